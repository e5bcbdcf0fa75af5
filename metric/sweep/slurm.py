"""The SLURM executor (``tools/sweep_launch.py --executor slurm``): a sweep's runs as one job array.

:func:`launch_slurm` writes an sbatch script into ``ROOT/NAME/slurm/`` and submits it once:
``--array=<run indices>%LAUNCH.PARALLEL_JOBS``, so task ``SLURM_ARRAY_TASK_ID`` is run ``I`` and
runs ``tools/sweep_launch.py --sweep-cfg S --run-job I`` (:func:`metric.sweep.run.run_job`; with
``LAUNCH.NUM_GPUS > 1`` it spawns that many training processes on a free port, as torchrun would
on one node: one process must own the run's status file and lock). Each task:

- logs to ``slurm/logs/<array job id>_<run>.out`` (appended across its requeues), the run's own
  output to ``runs/I/job.log``;
- is signalled ``LAUNCH.SIGNAL_SECONDS`` before its time limit (``--signal=B:USR1@S``, delivered to
  the task's shell); the shell stops the run (recorded ``interrupted``) and requeues the task
  (``scontrol requeue JOB_TASK``, with ``--requeue``): the next start resumes from the run's last
  checkpoint (``TRAIN.AUTO_RESUME``). ``scancel --batch --signal=USR1 JOB_TASK`` does the same by hand.
  A start that wrote no checkpoint is not requeued (it would repeat forever): the task ends, saying so;
- when the run fails (exit status not 0, state ``failed``), requeues itself while the run has failed
  fewer than ``LAUNCH.MAX_RETRY`` times (``failures`` in ``runs/I/sweep_status.json``), then ends
  FAILED (the run's status keeps the last line of its log); relaunching the sweep does not start it
  again, and ``sweep_launch`` / ``sweep_collect`` report it. A run stopped otherwise (``scancel``, a
  killed node) is not requeued by the task: relaunching the sweep resumes it.

Relaunching (the same command) submits only the runs still to do (:func:`metric.sweep.jobs.pending_jobs`)
that no earlier array of this sweep still has queued or running (``slurm/submissions.jsonl``).
Options from ``LAUNCH.*``: PARTITION, ACCOUNT, TIME_LIMIT (minutes), GPUS_PER_JOB (0: NUM_GPUS when
the partition has GPUs), CPUS_PER_JOB, MEM, EXTRA_SBATCH.
"""

import datetime
import getpass
import json
import os
import shlex
import shutil
import subprocess
import sys

from metric.checkpoint.files import checkpoint_dir
from metric.sweep import jobs as J
from metric.sweep.config import sweep_dir
from metric.utils import io, lock
from metric.utils.errors import ConfigError, ExecutorError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH_TOOL = os.path.join(REPO_ROOT, "tools", "sweep_launch.py")
SUBMISSIONS = "submissions.jsonl"
# SLURM may deliver the --signal up to this many seconds early (its event resolution).
SIGNAL_SLACK_S = 60
COMMAND_TIMEOUT_S = 60


def slurm_dir(root):
    return os.path.join(root, "slurm")


def task_log(root, array_id, job):
    """The SLURM output file of run ``job`` in array ``array_id`` (``--output=.../%A_%a.out``)."""
    return os.path.join(slurm_dir(root), "logs", f"{array_id}_{job}.out")


def array_spec(jobs, parallel=0):
    """``--array`` value of run indices ``jobs``: ranges (``0-3,7,9-10``), ``%parallel`` if > 0."""
    jobs = sorted(set(int(j) for j in jobs))
    parts, i = [], 0
    while i < len(jobs):
        k = i
        while k + 1 < len(jobs) and jobs[k + 1] == jobs[k] + 1:
            k += 1
        parts.append(str(jobs[i]) if k == i else f"{jobs[i]}-{jobs[k]}")
        i = k + 1
    return ",".join(parts) + (f"%{parallel}" if parallel > 0 else "")


def _command(args, what):
    """The stdout of SLURM command ``args`` (an ExecutorError with its message if it fails)."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExecutorError(f"{what}: {' '.join(args[:2])} did not run: {err}") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise ExecutorError(f"{what}: {args[0]} failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout


def _config_value(name):
    """A value of ``scontrol show config`` (None if scontrol cannot say)."""
    try:
        text = _command(["scontrol", "show", "config"], "reading the SLURM config")
    except ExecutorError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def _partition_has_gpus(partition):
    """Whether a node of ``partition`` ("": the default one) offers a ``gpu`` GRES (sinfo's %G)."""
    args = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        return any("gpu" in line for line in _command(args, "reading the partition's GPUs").splitlines())
    except ExecutorError:
        return False


def gpus_per_task(c, has_gpus=None):
    """GPUs a task asks for: LAUNCH.GPUS_PER_JOB, or (0) LAUNCH.NUM_GPUS where the partition has GPUs."""
    if c.LAUNCH.GPUS_PER_JOB:
        return c.LAUNCH.GPUS_PER_JOB
    has_gpus = _partition_has_gpus(c.LAUNCH.PARTITION) if has_gpus is None else has_gpus
    return c.LAUNCH.NUM_GPUS if has_gpus else 0


def check_launch(c, jobs, max_array_size=None):
    """ConfigErrors for LAUNCH values SLURM would take but that cannot work."""
    limit_s = c.LAUNCH.TIME_LIMIT * 60
    if c.LAUNCH.SIGNAL_SECONDS and c.LAUNCH.SIGNAL_SECONDS + SIGNAL_SLACK_S >= limit_s:
        raise ConfigError(
            f"LAUNCH.SIGNAL_SECONDS={c.LAUNCH.SIGNAL_SECONDS} leaves no time to train within LAUNCH.TIME_LIMIT="
            f"{c.LAUNCH.TIME_LIMIT} min (SLURM may signal up to {SIGNAL_SLACK_S}s early, and every start would "
            "requeue at once): lower SIGNAL_SECONDS or raise TIME_LIMIT"
        )
    for opt in c.LAUNCH.EXTRA_SBATCH:
        if not opt.startswith("-") or "\n" in opt:
            raise ConfigError(
                f"LAUNCH.EXTRA_SBATCH: {opt!r} is not an sbatch option; give options such as '--qos=high'"
            )
    if max_array_size and jobs and max(jobs) >= max_array_size:
        raise ConfigError(
            f"run {max(jobs)} is beyond this cluster's MaxArraySize={max_array_size} (array task ids are run "
            "indices): ask the admins to raise MaxArraySize, or split the sweep into smaller ones"
        )


def render_script(c, sweep_cfg_path, jobs, gpus=0, python=None, workdir=None):
    """The sbatch script that runs ``jobs`` (run indices) of the sweep of ``c`` as one array."""
    root = sweep_dir(c)
    L = c.LAUNCH
    q = shlex.quote
    logs = os.path.join(slurm_dir(root), "logs")
    opts = [
        f"--job-name=sweep-{c.NAME}",
        f"--array={array_spec(jobs, L.PARALLEL_JOBS)}",
        f"--output={logs}/%A_%a.out",
        "--open-mode=append",
        f"--chdir={workdir or os.getcwd()}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={L.CPUS_PER_JOB}",
        f"--time={L.TIME_LIMIT}",
        "--requeue",
    ]
    if L.SIGNAL_SECONDS:
        opts.append(f"--signal=B:USR1@{L.SIGNAL_SECONDS}")
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    if L.MEM:
        opts.append(f"--mem={L.MEM}")
    if L.PARTITION:
        opts.append(f"--partition={L.PARTITION}")
    if L.ACCOUNT:
        opts.append(f"--account={L.ACCOUNT}")
    opts += list(L.EXTRA_SBATCH)
    python = python or sys.executable
    run_cmd = f'{q(python)} {q(LAUNCH_TOOL)} --sweep-cfg {q(os.path.abspath(sweep_cfg_path))} --run-job "$RUN"'
    # The run's state and failure count from its status file (plain json: no slow imports).
    status_cmd = (
        f"{q(python)} -c 'import json, sys; s = json.load(open(sys.argv[1])); "
        'print(s.get("state"), s.get("failures", 0))\' '
        f'"$RUN_DIR/{J.STATUS_FILE}"'
    )
    header = "\n".join(f"#SBATCH {o}" for o in opts)
    return f"""#!/bin/bash
# Sweep {c.NAME}: one array task per run (SLURM_ARRAY_TASK_ID is the run's index), written by
# tools/sweep_launch.py --executor slurm (metric/sweep/slurm.py). Resubmitting it by hand is safe: a
# run already done exits at once; relaunching the sweep submits only the runs still to do.
{header}

RUN=$SLURM_ARRAY_TASK_ID
RUN_DIR={q(os.path.dirname(J.run_dir(root, 0)))}/$(printf %06d "$RUN")
CKPT_DIR="$RUN_DIR"/{q(os.path.relpath(checkpoint_dir(J.run_dir(root, 0)), J.run_dir(root, 0)))}
TASK=${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}
MAX_RETRY={int(L.MAX_RETRY)}
NUM_GPUS={int(L.NUM_GPUS)}
export PYTHONPATH={q(REPO_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}
threads=$(( ${{SLURM_CPUS_PER_TASK:-1}} / NUM_GPUS ))
export SWEEP_NUM_THREADS=${{SWEEP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}}

START=$(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))
log() {{ echo "[sweep-slurm $(date -u +%Y-%m-%dT%H:%M:%SZ)] task $TASK (run $RUN, start $START): $*"; }}
requeue() {{
  log "requeueing: $1"  # said first: the requeue may end this shell before it returns
  if scontrol requeue "$TASK"; then exit 0; fi
  log "scontrol requeue $TASK failed; relaunch the sweep to resume run $RUN"; exit 1
}}
checkpoints() {{ ls "$CKPT_DIR" 2>/dev/null | tr '\n' ' '; }}
on_usr1() {{
  log "SIGUSR1 (time limit near, or scancel --signal=USR1): stopping run $RUN to requeue it"
  rc=none
  if [ -n "$child" ]; then kill -USR1 "$child" 2>/dev/null; wait "$child"; rc=$?; fi
  if [ "$(checkpoints)" = "$CHECKPOINTS_AT_START" ]; then
    log "run $RUN stopped (exit status $rc) without a new checkpoint in this start: requeueing would repeat it" \
      "forever; not requeued. Raise LAUNCH.TIME_LIMIT (or lower TRAIN.CHECKPOINT_PERIOD) and relaunch the sweep"
    exit 1
  fi
  requeue "run $RUN stopped (exit status $rc); it resumes from its last checkpoint"
}}
child=""
CHECKPOINTS_AT_START=$(checkpoints)
trap on_usr1 USR1

log "start on $(hostname), $SWEEP_NUM_THREADS threads, GPUs ${{CUDA_VISIBLE_DEVICES:-none}}"
{run_cmd} &
child=$!
wait "$child"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
if [ "$rc" -eq 0 ]; then log "run $RUN done"; exit 0; fi
if [ "$rc" -eq 75 ]; then log "run $RUN is being run by another process; this task leaves it alone"; exit 75; fi
read -r state failures < <({status_cmd}) || state=unknown
if [ "$state" = failed ] && [ "${{failures:-0}}" -lt "$MAX_RETRY" ]; then
  requeue "run $RUN failed (exit status $rc, failure $failures of MAX_RETRY=$MAX_RETRY): retrying"
fi
if [ "$state" = failed ]; then
  log "run $RUN FAILED $failures times (MAX_RETRY=$MAX_RETRY), exit status $rc: giving up; see $RUN_DIR/{J.JOB_LOG}"
else
  log "run $RUN stopped (exit status $rc, state $state); relaunch the sweep to resume it"
fi
exit "$rc"
"""


def _read_submissions(root):
    path = os.path.join(slurm_dir(root), SUBMISSIONS)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: the submissions before it still count
    return [s for s in out if isinstance(s, dict) and "array_id" in s]


def active_runs(root):
    """``{run: array job id}`` of the runs an earlier array of this sweep still has queued or running."""
    ids = {str(s["array_id"]) for s in _read_submissions(root)}
    if not ids:
        return {}
    text = _command(["squeue", "-h", "-r", "-o", "%i %T", "-u", getpass.getuser()], "listing the sweep's queued tasks")
    out = {}
    for line in text.splitlines():
        task = line.split()[0] if line.split() else ""
        array_id, _, index = task.partition("_")
        if array_id in ids and index.isdigit():
            out[int(index)] = array_id
    return out


def _record(root, entry):
    path = os.path.join(slurm_dir(root), SUBMISSIONS)
    old = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    io.write_text_atomic(path, old + json.dumps(entry) + "\n", what="SLURM submission record")


def require_sbatch():
    """The path of SLURM's ``sbatch`` (an ExecutorError when it is not on PATH)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ExecutorError(
            "--executor slurm needs SLURM's sbatch on PATH and it is not there: run on a SLURM login node, "
            "or use --executor local"
        )
    return sbatch


def launch_slurm(c, sweep_cfg_path, jobs, out=print):
    """Submit runs ``jobs`` of the sweep of config ``c`` (file ``sweep_cfg_path``) as one SLURM job
    array; returns 0 (an ExecutorError / ConfigError when SLURM is missing or refuses)."""
    sbatch = require_sbatch()
    root = J.open_sweep(c)
    jobs = sorted(set(int(j) for j in jobs))
    max_array = _config_value("MaxArraySize")
    check_launch(c, jobs, int(max_array) if max_array and max_array.isdigit() else None)
    io.mkdirs(os.path.join(slurm_dir(root), "logs"), what="SLURM log folder")
    with lock.folder_lock(root, f"sweep {root}", "stop the launcher that runs it (its runs resume at the next launch)"):
        active = active_runs(root)
        busy = [j for j in jobs if j in active]
        if busy:
            arrays = ", ".join(sorted(set(active[j] for j in busy)))
            out(f"{len(busy)} runs still queued or running in SLURM job {arrays}: not submitted again")
        jobs = [j for j in jobs if j not in active]
        if not jobs:
            out(f"nothing to submit for sweep {c.NAME}: every run still to do is queued or running")
            return 0
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        # The tasks read a copy of the sweep config as it was at submission (the user's file may change).
        cfg_copy = os.path.join(slurm_dir(root), f"sweep_cfg-{stamp}.yaml")
        io.write_text_atomic(cfg_copy, c.dump(), what="sweep config copy")
        script_path = os.path.join(slurm_dir(root), f"array-{stamp}.sbatch")
        script = render_script(c, cfg_copy, jobs, gpus=gpus_per_task(c))
        io.write_text_atomic(script_path, script, what="sbatch script")
        os.chmod(script_path, 0o755)
        answer = _command([sbatch, "--parsable", script_path], f"submitting {script_path}")
        array_id = answer.strip().split(";")[0]
        if not array_id.isdigit():
            raise ExecutorError(f"submitting {script_path}: sbatch answered {answer.strip()!r}, not a job id")
        _record(root, {"array_id": array_id, "runs": jobs, "script": script_path, "submitted_at": stamp})
    spec = array_spec(jobs, c.LAUNCH.PARALLEL_JOBS)
    cfg_arg = shlex.quote(sweep_cfg_path)
    out(f"sweep {c.NAME}: submitted SLURM job array {array_id}: {len(jobs)} runs (--array={spec})")
    out(f"  script:   {script_path}")
    out(f"  watch:    squeue -r -j {array_id}    status table: python tools/sweep_collect.py --sweep-cfg {cfg_arg}")
    job_log = os.path.join(os.path.dirname(J.run_dir(root, 0)), "<run>", J.JOB_LOG)
    out(f"  logs:     {task_log(root, array_id, '<run>')} and {job_log}")
    out(f"  stop:     scancel {array_id}    (stopped runs resume at the next launch)")
    out(
        f"  relaunch: python tools/sweep_launch.py --sweep-cfg {cfg_arg} --executor slurm    "
        f"(skips done runs, resumes interrupted ones, retries failed ones up to LAUNCH.MAX_RETRY={c.LAUNCH.MAX_RETRY})"
    )
    return 0
