"""Write faults: a full disk, a read-only file system and a missing permission are one line that
names the path and the cause (OutputError in the library, exit status 2 in the tools) — never a
traceback, never a leftover temporary, and the previous output is left intact.

Faults are injected by monkeypatching a file-system function (``os.fsync``: where a full disk
shows up for buffered writes; ``os.replace``/``os.rename``: the commit of an atomic write), so
these tests also run as root. The chmod 0o555 cases are skipped as root (root ignores
permissions)."""

import errno
import importlib.util
import os
import zipfile

import numpy as np
import pytest
import torch

from metric.checkpoint import read_checkpoint, save_checkpoint
from metric.config import load_cfg
from metric.modeling import build_model
from metric.retrieval.ann import AnnOptions, build_ann_index, load_ann_index
from metric.retrieval.metrics import write_json
from metric.retrieval.results import read_results_csv, write_results_csv
from metric.retrieval.store import load_features, save_features
from metric.utils import io
from metric.utils.cli import run_tool
from metric.utils.errors import OutputError
from metric.utils.logger import setup_logging
from tests.helpers import TINY_MODEL, tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

FAULTS = [
    (errno.ENOSPC, "no space left on device"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
]
SITES = ["fsync", "rename"]


def inject(monkeypatch, code, site, only=None):
    """Make ``site`` fail with ``code``; with ``only``, fsync fails only for files whose path
    contains that string (the others are written normally)."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if site == "fsync":
        real = os.fsync

        def fsync(fd):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if only is None or only in target:
                fail()
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif site == "rename":
        monkeypatch.setattr(os, "replace", fail)
        monkeypatch.setattr(os, "rename", fail)
        monkeypatch.setattr(io, "_rename_exchange", lambda a, b: False)  # as renameat2 fails on that fs
    elif site == "access":  # the up-front check of the output folder
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        raise ValueError(site)


def leftovers(folder):
    """Temporaries anywhere under ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if ".tmp" in n]
    return found


TINY = TINY_MODEL


def _tiny_model():
    torch.manual_seed(0)
    return build_model(load_cfg(None, TINY)).eval()


def _store_data(n, seed, prefix):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return x, [f"{prefix}{i}" for i in range(n)]


# ----------------------------------------------------------------------------- writer classes
# Each returns (write again, output path, check that the first version is intact).


def _checkpoint(tmp_path):
    path = str(tmp_path / "checkpoints" / "model_epoch_0001.pyth")
    save_checkpoint(path, {"epoch": 0, "w": torch.ones(2)})
    return (
        lambda: save_checkpoint(path, {"epoch": 1, "w": torch.zeros(2)}),
        path,
        lambda: read_checkpoint(path)["epoch"] == 0,
    )


def _store(tmp_path):
    path = save_features(tmp_path / "store", *_store_data(20, 0, "a"))
    return (
        lambda: save_features(path, *_store_data(5, 1, "b")),
        path,
        lambda: load_features(path).ids == [f"a{i}" for i in range(20)],
    )


def _results_csv(tmp_path):
    path = str(tmp_path / "results.csv")
    write_results_csv(path, ["q"], ["a", "b"], np.array([[0, 1]]))
    return (
        lambda: write_results_csv(path, ["q"], ["a", "b"], np.array([[1, 0]])),
        path,
        lambda: read_results_csv(path) == {"q": ["a", "b"]},
    )


def _metrics_json(tmp_path):
    path = str(tmp_path / "metrics.json")
    write_json(path, {"mAP@100": 0.5})
    return (lambda: write_json(path, {"mAP@100": 0.75}), path, lambda: io.read_json(path) == {"mAP@100": 0.5})


def _ann_index(tmp_path):
    store = save_features(tmp_path / "store", *_store_data(200, 0, "a"))
    build_ann_index(store, AnnOptions("hnsw", ef_search=16, sample=20, recall_k=5))
    return (
        lambda: build_ann_index(store, AnnOptions("hnsw", ef_search=32, sample=20, recall_k=5)),
        os.path.join(store, "faiss_hnsw.index"),
        lambda: load_ann_index(store, "hnsw")[1]["ef_search"] == 16,
    )


def _onnx(tmp_path):
    from metric.export.onnx import export_onnx, onnx_signature

    path = str(tmp_path / "model.onnx")
    model = _tiny_model()
    export_onnx(model, path, (64, 64))
    return (lambda: export_onnx(model, path, (96, 96)), path, lambda: onnx_signature(path)["shape"][2:] == [64, 64])


def _kaggle_zip(tmp_path):
    from metric.export.kaggle import write_submission_zip

    saved = tmp_path / "saved_model"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"graph v1")
    (saved / "variables" / "variables.index").write_bytes(b"index")
    path = str(tmp_path / "submission.zip")
    write_submission_zip(str(saved), path)
    (saved / "saved_model.pb").write_bytes(b"graph v2")
    return (
        lambda: write_submission_zip(str(saved), path),
        path,
        lambda: zipfile.ZipFile(path).read("saved_model.pb") == b"graph v1",
    )


WRITERS = {
    "checkpoint": _checkpoint,
    "store": _store,
    "results_csv": _results_csv,
    "metrics_json": _metrics_json,
    "ann_index": _ann_index,
    "onnx": _onnx,
    "kaggle_zip": _kaggle_zip,
}


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("code, cause", FAULTS, ids=[errno.errorcode[c] for c, _ in FAULTS])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_writer_fault_is_one_line_and_leaves_old_output(tmp_path, monkeypatch, writer, code, cause, site):
    if writer == "onnx":
        pytest.importorskip("onnx")
    write_again, path, old_intact = WRITERS[writer](tmp_path)
    inject(monkeypatch, code, site)
    with pytest.raises(OutputError) as info:
        write_again()
    monkeypatch.undo()
    message = str(info.value)
    assert message.startswith("cannot write ") and message.endswith(f": {cause}") and "\n" not in message
    assert os.path.dirname(path) in message
    assert leftovers(tmp_path) == []
    assert old_intact()


def test_store_is_not_written_through_a_writable_memmap(tmp_path, monkeypatch):
    """A full disk under a writable np.memmap is a SIGBUS that kills the process: the store must
    be written with ordinary writes (the format stays what np.save writes)."""

    def no_memmap(*args, **kwargs):
        raise AssertionError("feature stores must not be written through a memmap")

    monkeypatch.setattr(np.lib.format, "open_memmap", no_memmap)
    monkeypatch.setattr(np, "memmap", no_memmap)
    x, ids = _store_data(50, 0, "a")
    path = save_features(tmp_path / "s", x, ids, normalize=False)
    monkeypatch.undo()
    np.save(tmp_path / "ref.npy", x)
    assert (tmp_path / "ref.npy").read_bytes() == open(os.path.join(path, "embeddings.npy"), "rb").read()
    assert isinstance(load_features(path).embeddings, np.memmap)  # reads still memory-map


def test_full_disk_in_the_middle_of_a_store_write(tmp_path, monkeypatch):
    """The disk fills up after the first blocks of rows: one line, no temporary folder left."""
    from metric.retrieval import store as store_mod

    monkeypatch.setattr(store_mod, "_BLOCK_BYTES", 4 * 8 * 10)  # blocks of 10 rows
    written = []
    real_write = store_mod._write_npy_rows

    def write_rows(f, count, dim, blocks):
        def failing():
            for i, block in enumerate(blocks):
                if i == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                written.append(len(block))
                yield block

        return real_write(f, count, dim, failing())

    monkeypatch.setattr(store_mod, "_write_npy_rows", write_rows)
    with pytest.raises(OutputError, match=f"cannot write feature store {tmp_path / 's'}: no space left on device"):
        save_features(tmp_path / "s", *_store_data(50, 0, "a"))
    assert written == [10, 10] and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the tools


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(name, args, capsys):
    try:
        status = run_tool(_tool(name), [str(a) for a in args])
    finally:
        setup_logging()  # drop a log file handler a tool may have added
    out, err = capsys.readouterr()
    return status, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_data):
    """Inputs of every writing tool: stores, an .npy + ids, results and ground truth, images,
    a GLDv2 csv, tiny-model weights and an ONNX file."""
    import cv2

    root = tmp_path_factory.mktemp("inputs")
    x, ids = _store_data(300, 0, "img")
    q, qids = _store_data(12, 1, "q")
    paths = {
        "index": save_features(root / "index", x, ids),
        "query": save_features(root / "query", q, qids),
        "npy": str(root / "x.npy"),
        "ids": str(root / "ids.txt"),
        "results": str(root / "results.csv"),
        "gt": str(root / "solution.csv"),
        "images": str(root / "images"),
        "gld": str(root / "train.csv"),
        "weights": str(root / "weights.pyth"),
        "data": tiny_data,
        "stats": str(root / "run"),
    }
    os.makedirs(paths["stats"])
    (root / "run" / "stats.jsonl").write_text(
        '{"_type": "train_iter", "epoch": 1, "iter": 2, "iters": 2, "loss": 1.5, "lr": 0.1}\n'
    )
    np.save(paths["npy"], x[:7])
    (root / "ids.txt").write_text("\n".join(ids[:7]) + "\n")
    (root / "results.csv").write_text("id,images\nq0,img1 img2\nq1,img3\n")
    (root / "solution.csv").write_text("id,images,Usage\nq0,img1,Public\nq1,img4,Private\n")
    os.makedirs(paths["images"])
    for name in ("q0", "q1", "img1", "img2", "img3"):
        cv2.imwrite(os.path.join(paths["images"], f"{name}.jpg"), np.full((20, 30, 3), 128, np.uint8))
    (root / "train.csv").write_text("id,url,landmark_id\nabc1,u,7\nabd2,u,7\nabe3,u,9\n")
    cfg = load_cfg(None, tiny_opts(tiny_data, str(root / "unused")))
    torch.manual_seed(0)
    torch.save(build_model(cfg).state_dict(), paths["weights"])
    return paths


def _model_opts(inputs, out, **extra):
    return tiny_opts(inputs["data"], os.path.join(out, "run"), **{"TEST.WEIGHTS": inputs["weights"], **extra})


def _tool_calls(inputs, out):
    """(tool, argv, output path named in the error, fsync only for paths containing this)."""
    return [
        (
            "search",
            ["--query", inputs["query"], "--index", inputs["index"], "--output", f"{out}/r.csv", "--no-progress"],
            f"{out}/r.csv",
            None,
        ),
        (
            "import_features",
            ["--embeddings", inputs["npy"], "--ids", inputs["ids"], "--output", f"{out}/imp"],
            f"{out}/imp",
            None,
        ),
        ("merge_features", [inputs["query"], inputs["index"], "--output", f"{out}/merged"], f"{out}/merged", None),
        (
            "build_index",
            ["--index", inputs["index"], "--type", "hnsw", "--output-dir", out, "--sample", 20],
            f"{out}/faiss_hnsw.index",
            None,
        ),
        (
            "evaluate",
            ["--results", inputs["results"], "--gt", inputs["gt"], "--json", f"{out}/m.json"],
            f"{out}/m.json",
            None,
        ),
        (
            "visualize",
            [
                "--results",
                inputs["results"],
                "--query-root",
                inputs["images"],
                "--index-root",
                inputs["images"],
                "--output",
                f"{out}/g.html",
            ],
            f"{out}/g.html",
            None,
        ),
        ("gldv2_to_list", ["--csv", inputs["gld"], "--output", f"{out}/gld"], f"{out}/gld/train_list.txt", None),
        ("plot_stats", [inputs["stats"], "--output", f"{out}/curves.png"], f"{out}/curves.png", None),
        (
            "torch2onnx",
            [*_model_opts(inputs, out), "--output", f"{out}/m.onnx", "--size", 64, 64],
            f"{out}/m.onnx",
            None,
        ),
        (
            "extract_features",
            [
                *_model_opts(
                    inputs,
                    out,
                    **{"INFER.INPUT": os.path.join(inputs["data"], "test.txt"), "INFER.OUTPUT": f"{out}/feats"},
                ),
                "--no-progress",
            ],
            f"{out}/feats",
            None,
        ),
        (
            "train_metric",
            tiny_opts(inputs["data"], f"{out}/run", **{"OPTIM.MAX_EPOCH": 1, "TEST.DATASET": ""}),
            f"{out}/run/checkpoints/model_epoch_0001.pyth",
            ".pyth",
        ),
    ]


TOOL_NAMES = [
    c[0]
    for c in _tool_calls(
        {k: "" for k in ("query", "index", "npy", "ids", "results", "gt", "images", "gld", "weights", "data", "stats")},
        "",
    )
]


def _assert_one_line(status, err, path, cause):
    """Exit status 2 and one error line, the last on stderr (progress bars may come before it)."""
    assert status == 2, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    assert str(path) in errors[0] and errors[0].endswith(cause), err


@pytest.mark.parametrize("tool", TOOL_NAMES)
def test_tool_full_disk_is_one_line(inputs, tmp_path, monkeypatch, capsys, tool):
    if tool == "torch2onnx":
        pytest.importorskip("onnx")
    out = str(tmp_path / "out")
    os.makedirs(out)
    name, argv, path, only = next(c for c in _tool_calls(inputs, out) if c[0] == tool)
    inject(monkeypatch, errno.ENOSPC, "fsync", only)
    status, err = _run(name, argv, capsys)
    monkeypatch.undo()
    _assert_one_line(status, err, path, "no space left on device")
    assert leftovers(out) == []


@pytest.mark.parametrize("tool", ["search", "import_features", "build_index", "evaluate", "plot_stats"])
def test_tool_read_only_file_system_is_one_line(inputs, tmp_path, monkeypatch, capsys, tool):
    out = str(tmp_path / "out")
    os.makedirs(out)
    name, argv, path, _ = next(c for c in _tool_calls(inputs, out) if c[0] == tool)
    inject(monkeypatch, errno.EROFS, "rename")
    status, err = _run(name, argv, capsys)
    monkeypatch.undo()
    _assert_one_line(status, err, path, "read-only file system")
    assert leftovers(out) == []


@pytest.mark.parametrize("tool", ["search", "torch2onnx", "make_kaggle_model", "onnx2tf", "plot_stats"])
def test_tool_unwritable_folder_is_found_before_the_work(inputs, tmp_path, monkeypatch, capsys, tool):
    """The output folder's permission is checked up front (injected: os.access says no)."""
    pytest.importorskip("onnx")
    out = str(tmp_path / "out")
    os.makedirs(out)
    if tool == "make_kaggle_model":
        name, argv, path = tool, [*_model_opts(inputs, out), "--output", f"{out}/s.zip"], f"{out}/s.zip"
    elif tool == "onnx2tf":
        from metric.export.onnx import export_onnx

        onnx_path = str(tmp_path / "m.onnx")
        export_onnx(_tiny_model(), onnx_path, (64, 64))
        name, argv, path = tool, [onnx_path, f"{out}/tf"], f"{out}/tf"
    else:
        name, argv, path, _ = next(c for c in _tool_calls(inputs, out) if c[0] == tool)
    inject(monkeypatch, errno.EACCES, "access")
    status, err = _run(name, argv, capsys)
    monkeypatch.undo()
    _assert_one_line(status, err, path, f"permission denied (folder {out})")
    assert os.listdir(out) == []


@pytest.mark.skipif(ROOT_USER, reason="root ignores file permissions")
@pytest.mark.parametrize("tool", ["search", "import_features", "build_index", "gldv2_to_list", "train_metric"])
def test_tool_in_read_only_folder(inputs, tmp_path, capsys, tool):
    """A real chmod 0o555 destination."""
    out = tmp_path / "ro"
    out.mkdir()
    name, argv, path, _ = next(c for c in _tool_calls(inputs, str(out)) if c[0] == tool)
    out.chmod(0o555)
    try:
        status, err = _run(name, argv, capsys)
    finally:
        out.chmod(0o755)
    _assert_one_line(status, err, out, err[-1][err[-1].find("permission denied") :])
    assert "permission denied" in err[-1]
    assert os.listdir(out) == []


def test_run_tool_backstop_for_os_errors(capsys):
    """An OS write fault that escaped a writer's own mapping is still one line, exit 2; an OS error
    of another kind keeps its traceback (it may be a bug)."""

    def read_only(argv):
        raise OSError(errno.EROFS, "Read-only file system", "/data/out/log.txt")

    def wrapped(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err

    def other(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")

    assert run_tool(read_only, []) == 2
    assert capsys.readouterr().err == "error: cannot write /data/out/log.txt: read-only file system\n"
    assert run_tool(wrapped, []) == 2
    assert capsys.readouterr().err == "error: cannot write: no space left on device\n"
    with pytest.raises(FileNotFoundError):
        run_tool(other, [])
