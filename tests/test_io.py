"""metric.utils.io: atomic writes, output checks, stale temporaries, write faults as one line, and
the iopath path manager (a custom storage backend carries a whole training run)."""

import errno
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import simplejson

from metric.utils import io
from metric.utils.errors import OutputError
from tests.helpers import tiny_opts

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def _temps(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


# ----------------------------------------------------------------------------- a custom backend


class TmpfsHandler(io.PathHandler):
    """``tmpfs://a/b`` -> ``<root>/a/b``: a storage backend that is not the native handler.
    Records the paths it served, so a test can tell that a file went through the manager."""

    PREFIX = "tmpfs://"

    def __init__(self, root):
        super().__init__()
        self.root, self.served = str(root), []

    def local(self, path):
        assert path.startswith(self.PREFIX), path
        self.served.append(path)
        return os.path.join(self.root, path[len(self.PREFIX) :])

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, force=False, **kwargs):
        return self.local(path)

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        return open(self.local(path), mode, buffering=buffering, **kwargs)

    def _exists(self, path, **kwargs):
        return os.path.exists(self.local(path))

    def _isfile(self, path, **kwargs):
        return os.path.isfile(self.local(path))

    def _isdir(self, path, **kwargs):
        return os.path.isdir(self.local(path))

    def _ls(self, path, **kwargs):
        return os.listdir(self.local(path))

    def _mkdirs(self, path, **kwargs):
        os.makedirs(self.local(path), exist_ok=True)

    def _rm(self, path, **kwargs):
        local = self.local(path)
        os.rmdir(local) if os.path.isdir(local) else os.remove(local)

    def _mv(self, src_path, dst_path, **kwargs):
        os.replace(self.local(src_path), self.local(dst_path))
        return True

    def _copy_from_local(self, local_path, dst_path, overwrite=False, **kwargs):
        with open(local_path, "rb") as src, open(self.local(dst_path), "wb") as dst:
            dst.write(src.read())


@pytest.fixture()
def tmpfs(tmp_path):
    root = tmp_path / "backend"
    root.mkdir()
    handler = TmpfsHandler(root)
    io.register_handler(handler, allow_override=True)
    return handler, root


# ----------------------------------------------------------------------------- atomic_write


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    assert io.write_text_atomic(path, "one") == str(path)
    io.write_text_atomic(path, "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["a.txt"]
    io.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    io.write_json_atomic(tmp_path / "c.json", {"x": 1.5, "y": [1, 2]})
    assert simplejson.loads((tmp_path / "c.json").read_text()) == {"x": 1.5, "y": [1, 2]}
    assert io.read_json(tmp_path / "c.json")["y"] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.json"]


def test_temp_name_is_hidden_sibling_with_pid(tmp_path):
    path = tmp_path / "model.pyth"
    seen = []
    with io.atomic_write(path, "wb") as f:
        seen.append(os.listdir(tmp_path))
        f.write(b"x")
    assert seen == [[f".model.pyth.tmp{os.getpid()}"]]


@pytest.mark.parametrize("exc", [ValueError("bug in the writer"), KeyboardInterrupt()])
def test_error_in_block_keeps_old_file_and_removes_temp(tmp_path, exc):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(type(exc)):
        with io.atomic_write(path, "w") as f:
            f.write("new, half written")
            raise exc
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_unserializable_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        io.write_json_atomic(tmp_path / "m.json", {"x": object()})
    assert os.listdir(tmp_path) == []


CAUSES = [
    (errno.ENOSPC, "no space left on device"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.EPERM, "permission denied"),
]


def _raiser(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("code, cause", CAUSES)
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_os_errors_become_one_line_output_error(tmp_path, monkeypatch, code, cause, where):
    path = tmp_path / "out.csv"
    path.write_text("old")
    monkeypatch.setattr(os, where, _raiser(code))
    with pytest.raises(OutputError) as info:
        with io.atomic_write(path, "w", what="results") as f:
            f.write("new")
    monkeypatch.undo()
    assert str(info.value) == f"cannot write results {path}: {cause}"
    assert "\n" not in str(info.value) and info.value.__suppress_context__
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.csv"]


def test_full_disk_inside_a_library_write_is_mapped(tmp_path, monkeypatch):
    """torch wraps the ENOSPC of its file writes in a RuntimeError: the cause is found in the chain.
    The temporary is opened on /dev/full, so the write really fails with ENOSPC."""
    torch = pytest.importorskip("torch")
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real_open = open
    monkeypatch.setattr(io, "open", lambda p, *a, **k: real_open("/dev/full", *a, **k), raising=False)
    with pytest.raises(OutputError, match=r"cannot write checkpoint .*w\.pyth: no space left on device"):
        with io.atomic_write(tmp_path / "w.pyth", "wb", what="checkpoint") as f:
            torch.save({"w": torch.zeros(100000)}, f)
    assert os.listdir(tmp_path) == []


def test_unrelated_os_error_in_block_is_not_mapped(tmp_path):
    with pytest.raises(FileNotFoundError):
        with io.atomic_write(tmp_path / "a.txt", "w") as f:
            f.write(open(tmp_path / "missing-input.txt").read())
    assert os.listdir(tmp_path) == []


def test_write_errors_maps_appends(tmp_path, monkeypatch):
    path = tmp_path / "stats.jsonl"
    with pytest.raises(OutputError, match=f"cannot write stats file {path}: disk quota exceeded"):
        with io.write_errors(path, "stats file"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_atomic_local_path_for_writers_that_need_a_file_name(tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    path.write_bytes(b"old")
    with io.atomic_local_path(path) as tmp:
        assert os.path.basename(tmp) == f".index.faiss.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["index.faiss"]
    monkeypatch.setattr(os, "replace", _raiser(errno.ENOSPC))
    with pytest.raises(OutputError, match="no space left on device"):
        with io.atomic_local_path(path, "index") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"newer")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["index.faiss"]


# ----------------------------------------------------------------------------- atomic_folder


def test_atomic_folder_replaces_and_cleans_up(tmp_path, monkeypatch):
    out = tmp_path / "store"
    for content in ("one", "two"):
        with io.atomic_folder(out) as tmp:
            assert os.path.basename(tmp) == f".store.tmp{os.getpid()}"
            with open(os.path.join(tmp, "f.txt"), "w") as f:
                f.write(content)
    assert (out / "f.txt").read_text() == "two" and os.listdir(tmp_path) == ["store"]
    monkeypatch.setattr(io, "_rename_exchange", lambda a, b: False)  # the two-rename fallback
    with io.atomic_folder(out) as tmp:
        open(os.path.join(tmp, "g.txt"), "w").close()
    assert os.listdir(out) == ["g.txt"] and os.listdir(tmp_path) == ["store"]
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_folder(out) as tmp:
            open(os.path.join(tmp, "h.txt"), "w").close()
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", _raiser(errno.ENOSPC))
    with pytest.raises(OutputError, match=f"cannot write feature store {out}: no space left on device"):
        with io.atomic_folder(out, what="feature store") as tmp:
            with open(os.path.join(tmp, "h.txt"), "wb") as f:
                os.fsync(f.fileno())
    assert os.listdir(out) == ["g.txt"] and os.listdir(tmp_path) == ["store"]


# ----------------------------------------------------------------------------- check_output_path


def test_check_output_path_cases(tmp_path):
    assert io.check_output_path(tmp_path / "r.csv") == str(tmp_path / "r.csv")
    with pytest.raises(OutputError, match=f"results folder {tmp_path / 'no'} does not exist; create it"):
        io.check_output_path(tmp_path / "no" / "r.csv", "results")
    made = io.check_output_path(tmp_path / "new" / "deeper" / "r.csv", create=True)
    assert os.path.isdir(os.path.dirname(made))
    with pytest.raises(OutputError, match="is a folder; give a file path"):
        io.check_output_path(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is a file; give a folder path"):
        io.check_output_path(tmp_path / "file", "feature store", folder=True)
    with pytest.raises(OutputError, match="is not a folder"):
        io.check_output_path(tmp_path / "file" / "r.csv")
    with pytest.raises(OutputError, match=f"parent folder {tmp_path / 'no'} of feature store .* does not exist"):
        io.check_output_path(tmp_path / "no" / "store", "feature store", folder=True)
    assert io.check_output_path(tmp_path / "new", folder=True) == str(tmp_path / "new")


def test_check_output_path_create_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "makedirs", _raiser(errno.EACCES))
    with pytest.raises(OutputError, match=f"cannot create results folder {tmp_path / 'a'}: permission denied"):
        io.check_output_path(tmp_path / "a" / "r.csv", "results", create=True)


def test_check_output_path_unwritable_folder(tmp_path, monkeypatch):
    """Injected (works as root too): no write access, then a read-only file system."""
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(OutputError, match=f"cannot write output {tmp_path / 'r.csv'}: permission denied"):
        io.check_output_path(tmp_path / "r.csv")
    monkeypatch.setattr(io, "_read_only_fs", lambda p: True)
    with pytest.raises(OutputError, match="read-only file system"):
        io.check_output_path(tmp_path / "r.csv")


@pytest.mark.skipif(ROOT_USER, reason="root ignores file permissions")
def test_check_output_path_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=f"cannot write output {ro / 'r.csv'}: permission denied"):
            io.check_output_path(ro / "r.csv")
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- stale temporaries


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_temps(tmp_path, caplog):
    dead, me = _dead_pid(), os.getpid()
    (tmp_path / f".model_epoch_0001.pyth.tmp{dead}").write_bytes(b"partial")  # killed writer
    (tmp_path / f".store.tmp{dead}").mkdir()  # a killed store write (a folder)
    (tmp_path / f".store.tmp{dead}" / "embeddings.npy").write_bytes(b"x")
    (tmp_path / f".live.pyth.tmp{me}").write_bytes(b"in progress")  # ours, written now: kept
    old = tmp_path / f".reused.pyth.tmp{me}"  # our pid, but written before we started: pid reused
    old.write_bytes(b"old")
    start = io.process_start_time(me)
    if start is not None:
        os.utime(old, (start - 3600, start - 3600))
    (tmp_path / "model_epoch_0001.pyth").write_bytes(b"complete")  # not a temporary
    (tmp_path / "notes.tmp123").write_bytes(b"not hidden: not ours")
    with caplog.at_level(logging.INFO, logger="metric.utils.io"):
        assert io.clean_stale_temps(tmp_path / "missing") == []
        removed = io.clean_stale_temps(tmp_path, name="store")  # only that target's temporaries
        assert [os.path.basename(p) for p in removed] == [f".store.tmp{dead}"]
        removed = io.clean_stale_temps(tmp_path)
    expected = {f".model_epoch_0001.pyth.tmp{dead}"} | ({old.name} if start is not None else set())
    assert {os.path.basename(p) for p in removed} == expected
    left = set(os.listdir(tmp_path))
    assert left == {f".live.pyth.tmp{me}", "model_epoch_0001.pyth", "notes.tmp123"} | ({old.name} - expected)
    lines = [r.getMessage() for r in caplog.records if "stale temporary" in r.getMessage()]
    assert len(lines) == 2 and f".model_epoch_0001.pyth.tmp{dead}" in lines[1]


def test_process_start_time_and_liveness():
    assert io.pid_running(os.getpid()) and not io.pid_running(_dead_pid())
    start = io.process_start_time(os.getpid())
    if start is not None:  # Linux /proc
        assert start <= time.time() + 1 and start > time.time() - 7 * 86400


def test_checkpoint_and_store_writers_clean_stale_temps(tmp_path):
    torch = pytest.importorskip("torch")
    from metric.checkpoint import save_checkpoint
    from metric.retrieval.store import save_features

    dead = _dead_pid()
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / f".model_epoch_0001.pyth.tmp{dead}").write_bytes(b"partial")
    save_checkpoint(str(ckpt_dir / "model_epoch_0002.pyth"), {"epoch": 1, "w": torch.ones(1)})
    assert os.listdir(ckpt_dir) == ["model_epoch_0002.pyth"]
    (tmp_path / f".feats.tmp{dead}").mkdir()
    (tmp_path / f".other.tmp{dead}").mkdir()  # another store's temporary: left to its own writer
    save_features(tmp_path / "feats", np.eye(3), ["a", "b", "c"])
    assert sorted(os.listdir(tmp_path)) == [f".other.tmp{dead}", "checkpoints", "feats"]


# ----------------------------------------------------------------------------- iopath


def test_path_manager_helpers(tmp_path):
    assert io.is_local(tmp_path) and io.abspath("x") == os.path.abspath("x")
    io.mkdirs(tmp_path / "a" / "b")
    assert io.isdir(tmp_path / "a" / "b") and not io.isfile(tmp_path / "a")
    with io.open_path(tmp_path / "a" / "f.txt", "w") as f:
        f.write("héllo")
    assert io.exists(tmp_path / "a" / "f.txt") and io.ls(tmp_path / "a") == sorted(io.ls(tmp_path / "a"))
    assert io.open_path(tmp_path / "a" / "f.txt").read() == "héllo"
    assert io.get_local_path(tmp_path / "a" / "f.txt") == str(tmp_path / "a" / "f.txt")
    io.rm(tmp_path / "a" / "f.txt")
    assert not io.exists(tmp_path / "a" / "f.txt")


def test_atomic_writes_through_a_registered_backend(tmpfs):
    handler, root = tmpfs
    assert not io.is_local("tmpfs://x") and io.abspath("tmpfs://x") == "tmpfs://x"
    io.mkdirs("tmpfs://d")
    io.write_text_atomic("tmpfs://d/a.txt", "one")
    io.write_text_atomic("tmpfs://d/a.txt", "two")
    assert (root / "d" / "a.txt").read_text() == "two" and os.listdir(root / "d") == ["a.txt"]
    with io.atomic_local_path("tmpfs://d/b.bin") as tmp:
        assert io.is_local(tmp)
        with open(tmp, "wb") as f:
            f.write(b"local first")
    assert (root / "d" / "b.bin").read_bytes() == b"local first"
    with io.atomic_folder("tmpfs://d/store") as tmp:
        io.write_through(os.path.join(tmp, "meta.json"), b"{}")
    assert os.listdir(root / "d" / "store") == ["meta.json"]
    with pytest.raises(RuntimeError):
        with io.atomic_write("tmpfs://d/a.txt", "w") as f:
            f.write("three")
            raise RuntimeError("writer failed")
    assert (root / "d" / "a.txt").read_text() == "two"
    assert sorted(os.listdir(root / "d")) == ["a.txt", "b.bin", "store"]
    assert io.check_output_path("tmpfs://d/c.txt") == "tmpfs://d/c.txt"
    with pytest.raises(OutputError, match="does not exist"):
        io.check_output_path("tmpfs://nowhere/c.txt")
    assert any(p.endswith(f".a.txt.tmp{os.getpid()}") for p in handler.served)


def test_stores_and_results_through_a_registered_backend(tmpfs):
    from metric.retrieval.results import read_results_csv, write_results_csv
    from metric.retrieval.store import load_features, merge_stores, save_features

    handler, root = tmpfs
    io.mkdirs("tmpfs://feats")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    a = save_features("tmpfs://feats/a", x[:3], ["a0", "a1", "a2"], meta={"shard": {"index": 1, "total": 2}})
    b = save_features("tmpfs://feats/b", x[3:], ["b0", "b1"], meta={"shard": {"index": 2, "total": 2}})
    assert a == "tmpfs://feats/a" and os.path.isfile(root / "feats" / "a" / "meta.json")
    merged = load_features(merge_stores([b, a], "tmpfs://feats/m"))
    assert merged.ids == ["a0", "a1", "a2", "b0", "b1"] and merged.path == "tmpfs://feats/m"
    np.testing.assert_allclose(merged.embeddings, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    save_features("tmpfs://feats/a", x[:2], ["a0", "a1"])  # replace through the backend
    assert load_features("tmpfs://feats/a").ids == ["a0", "a1"]
    assert sorted(os.listdir(root / "feats")) == ["a", "b", "m"]
    write_results_csv("tmpfs://feats/r.csv", ["q"], ["a0", "a1"], np.array([[1, 0]]))
    assert read_results_csv("tmpfs://feats/r.csv") == {"q": ["a1", "a0"]}


@pytest.mark.slow
def test_training_resume_stats_and_extraction_through_a_registered_backend(tmpfs, tiny_data, tmp_path, monkeypatch):
    """OUT_DIR on ``tmpfs://``: config, log, stats and checkpoints go through the handler; a second
    run with a larger OPTIM.MAX_EPOCH resumes from the checkpoint there; the weights are then
    read back from the backend to extract a feature store into it. Nothing lands in the cwd."""
    from metric.checkpoint import list_checkpoints
    from metric.config import load_cfg
    from metric.engine.extract import extract_features
    from metric.engine.trainer import train_model
    from metric.retrieval.store import load_features
    from metric.utils.logger import read_stats, setup_logging

    handler, root = tmpfs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a path taken for a local one would show up here
    out = "tmpfs://runs/tiny"
    extra = {"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 1}
    try:
        train_model(load_cfg(None, tiny_opts(tiny_data, out, **extra)))
        assert [os.path.basename(p) for p in list_checkpoints(out)] == ["model_epoch_0001.pyth"]
        train_model(load_cfg(None, tiny_opts(tiny_data, out, **dict(extra, **{"OPTIM.MAX_EPOCH": 2}))))
    finally:
        setup_logging()  # close the log file handler on the backend
    local_out = root / "runs" / "tiny"
    assert sorted(os.listdir(local_out)) == ["checkpoints", "config.yaml", "log.txt", "stats.jsonl"]
    assert sorted(os.listdir(local_out / "checkpoints")) == ["model_epoch_0001.pyth", "model_epoch_0002.pyth"]
    epochs = [r["epoch"] for r in read_stats(f"{out}/stats.jsonl", "train_epoch")]
    assert epochs == [1, 2]  # the second run resumed after epoch 1
    assert "resumed from tmpfs://runs/tiny/checkpoints/model_epoch_0001.pyth" in (local_out / "log.txt").read_text()
    assert any(p.endswith("stats.jsonl") for p in handler.served)

    weights = f"{out}/checkpoints/model_epoch_0002.pyth"
    cfg = load_cfg(
        None,
        tiny_opts(
            tiny_data,
            out,
            **{
                "TEST.WEIGHTS": weights,
                "INFER.INPUT": os.path.join(tiny_data, "test.txt"),
                "INFER.OUTPUT": "tmpfs://feats/test",
            },
        ),
    )
    assert extract_features(cfg, progress=False) == "tmpfs://feats/test"
    store = load_features("tmpfs://feats/test")
    assert len(store) == 32 and store.dim == 16 and store.meta["weights"] == weights
    assert os.path.isfile(root / "feats" / "test" / "embeddings.npy")
    assert os.listdir(cwd) == []
