"""tools/search.py, import_features.py, merge_features.py, build_index.py: happy paths and exit 2."""

import os

import numpy as np
import pytest

from metric.retrieval.ann import load_ann_index
from metric.retrieval.results import read_results_csv, read_scores_csv
from metric.retrieval.search import search
from metric.retrieval.store import load_features, save_features
from metric.utils.errors import FeatureStoreError
from tests.helpers import call_tool, run_py


@pytest.fixture()
def stores(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((12, 8)).astype(np.float32)
    idx = save_features(tmp_path / "index", x, [f"img{i}" for i in range(len(x))])
    qry = save_features(tmp_path / "query", q, [f"q{i}" for i in range(len(q))])
    return tmp_path, qry, idx


def test_search_tool(stores, capsys):
    tmp, qry, idx = stores
    status, out, _ = call_tool(
        "search",
        [
            "--query",
            qry,
            "--index",
            idx,
            "--topk",
            7,
            "--output",
            tmp / "r.csv",
            "--scores",
            tmp / "s.csv",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0 and "results:" in out
    q, x = load_features(qry), load_features(idx)
    scores, ref = search(q, x, 7)
    res = read_results_csv(tmp / "r.csv")
    assert list(res) == q.ids
    assert res["q3"] == [x.ids[j] for j in ref[3]]
    np.testing.assert_allclose(read_scores_csv(tmp / "s.csv")["q3"], scores[3], atol=1e-5)
    status, _, _ = call_tool(
        "search",
        [
            "--query",
            qry,
            "--index",
            idx,
            "--topk",
            7,
            "--output",
            tmp / "r2.csv",
            "--qe",
            3,
            "--dba",
            2,
            "--backend",
            "faiss",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0 and len(read_results_csv(tmp / "r2.csv")["q0"]) == 7


def test_import_and_merge_tools(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.standard_normal((6, 4)))
    (tmp_path / "ids.txt").write_text("".join(f"a{i}\n" for i in range(6)))
    status, out, _ = call_tool(
        "import_features",
        ["--embeddings", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt", "--output", tmp_path / "a"],
        capsys,
    )
    assert status == 0 and "imported 6 x 4" in out
    save_features(tmp_path / "b", rng.standard_normal((3, 4)), ["b0", "b1", "b2"])
    status, out, _ = call_tool("merge_features", [tmp_path / "a", tmp_path / "b", "--output", tmp_path / "m"], capsys)
    assert status == 0 and load_features(tmp_path / "m").ids == [f"a{i}" for i in range(6)] + ["b0", "b1", "b2"]


def test_build_index_tool_and_ann_search(stores, capsys):
    tmp, qry, idx = stores
    status, out, _ = call_tool(
        "build_index", ["--index", idx, "--type", "hnsw", "--sample", 20, "--no-progress"], capsys
    )
    assert status == 0 and "recall@100" in out
    status, out, _ = call_tool(
        "build_index",
        [
            "--index",
            idx,
            "--type",
            "ivfpq",
            "--nlist",
            4,
            "--m",
            2,
            "--nbits",
            4,
            "--nprobe",
            4,
            "--query",
            qry,
            "--sample",
            12,
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0, out
    recall = float(out.strip().split()[-1])
    assert 0.0 < recall <= 1.0
    status, _, err = call_tool("search", ["--query", qry, "--index", idx, "--output", tmp / "r.csv", "--ann"], capsys)
    assert status == 2 and "several approximate indexes" in err
    status, _, _ = call_tool(
        "search",
        [
            "--query",
            qry,
            "--index",
            idx,
            "--topk",
            5,
            "--output",
            tmp / "r.csv",
            "--ann",
            "--ann-type",
            "hnsw",
            "--qe",
            2,
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0 and len(read_results_csv(tmp / "r.csv")) == 12


def test_stale_ann_index_is_refused(stores, capsys):
    tmp, _, idx = stores
    (tmp / "ann").mkdir()
    status, _, _ = call_tool(
        "build_index",
        ["--index", idx, "--type", "hnsw", "--output-dir", tmp / "ann", "--sample", 5, "--no-progress"],
        capsys,
    )
    assert status == 0
    load_ann_index(idx, "hnsw", tmp / "ann")
    save_features(idx, np.ones((300, 8)) + np.arange(8), [f"img{i}" for i in range(300)])  # store changed
    with pytest.raises(FeatureStoreError, match="different version of store"):
        load_ann_index(idx, "hnsw", tmp / "ann")


def _bad_calls(tmp, qry, idx):
    other = save_features(tmp / "other", np.ones((3, 5)), ["o1", "o2", "o3"])
    os.makedirs(tmp / "half")
    np.save(tmp / "half" / "embeddings.npy", np.ones((2, 8), np.float32))
    out = ["--output", tmp / "r.csv"]
    return [
        ("search", ["--query", qry, "--index", tmp / "missing", *out], "does not exist"),
        ("search", ["--query", qry, "--index", tmp / "half", *out], "not a complete feature store"),
        ("search", ["--query", qry, "--index", other, *out], "query dimension 8 does not match index dimension 5"),
        ("search", ["--query", qry, "--index", idx, "--topk", 0, *out], "topk must be an integer >= 1"),
        ("search", ["--query", qry, "--index", idx, "--output", tmp / "nodir" / "r.csv"], "does not exist"),
        ("search", ["--query", qry, "--index", idx, "--qe", -2, *out], "K must be"),
        ("search", ["--query", qry, "--index", idx, "--ann", "--dba", 2, *out], "cannot use a saved approximate"),
        ("search", ["--query", qry, "--index", idx, "--ann", *out], "no approximate index"),
        (
            "import_features",
            ["--embeddings", tmp / "no.npy", "--ids", tmp / "no.txt", "--output", tmp / "i"],
            "does not exist",
        ),
        ("merge_features", [idx, tmp / "half", "--output", tmp / "m"], "half (incomplete"),
        ("merge_features", [idx, other, "--output", tmp / "m"], "different dimensions"),
        ("build_index", ["--index", idx, "--type", "ivfpq", "--nbits", 9], "needs at least 512 training vectors"),
        ("build_index", ["--index", idx, "--type", "ivfpq", "--m", 3], "must divide the dimension 8"),
    ]


def test_bad_inputs_exit_2_with_one_line(stores, capsys):
    tmp, qry, idx = stores
    for name, args, match in _bad_calls(tmp, qry, idx):
        status, _, err = call_tool(name, args, capsys)
        assert status == 2, (name, args)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (name, err)


def test_bad_arguments_exit_2(stores, capsys):
    tmp, qry, idx = stores
    status, _, err = call_tool(
        "search", ["--query", qry, "--index", idx, "--output", tmp / "r.csv", "--backend", "nope"], capsys
    )
    assert status == 2 and "error: argument --backend: invalid choice" in err


@pytest.mark.slow
def test_exit_status_in_subprocess(stores):
    tmp, qry, _ = stores
    proc = run_py(
        ["tools/search.py", "--query", str(qry), "--index", str(tmp / "missing"), "--output", str(tmp / "r.csv")],
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: feature store {tmp / 'missing'} does not exist"]
