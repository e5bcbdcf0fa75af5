"""The local executor (``tools/sweep_launch.py``, the default): the runs of a sweep on this machine.

As many runs at once as the GPUs allow (``LAUNCH.NUM_GPUS`` each, its own
``CUDA_VISIBLE_DEVICES``) or, without GPUs, the CPU cores (each run gets ``cores / runs at
once`` threads: ``SWEEP_NUM_THREADS``); ``LAUNCH.PARALLEL_JOBS`` caps both. Each run is
:func:`metric.sweep.run.run_job` (what ``tools/sweep_launch.py --run-job I`` runs) in a child
forked from the launcher, which has imported everything already, so a run costs no interpreter
start-up; its output goes to ``runs/I/job.log``. It ends when the launcher ends, however that
ends (its training is then ``interrupted`` and resumes at the next launch). A line is printed
when a run starts and ends, and a bar of the whole sweep after each end; a failed run is
started again until it has failed ``LAUNCH.MAX_RETRY`` times, then it is reported with the last
line of its log. The sweep folder is locked while the launcher runs.
"""

import collections
import os
import shutil
import signal
import subprocess
import sys
import time

from metric.sweep import jobs as J
from metric.sweep.run import EXIT_BUSY, child_main, run_job
from metric.utils import lock
from metric.utils.cli import run_tool
from metric.utils.errors import ConfigError
from metric.utils.logger import format_seconds

POLL_SECONDS = 0.05


def _cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _visible_gpus():
    """The CUDA device names this launcher may hand out: CUDA_VISIBLE_DEVICES when set, else one
    per GPU that ``nvidia-smi -L`` lists (the launcher never initializes CUDA: it forks the runs)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        names = [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return [] if names[:1] == ["-1"] else names
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(x for x in listing.splitlines() if x.startswith("GPU "))]


class _Forked:
    """``fn()`` (which returns an exit status) run in a forked child whose output (file
    descriptors 1 and 2) goes to ``log`` and whose environment gets ``env``; the child is sent
    SIGTERM when this process ends. ``poll`` / ``terminate`` / ``wait`` as a ``Popen``'s."""

    def __init__(self, fn, log, env):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode = None
        self.pid = os.fork()
        if self.pid:
            return

        def close_inherited():
            # Nothing of the launcher's stays open here: its lock of the sweep folder (an flock,
            # held while any copy of the descriptor is open) must end with the launcher.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))

        def run():
            os.environ.update(env)
            return run_tool(lambda _argv: fn(), [])

        child_main(log, run, prepare=close_inherited)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def plan_slots(c, n_jobs, gpus=None, cores=None):
    """``(slots, threads)``: one ``CUDA_VISIBLE_DEVICES`` value (None on CPU) per run that may run
    at once, and the CPU threads of each (``SWEEP_NUM_THREADS`` when the environment sets it,
    else the cores split between the runs at once)."""
    gpus = _visible_gpus() if gpus is None else gpus
    cores = _cpu_cores() if cores is None else cores
    per = c.LAUNCH.NUM_GPUS
    if gpus:
        if len(gpus) < per:
            raise ConfigError(f"LAUNCH.NUM_GPUS={per} but this machine has {len(gpus)} GPUs; lower it")
        slots = [",".join(gpus[i * per : (i + 1) * per]) for i in range(len(gpus) // per)]
    else:
        slots = [None] * max(1, cores // per)
    if c.LAUNCH.PARALLEL_JOBS:
        slots = slots[: c.LAUNCH.PARALLEL_JOBS]
    slots = slots[: max(1, n_jobs)]
    given = os.environ.get("SWEEP_NUM_THREADS", "")
    if given and not (given.isdigit() and int(given) > 0):
        raise ConfigError(f"SWEEP_NUM_THREADS={given!r} is not allowed: expected a positive integer (or unset)")
    return slots, int(given) if given else max(1, cores // (len(slots) * per))


def _bar(done, failed, running, total, width=24):
    filled = int(width * done / max(1, total))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total} done, {running} running, {failed} failed"


def _describe(entry):
    values = " ".join(f"{k}={v}" for k, v in entry["values"].items())
    return f"{values} seed {entry['seed']}"


class LocalLauncher:
    def __init__(self, c, jobs, out=print):
        self.c, self.out = c, out
        self.root = J.open_sweep(c)
        self.setup = J.read_setup(self.root)
        self.jobs = list(jobs)
        self.slots, self.threads = plan_slots(c, len(self.jobs))
        self.timing = []  # per finished run: (seconds until run_job began, seconds not spent training after that)

    def _start(self, job, slot):
        env = {"SWEEP_NUM_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads)}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        return _Forked(lambda: run_job(self.c, job), J.log_path(self.root, job), env)

    def run(self):
        """Run the jobs; returns ``[(job, why)]`` of those that did not finish (failed MAX_RETRY
        times, interrupted on their own, or run by another process)."""
        c, out, total = self.c, self.out, len(self.jobs)
        where = "GPUs " + " | ".join(self.slots) if self.slots[0] is not None else "CPU"
        out(f"sweep {c.NAME}: {total} runs to do, {len(self.slots)} at once on {where}, {self.threads} threads each")
        queue = collections.deque(self.jobs)
        running = {}  # slot index -> (proc, job, t0)
        done, gave_up, t_start = 0, [], time.time()
        entries = {e["job"]: e for e in self.setup["jobs"]}
        try:
            while queue or running:
                for i, slot in enumerate(self.slots):
                    if i in running or not queue:
                        continue
                    job = queue.popleft()
                    status = J.read_status(self.root, job)
                    os.makedirs(J.run_dir(self.root, job), exist_ok=True)
                    running[i] = (self._start(job, slot), job, time.time())
                    resume = " (resuming)" if status["state"] in ("running", "interrupted") else ""
                    out(f"start job {job:06d} attempt {status['attempts'] + 1}{resume}: {_describe(entries[job])}")
                ended = [i for i, (proc, _, _) in running.items() if proc.poll() is not None]
                if not ended:
                    time.sleep(POLL_SECONDS)
                    continue
                for i in ended:
                    proc, job, t0 = running.pop(i)
                    wall = time.time() - t0
                    status = J.read_status(self.root, job)
                    if proc.returncode == 0 and status["state"] == "done":
                        done += 1
                        self._time(status, t0, wall)
                        out(f"done  job {job:06d} in {wall:.1f}s")
                    elif status["state"] == "interrupted":  # stopped by a signal sent to the run alone
                        gave_up.append((job, f"interrupted: {status.get('last_line', '')}"))
                        out(f"interrupted job {job:06d} (exit {proc.returncode}): it resumes at the next launch")
                    elif proc.returncode == EXIT_BUSY:
                        gave_up.append((job, "being run by another process"))
                        out(f"busy  job {job:06d}: another process runs it (see {J.log_path(self.root, job)})")
                    else:
                        line = status.get("last_line") or J.last_line(J.log_path(self.root, job))
                        retry = status["failures"] < c.LAUNCH.MAX_RETRY and status["state"] == "failed"
                        out(
                            f"FAILED job {job:06d} (attempt {status['attempts']}, failure {status['failures']} of "
                            f"{c.LAUNCH.MAX_RETRY}, exit {proc.returncode}): {line}"
                            + ("; retrying" if retry else "; giving up")
                        )
                        if retry:
                            queue.append(job)
                        else:
                            gave_up.append((job, line))
                    elapsed = format_seconds(time.time() - t_start)
                    out(f"{_bar(done, len(gave_up), len(running), total)}  elapsed {elapsed}")
        finally:
            for proc, _, _ in running.values():  # interrupted: the runs stop and resume next time
                proc.terminate()
            for proc, _, _ in running.values():
                proc.wait()
        out(f"sweep {c.NAME}: {done} of {total} runs done in {format_seconds(time.time() - t_start)}")
        overhead = self.overhead()
        if overhead:
            out(
                f"launcher overhead per run: {overhead['startup'] + overhead['bookkeeping']:.2f}s "
                f"({overhead['startup']:.2f}s until the run started, {overhead['bookkeeping']:.2f}s after its training)"
            )
        for job, line in gave_up:
            out(f"not done: job {job:06d}: {line}  (log {J.log_path(self.root, job)})")
        return gave_up

    def _time(self, status, t0, wall):
        if status.get("start") and status.get("end") and status.get("train_seconds") is not None:
            startup = max(0.0, status["start"] - t0)
            self.timing.append((startup, max(0.0, wall - startup - status["train_seconds"])))

    def overhead(self):
        """Mean seconds per finished run: ``startup`` (process start until run_job began) and
        ``bookkeeping`` (everything else the launcher and run_job add to the training)."""
        if not self.timing:
            return None
        n = len(self.timing)
        return {"startup": sum(t[0] for t in self.timing) / n, "bookkeeping": sum(t[1] for t in self.timing) / n}


def launch_local(c, jobs, out=print):
    """Run ``jobs`` of the sweep of ``c`` here, holding the sweep folder's lock; returns the
    :class:`LocalLauncher` (``run()`` already called; its result in ``.gave_up``)."""
    root = J.open_sweep(c)
    with lock.folder_lock(root, f"sweep {root}", "stop the launcher that runs it (its runs resume at the next launch)"):
        launcher = LocalLauncher(c, jobs, out)
        launcher.gave_up = launcher.run()
    return launcher
