"""Command-line faults (issue 17, round 2): config files that are not UTF-8, an OUT_DIR that is a
file, export sizes that cannot fit, abbreviated options, outputs that collide with each other or
with an input, the original project's search command, and tools/infer.sh under the same contract
as the Python tools: one ``error:`` line on stderr, exit status 2, never a traceback."""

import glob
import importlib.util
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from metric import build_model, load_cfg
from metric.retrieval.store import load_features, save_features
from metric.utils import cli, io, lock
from metric.utils.errors import ConfigError, OutputError
from tests.helpers import REPO, TINY_MODEL, call_tool, logging_restored, run_py, tiny_opts

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
TOOLS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(REPO, "tools", "*.py")))


def _one_error(status, err, *words):
    """Exit status 2 and exactly one line on stderr, an ``error:`` line holding ``words``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture()
def stores(tmp_path):
    rng = np.random.default_rng(0)
    idx = save_features(
        tmp_path / "index", rng.standard_normal((30, 8)).astype(np.float32), [f"img{i}" for i in range(30)]
    )
    qry = save_features(tmp_path / "query", rng.standard_normal((4, 8)).astype(np.float32), [f"q{i}" for i in range(4)])
    return tmp_path, qry, idx


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "tiny.pth")
    torch.save(build_model(load_cfg(None, TINY_MODEL)).state_dict(), path)
    return path


# ----------------------------------------------------------------------------- 1. config files


@pytest.mark.parametrize(
    "content, words",
    [
        (b"OUT_DIR: output/caf\xe9\n", [":1:", "not UTF-8", "0xe9", "column 20"]),  # latin-1 text
        (b"MODEL:\n  DEPTH: 18\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", [":3:", "not UTF-8", "0x89"]),  # binary
        (b"OUT_DIR: a\x00b\n", ["line 1, column 11", "#x0000"]),  # valid UTF-8, but a control character
    ],
)
def test_config_file_not_utf8_is_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_cfg(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    for w in words:
        assert w in str(info.value)
    status, _, err = call_tool("model_info", ["--cfg", path, *TINY_MODEL], capsys)
    _one_error(status, err, str(path), *words)
    # a _BASE_ file goes through the same reader
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: bad.yaml\nMODEL:\n  DEPTH: 18\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_cfg(str(child))
    # UTF-8 with a byte-order mark still reads
    path.write_bytes(b"\xef\xbb\xbfOUT_DIR: caf\xc3\xa9\n")
    assert load_cfg(str(path), validate_cfg=False).OUT_DIR == "caf\u00e9"


# ----------------------------------------------------------------------------- 2. OUT_DIR a file


def test_out_dir_that_is_a_file_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a folder\n")
    # the lock, the folder creation, then the whole tool with a relative OUT_DIR (was a traceback)
    with pytest.raises(OutputError, match="OUT_DIR taken exists and is not a folder; choose another OUT_DIR"):
        with lock.folder_lock("taken", "OUT_DIR taken", "choose another OUT_DIR"):
            pass
    with pytest.raises(OutputError, match="taken: it exists and is not a folder"):
        io.mkdirs("taken")
    for out_dir in ("taken", "taken/run"):
        status, _, err = call_tool("train_metric", tiny_opts(tiny_data, out_dir, **{"OPTIM.MAX_EPOCH": 1}), capsys)
        _one_error(status, err, "taken")
    assert (tmp_path / "taken").read_text() == "not a folder\n"
    # feature store destinations (locked with <store>.lock next to them) were already one line
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 4)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    store = save_features(tmp_path / "s", rng.standard_normal((3, 4)).astype(np.float32), ["a", "b", "c"])
    for out in ("taken", "taken/store"):
        status, _, err = call_tool(
            "import_features", ["--embeddings", "x.npy", "--ids", "ids.txt", "--output", out], capsys
        )
        _one_error(status, err, "taken")
        status, _, err = call_tool("merge_features", [store, "--output", out], capsys)
        _one_error(status, err, "taken")


# ----------------------------------------------------------------------------- 3. export sizes


def _refuse_model_load(monkeypatch):
    import metric.engine.memory_estimates as memory
    import metric.export.onnx as onnx_mod

    def load(cfg):
        raise AssertionError("the model was loaded before the sizes were checked")

    monkeypatch.setattr(onnx_mod, "load_export_model", load)
    monkeypatch.setattr(memory, "machine_memory", lambda: 16 * 10**9)


@pytest.mark.parametrize("size, dynamic", [(("100000", "100000"), False), (("32", "100000"), True)])
def test_torch2onnx_refuses_a_size_that_cannot_fit(tmp_path, tiny_weights, monkeypatch, capsys, size, dynamic):
    _refuse_model_load(monkeypatch)
    argv = [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "--output", tmp_path / "m.onnx", "--size", *size]
    status, _, err = call_tool("torch2onnx", argv + (["--dynamic"] if dynamic else []), capsys)
    _one_error(status, err, f"export size {size[0]} x {size[1]}", "needs about", "16.0 GB", "--size")
    assert os.listdir(tmp_path) == []


def test_kaggle_model_refuses_a_size_that_cannot_fit(tmp_path, tiny_weights, monkeypatch, capsys):
    _refuse_model_load(monkeypatch)
    argv = [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "TEST.IM_SIZE", "100000", "--output", tmp_path / "s.zip"]
    status, _, err = call_tool("make_kaggle_model", argv, capsys)
    _one_error(status, err, "TEST.IM_SIZE=100000", "needs about", "lower TEST.IM_SIZE")


def test_export_memory_estimate_accepts_ordinary_sizes():
    from metric.engine.memory_estimates import check_export_memory
    from metric.export.onnx import export_inputs

    cfg = load_cfg(None, ["MODEL.DEPTH", "50"])
    check_export_memory(cfg, export_inputs((1024, 1024), True), "export size", "smaller", cpu_bytes=8 * 10**9)
    with pytest.raises(ConfigError, match="needs about 2.2 GB"):
        check_export_memory(cfg, export_inputs((2800, 2800)), "export size", "smaller", cpu_bytes=2 * 10**9)


# ----------------------------------------------------------------------------- 4. abbreviations


def _tool_options(name, monkeypatch):
    """The long options of the parser that tools/NAME.py builds (captured at parse time)."""
    captured = []

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise Captured

    with monkeypatch.context() as m:
        m.setattr(cli._ArgumentParser, "parse_args", capture)
        spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with logging_restored(), pytest.raises(Captured):
            module.main([])
    return sorted(o for o in captured[0]._option_string_actions if o.startswith("--"))


def _abbreviation(options):
    """An unambiguous prefix of one option (the longest such option; argparse would accept it)."""
    for opt in sorted((o for o in options if o != "--help"), key=len, reverse=True) + ["--help"]:
        prefix = opt[:-1]
        if len(prefix) > 2 and [o for o in options if o.startswith(prefix)] == [opt]:
            return prefix
    raise AssertionError(options)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_refuses_an_abbreviated_option(tool, monkeypatch, capsys):
    options = _tool_options(tool, monkeypatch)
    for abbr in {_abbreviation(options), "--hel"}:
        status, out, err = call_tool(tool, [abbr], capsys)
        _one_error(status, err, f"unrecognized option {abbr} (did you mean --")
        assert out == ""


def test_abbreviation_on_the_real_command_line(tmp_path):
    proc = run_py(["tools/plot_stats.py", str(tmp_path), "--outpu", str(tmp_path / "c.png")])
    _one_error(proc.returncode, proc.stderr, "unrecognized option --outpu (did you mean --output?)")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    "script", ["dolg_throughput", "train_throughput", "scale_bench", "search_bench", "rerank_demo", "dist_search_bench"]
)
def test_benchmarks_refuse_abbreviated_options(script, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", os.path.join(REPO, "benchmarks", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--hel"])
    with pytest.raises(SystemExit) as info:
        if hasattr(module, "parse_args"):
            module.parse_args()
        elif hasattr(module, "make_parser"):
            module.make_parser().parse_args(["--hel"])
        else:
            module.main(["--hel"])
    assert info.value.code == 2 and "unrecognized arguments: --hel" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. colliding outputs


def test_search_output_and_scores_to_one_file_is_refused(stores, capsys):
    tmp, qry, idx = stores
    (tmp / "sub").mkdir()
    for scores in (tmp / "r.csv", tmp / "sub" / ".." / "r.csv"):
        status, _, err = call_tool(
            "search",
            ["--query", qry, "--index", idx, "--output", tmp / "r.csv", "--scores", scores, "--no-progress"],
            capsys,
        )
        _one_error(status, err, "--output and --scores are the same file", str(tmp / "r.csv"))
        assert not (tmp / "r.csv").exists()
    os.symlink(tmp / "sub", tmp / "link")
    status, _, err = call_tool(
        "search",
        [
            "--query",
            qry,
            "--index",
            idx,
            "--output",
            tmp / "sub" / "r.csv",
            "--scores",
            tmp / "link" / "r.csv",
            "--no-progress",
        ],
        capsys,
    )
    _one_error(status, err, "the same file")


@pytest.mark.parametrize("name", ["meta.json", "ids.txt", "results.csv", ""])
def test_search_output_into_an_input_store_is_refused(stores, capsys, name):
    tmp, qry, idx = stores
    before = {n: (tmp / "query" / n).read_bytes() for n in os.listdir(qry)}
    status, _, err = call_tool(
        "search", ["--query", qry, "--index", idx, "--output", os.path.join(qry, name), "--no-progress"], capsys
    )
    _one_error(status, err, "--output", "the input --query")
    assert {n: (tmp / "query" / n).read_bytes() for n in os.listdir(qry)} == before
    assert len(load_features(qry)) == 4


def test_outputs_equal_to_an_input_are_refused_in_every_tool(stores, tiny_data, tiny_weights, capsys):
    tmp, qry, idx = stores
    results, gt, stats = tmp / "results.csv", tmp / "solution.csv", tmp / "run" / "stats.jsonl"
    results.write_text("id,images\nq0,img1\n")
    gt.write_text("id,images,Usage\nq0,img1,Public\n")
    stats.parent.mkdir()
    stats.write_text('{"_type": "train_iter", "epoch": 1, "iter": 1, "iters": 1, "loss": 1.0, "lr": 0.1}\n')
    np.save(tmp / "x.npy", np.ones((2, 8), np.float32))
    (tmp / "ids.txt").write_text("a\nb\n")
    ext = [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "INFER.INPUT", os.path.join(tiny_data, "test.txt")]
    cases = [
        ("evaluate", ["--results", results, "--gt", gt, "--json", results], "--json", "is also the input --results"),
        (
            "evaluate",
            ["--query", qry, "--index", idx, "--gt", gt, "--json", tmp / "index" / "m.json"],
            "--json",
            "is inside the input --index",
        ),
        (
            "visualize",
            ["--results", results, "--gt", gt, "--query-root", tmp, "--index-root", tmp, "--output", gt],
            "--output",
            "is also the input --gt",
        ),
        ("plot_stats", [tmp / "run", "--output", stats], "--output", "is also the input"),
        ("merge_features", [qry, idx, "--output", idx], "--output", "is also the input"),
        (
            "import_features",
            ["--embeddings", tmp / "x.npy", "--ids", tmp / "ids.txt", "--output", tmp],
            "--output",
            "inside the output --output",
        ),
        (
            "torch2onnx",
            [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "--output", tiny_weights],
            "--output",
            "is also the input TEST.WEIGHTS",
        ),
        (
            "make_kaggle_model",
            [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "--output", tiny_weights],
            "--output",
            "is also the input TEST.WEIGHTS",
        ),
        ("onnx2tf", [tmp / "m.onnx", tmp], "OUTDIR", "is inside the output OUTDIR"),
        ("extract_features", [*ext, "INFER.OUTPUT", tiny_data], "INFER.OUTPUT", "inside the output INFER.OUTPUT"),
        (
            "test_metric",
            [*TINY_MODEL, "TEST.WEIGHTS", tiny_weights, "--json", tiny_weights],
            "--json",
            "is also the input TEST.WEIGHTS",
        ),
    ]
    kept = {p: p.read_bytes() for p in (results, gt, stats)}
    for tool, argv, *words in cases:
        status, _, err = call_tool(tool, argv, capsys)
        _one_error(status, err, *words)
    assert {p: p.read_bytes() for p in kept} == kept
    assert len(load_features(idx)) == 30 and os.path.exists(os.path.join(tiny_data, "test.txt"))


def test_check_distinct_paths():
    io.check_distinct_paths(
        [("--output", "a.csv"), ("--scores", "b.csv"), ("--json", None)],
        [("--gt", "gt.csv")],
        stores=[("--query", "q")],
    )
    io.check_distinct_paths([("--output", "q2/r.csv")], stores=[("--query", "q")])  # q2 is not inside q
    with pytest.raises(OutputError, match="--output and --scores are the same file"):
        io.check_distinct_paths([("--output", "a.csv"), ("--scores", "./x/../a.csv")])
    with pytest.raises(OutputError, match="is inside the input --query q"):
        io.check_distinct_paths([("--output", "q/r.csv")], stores=[("--query", "q")])


# ----------------------------------------------------------------------------- 6. original search form


@pytest.mark.parametrize(
    "argv, command",
    [
        (
            ["search_gpu", "q_feats,", "r_feats,", "out.pkl"],
            "--query q_feats --index r_feats --output out.csv --topk 100",
        ),
        (["search_gpu", "q,r,res.csv", "50"], "--query q --index r --output res.csv --topk 50"),
    ],
)
def test_original_search_command_names_the_new_one(argv, command, capsys):
    status, out, err = call_tool("search", argv, capsys)
    _one_error(status, err, "search_gpu", f"python tools/search.py {command}")
    assert out == ""


# ----------------------------------------------------------------------------- 7. tools/infer.sh

TINY = [
    *TINY_MODEL,
    "MODEL.HEADS.POOL_LAYER",
    "avgpool",
    "TEST.IM_SIZE",
    "40",  # the model of tiny_weights
    "DATA_LOADER.NUM_WORKERS",
    "0",
]


def _infer(args, cwd, path_prefix=None):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    cmd = [
        "bash",
        os.path.join(REPO, "tools", "infer.sh"),
        "--cfg",
        os.path.join(REPO, "configs", "metric", "demo_cpu.yaml"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _fake_mkdir(folder, cause):
    """A ``mkdir`` earlier on PATH that fails as the real one does on a full or read-only disk
    (the shell's analogue of the injected OSErrors of tests/test_faults_write.py; works as root)."""
    folder.mkdir()
    script = folder / "mkdir"
    script.write_text(f"#!/bin/sh\necho \"mkdir: cannot create directory 'x': {cause}\" >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(folder)


@pytest.fixture()
def infer_setup(tmp_path, tiny_weights):
    (tmp_path / "w.pth").write_bytes(open(tiny_weights, "rb").read())
    (tmp_path / "taken").write_text("a file\n")
    return tmp_path


@pytest.mark.parametrize("case", ["parent is a file", "output is a file", "full disk", "read-only"])
def test_infer_sh_destination_faults_are_one_line(infer_setup, case):
    tmp = infer_setup
    fake = None
    out = {"parent is a file": tmp / "taken" / "feats", "output is a file": tmp / "taken"}.get(case, tmp / "new" / "f")
    if case == "full disk":
        fake = _fake_mkdir(tmp / "bin", "No space left on device")
    elif case == "read-only":
        fake = _fake_mkdir(tmp / "bin", "Read-only file system")
    proc = _infer(
        ["--weights", str(tmp / "w.pth"), "--input", str(tmp / "list.txt"), "--output", str(out), "--gpus", ""],
        tmp,
        fake,
    )
    words = {
        "parent is a file": ["parent folder", "taken", "is not a folder"],
        "output is a file": ["taken exists and is not a folder"],
        "full disk": [f"cannot create shard folder {out}.shards: no space left on device"],
        "read-only": [f"cannot create shard folder {out}.shards: read-only file system"],
    }[case]
    _one_error(proc.returncode, proc.stderr, *words)
    assert (tmp / "taken").read_text() == "a file\n" and not (tmp / "new").exists()


@pytest.mark.skipif(ROOT_USER, reason="root ignores file permissions")
def test_infer_sh_read_only_folder(infer_setup):
    tmp = infer_setup
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    try:
        proc = _infer(["--weights", "w.pth", "--input", "list.txt", "--output", "ro/feats", "--gpus", ""], tmp)
    finally:
        (tmp / "ro").chmod(0o755)
    _one_error(proc.returncode, proc.stderr, "cannot create shard folder ro/feats.shards: permission denied")


def test_infer_sh_failed_shard_is_one_line(infer_setup):
    proc = _infer(
        ["--weights", "w.pth", "--input", "missing.txt", "--output", "feats", "--gpus", "", *TINY], infer_setup
    )
    _one_error(
        proc.returncode,
        proc.stderr,
        "shard 1/1 failed:",
        "missing.txt",
        "(log: feats.shards/",
        "rerun the same command",
    )


@pytest.mark.slow
def test_infer_sh_resolves_relative_paths_against_the_callers_folder(tiny_data, tmp_path, tiny_weights):
    """Relative --weights, --input and --output given from another folder than the checkout."""
    work = tmp_path / "work"
    shutil.copytree(tiny_data, work / "data")
    (work / "w.pth").write_bytes(open(tiny_weights, "rb").read())
    proc = _infer(
        [
            "--weights",
            "w.pth",
            "--input",
            "data/test.txt",
            "--output",
            "out/feats",
            "--shards",
            "2",
            "--gpus",
            "",
            *TINY,
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(load_features(work / "out" / "feats")) == 32
    assert not os.path.exists(os.path.join(REPO, "out"))
