"""One run of a sweep: ``tools/sweep_launch.py --sweep-cfg S --run-job I`` (:func:`run_job`), what
the local executor and every SLURM task run.

It trains ``cfgs/I.yaml`` with ``OUT_DIR runs/I`` through the code path of
``tools/train_metric.py`` (:func:`metric.config.load_cfg`, :func:`metric.engine.trainer.train_model`),
in a child forked from this process (the modules are imported once), so that a crash of any
kind — an exception, a segfault, the OOM killer — is seen and recorded by this process. The
child's output goes to ``runs/I/job.log``. ``TRAIN.AUTO_RESUME`` is on: a run interrupted earlier
resumes from its newest checkpoint.

``runs/I/sweep_status.json`` (written atomically) says ``running`` while it trains, then
``done`` (exit status 0 and the stats' ``final`` record written), ``failed`` (with the return
code and the last line of the log; counted in ``failures``) or ``interrupted`` (a signal:
SIGTERM, SIGINT, SIGHUP or SIGUSR1 — a SLURM requeue, a killed launcher — is passed on to the
training and the run stays pending, not failed). A run already done exits 0 at once; a run that
another process is running (``runs/I/.sweep_lock``) exits with status 75.

Environment honoured: ``SWEEP_NUM_THREADS`` (the run's ``NUM_THREADS`` and ``OMP_NUM_THREADS``),
``SWEEP_NUM_GPUS`` (its ``NUM_GPUS``; default ``LAUNCH.NUM_GPUS``); ``CUDA_VISIBLE_DEVICES`` as set
by the executor. With ``NUM_GPUS > 1`` the trainer spawns the processes itself, on a free port.
"""

import ctypes
import datetime
import os
import signal
import socket
import sys
import time
import traceback

from metric.config import load_cfg
from metric.engine.trainer import train_model
from metric.sweep import jobs as J
from metric.utils import io, lock
from metric.utils.cli import run_tool
from metric.utils.errors import ConfigError, OutputBusyError
from metric.utils.logger import StatsWriter, read_stats

EXIT_BUSY = 75
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def die_with_parent(sig=signal.SIGTERM):
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_from_file(argv):
    """``tools/train_metric.py``'s main: ``argv`` = [config file, KEY, VALUE, ...]."""
    train_model(load_cfg(argv[0], argv[1:]))


def run_job(c, job, environ=None, out=print):
    """Run job ``job`` of the sweep of config ``c``; returns the exit status (0: done). ``out``
    takes its progress lines (the tool's output, as :func:`metric.sweep.local.launch_local`'s)."""
    environ = os.environ if environ is None else environ
    root = J.open_sweep(c)
    n = J.num_jobs(root)
    if not 0 <= job < n:
        raise ConfigError(f"--run-job {job}: sweep {root} has jobs 0 to {n - 1}")
    rdir = J.run_dir(root, job)
    io.mkdirs(rdir)
    try:
        key = lock.acquire(os.path.join(rdir, ".sweep_lock"), f"job {job:06d} of sweep {c.NAME}", "let it finish")
    except OutputBusyError as err:
        sys.stderr.write(f"job {job:06d}: {err}\n")
        return EXIT_BUSY
    try:
        return _run_locked(c, root, job, environ, out)
    finally:
        lock.release(key)


def _overrides(c, rdir, environ):
    threads = environ.get("SWEEP_NUM_THREADS", "")
    gpus = int(environ.get("SWEEP_NUM_GPUS") or c.LAUNCH.NUM_GPUS)
    opts = ["OUT_DIR", rdir, "NUM_GPUS", str(gpus), "TRAIN.AUTO_RESUME", "True"]
    if threads:
        opts += ["NUM_THREADS", threads]
    if gpus > 1:
        opts += ["PORT", str(_free_port())]
    return opts, threads


def _run_locked(c, root, job, environ, out):
    rdir, log = J.run_dir(root, job), J.log_path(root, job)
    status = J.read_status(root, job)
    if status["state"] == "done":
        out(f"job {job:06d}: already done")
        return 0
    opts, threads = _overrides(c, rdir, environ)
    status.update(
        state="running",
        attempts=status["attempts"] + 1,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=_now(),
        start=time.time(),
        end=None,
        returncode=None,
        last_line="",
    )
    J.write_status(root, job, status)
    cfg_file = J.cfg_path(root, job)
    with io.write_errors(log, "job log"), open(log, "ab") as f:
        f.write(
            f"=== attempt {status['attempts']} of job {job:06d} on {status['host']} at {status['started_at']}: "
            f"{cfg_file} {' '.join(opts)}\n".encode()
        )
        offset = f.tell()
    out(f"job {job:06d}: attempt {status['attempts']}, log {log}")
    rc, interrupted, seconds = _train_in_child(cfg_file, opts, threads, log)
    line = J.last_line(log, offset)
    if rc < 0 and not interrupted:
        line = f"killed by {signal.Signals(-rc).name}; last output: {line}"
    finished = rc == 0 and _has_final(rdir)
    if rc == 0 and not finished:
        line = f"training exited 0 but {StatsWriter.FILE} has no final record"
    state = "done" if finished else ("interrupted" if interrupted else "failed")
    status.update(
        state=state,
        failures=status["failures"] + (state == "failed"),
        returncode=rc,
        last_line=line,
        end=time.time(),
        ended_at=_now(),
        train_seconds=seconds,
        total_seconds=status.get("total_seconds", 0.0) + seconds,
    )
    J.write_status(root, job, status)
    out(f"job {job:06d}: {state} (exit {rc}) in {seconds:.1f}s" + ("" if finished else f": {line}"))
    if finished:
        return 0
    return rc if rc > 0 else (128 - rc if rc < 0 else 1)


def _has_final(rdir):
    path = os.path.join(rdir, StatsWriter.FILE)
    return os.path.isfile(path) and bool(read_stats(path, "final"))


def child_main(log, fn, prepare=None):
    """The body of a forked child; never returns. ``prepare()`` runs first (in the child), then
    file descriptors 1 and 2 go to ``log`` (appended) and the process exits with ``fn()``'s status
    (1 when it raised: its traceback goes to the log). The child is sent SIGTERM when its parent
    ends."""
    code = 1
    try:
        die_with_parent(signal.SIGTERM)
        if prepare is not None:
            prepare()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's own streams)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        code = fn()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _train_in_child(cfg_file, opts, threads, log):
    """Train in a forked child whose output goes to ``log``; returns ``(return code, interrupted,
    seconds)`` (a negative code: the signal that ended it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: never returns

        def reset_signals():
            for sig in FORWARDED:
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)

        def train():
            if threads:
                os.environ["OMP_NUM_THREADS"] = threads
            return run_tool(train_from_file, [cfg_file, *opts])

        child_main(log, train, prepare=reset_signals)
    caught = []

    def forward(sig, _frame):
        caught.append(sig)
        try:
            os.kill(pid, signal.SIGTERM if sig == signal.SIGUSR1 else sig)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        _, wait_status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return os.waitstatus_to_exitcode(wait_status), bool(caught), time.time() - t0
