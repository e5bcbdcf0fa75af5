"""Faults with several processes: never hung (timeouts, dead peers, rendezvous), never two
writers (locks on OUT_DIR and feature stores), one mistake one line (checks in the launcher)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import metric.utils.distributed as du
from metric.config import load_cfg
from metric.utils import lock
from metric.utils.errors import DistributedError, OutputBusyError
from tests.helpers import REPO, call_tool, free_port, run_py, tiny_opts

# --- locks ----------------------------------------------------------------------------------------

# Another run holding a lock, as metric.utils.lock takes it (without importing metric: fast).
_HOLDER = (
    "import fcntl, os, socket, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "os.write(fd, f'{os.getpid()} {socket.gethostname()}\\n'.encode())\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)

# A second run trying the lock (raw flock, fast): exit 2 with the holder's pid and host when held.
_TRY = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "try:\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "except BlockingIOError:\n"
    "    print(os.read(fd, 100).decode().strip())\n"
    "    sys.exit(2)\n"
)


def _env():
    return dict(os.environ, PYTHONPATH=REPO)


@contextlib.contextmanager
def held_by_another_process(lock_path):
    """A process (not this one: locks are reentrant within a process) holding ``lock_path``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _try_in_subprocess(lock_path):
    return subprocess.run(
        [sys.executable, "-c", _TRY, str(lock_path)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60
    )


def test_lock_refuses_a_second_process_naming_the_holder(tmp_path):
    path = tmp_path / ".lock"
    with lock.folder_lock(tmp_path, "OUT_DIR x", "choose another OUT_DIR"):
        assert path.read_text().split()[0] == str(os.getpid())
        with lock.folder_lock(tmp_path, "OUT_DIR x", "choose another OUT_DIR"):  # reentrant in this process
            pass
        assert lock.holds(path)
        proc = _try_in_subprocess(path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout.strip() == f"{os.getpid()} {socket.gethostname()}"
    assert not path.exists() and not lock.holds(path)  # the holder removes the file as it lets go
    assert _try_in_subprocess(path).returncode == 0


def test_lock_of_a_killed_holder_is_free(tmp_path):
    path = tmp_path / ".lock"
    with held_by_another_process(path) as holder:
        with pytest.raises(OutputBusyError) as info:
            lock.acquire(str(path), "OUT_DIR x", "choose another OUT_DIR")
        assert str(info.value) == (
            f"OUT_DIR x is in use by another run (pid {holder.pid}); wait for it or choose another OUT_DIR"
        )
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert path.exists()  # left behind by kill -9, but not locked
        key = lock.acquire(str(path), "OUT_DIR x", "choose another OUT_DIR")
        try:
            assert path.read_text().split()[0] == str(os.getpid())
        finally:
            lock.release(key)


def _one_error_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_feature_store_writers_are_locked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 4)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    status, _, _ = call_tool(
        "import_features",
        ["--embeddings", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt", "--output", tmp_path / "s"],
        capsys,
    )
    assert status == 0 and not (tmp_path / "s.lock").exists()
    out = tmp_path / "merged"
    with held_by_another_process(str(out) + ".lock") as holder:
        status, _, err = call_tool("merge_features", [tmp_path / "s", "--output", out], capsys)
        assert status == 2
        _one_error_line(err, f"feature store {out} is in use by another run (pid {holder.pid})")
        status, _, err = call_tool(
            "import_features",
            ["--embeddings", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt", "--output", out],
            capsys,
        )
        assert status == 2
        _one_error_line(err, f"(pid {holder.pid})", "choose another output folder")
        assert not out.exists()
    status, _, _ = call_tool("merge_features", [tmp_path / "s", "--output", out], capsys)
    assert status == 0 and (out / "meta.json").exists()


def test_extraction_output_is_locked(tmp_path, capsys):
    out = tmp_path / "feats"
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with held_by_another_process(str(out) + ".lock") as holder:
        status, _, err = call_tool(
            "extract_features", ["INFER.INPUT", tmp_path / "list.txt", "INFER.OUTPUT", out], capsys
        )
    assert status == 2
    _one_error_line(
        err, f"feature store {out} is in use by another run (pid {holder.pid})", "choose another INFER.OUTPUT"
    )


def test_training_out_dir_is_locked(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(du, "launch", lambda fn, cfg: pytest.fail("started training on a locked OUT_DIR"))
    with held_by_another_process(out / ".lock") as holder:
        status, _, err = call_tool("train_metric", tiny_opts(tiny_data, str(out)), capsys)
    assert status == 2
    _one_error_line(
        err, f"OUT_DIR {out} is in use by another run (pid {holder.pid}); wait for it or choose another OUT_DIR"
    )
    assert os.listdir(out) == [".lock"]  # nothing written (the lock file was left by the killed holder)


@pytest.mark.slow
def test_second_training_run_on_one_out_dir_exits_2(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with lock.folder_lock(out, "OUT_DIR", "-"):  # this test process stands for the first run
        proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, out)], timeout=120)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, f"OUT_DIR {out} is in use by another run (pid {os.getpid()})")
    assert not os.path.exists(os.path.join(out, "config.yaml"))


# --- checks in the launching process --------------------------------------------------------------


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test if any process is spawned."""
    import torch.multiprocessing as mp

    monkeypatch.setattr(mp, "start_processes", lambda *a, **k: pytest.fail("spawned worker processes"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_missing_data_with_4_processes_is_one_line_before_spawning(tiny_data, tmp_path, capsys, no_spawn):
    out = tmp_path / "run"
    opts = tiny_opts(
        tiny_data, str(out), **{"TRAIN.DATASET": "no_such_set", "NUM_GPUS": 4, "DIST.ALLOW_OVERSUBSCRIBE": True}
    )
    status, _, err = call_tool("train_metric", opts, capsys)
    assert status == 2
    _one_error_line(err, "data set folder not found", "no_such_set")
    assert not out.exists()  # found before anything was written to OUT_DIR


def test_bad_weights_file_is_found_before_spawning(tiny_data, tmp_path, capsys, no_spawn):
    weights = tmp_path / "w.pyth"
    weights.write_bytes(b"not a torch file")
    opts = tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.WEIGHTS": weights, "NUM_GPUS": 2})
    status, _, err = call_tool("train_metric", opts, capsys)
    assert status == 2
    _one_error_line(err, f"TRAIN.WEIGHTS file {weights} is not a complete weights file")


def test_more_cpu_processes_than_cores_needs_the_opt_in(tiny_data, tmp_path, capsys, no_spawn, monkeypatch):
    monkeypatch.setattr(du, "cpu_cores", lambda: 2)
    status, _, err = call_tool("train_metric", tiny_opts(tiny_data, str(tmp_path / "run"), NUM_GPUS=3), capsys)
    assert status == 2
    _one_error_line(err, "NUM_GPUS=3 without CUDA runs 3 CPU processes", "2 CPU cores", "DIST.ALLOW_OVERSUBSCRIBE True")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_local_rank_0_prints_errors_every_rank_finds(
    tiny_data, tmp_path, capsys, monkeypatch, local_rank, printed
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(du, "init_process", lambda cfg: pytest.fail("joined the process group"))
    opts = tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.DATASET": "no_such_set"})
    status, _, err = call_tool("train_metric", opts, capsys)
    assert status == 2
    if printed:
        _one_error_line(err, "data set folder not found")
    else:
        assert err == ""


@pytest.mark.slow
def test_missing_data_with_4_processes_end_to_end(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data, out, **{"TRAIN.DATASET": "no_such_set", "NUM_GPUS": 4, "DIST.ALLOW_OVERSUBSCRIBE": True}
    )
    start = time.monotonic()
    proc = run_py(["tools/train_metric.py", *opts], timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "data set folder not found")
    assert "processes with gloo" not in proc.stdout  # nothing was spawned
    assert seconds < 30, seconds
    assert not os.path.exists(out)


# --- collectives: timeouts and dead peers ----------------------------------------------------------


@pytest.mark.parametrize(
    "message, kind",
    [
        (
            "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation",
            "timeout",
        ),
        ("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4998", "lost"),
        (
            "[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:37261: Connection reset by peer",
            "lost",
        ),
        ("shape mismatch", None),
    ],
)
def test_peer_failures_are_recognized(message, kind):
    assert du.peer_failure(RuntimeError(message)) == kind
    assert du.peer_failure(ValueError(message)) is None


def test_collective_helpers_raise_one_line(monkeypatch):
    import torch.distributed as dist

    def stuck(*args, **kwargs):
        raise RuntimeError(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
            "5000ms for recv operation to complete"
        )

    monkeypatch.setattr(du, "world_size", lambda: 2)
    monkeypatch.setattr(du, "_timeout_s", 5)
    monkeypatch.setattr(du, "_comm_device", lambda: torch.device("cpu"))
    for name in ("barrier", "all_reduce", "all_gather_object"):
        monkeypatch.setattr(dist, name, stuck)
    with pytest.raises(DistributedError) as info:
        du.barrier()
    message = str(info.value)
    assert (
        message.startswith(
            "rank 0: barrier (in test_collective_helpers_raise_one_line) timed out after 5 s "
            "(a peer process died or is stuck)"
        )
        and "\n" not in message
    )
    with pytest.raises(DistributedError, match=r"rank 0: all_reduce \(in .*\) timed out after 5 s"):
        du.all_reduce_mean(torch.ones(2))
    with pytest.raises(DistributedError, match=r"rank 0: all_gather_object \(in .*\) timed out"):
        du.all_gather_objects(1)
    monkeypatch.setattr(dist, "barrier", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not a peer failure: raised as it is
        du.barrier()


def test_timeout_key_is_checked():
    from metric.utils.errors import ConfigError

    assert load_cfg(None, []).DIST.TIMEOUT_S == 1800
    with pytest.raises(ConfigError, match=r"DIST.TIMEOUT_S=0 is not allowed: expected >= 1"):
        load_cfg(None, ["DIST.TIMEOUT_S", "0"])
    # the same limit as the search tools' --timeout: torch's process group overflows or hangs beyond
    with pytest.raises(
        ConfigError, match=r"DIST.TIMEOUT_S=100000000000 is not allowed: expected >= 1 and <= 10000000$"
    ):
        load_cfg(None, ["DIST.TIMEOUT_S", "100000000000"])
    assert load_cfg(None, ["DIST.TIMEOUT_S", "10000000"]).DIST.TIMEOUT_S == 10_000_000


# The end of a test script that patches the library, then runs tools/train_metric.py (spawned
# processes import the script again, so they get the patch too).
_RUN_TRAIN_TOOL = """
if __name__ == "__main__":
    from metric.utils.cli import exit_tool, run_tool
    spec = importlib.util.spec_from_file_location("train_metric_tool", "tools/train_metric.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    exit_tool(run_tool(tool.main))
"""

# Stops (SIGSTOP) rank 1 of a self-spawned two-process run at a point the test chooses; it is a
# file, not `python -c`, so that the spawned processes import it too (as __mp_main__).
_STOPPER = """
import importlib.util, os, signal, sys
import torch
import metric.utils.distributed as du

WHERE = os.environ["STOP_WHERE"]
if WHERE == "all_gather_objects":
    real = du.all_gather_objects
    def patched(obj):
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(obj)
    du.all_gather_objects = patched
else:
    real = torch.Tensor.backward
    def patched(self, *args, **kwargs):
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(self, *args, **kwargs)
    torch.Tensor.backward = patched
"""


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize(
    "where, collective",
    [("all_gather_objects", "all_gather_object"), ("backward", "the gradient all-reduce (DDP backward)")],
)
def test_a_stopped_peer_ends_the_run_with_one_line(tiny_data, tmp_path, where, collective):
    script = tmp_path / "stop_rank1.py"
    script.write_text(_STOPPER + _RUN_TRAIN_TOOL)
    opts = tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.BATCH_SIZE": 8, "TEST.BATCH_SIZE": 8})
    start = time.monotonic()
    proc = run_py(
        [str(script), *opts, "NUM_GPUS", "2", "HOST", "127.0.0.1", "PORT", str(free_port()), "DIST.TIMEOUT_S", "5"],
        env={"STOP_WHERE": where},
        timeout=180,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(
        proc.stderr, f"error: rank 0: {collective}", "timed out after 5 s", "a peer process died or is stuck"
    )
    assert "no CUDA: running 2 CPU processes with gloo" in proc.stdout
    assert seconds < 90, (seconds, line)  # about 25 s on a 2-core machine: start-up, 5 s, shutdown
    assert not os.path.exists(tmp_path / "run" / ".lock")


# Rank 1 aborts during interpreter finalization, as gloo's native destructors did once in CI
# (SIGABRT, "terminate called without an active exception") after the run had finished.
_ABORT_AT_EXIT = """
import atexit, importlib.util, os, sys
import metric.utils.distributed as du

real_cleanup = du.cleanup
def cleanup(wait=True):
    real_cleanup(wait)
    if os.environ.get("RANK") == "1":
        atexit.register(os.abort)
du.cleanup = cleanup
"""


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_a_finished_process_skips_interpreter_finalization(tiny_data, tmp_path, launcher):
    script = tmp_path / "abort_at_exit.py"
    script.write_text(_ABORT_AT_EXIT + _RUN_TRAIN_TOOL)
    out = tmp_path / "run"
    opts = tiny_opts(tiny_data, str(out), **{"TRAIN.BATCH_SIZE": 8, "TEST.BATCH_SIZE": 8})
    port = str(free_port())
    if launcher == "spawn":
        args = [str(script), *opts, "NUM_GPUS", "2", "HOST", "127.0.0.1", "PORT", port]
    else:
        args = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        args += [f"--master_port={port}", str(script), *opts]
    proc = run_py(args, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGABRT" not in proc.stderr and "Signals.SIGABRT" not in proc.stderr, proc.stderr[-3000:]
    assert "error:" not in proc.stderr, proc.stderr[-3000:]
    # what the processes wrote before leaving is complete: the log's last line and the last checkpoint
    assert "training done" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "model_epoch_0001.pyth").exists()
    assert not os.path.exists(out / ".lock")


@pytest.mark.slow
@pytest.mark.dist
def test_an_error_of_every_spawned_process_is_one_line(tiny_data, tmp_path):
    weights = tmp_path / "other.pyth"
    torch.save({"some.other.layer": torch.zeros(3)}, weights)  # a readable file that fits no model
    opts = tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.WEIGHTS": weights, "TEST.BATCH_SIZE": 8})
    proc = run_py(["tools/train_metric.py", *opts, "NUM_GPUS", "2", "PORT", str(free_port())], timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, str(weights))
    assert "rank" not in line and "Terminating process" not in proc.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_unreachable_rendezvous_is_one_line(tiny_data, tmp_path):
    env = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }  # a hand-launched worker whose master never comes
    start = time.monotonic()
    proc = run_py(
        ["tools/train_metric.py", *tiny_opts(tiny_data, str(tmp_path / "run")), "DIST.TIMEOUT_S", "3"],
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    _one_error_line(
        proc.stderr,
        "rank 1: cannot join the process group at 127.0.0.1:",
        "within 3 s",
        "check MASTER_ADDR and MASTER_PORT",
    )
    assert time.monotonic() - start < 60
