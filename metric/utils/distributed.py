"""Process-group setup and small collective helpers.

Three ways to run: a single process; ``torchrun --nproc_per_node=N`` (multi-node
through torchrun's own flags), detected from the ``WORLD_SIZE`` environment
variable; or ``NUM_GPUS > 1`` without torchrun, in which case :func:`launch`
spawns that many processes itself, meeting at ``HOST:PORT``. The backend is
nccl on CUDA and gloo on CPU (``DIST_BACKEND`` overrides).

Never hung: the process group has a timeout (``DIST.TIMEOUT_S``), and a collective of the
helpers below (or code run under :func:`collective`) whose peer died, was stopped or is stuck
ends with one :class:`~metric.utils.errors.DistributedError` line naming the rank and the
collective, instead of waiting forever or a gloo traceback. A rendezvous that cannot be reached
(a hand-launched worker with a wrong ``MASTER_ADDR``/``MASTER_PORT``) is one line too. Processes
spawned by :func:`launch` die with their parent; their error lines come back to the parent,
which reports one (the first process that failed).

Limits: with nccl (CUDA) the timeout is enforced by torch's NCCL watchdog, which aborts the
stuck process with messages of its own (the launcher then reports which process was killed by
which signal). Under torchrun the failing rank prints its line and torchrun, which stops the
other ranks, adds its own summary of the failed workers. That summary calls the first rank to
exit the "root cause", which after a timeout is the rank that waited, not the one that stopped:
a process that calls :func:`watch_peers` (the sharded search tools) names the stopped rank in its
timeout line, from heartbeats in the rendezvous store.
"""

import contextlib
import ctypes
import datetime
import functools
import json
import logging
import multiprocessing.connection as mp_connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metric.utils.errors as errors
from metric.utils.errors import ConfigError, DistributedError, MetricError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def under_torchrun():
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _backend(cfg, device):
    if cfg.DIST_BACKEND != "auto":
        return cfg.DIST_BACKEND
    return "nccl" if device.type == "cuda" else "gloo"


def init_process(cfg):
    """Join the process group (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local_rank} on this node has no GPU ({torch.cuda.device_count()} visible); "
                "lower NUM_GPUS / --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        _join_group(_backend(cfg, device), device, rank, world, cfg.DIST.TIMEOUT_S)
    return DistInfo(rank, world, local_rank, device)


# --- timeouts and dead peers ------------------------------------------------------------------

# The longest collective timeout, in seconds (about 116 days): torch's process group overflows
# or hangs on far larger values (DIST.TIMEOUT_S and the search tools' --timeout both stop here).
MAX_TIMEOUT_S = 10_000_000
_timeout_s = None  # DIST.TIMEOUT_S of the group this process joined (for the messages)
_joined = False  # this process joined a group of several processes (see end_process)


@contextlib.contextmanager
def _native_stderr_held():
    """Hold back what native code writes to stderr in the block (c10d's retry warnings and C++
    stack traces of a failing rendezvous); it is written out after a block that succeeds and
    dropped after one that fails (the error says what happened, in one line)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            ok = True
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            if ok and text:
                sys.stderr.write(text.decode("utf-8", "replace"))
            elif text:
                logger.debug("rendezvous output:\n%s", text.decode("utf-8", "replace")[-4000:])


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _join_group(backend, device, rank, world, timeout_s):
    global _timeout_s, _joined
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    try:
        with _native_stderr_held():
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
    except (RuntimeError, ValueError) as err:  # DistNetworkError, DistStoreError, a missing variable
        text = str(err).lower()
        if "address already in use" in text or "eaddrinuse" in text:
            raise DistributedError(
                f"rank {rank}: cannot host the process group at {addr}:{port}: the port is in use "
                "(another run?); choose another PORT (MASTER_PORT under torchrun)"
            ) from None
        raise DistributedError(
            f"rank {rank}: cannot join the process group at {addr}:{port} within {timeout_s} s "
            f"({_first_line(err)}); check MASTER_ADDR and MASTER_PORT (HOST and PORT when NUM_GPUS spawns the "
            f"processes) and that all {world} processes were started"
        ) from None
    _timeout_s = timeout_s
    _joined = True


_TIMEOUT_MARKS = ("timed out", "timeout")
_LOST_MARKS = (
    "connection closed",
    "connection reset",
    "closed by peer",
    "broken pipe",
    "connection refused",
    "socket closed",
    "end of file",
)


def peer_failure(err):
    """``"timeout"`` or ``"lost"`` if ``err`` is a collective's failure because a peer is stuck
    or gone (gloo/c10d report both as RuntimeError, or its subclass DistBackendError), else None."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err).lower()
    if any(m in text for m in _TIMEOUT_MARKS):
        return "timeout"
    if any(m in text for m in _LOST_MARKS):
        return "lost"
    return None


def looks_distributed(err):
    """Whether ``err`` comes from torch.distributed (for catch-alls around code with collectives
    inside, such as DistributedDataParallel's gradient all-reduce)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(m in text for m in ("gloo", "nccl", "c10d"))


def collective_error(name, err):
    """The one-line :class:`DistributedError` for collective ``name`` that failed with ``err``,
    or None when ``err`` is not a peer failure. After a timeout, when this process watches its
    peers (:func:`watch_peers`), the line names the ranks that gave no sign of life (stopped or
    dead); a closed connection is reported at once (a launcher stops this process right away)."""
    kind = peer_failure(err)
    if kind is None:
        return None
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if kind == "lost":
        # under torchrun at once: it stops this process as soon as it sees the dead one (and names it)
        quiet = None if os.environ.get("TORCHELASTIC_RUN_ID") else quiet_ranks()
        if quiet:
            who = f"rank {quiet[0]}" if len(quiet) == 1 else "ranks " + ", ".join(map(str, quiet))
            return DistributedError(
                f"rank {rank}: {name} failed: a peer process closed its connection, and {who} gave no sign of "
                f"life for {_HEARTBEAT_WAIT_S:g} s (it died or was killed); see its output"
            )
        return DistributedError(
            f"rank {rank}: {name} failed: a peer process closed its connection (it died or was killed); "
            "see the other processes' output"
        )
    after = f"{_timeout_s:g} s" if _timeout_s is not None else "the process group's timeout"
    quiet = quiet_ranks()  # torchrun sees nothing wrong with a stopped or stuck process: name it here
    if quiet:
        who = f"rank {quiet[0]}" if len(quiet) == 1 else "ranks " + ", ".join(map(str, quiet))
        culprit = f"{who} gave no sign of life for {_HEARTBEAT_WAIT_S:g} s (stopped or dead); see its output"
    elif quiet is not None:
        culprit = "every other rank is alive, so one is slow or stuck in its own work; see their output"
    else:
        return DistributedError(
            f"rank {rank}: {name} timed out after {after} (a peer process died or is stuck); see the other "
            f"processes' output, or raise {_timeout_option} if it is only slow"
        )
    return DistributedError(
        f"rank {rank}: {name} timed out after {after}: {culprit}, or raise {_timeout_option} if it is only slow"
    )


# --- naming the peer that failed --------------------------------------------------------------

_timeout_option = "DIST.TIMEOUT_S"  # what the timeout message tells the user to raise
_HEARTBEAT_S = 0.25  # a watched process counts up its key in the rendezvous store this often
_HEARTBEAT_WAIT_S = 1.5  # after a failure, a rank whose count did not move for this long is named
_heartbeat = None  # (store client, stop event, thread) while this process is watched
_store_lock = threading.Lock()  # one request at a time on the store client (beats and reads)


def _heartbeat_key(r):
    return f"pymetric/alive/{r}"


def _store_client():
    """A client of the process group's rendezvous store (torchrun's agent store, or rank 0's
    store for a hand-launched group), with a short timeout of its own."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=5),
        wait_for_workers=False,
    )


def watch_peers(timeout_option=None):
    """Let this rank's collective errors name the rank that failed: a daemon thread counts up
    ``pymetric/alive/<rank>`` in the rendezvous store every :data:`_HEARTBEAT_S`; a rank whose
    collective fails reads every rank's count twice, :data:`_HEARTBEAT_WAIT_S` apart, and names
    those that did not move (a stopped process's threads stop, a dead one's are gone; clocks of
    other nodes play no part). ``timeout_option`` is what the timeout message tells the user to
    raise (``--timeout`` for the search tools). Ended by :func:`cleanup`; without a store (not
    under torchrun's environment) the messages stay as they were."""
    global _heartbeat, _timeout_option
    if timeout_option:
        _timeout_option = timeout_option
    if _heartbeat is not None or world_size() < 2:
        return
    try:
        store = _store_client()
        store.add(_heartbeat_key(rank()), 1)
    except (RuntimeError, KeyError, ValueError) as err:  # no reachable store: nothing named, nothing broken
        logger.debug("no heartbeat: %s", err)
        return
    stop = threading.Event()
    me = rank()

    def beat():
        while not stop.wait(_HEARTBEAT_S):
            try:
                with _store_lock:
                    store.add(_heartbeat_key(me), 1)
            except RuntimeError:
                return

    thread = threading.Thread(target=beat, name="pymetric-heartbeat", daemon=True)
    thread.start()
    _heartbeat = (store, stop, thread)


def _stop_heartbeat():
    global _heartbeat, _timeout_option
    _timeout_option = "DIST.TIMEOUT_S"
    if _heartbeat is not None:
        _heartbeat[1].set()
        _heartbeat[2].join(timeout=2 * _HEARTBEAT_S + 5)
        _heartbeat = None


def quiet_ranks():
    """The other ranks whose heartbeat did not move in :data:`_HEARTBEAT_WAIT_S` (sorted), or None
    when this process is not watched or the store cannot be read (its host is gone)."""
    if _heartbeat is None:
        return None
    store, me = _heartbeat[0], rank()
    try:
        world = world_size()
        with _store_lock:
            before = [store.add(_heartbeat_key(r), 0) for r in range(world)]
        time.sleep(_HEARTBEAT_WAIT_S)
        with _store_lock:
            after = [store.add(_heartbeat_key(r), 0) for r in range(world)]
    except RuntimeError:
        return None
    return [r for r in range(world) if r != me and after[r] == before[r]]


@contextlib.contextmanager
def collective(name):
    """Run the block's collectives; a peer failure becomes a one-line :class:`DistributedError`
    naming this rank and ``name``."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:
        mapped = collective_error(name, err) if looks_distributed(err) else None
        if mapped is None:
            raise
        raise mapped from None


def _caller_name(depth):
    code = sys._getframe(depth + 1).f_code
    return getattr(code, "co_qualname", code.co_name)


def _guarded(op):
    """Decorate a collective helper: a peer failure names ``op`` and the function that called it."""

    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DistributedError:
                raise
            except RuntimeError as err:
                mapped = collective_error(f"{op} (in {_caller_name(1)})", err)
                if mapped is None:
                    raise
                raise mapped from None

        return guarded

    return wrap


def cleanup(wait=True):
    """Leave the process group. With ``wait`` (the normal end) every rank first waits for the
    others: tearing gloo down while a peer still talks to it can abort the process. After an
    error, ``wait=False`` leaves at once (the launcher stops the other ranks)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                with collective("the final barrier"):
                    dist.barrier()
        finally:
            _stop_heartbeat()
            dist.destroy_process_group()
    _stop_heartbeat()


# --- processes spawned by launch() ----------------------------------------------------------

# After the first spawned process fails, the others get this long to end by themselves (they
# see their peer gone), then SIGTERM, then as long again before SIGKILL (a stopped process).
_SPAWN_GRACE_S = 3.0


def check_processes(cfg):
    """Refuse a number of processes this machine cannot run, in one line (:class:`ConfigError`):
    more than the visible GPUs, nccl without CUDA, and without CUDA more CPU processes than CPU
    cores unless ``DIST.ALLOW_OVERSUBSCRIBE``. Counts ``NUM_GPUS``, or under torchrun this node's
    ``LOCAL_WORLD_SIZE``."""
    if under_torchrun():
        n, what = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), "torchrun --nproc_per_node"
    else:
        n, what = cfg.NUM_GPUS, "NUM_GPUS"
    if n <= 1:
        return n
    if torch.cuda.is_available():
        if not under_torchrun() and n > torch.cuda.device_count():
            raise ConfigError(f"NUM_GPUS={n} but only {torch.cuda.device_count()} GPUs are visible; lower NUM_GPUS")
        return n
    if cfg.DIST_BACKEND == "nccl":
        raise ConfigError("DIST_BACKEND='nccl' needs CUDA, which this machine does not have; use auto or gloo")
    cores = cpu_cores()
    if n > cores and not cfg.DIST.ALLOW_OVERSUBSCRIBE:
        raise ConfigError(
            f"{what}={n} without CUDA runs {n} CPU processes, but this machine has {cores} CPU cores; "
            "lower it, or set DIST.ALLOW_OVERSUBSCRIBE True to run them anyway"
        )
    return n


def cpu_cores():
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_processes():
    """Processes of this job on this machine: ``LOCAL_WORLD_SIZE`` (torchrun and the processes
    :func:`launch` spawns set it), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any set_num_threads of ours


def _omp_num_threads():
    """``OMP_NUM_THREADS`` when the environment sets it to a positive integer, else None."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def auto_num_threads(cores=None, processes=None):
    """``NUM_THREADS`` 0: ``OMP_NUM_THREADS`` when the environment sets it (torchrun sets 1 for
    several processes unless it is set), else the CPU cores divided by the local processes, at
    least 1."""
    omp = _omp_num_threads()
    if omp is not None and cores is None and processes is None:
        return omp
    # The CPUs this process may use, but never more than torch's own default (physical cores),
    # which the CPU count (logical CPUs with SMT) can exceed.
    cores = min(cpu_cores(), _TORCH_DEFAULT_THREADS) if cores is None else cores
    processes = local_processes() if processes is None else processes
    return max(1, cores // max(1, processes))


def set_num_threads(num_threads):
    """Set torch's intra-op threads to ``num_threads`` (``NUM_THREADS``; 0 = :func:`auto_num_threads`);
    returns the number set."""
    n = int(num_threads) or auto_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _die_with_parent(parent_pid):
    """Have the kernel kill this spawned process when its parent ends (Linux), so a killed
    launcher leaves no orphan writing to OUT_DIR after its lock is gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent ended before the call above
        os._exit(1)


def _error_file(error_dir, rank):
    return os.path.join(error_dir, f"rank{rank}.json")


def _spawned_worker(local_rank, fn, cfg, world, error_dir, parent_pid):
    _die_with_parent(parent_pid)
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    try:
        fn(cfg)
    except MetricError as err:
        # The child's one-line message goes to the parent, which reports one for all processes.
        tmp = _error_file(error_dir, local_rank) + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"type": type(err).__name__, "message": str(err)}, f)
            os.replace(tmp, _error_file(error_dir, local_rank))
        except OSError:  # the parent is gone or going (its folder was removed): say it here
            sys.stderr.write(f"error (rank {local_rank}): {err}\n")
        sys.exit(2)
    end_process(0)


def joined_a_group():
    """Whether this process joined a process group of several processes (it may have left it)."""
    return _joined


def end_process(status):
    """End a process that joined a process group and has left it: flush what it wrote and exit
    with ``status`` without interpreter finalization. The native destructors that finalization
    runs (gloo's worker and transport threads, still referenced from Python objects such as a
    DistributedDataParallel wrapper) have aborted a process whose work was done (SIGABRT,
    "terminate called without an active exception"), and its launcher then reported the run as
    failed. Used by spawned processes and by the tools' exit under torchrun."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _child_error(error_dir, err):
    """The error to raise for spawned process ``err.error_index`` that ended badly: its own
    (its class and one line) when it left one, else how it ended plus another process's line."""

    def read(rank):
        try:
            with open(_error_file(error_dir, rank), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    own = read(err.error_index)
    if own is not None:
        cls = getattr(errors, own.get("type", ""), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, MetricError) else MetricError
        return cls(own["message"])
    how = (
        f"was killed by signal {err.signal_name}"
        if getattr(err, "signal_name", None)
        else f"exited with status {err.exit_code}"
    )
    others = sorted(n for n in os.listdir(error_dir) if n.endswith(".json"))
    other = read(int(others[0][len("rank") : -len(".json")])) if others else None
    tail = f"; then {other['message']}" if other else ""
    return DistributedError(f"training process {err.error_index} {how} without an error message{tail}")


def _wait_for(context):
    """Wait for the spawned processes. Once one fails, wake any that is stopped (SIGSTOP), so
    that it sees its peer gone or gets the SIGTERM that follows; torch's join then gives the
    others the grace period, stops them and raises the first failure."""
    waiting = {p.sentinel: p for p in context.processes}
    while waiting:
        for sentinel in mp_connection.wait(list(waiting)):
            proc = waiting.pop(sentinel)
            proc.join()
            if proc.exitcode != 0:
                for other in context.processes:
                    if other.is_alive():
                        with contextlib.suppress(OSError):
                            os.kill(other.pid, signal.SIGCONT)
                waiting = {}
                break
    while not context.join(grace_period=_SPAWN_GRACE_S):
        pass


def launch(fn, cfg):
    """Run ``fn(cfg)`` in this process, or in ``NUM_GPUS`` spawned processes when that is > 1
    and the process was not started by torchrun. A spawned process's error comes back here as
    one error (the first process that failed); the others are stopped."""
    if cfg.NUM_GPUS <= 1 or under_torchrun():
        return fn(cfg)
    n = check_processes(cfg)
    if not torch.cuda.is_available():
        logger.info("no CUDA: running %d CPU processes with gloo", n)
    os.environ["MASTER_ADDR"] = cfg.HOST
    os.environ["MASTER_PORT"] = str(cfg.PORT)
    error_dir = tempfile.mkdtemp(prefix="pymetric-errors-")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    try:
        context = mp.start_processes(
            _spawned_worker, args=(fn, cfg, n, error_dir, os.getpid()), nprocs=n, join=False, start_method="spawn"
        )
        spawn_log.setLevel(logging.ERROR)  # its "Terminating process N via signal SIGTERM" lines
        _wait_for(context)
    except mp.ProcessExitedException as err:
        raise _child_error(error_dir, err) from None
    finally:
        spawn_log.setLevel(level)
        shutil.rmtree(error_dir, ignore_errors=True)
    return None


# --- collectives (no-ops in a single process) ---------------------------------


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device():
    """The device collectives run on: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def comm_device():
    """The device the tensors of a collective must be on: the current GPU for nccl, else the CPU."""
    if world_size() > 1:
        return _comm_device()
    return torch.device("cpu")


def _all_reduce_sum(tensor):
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


@_guarded("all_reduce")
def all_reduce_sum(tensor):
    """Sum over ranks; the result is on the device ``tensor`` came from."""
    if world_size() == 1:
        return tensor
    return _all_reduce_sum(tensor)


@_guarded("all_reduce")
def all_reduce_mean(tensor):
    if world_size() == 1:
        return tensor
    return _all_reduce_sum(tensor) / world_size()


@_guarded("all_reduce of the buffers")
def average_buffers(module):
    """Average floating-point buffers (BN running statistics) over ranks, so every rank holds
    the same model for evaluation and checkpoints (DDP keeps parameters, not buffers, in sync)."""
    if world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size())


@_guarded("all_gather_object")
def all_gather_objects(obj):
    """A list with every rank's ``obj`` (rank order)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@_guarded("barrier")
def barrier():
    if world_size() > 1:
        dist.barrier()


# --- model-parallel collectives (the Partial FC classifier) -----------------------------------


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_padded(x):
    """Every rank's ``x`` (same trailing shape, any number of rows), concatenated in rank
    order, and the list of row counts."""
    sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s.item()) for s in all_sizes]
    most = max(counts)
    padded = x.new_zeros((most,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), counts


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums the gradient over the ranks and returns each rank the rows
    it contributed, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, grad_scale):
        out, counts = _gather_padded(x.detach())
        ctx.counts, ctx.grad_scale, ctx.rank = counts, grad_scale, rank()
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        with collective("the all-reduce of the gathered embeddings' gradient (Partial FC backward)"):
            dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]] * ctx.grad_scale, None


@_guarded("all_gather")
def all_gather_rows(x, grad_scale=None):
    """The rows of every rank's ``x`` concatenated in rank order (the ranks may hold different
    numbers of rows), differentiable: the gradient a rank gets back for its rows is the sum over
    the ranks of the gradients of those rows, times ``grad_scale`` (default: the number of
    ranks, which undoes DistributedDataParallel's averaging of the gradients of the layers that
    made ``x``: every rank's loss already counts every sample). A single process returns ``x``."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x, float(world_size() if grad_scale is None else grad_scale))


@_guarded("all_reduce")
def all_reduce_max(tensor):
    """Element-wise maximum over ranks (no gradient); the result is on ``tensor``'s device."""
    if world_size() == 1:
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(tensor.device)


@_guarded("send/recv of a parameter shard")
def gather_rows_to_master(shard, total_rows, start_row, chunk_rows=1 << 16):
    """Rank 0 gets the [total_rows, ...] CPU tensor whose rows ``start_row .. start_row +
    len(shard) - 1`` are each rank's ``shard`` (the shards must cover it); the other ranks get
    None. The rows travel in chunks of ``chunk_rows`` straight into the one full tensor, so rank 0
    holds the full tensor and its own shard, never two full copies."""
    shard = shard.detach()
    if world_size() == 1:
        return shard.cpu().clone()
    device = _comm_device()
    span = torch.tensor([start_row, shard.shape[0]], dtype=torch.long, device=device)
    spans = [torch.zeros_like(span) for _ in range(world_size())]
    dist.all_gather(spans, span)
    spans = [(int(s[0]), int(s[1])) for s in spans]
    me = rank()
    full = None
    if me == 0:
        full = torch.empty((total_rows,) + tuple(shard.shape[1:]), dtype=shard.dtype)
        full[start_row : start_row + shard.shape[0]] = shard.cpu()
    for src, (begin, rows) in enumerate(spans):
        if src == 0:
            continue
        for i in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - i)
            if me == src:
                dist.send(shard[i : i + n].contiguous().to(device), dst=0)
            elif me == 0:
                buf = torch.empty((n,) + tuple(shard.shape[1:]), dtype=shard.dtype, device=device)
                dist.recv(buf, src=src)
                full[begin + i : begin + i + n] = buf.cpu()
    return full


@_guarded("all_gather")
def all_gather_tensor(x):
    """Every rank's ``x`` (any number of rows) concatenated in rank order, without gradient."""
    if world_size() == 1:
        return x
    return _gather_padded(x.detach())[0]
