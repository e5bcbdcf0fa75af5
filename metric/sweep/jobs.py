"""The files of a sweep and the state of its runs.

``ROOT_DIR/NAME`` holds::

    sweep_cfg.yaml           the sweep config setup was run with
    setup.json               what setup sampled: per job its config, seed, sampled values, FLOPs, params
    cfgs/000000.yaml ...     one complete training config per run (job)
    runs/000000/             the run's OUT_DIR (log.txt, stats.jsonl, checkpoints/) and
        sweep_status.json    its state: running | interrupted | done | failed, attempts, failures, ...
        job.log              everything the run printed, one header line per attempt
    sweep.jsonl, analysis.html   written by sweep_collect / sweep_analyze

A run's status file is written atomically by the process that runs it
(:func:`metric.sweep.run.run_job`); readers never see half of one.
"""

import os
import socket

from metric.sweep.config import load_sweep_cfg, setup_part, sweep_dir
from metric.utils import io
from metric.utils.errors import ConfigError, DataError

STATUS_FILE = "sweep_status.json"
JOB_LOG = "job.log"
SETUP_FILE = "setup.json"
SWEEP_CFG_FILE = "sweep_cfg.yaml"
STATES = ("running", "interrupted", "done", "failed")


def cfg_path(root, job):
    return os.path.join(root, "cfgs", f"{job:06d}.yaml")


def run_dir(root, job):
    return os.path.join(root, "runs", f"{job:06d}")


def status_path(root, job):
    return os.path.join(run_dir(root, job), STATUS_FILE)


def log_path(root, job):
    return os.path.join(run_dir(root, job), JOB_LOG)


def read_setup(root):
    """The setup summary of sweep folder ``root`` (a DataError if setup has not been run)."""
    path = os.path.join(root, SETUP_FILE)
    if not io.isfile(path):
        raise DataError(f"{root} has no {SETUP_FILE}: run tools/sweep_setup.py --sweep-cfg ... first")
    try:
        setup = io.read_json(path)
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); run tools/sweep_setup.py again") from None
    if not isinstance(setup, dict) or not isinstance(setup.get("jobs"), list):
        raise DataError(f"{path} has no job list; run tools/sweep_setup.py again")
    return setup


def num_jobs(root):
    return len(read_setup(root)["jobs"])


def open_sweep(c):
    """The folder of the sweep of config ``c`` after checking that setup wrote it for this sweep
    (a ConfigError when the folder holds another sweep or none)."""
    root = sweep_dir(c)
    saved = os.path.join(root, SWEEP_CFG_FILE)
    if not io.isfile(saved):
        raise ConfigError(f"sweep {c.NAME} is not set up ({saved} is missing); run tools/sweep_setup.py first")
    if setup_part(load_sweep_cfg(saved)) != setup_part(c):
        raise ConfigError(
            f"{root} holds another sweep (its {SWEEP_CFG_FILE} has other NAME/SETUP values); "
            "choose another NAME or ROOT_DIR"
        )
    read_setup(root)
    return root


def read_status(root, job):
    """The status dict of a run (``{"state": "pending", "attempts": 0, "failures": 0}`` before its
    first start). A status file that cannot be read is a DataError naming it."""
    path = status_path(root, job)
    if not io.isfile(path):
        return {"state": "pending", "attempts": 0, "failures": 0}
    try:
        status = io.read_json(path)
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); remove it to run job {job} again") from None
    if not isinstance(status, dict) or status.get("state") not in STATES:
        raise DataError(f"{path}: no known state; remove it to run job {job} again")
    status.setdefault("attempts", 0)
    status.setdefault("failures", 0)
    return status


def write_status(root, job, status):
    io.write_json_atomic(status_path(root, job), status, what="run status")


def live_state(status):
    """The state of a run for a reader: ``running`` whose process is gone (on this host) reads as
    ``interrupted``."""
    state = status["state"]
    if state == "running" and status.get("host") == socket.gethostname() and status.get("pid"):
        if not io.pid_running(int(status["pid"])):
            return "interrupted"
    return state


def pending_jobs(root, max_retry):
    """The jobs of sweep folder ``root`` still to run: not done, and failed fewer than
    ``max_retry`` times (interrupted runs are pending: they resume from their checkpoint)."""
    out = []
    for job in range(num_jobs(root)):
        status = read_status(root, job)
        if status["state"] != "done" and status["failures"] < max_retry:
            out.append(job)
    return out


def given_up_jobs(root, max_retry):
    """``[(job, status)]`` of the runs that failed ``max_retry`` times (not launched again)."""
    out = []
    for job in range(num_jobs(root)):
        status = read_status(root, job)
        if status["state"] != "done" and status["failures"] >= max_retry:
            out.append((job, status))
    return out


def last_line(path, start=0):
    """The last non-empty line of text file ``path`` from byte ``start`` on ("" if none)."""
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(start, end - 65536))
        tail = f.read().decode("utf-8", "replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""
