"""The SLURM executor of sweeps (metric/sweep/slurm.py).

The end-to-end tests submit a real job array to a real SLURM (Debian's slurm-wlm on localhost,
started by tools/setup_ci_services.sh, which .ci/run calls): three runs of the tiny model, two at
once. Run 0 is sent SIGUSR1 (what SLURM sends LAUNCH.SIGNAL_SECONDS before the time limit) once it
has a checkpoint: its task requeues itself and the run resumes. Run 1's training process is killed
(SIGKILL) once it has a checkpoint: the run fails, its task is requeued (failure 1 of MAX_RETRY=2)
and resumes. Run 2 trains on a list file that does not exist: it fails twice, ends FAILED and a
relaunch reports it instead of launching it. Without sbatch (or a SLURM that answers) they are
skipped, with the reason; with PYMETRIC_REQUIRE_SERVICES=1 (CI) they fail instead.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from metric.sweep.config import load_sweep_cfg
from metric.sweep.slurm import array_spec, check_launch, render_script
from metric.utils.errors import ConfigError
from tests.helpers import logging_restored, tiny_opts, tool_in_process, write_tiny_dataset

EPOCHS = 8
DEADLINE_S = 150


def _write_sweep(root, name="slurm_e2e", epochs=EPOCHS, **launch):
    data = write_tiny_dataset(os.path.join(root, "data", "tiny"))
    base = os.path.join(root, "base.yaml")
    with open(base, "w") as f:
        f.write("VERSION: 2\n")
    opts = tiny_opts(data, "unused", **{"OPTIM.MAX_EPOCH": epochs, "LOG.TENSORBOARD": False})
    sweep = {
        "NAME": name,
        "ROOT_DIR": os.path.join(root, "sweeps"),
        "SETUP": {
            "BASE_CFG": base,
            "BASE_OPTS": opts,
            # runs 0 and 1 train (the same images); run 2's list file does not exist: it always fails
            "SAMPLERS": {"TRAIN.SPLIT": {"TYPE": "grid", "VALUES": ["train.txt", "test.txt", "missing.txt"]}},
        },
        "LAUNCH": {"PARALLEL_JOBS": 2, "MAX_RETRY": 2, "CPUS_PER_JOB": 1, "TIME_LIMIT": 10, "SIGNAL_SECONDS": 60},
    }
    sweep["LAUNCH"].update(launch)
    path = os.path.join(root, "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(sweep, f)
    return path


# --- without SLURM: the script and the checks ---------------------------------------------------


def test_array_spec_compresses_run_indices_and_throttles():
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([5, 0, 1, 2, 7, 9, 10], 2) == "0-2,5,7,9-10%2"
    assert array_spec([4]) == "4"


def test_the_script_carries_the_launch_options_and_is_valid_bash(tmp_path):
    path = _write_sweep(
        str(tmp_path),
        PARTITION="gpu",
        ACCOUNT="lab",
        MEM="16G",
        NUM_GPUS=2,
        CPUS_PER_JOB=8,
        TIME_LIMIT=90,
        SIGNAL_SECONDS=300,
        EXTRA_SBATCH=["--qos=high", "--constraint=a100"],
    )
    c = load_sweep_cfg(path)
    script = render_script(c, path, [0, 2, 3], gpus=2)
    header = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    for opt in [
        "--array=0,2-3%2",
        "--partition=gpu",
        "--account=lab",
        "--mem=16G",
        "--gres=gpu:2",
        "--cpus-per-task=8",
        "--time=90",
        "--requeue",
        "--signal=B:USR1@300",
        "--qos=high",
        "--constraint=a100",
        "--open-mode=append",
    ]:
        assert opt in header, (opt, header)
    logs = os.path.join(c.ROOT_DIR, c.NAME, "slurm", "logs")
    assert f"--output={logs}/%A_%a.out" in header
    assert "MAX_RETRY=2" in script and "NUM_GPUS=2" in script
    assert f'--sweep-cfg {os.path.abspath(path)} --run-job "$RUN"' in script
    assert 'scontrol requeue "$TASK"' in script and "trap on_usr1 USR1" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # parses
    # no GPUs asked for on a CPU partition, no signal when SIGNAL_SECONDS is 0
    c2 = load_sweep_cfg(path, ["LAUNCH.SIGNAL_SECONDS", "0", "LAUNCH.PARTITION", ""])
    header2 = [line for line in render_script(c2, path, [1]).splitlines() if line.startswith("#SBATCH ")]
    assert not any(o in line for line in header2 for o in ("--gres", "--signal", "--partition")), header2


def test_launch_values_that_cannot_work_are_refused(tmp_path):
    path = _write_sweep(str(tmp_path))
    with pytest.raises(ConfigError, match=r"SIGNAL_SECONDS=120 leaves no time to train within LAUNCH.TIME_LIMIT=2 min"):
        check_launch(load_sweep_cfg(path, ["LAUNCH.TIME_LIMIT", "2", "LAUNCH.SIGNAL_SECONDS", "120"]), [0])
    with pytest.raises(ConfigError, match=r"LAUNCH.EXTRA_SBATCH: 'qos=high' is not an sbatch option"):
        check_launch(load_sweep_cfg(path, ["LAUNCH.EXTRA_SBATCH", "['qos=high']"]), [0])
    with pytest.raises(ConfigError, match=r"run 1001 is beyond this cluster's MaxArraySize=1001"):
        check_launch(load_sweep_cfg(path), [3, 1001], max_array_size=1001)
    check_launch(load_sweep_cfg(path), [3, 1000], max_array_size=1001)


# The task script's logic run by bash without SLURM: a stand-in for python (the run and the status
# read) and for scontrol, which records the requeues it is asked for.
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = "-c" ]; then echo "$FAKE_STATUS"; exit 0; fi
[ -n "$FAKE_SLEEP" ] && trap 'kill $! 2>/dev/null; exit 143' USR1  # before "started": the test signals then
touch "$FAKE_DIR/started"
[ -n "$FAKE_NEW_CHECKPOINT" ] && mkdir -p "$FAKE_CKPT" && touch "$FAKE_CKPT/model_epoch_0001.pyth"
if [ -n "$FAKE_SLEEP" ]; then sleep 30 & wait; fi
exit "$FAKE_RC"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
"""


def _run_task_script(tmp_path, usr1=False, **fake):
    """``(exit status, output, scontrol calls)`` of the task script of run 0, run by bash."""
    path = _write_sweep(str(tmp_path))
    c = load_sweep_cfg(path)
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (fake_dir / name).write_text(text)
        (fake_dir / name).chmod(0o755)
    script = tmp_path / "task.sbatch"
    script.write_text(render_script(c, path, [0], python=str(fake_dir / "python")))
    env = dict(
        os.environ,
        PATH=f"{fake_dir}:{os.environ['PATH']}",
        SLURM_ARRAY_JOB_ID="41",
        SLURM_ARRAY_TASK_ID="0",
        SLURM_CPUS_PER_TASK="1",
        FAKE_DIR=str(fake_dir),
        FAKE_CKPT=os.path.join(c.ROOT_DIR, c.NAME, "runs", "000000", "checkpoints"),
        FAKE_STATUS="running 0",
        FAKE_RC="0",
        FAKE_NEW_CHECKPOINT="",
        FAKE_SLEEP="1" if usr1 else "",
    )
    env.update(fake)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if usr1:
        deadline = time.time() + 20
        while not (fake_dir / "started").exists():
            assert time.time() < deadline and proc.poll() is None, "the task script did not start the run"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    calls = (fake_dir / "scontrol.calls").read_text() if (fake_dir / "scontrol.calls").exists() else ""
    return proc.returncode, out, calls


def test_task_script_requeues_on_usr1_after_a_new_checkpoint(tmp_path):
    rc, out, calls = _run_task_script(tmp_path, usr1=True, FAKE_NEW_CHECKPOINT="1")
    assert (rc, calls) == (0, "requeue 41_0\n"), out
    assert "requeueing: run 0 stopped (exit status 143); it resumes from its last checkpoint" in out


def test_task_script_does_not_requeue_a_start_that_wrote_no_checkpoint(tmp_path):
    rc, out, calls = _run_task_script(tmp_path, usr1=True)
    assert (rc, calls) == (1, ""), out
    assert "without a new checkpoint in this start" in out and "Raise LAUNCH.TIME_LIMIT" in out


@pytest.mark.parametrize("failures, requeued", [(1, True), (2, False)])
def test_task_script_retries_a_failed_run_up_to_max_retry(tmp_path, failures, requeued):
    rc, out, calls = _run_task_script(tmp_path, FAKE_RC="3", FAKE_STATUS=f"failed {failures}")
    if requeued:
        assert (rc, calls) == (0, "requeue 41_0\n"), out
        assert "requeueing: run 0 failed (exit status 3, failure 1 of MAX_RETRY=2): retrying" in out
    else:
        assert (rc, calls) == (3, ""), out
        assert "run 0 FAILED 2 times (MAX_RETRY=2), exit status 3: giving up" in out


def test_task_script_leaves_a_done_or_stopped_run_alone(tmp_path):
    rc, out, calls = _run_task_script(tmp_path)
    assert (rc, calls) == (0, "") and "run 0 done" in out, out
    rc, out, calls = _run_task_script(tmp_path / "stopped", FAKE_RC="143", FAKE_STATUS="interrupted 0")
    assert (rc, calls) == (143, "") and "relaunch the sweep to resume it" in out, out


FAKE_SLURM = {  # stand-ins that answer as a SLURM with an empty queue does
    "sbatch": 'echo "$*" >> "$(dirname "$0")/sbatch.calls"; echo 77',
    "squeue": "exit 0",
    "scontrol": 'echo "MaxArraySize            = 1001"',
    "sinfo": 'echo "(null)"',
}


def test_launch_exit_status_is_1_when_a_run_gave_up_and_sbatch_is_checked_first(tmp_path, monkeypatch):
    """The tool with stand-ins for SLURM's commands: a run that failed MAX_RETRY times makes the exit
    status 1 (as with the local executor) while the others are submitted; without sbatch the answer
    is one line and exit 2 even when nothing is left to submit."""
    path = _write_sweep(str(tmp_path))
    root = os.path.join(str(tmp_path), "sweeps", "slurm_e2e")
    assert tool_in_process("sweep_setup", ["--sweep-cfg", path]).returncode == 0
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    real_path = os.environ["PATH"]

    def give_status(job, **status):
        os.makedirs(os.path.join(root, "runs", f"{job:06d}"), exist_ok=True)
        with open(os.path.join(root, "runs", f"{job:06d}", "sweep_status.json"), "w") as f:
            json.dump(status, f)

    give_status(2, state="failed", attempts=2, failures=2, last_line="DataError: missing.txt")
    monkeypatch.setenv("PATH", f"{fake}:{real_path}")
    proc = tool_in_process("sweep_launch", ["--sweep-cfg", path, "--executor", "slurm"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not launched: job 000002 failed 2 times (LAUNCH.MAX_RETRY): DataError: missing.txt" in proc.stdout
    assert "submitted SLURM job array 77: 2 runs (--array=0-1%2)" in proc.stdout
    assert (fake / "sbatch.calls").read_text().count("--parsable") == 1
    for job in (0, 1):
        give_status(job, state="done", attempts=1, failures=0)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    proc = tool_in_process("sweep_launch", ["--sweep-cfg", path, "--executor", "slurm"])
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --executor slurm needs SLURM's sbatch")


# --- a real SLURM -------------------------------------------------------------------------------


def _slurm_missing():
    """Why the real-SLURM tests cannot run here (None if they can)."""
    missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel", "sinfo") if shutil.which(c) is None]
    if missing:
        return f"SLURM commands not on PATH: {' '.join(missing)} (tools/setup_ci_services.sh installs and starts SLURM)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        why = (proc.stderr.strip().splitlines() or [f"node states {states}"])[-1]
        return f"SLURM does not answer with a usable node ({why}); start it with tools/setup_ci_services.sh"
    return None


def _require_slurm():
    reason = _slurm_missing()
    if reason is None:
        return
    if os.environ.get("PYMETRIC_REQUIRE_SERVICES") == "1":
        pytest.fail(f"PYMETRIC_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


def _status(root, job):
    path = os.path.join(root, "runs", f"{job:06d}", "sweep_status.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _checkpoints(root, job):
    folder = os.path.join(root, "runs", f"{job:06d}", "checkpoints")
    return sorted(n for n in os.listdir(folder) if n.startswith("model_epoch_")) if os.path.isdir(folder) else []


def _training_child(pid):
    """The training process: the child that run_job (process ``pid``) forked."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue  # not a process, or one that just ended
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
            children.append(int(entry))
    assert len(children) == 1, f"run_job {pid} has children {children}"
    return children[0]


def _active_tasks(array_id):
    proc = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T"], capture_output=True, text=True)
    return [line for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory):
    """The array of the sweep above, run to its end with run 0 signalled and run 1 killed."""
    _require_slurm()
    tmp = str(tmp_path_factory.mktemp("slurm_sweep"))
    path = _write_sweep(tmp)
    root = os.path.join(tmp, "sweeps", "slurm_e2e")
    setup = tool_in_process("sweep_setup", ["--sweep-cfg", path])
    assert setup.returncode == 0, setup.stderr
    t0 = time.time()
    launch = tool_in_process("sweep_launch", ["--sweep-cfg", path, "--executor", "slurm"])
    assert launch.returncode == 0, launch.stdout + launch.stderr
    with open(os.path.join(root, "slurm", "submissions.jsonl")) as f:
        array_id = json.loads(f.readline())["array_id"]
    # launching again while the array is queued submits no run twice
    twice = tool_in_process("sweep_launch", ["--sweep-cfg", path, "--executor", "slurm"])
    acted = {}  # run -> checkpoints it had when it was interrupted
    try:
        while True:
            assert time.time() - t0 < DEADLINE_S, f"the array did not end in {DEADLINE_S}s: {_active_tasks(array_id)}"
            for job in (0, 1):
                status = _status(root, job)
                if job in acted or not status:
                    continue
                assert status["state"] != "done", f"run {job} ended before the test could interrupt it; lengthen it"
                if status["state"] != "running" or not _checkpoints(root, job):
                    continue
                acted[job] = _checkpoints(root, job)
                if job == 0:  # as SLURM does LAUNCH.SIGNAL_SECONDS before the time limit
                    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array_id}_0"], check=True)
                else:
                    os.kill(_training_child(int(status["pid"])), signal.SIGKILL)
            if len(acted) == 2 and not _active_tasks(array_id):
                break
            time.sleep(0.05)
    finally:
        subprocess.run(["scancel", array_id], capture_output=True)
    logs = {job: _read(os.path.join(root, "slurm", "logs", f"{array_id}_{job}.out")) for job in range(3)}
    return {
        "path": path,
        "root": root,
        "array_id": array_id,
        "launch": launch.stdout,
        "twice": twice,
        "acted": acted,
        "logs": logs,
        "seconds": time.time() - t0,
    }


def _scontrol_job(task):
    out = subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


@pytest.mark.slow
def test_a_requeued_and_a_killed_task_resume_their_runs_and_complete(slurm_sweep):
    root, array_id, logs = slurm_sweep["root"], slurm_sweep["array_id"], slurm_sweep["logs"]
    assert f"submitted SLURM job array {array_id}: 3 runs (--array=0-2%2)" in slurm_sweep["launch"]
    assert f"squeue -r -j {array_id}" in slurm_sweep["launch"]
    twice = slurm_sweep["twice"]
    assert twice.returncode == 0, twice.stdout + twice.stderr
    assert f"3 runs still queued or running in SLURM job {array_id}: not submitted again" in twice.stdout
    assert "nothing to submit" in twice.stdout
    for job in (0, 1):
        status = _status(root, job)
        assert status["state"] == "done", (job, status, logs[job])
        assert status["attempts"] == 2, (job, status)
        assert _checkpoints(root, job)[-1] == f"model_epoch_{EPOCHS:04d}.pyth"
        # resumed, not restarted: from a checkpoint at least as new as the one it had when
        # interrupted, and every epoch trained (recorded) once
        job_log = _read(os.path.join(root, "runs", f"{job:06d}", "job.log"))
        had = int(slurm_sweep["acted"][job][-1][len("model_epoch_") : -len(".pyth")])
        resumed = [line for line in job_log.splitlines() if "resumed from" in line]
        assert len(resumed) == 1, job_log[-3000:]
        assert int(resumed[0].split("(epoch ")[1].split()[0]) >= had, resumed
        with open(os.path.join(root, "runs", f"{job:06d}", "stats.jsonl")) as f:
            epochs = [r["epoch"] for r in map(json.loads, f) if r["_type"] == "train_epoch"]
        assert epochs == list(range(1, EPOCHS + 1)), epochs
        assert _scontrol_job(f"{array_id}_{job}").get("Restarts") == "1"
        assert f"(run {job}, start 2): run {job} done" in logs[job], logs[job]
    # run 0: the time-limit signal stopped it (interrupted, not a failure) and the task requeued itself
    assert _status(root, 0)["failures"] == 0
    assert "SIGUSR1" in logs[0] and "requeueing: run 0 stopped" in logs[0], logs[0]
    # run 1: its killed training is a failure (1 of MAX_RETRY=2): requeued and retried
    assert _status(root, 1)["failures"] == 1
    assert "requeueing: run 1 failed (exit status" in logs[1] and "failure 1 of MAX_RETRY=2" in logs[1], logs[1]
    print(f"\nSLURM array {array_id} ended in {slurm_sweep['seconds']:.1f}s; task logs:")
    for job in range(3):
        print(logs[job])


@pytest.mark.slow
def test_a_run_that_keeps_failing_ends_failed_after_max_retry_and_is_reported(slurm_sweep):
    root, array_id, log = slurm_sweep["root"], slurm_sweep["array_id"], slurm_sweep["logs"][2]
    status = _status(root, 2)
    assert status["state"] == "failed" and status["failures"] == 2 and status["attempts"] == 2, status
    assert "missing.txt" in status["last_line"]
    assert "requeueing: run 2 failed (exit status 2, failure 1 of MAX_RETRY=2): retrying" in log, log
    assert "run 2 FAILED 2 times (MAX_RETRY=2), exit status 2: giving up" in log, log
    assert _scontrol_job(f"{array_id}_2").get("JobState") == "FAILED"
    # relaunching submits nothing and names the run that gave up
    again = tool_in_process("sweep_launch", ["--sweep-cfg", slurm_sweep["path"], "--executor", "slurm"])
    assert again.returncode == 1, again.stdout + again.stderr
    assert "not launched: job 000002 failed 2 times (LAUNCH.MAX_RETRY)" in again.stdout
    assert "missing.txt" in again.stdout
    with open(os.path.join(root, "slurm", "submissions.jsonl")) as f:
        assert len(f.readlines()) == 1


def test_executor_slurm_without_sbatch_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from metric.sweep.slurm import launch_slurm
    from metric.utils.cli import run_tool

    path = _write_sweep(str(tmp_path))
    c = load_sweep_cfg(path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    with logging_restored():
        status = run_tool(lambda argv: launch_slurm(c, path, [0, 1]), [])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: --executor slurm needs SLURM's sbatch on PATH"), err
    assert err.endswith("run on a SLURM login node, or use --executor local\n"), err
    assert not os.path.exists(os.path.join(c.ROOT_DIR, c.NAME))  # nothing written
