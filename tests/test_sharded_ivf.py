"""Sharded IVF (issue 21): one trained quantizer, one index per shard, searched under torchrun.

The reference of a sharded IVF search is a single IVF index filled from the SAME trained
quantizer (``--shards 1 --quantizer``): with the same ``nprobe`` it visits the same lists, whose
rows and codes are those of the shards together, so the merged lists must hold the same ids
wherever the scores are distinct (faiss orders equal scores arbitrarily; the merge orders them by
row) and the same scores.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from metric.retrieval import ann_sharded
from metric.retrieval.ann import AnnSearchOptions
from metric.retrieval.results import read_results_csv, read_scores_csv
from metric.retrieval.sharded import open_index
from metric.retrieval.store import load_features, save_features
from metric.retrieval.topk_merge import merge_topk, sort_topk
from metric.utils.errors import FeatureStoreError
from tests.helpers import REPO, call_tool, free_port

N, DIM, Q = 3001, 16, 40


def _clustered(rng, n, centres, spread=0.35):
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An index store of N clustered rows (40 of them exact duplicates of other rows, so that
    equal scores occur within and across shards) and a query store."""
    root = tmp_path_factory.mktemp("ivf")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((24, DIM))
    x = _clustered(rng, N, centres)
    x[rng.choice(N, 40, replace=False)] = x[rng.choice(N, 40, replace=False)]
    index, query = str(root / "index"), str(root / "query")
    save_features(index, x, [f"x{i:05d}" for i in range(N)])
    save_features(query, _clustered(rng, Q, centres), [f"q{i:03d}" for i in range(Q)])
    return index, query, root


def _build(capsys, *argv):
    status, out, err = call_tool("build_index", [*argv, "--no-progress", "--sample", 30], capsys)
    assert status == 0, err
    return out


def _two_ranks(argv):
    """``tools/search.py ARGV`` as 2 gloo ranks, started with the environment torchrun gives its
    workers (no launcher process: half the start-up time); stdout of rank 0, stderr of both."""
    port = str(free_port())
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "tools/search.py", *argv, "--no-progress"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=dict(os.environ, **env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    status = max(p.returncode for p in procs)
    return subprocess.CompletedProcess(cmd, status, outs[0][0], outs[0][1] + outs[1][1])


def _check_equal(ref_ids, ref_scores, ids, scores):
    """Same (printed) scores; ids equal wherever a score is distinct; a group of equal printed
    scores holds the same ids (the last group of a row may be cut at k differently)."""
    for q in ref_ids:
        a, b = np.array(ref_scores[q]), np.array(scores[q])
        assert np.array_equal(a, b), q
        values, counts = np.unique(a, return_counts=True)
        for v, c in zip(values, counts):
            at = np.flatnonzero(a == v)
            got = [ids[q][i] for i in at]
            if v != a[-1]:
                assert set(got) == {ref_ids[q][i] for i in at}, (q, v)
                if c == 1:
                    assert got == [ref_ids[q][at[0]]]


@pytest.mark.slow
@pytest.mark.dist
def test_sharded_ivf_search_equals_one_index_from_the_same_quantizer_and_refuses_a_mismatched_shard(
    data, tmp_path, capsys
):
    index, query, _ = data
    ann = str(tmp_path / "ann")
    os.makedirs(ann)
    common = ["--index", index, "--type", "ivfpq", "--nlist", 16, "--m", 4, "--nbits", 6, "--output-dir", ann]
    out = _build(capsys, *common, "--shards", 2, "--nprobe", 4)
    assert "shard 1 of 2: rows 1501..3001" in out
    search = ["--query", query, "--index", index, "--topk", "25", "--ann", "--ann-dir", ann, "--nprobe", "4"]
    # one process (no torchrun, no --shard) searches the 2 shards one after the other, merged as 2 ranks do
    merged = str(tmp_path / "merged.csv")
    status, _, err = call_tool("search", [*search, "--output", merged], capsys)
    assert status == 0, err
    by_queries = str(tmp_path / "by_queries.csv")  # --shard queries: every rank searches every shard
    status, _, err = call_tool("search", [*search, "--output", by_queries, "--shard", "queries"], capsys)
    assert status == 0, err
    assert read_results_csv(by_queries) == read_results_csv(merged)
    trained = os.path.join(ann, "faiss_ivfpq.trained")
    _build(capsys, *common, "--shards", 1, "--quantizer", trained)

    single = [str(tmp_path / "one.csv"), str(tmp_path / "one_scores.csv")]
    status, _, err = call_tool(
        "search", [*search, "--shard", "index", "--output", single[0], "--scores", single[1]], capsys
    )
    assert status == 0, err
    sharded = [str(tmp_path / "two.csv"), str(tmp_path / "two_scores.csv")]
    proc = _two_ranks([*search, "--output", sharded[0], "--scores", sharded[1]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded over 2 process(es) by index" in proc.stdout
    ref_ids, ref_scores = read_results_csv(single[0]), read_scores_csv(single[1])
    ids, scores = read_results_csv(sharded[0]), read_scores_csv(sharded[1])
    assert list(ids) == list(ref_ids) and all(len(v) == 25 for v in ids.values())
    _check_equal(ref_ids, ref_scores, ids, scores)
    assert read_results_csv(merged) == ids

    # shard 1 rebuilt from another trained quantizer: refused by every rank, before any search
    other = str(tmp_path / "other")
    os.makedirs(other)
    _build(capsys, *common[:-1], other, "--shards", 2, "--train-only", "--seed", 5, "--train-size", 2000)
    _build(capsys, *common, "--shards", 2, "--shard-rank", 1, "--quantizer", os.path.join(other, "faiss_ivfpq.trained"))
    bad = str(tmp_path / "bad.csv")
    proc = _two_ranks([*search, "--output", bad])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "was built from another trained quantizer" in line]
    assert len(lines) == 1 and "faiss_ivfpq.shard-1-of-2.index" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(bad)


def test_ivfflat_shards_of_shard_stores_equal_one_index(data, tmp_path):
    """A folder of shard stores (as sharded extraction writes it) gets one index per store; the
    shards merged equal one IVF-Flat index from the same quantizer (exact scores in the lists)."""
    index, _, _ = data
    store = load_features(index)
    folder = tmp_path / "index.shards"
    folder.mkdir()
    cuts = [0, 1000, 1001, N]  # unequal shards, one of a single row
    for k in range(3):
        a, b = cuts[k], cuts[k + 1]
        meta = {"shard": {"index": k + 1, "total": 3}}
        save_features(str(folder / f"shard_{k + 1:04d}_of_0003"), store.embeddings[a:b], store.ids[a:b], meta=meta)
    layout = open_index(str(folder))
    options = ann_sharded.ShardedIvfOptions(index_type="ivfflat", nlist=16, sample=0)
    built = ann_sharded.build_sharded_index(layout, options=options)
    assert [(p["start"], p["stop"]) for p in built["shards"]] == [(0, 1000), (1000, 1001), (1001, N)]
    ann_sharded.build_sharded_index(layout, world=1, options=options, quantizer=built["trained"]["path"])
    queries = np.array(store.embeddings[::97])
    one, params = ann_sharded.load_ivf_shard(layout, 1, 0)
    ref_s, ref_i = sort_topk(*ann_sharded.search_ivf_shard(one, params, queries, 30, nprobe=3), 30)
    parts = [ann_sharded.load_ivf_shard(layout, 3, r) for r in range(3)]
    ann_sharded.check_shard_group([p for _, p in parts])
    found = [ann_sharded.search_ivf_shard(ix, p, queries, 30, nprobe=3) for ix, p in parts]
    s, i = merge_topk([f[0] for f in found], [f[1] for f in found], 30)
    assert np.array_equal(s, ref_s)
    # ids equal where a score is distinct (a score equal to the k-th may tie with a row past k)
    distinct = np.array([[np.sum(row == v) == 1 and v != row[-1] for v in row] for row in ref_s])
    assert distinct.mean() > 0.5
    bad = np.argwhere(distinct & (i != ref_i))
    assert not len(bad), [(r, c, ref_s[r, c], ref_s[r, -1], i[r, c], ref_i[r, c]) for r, c in bad[:5]]


def test_shards_of_another_store_version_or_layout_are_refused(data, tmp_path, capsys):
    index, _, _ = data
    store = load_features(index)
    copy, ann = str(tmp_path / "copy"), str(tmp_path / "ann")
    os.makedirs(ann)
    save_features(copy, store.embeddings, store.ids)
    _build(capsys, "--index", copy, "--type", "ivfflat", "--nlist", 8, "--shards", 2, "--output-dir", ann)
    layout = open_index(copy)
    params = [ann_sharded.load_ivf_shard(layout, 2, r, ann)[1] for r in range(2)]
    ann_sharded.check_shard_group(params)
    with pytest.raises(FeatureStoreError, match="no sharded IVF index of 3 shards in .* --shards 3"):
        ann_sharded.load_ivf_shard(layout, 3, 0, ann, index_type="ivfflat")
    with pytest.raises(FeatureStoreError, match="shard-1-of-2.index does not fit"):
        ann_sharded.check_shard_group([params[0], dict(params[1], start=1400)])
    with pytest.raises(FeatureStoreError, match="the shards end at row 2900"):
        ann_sharded.check_shard_group([params[0], dict(params[1], stop=2900)])
    # a damaged shard file, a missing shard
    shard0 = os.path.join(ann, "faiss_ivfflat.shard-0-of-2.index")
    data0 = open(shard0, "rb").read()
    with open(shard0, "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2")
    with pytest.raises(FeatureStoreError, match="does not match"):
        ann_sharded.load_ivf_shard(layout, 2, 0, ann)
    with open(shard0, "wb") as f:
        f.write(data0)
    os.rename(os.path.join(ann, "faiss_ivfflat.shard-1-of-2.json"), os.path.join(tmp_path, "moved.json"))
    with pytest.raises(FeatureStoreError, match="shard 1 of 2 is missing .* --shards 2 --shard-rank 1"):
        ann_sharded.load_ivf_shard(layout, 2, 1, ann)
    # the store rewritten (one row changed): its shards are refused, naming the file
    x = np.array(store.embeddings)
    x[7] = x[8]
    save_features(copy, x, store.ids)
    with pytest.raises(FeatureStoreError, match=r"shard-0-of-2.index was built for other index stores"):
        ann_sharded.load_ivf_shard(open_index(copy), 2, 0, ann)


def test_shards_built_one_by_one_with_the_saved_quantizer_equal_a_build_of_all(data, tmp_path, capsys):
    """Train once (--train-only), build each shard apart (--shard-rank, as on other machines):
    the same index files as one build of all shards."""
    index, _, _ = data
    together, apart = str(tmp_path / "together"), str(tmp_path / "apart")
    os.makedirs(together)
    os.makedirs(apart)
    common = ["--index", index, "--type", "ivfflat", "--nlist", 8, "--shards", 3]
    _build(capsys, *common, "--output-dir", together)
    out = _build(capsys, *common, "--output-dir", apart, "--train-only")
    assert "quantizer: ivfflat nlist=8" in out and not os.path.exists(
        os.path.join(apart, "faiss_ivfflat.shard-0-of-3.json")
    )
    quantizer = os.path.join(together, "faiss_ivfflat.trained")
    for rank in (2, 0, 1):
        _build(capsys, *common, "--output-dir", apart, "--shard-rank", rank, "--quantizer", quantizer)
    for rank in range(3):
        name = f"faiss_ivfflat.shard-{rank}-of-3.index"
        assert open(os.path.join(together, name), "rb").read() == open(os.path.join(apart, name), "rb").read()


def test_a_shard_being_built_by_another_run_is_refused_in_one_line(data, tmp_path, capsys):
    import fcntl
    import socket

    index, _, _ = data
    out = str(tmp_path / "out")
    os.makedirs(out)
    fd = os.open(os.path.join(out, "faiss_ivfflat.shard-1-of-2.index.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: as another process holds it
        os.write(fd, f"4242 {socket.gethostname()}\n".encode())
        argv = ["--index", index, "--type", "ivfflat", "--nlist", 8, "--shards", 2, "--output-dir", out]
        status, _, err = call_tool("build_index", [*argv, "--no-progress"], capsys)
    finally:
        os.close(fd)
    assert status == 2 and "faiss_ivfflat.shard-1-of-2.index is in use by another run (pid 4242)" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(out, "faiss_ivfflat.shard-1-of-2.json"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shards", 2, "--shard-rank", 1], "needs the trained quantizer: train it first with --train-only"),
        (["--shards", 2, "--type", "hnsw"], "sharded indexes are IVF ones"),
        (["--type", "ivfflat"], "--type ivfflat is a sharded index type: add --shards W"),
        (["--shards", 2, "--shard-rank", 2, "--quantizer", "Q"], "no trained quantizer at"),
        (["--shards", 0], "shards must be an integer >= 1"),
    ],
)
def test_build_index_sharded_bad_input_is_one_line(data, tmp_path, capsys, argv, message):
    index, _, _ = data
    out = str(tmp_path / "out")
    os.makedirs(out)
    argv = [str(tmp_path / a) if a == "Q" else a for a in argv]
    status, _, err = call_tool("build_index", ["--index", index, "--output-dir", out, "--nlist", 8, *argv], capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_ann_shard_modes():
    assert ann_sharded.ann_shard_mode("queries") == "queries"  # every rank loads every shard
    assert ann_sharded.ann_shard_mode(None) == ann_sharded.ann_shard_mode("auto") == "index"
    assert AnnSearchOptions(index_type="ivfflat").index_type == "ivfflat"
