"""Sharded search (issue 21): tools/search.py and tools/evaluate.py over 2 and 3 gloo processes equal a
single process; the index is refused before any search when its shards do not tile it; a stopped or
dead rank ends the run with one line and no results file.

The multi-process runs are few and each runs many checks: one 2-process launch runs every tool
command of ``_runs`` in one process group (index and queries sharding, ties, αQE + DBA, labelled
metrics, refusals), then a rank that stops and a rank that dies; one torchrun of 3 processes runs
the user's command."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from metric.retrieval.results import read_results_csv, read_scores_csv
from metric.retrieval.store import save_features
from metric.retrieval.topk_merge import merge_topk, shard_rows
from tests.helpers import REPO, call_tool, free_port

# ----------------------------------------------------------------------------- data


def _tie_vectors(rng, n, d=8):
    """Unit vectors with four entries +-0.5 and the rest 0: every product of two is exact
    (-1, -0.5, 0, 0.5 or 1) however it is computed, so scores tie exactly and often."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        cols = rng.choice(d, 4, replace=False)
        row[cols] = rng.choice([-0.5, 0.5], 4)
    return x


def _make_data(root):
    """Stores under ``root``: ``t`` (tie vectors with duplicates across the halves), the same in
    float16 ``t16``, and its queries ``tq``; ``r`` (random unit vectors), the same rows as three
    shard stores of 5, 20 and 12 rows in ``r.shards``, queries ``rq``, and label files. (Ties
    are exact only between exact products: αQE's queries would make duplicates in two slices
    differ in the last bit, the documented limit of the tie rule.)"""
    rng = np.random.default_rng(21)
    t = _tie_vectors(rng, 30)
    t[17], t[25], t[29] = t[3], t[5], t[1]  # duplicates in the other half of the index
    save_features(root / "t", t, [f"t{i}" for i in range(30)])
    save_features(root / "t16", t, [f"t{i}" for i in range(30)], dtype="float16")  # the same rows, exactly
    save_features(root / "tq", _tie_vectors(rng, 7), [f"tq{i}" for i in range(7)])
    r = rng.standard_normal((37, 16)).astype(np.float32)
    ids = [f"r{i}" for i in range(37)]
    save_features(root / "r", r, ids)
    (root / "r.shards").mkdir()
    start = 0
    for k, size in enumerate((5, 20, 12), 1):
        save_features(
            root / "r.shards" / f"shard_{k:04d}_of_0003",
            r[start : start + size],
            ids[start : start + size],
            meta={"shard": {"index": k, "total": 3}},
        )
        start += size
    save_features(root / "rq", rng.standard_normal((9, 16)).astype(np.float32), [f"rq{i}" for i in range(9)])
    (root / "r_labels.txt").write_text("".join(f"r{i} {i % 5}\n" for i in range(37)))
    shutil.copytree(root / "r.shards", root / "bad.shards")
    damaged = root / "bad.shards" / "shard_0003_of_0003" / "embeddings.npy"
    data = bytearray(damaged.read_bytes())
    data[-8:] = data[-4:] + data[-8:-4]  # two values of the last row swapped: same norm, another digest
    damaged.write_bytes(bytes(data))
    (root / "rq_labels.txt").write_text("".join(f"rq{i} {(i * 3) % 5}\n" for i in range(9)))


def _search_args(root, out, query, index, *extra):
    return ["--query", root / query, "--index", root / index, "--output", root / out, "--no-progress", *extra]


# Tool commands run by one 2-process group: (tool, argv relative to the data folder, expected status).
def _runs(root):
    return [
        ("search", _search_args(root, "o_ties.csv", "tq", "t", "--topk", "12", "--scores", root / "o_ties.s.csv"), 0),
        ("search", _search_args(root, "o_ties_q.csv", "tq", "t", "--topk", "12", "--shard", "queries"), 0),
        ("search", _search_args(root, "o_t16.csv", "tq", "t16", "--topk", "12"), 0),
        ("search", _search_args(root, "o_rc.csv", "rq", "r", "--topk", "10", "--scores", root / "o_rc.s.csv"), 0),
        ("search", _search_args(root, "o_rr.csv", "rq", "r.shards", "--topk", "10", "--dba", "2", "--qe", "2"), 0),
        (
            "search",
            _search_args(
                root, "o_rr_q.csv", "rq", "r.shards", "--topk", "10", "--dba", "2", "--qe", "2", "--shard", "queries"
            ),
            0,
        ),
        ("search", _search_args(root, "o_sg.csv", "rq", "r.shards", "--rerank", "superglobal", "--sg-m", "8"), 2),
        ("search", _search_args(root, "o_bad.csv", "rq", "bad.shards"), 2),  # only rank 1 verifies the bad shard
        (
            "evaluate",
            [
                "--query",
                root / "rq",
                "--query-labels",
                root / "rq_labels.txt",
                "--index",
                root / "r.shards",
                "--index-labels",
                root / "r_labels.txt",
                "--json",
                root / "e_index.json",
            ],
            0,
        ),
        (
            "evaluate",
            ["--query", root / "r", "--query-labels", root / "r_labels.txt", "--json", root / "e_loo.json"],
            0,
        ),
        (
            "evaluate",
            ["--query", root / "r", "--query-labels", root / "r_labels.txt", "--json", root / "e_loo_q.json"]
            + ["--shard", "queries"],
            0,
        ),
    ]


# Runs the tool commands of a JSON file in one process group (joined once) and prints their exit
# statuses. Then tools/search.py with the arguments FAULT_ARGS twice, each in a new group: rank 1
# stops itself (SIGSTOP) at its first all-gather of results (rank 0 wakes it once it has given up),
# then rank 1 dies there (exit 1).
_WORKER = """
import json, os, signal, sys, time
import metric.retrieval.sharded as sharded
from metric.retrieval.sharded_pipeline import process_group
from metric.utils.cli import run_tool
from tests.helpers import load_tool

runs = json.load(open(sys.argv[1]))
if os.environ["RANK"] != "0":  # sharded evaluation: rank 0 alone reads the labels (and ids)
    import metric.retrieval.sharded_pipeline as sharded_pipeline
    def no_labels(path):
        raise AssertionError("a rank other than 0 read " + str(path))
    sharded_pipeline.read_labels = no_labels
# --shard auto decides on each rank from its node's memory: here rank 0 finds room for queries
# sharding and rank 1 does not (nodes of unequal memory); every rank must still use one mode
sharded.QUERIES_PER_RANK = 1
sharded.machine_memory = (lambda: 1 << 50) if os.environ["RANK"] == "0" else (lambda: 1)
with process_group(60):
    statuses = [run_tool(load_tool(name).main, argv) for name, argv in runs]
print("STATUSES " + json.dumps(statuses), flush=True)

rank, real, pid_file = os.environ["RANK"], sharded.gather_rows, sys.argv[1] + ".pid"
def stalled(x):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)
    return real(x)
def dead(x):
    os._exit(1)
for fault, port, timeout in (("stalled", "PORT2", "3"), ("dead", "PORT3", "20")):
    os.environ["MASTER_PORT"] = os.environ[port]
    sharded.gather_rows = {"stalled": stalled, "dead": dead}[fault] if rank == "1" else real
    start = time.monotonic()
    status = run_tool(load_tool("search").main, json.loads(os.environ["FAULT_ARGS"]) + ["--timeout", timeout])
    print(f"{fault.upper()} {status} {time.monotonic() - start:.1f}", flush=True)
    if fault == "stalled" and rank == "0":
        os.kill(int(open(pid_file).read()), signal.SIGCONT)  # rank 1 goes on and finds rank 0 gone
"""


def _launch(world, args, extra_env=None):
    """Start ``python ARGS`` as ranks 0..world-1 of a process group (the environment torchrun
    gives its workers); returns the Popen objects."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            PYTHONPATH=REPO,
            OMP_NUM_THREADS="1",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **(extra_env or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *map(str, args)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=120):
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out.append((p.returncode, stdout, stderr))
    return out


def _same_results(root, sharded, single, scores=None):
    """The results CSVs ``sharded`` and ``single`` list the same ids; the scores CSVs ``scores``
    (a pair of names) hold the same scores up to float rounding."""
    a, b = read_results_csv(root / sharded), read_results_csv(root / single)
    assert a == b, (sharded, a, b)
    if scores:
        sa, sb = read_scores_csv(root / scores[0]), read_scores_csv(root / scores[1])
        assert sa.keys() == sb.keys()
        for key in sb:
            # printed with 6 decimals: a rounding-only difference moves the last digit by at most one
            np.testing.assert_allclose(sa[key], sb[key], rtol=0, atol=1.01e-6)


def _single(capsys, name, argv):
    status, _, err = call_tool(name, argv, capsys)
    assert status == 0, err


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- merge and slices


def test_merge_topk_equals_a_search_of_the_whole_index():
    from metric.retrieval.search import search

    rng = np.random.default_rng(0)
    x = _tie_vectors(rng, 41)
    q = _tie_vectors(rng, 6)
    for world in (1, 2, 3, 5):
        blocks = []
        for r in range(world):
            a, b = shard_rows(len(x), world, r)
            s, i = search(q, x[a:b], 9, backend="torch") if b > a else (np.zeros((6, 0)), np.zeros((6, 0), int))
            blocks.append((s, i + a))
        s, i = merge_topk([b[0] for b in blocks], [b[1] for b in blocks], 9)
        s0, i0 = search(q, x, 9, backend="torch")
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_array_equal(s, s0)
    # missing results (-1, -inf) of an approximate slice go last; the width stays k
    s, i = merge_topk([np.array([[0.5, -np.inf]], np.float32)], [np.array([[7, -1]])], 2)
    np.testing.assert_array_equal(i, [[7, -1]])
    assert [shard_rows(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


def test_the_default_timeout_is_dist_timeout_s():
    from metric.config import load_cfg
    from metric.retrieval.sharded_pipeline import DEFAULT_TIMEOUT_S

    assert DEFAULT_TIMEOUT_S == load_cfg(None, []).DIST.TIMEOUT_S


def test_auto_picks_the_mode_by_memory_and_logs_both_estimates(caplog):
    from metric.retrieval.sharded import choose_mode, estimate_memory

    n, d, q, k, w = 10_000_000, 512, 1_000_000, 100, 4
    index_mode = estimate_memory("index", n, d, 2, q, k, w)
    queries_mode = estimate_memory("queries", n, d, 2, q, k, w)
    assert n * d * 2 / w < index_mode < queries_mode  # a quarter of the index each vs all of it
    with caplog.at_level("INFO", logger="metric.retrieval.sharded"):
        assert choose_mode("auto", n, d, 2, q, k, w, budget=4 * queries_mode) == "queries"
    assert "with index sharding" in caplog.text and "using queries sharding" in caplog.text
    assert choose_mode("auto", n, d, 2, q, k, w, budget=queries_mode) == "index"  # does not fit half of it
    assert choose_mode("auto", n, d, 2, 100, k, w, budget=1 << 50) == "index"  # few queries
    assert choose_mode("queries", n, d, 2, 100, k, w, budget=1) == "queries"  # as asked


# ----------------------------------------------------------------------------- refusals, one process


def _shard_store(path, rows, k, total, **meta):
    save_features(
        path, rows, [f"{path.name}_{i}" for i in range(len(rows))], meta={"shard": {"index": k, "total": total}, **meta}
    )


@pytest.mark.parametrize("fault", ["gap", "overlap", "repeated rows", "dimension", "version"])
def test_shards_that_do_not_tile_the_index_are_refused_before_any_search(tmp_path, capsys, fault):
    rng = np.random.default_rng(1)
    shards = tmp_path / "x.shards"
    shards.mkdir()
    save_features(tmp_path / "q", rng.standard_normal((3, 8)).astype(np.float32), ["a", "b", "c"])
    rows = rng.standard_normal((4, 8)).astype(np.float32)
    _shard_store(shards / "shard_0001_of_0003", rows, 1, 3, model_digest="m1")
    bad = shards / "shard_0003_of_0003"
    if fault == "gap":
        expect = "shard 2/3 of the index is missing"
        _shard_store(bad, rows, 3, 3, model_digest="m1")
    else:
        _shard_store(shards / "shard_0002_of_0003", rows, 2, 3, model_digest="m1")
        if fault == "overlap":  # shard 2 twice (and 3 too)
            _shard_store(bad, rows, 3, 3, model_digest="m1")
            _shard_store(shards / "shard_2_of_3", rows, 2, 3, model_digest="m1")
            expect = "is given twice"
        elif fault == "repeated rows":  # shard 3 holds rows of shard 2 again
            save_features(
                bad,
                rows,
                [f"shard_0002_of_0003_{i}" for i in range(4)],
                meta={"shard": {"index": 3, "total": 3}, "model_digest": "m1"},
            )
            expect = "the shards overlap"
        elif fault == "dimension":
            _shard_store(bad, rng.standard_normal((4, 6)).astype(np.float32), 3, 3, model_digest="m1")
            expect = "has dimension 6"
        else:
            _shard_store(bad, rows, 3, 3, model_digest="m2")
            expect = "another version of the index"
    out = tmp_path / "out.csv"
    status, _, err = call_tool("search", ["--query", tmp_path / "q", "--index", shards, "--output", out], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert "shard_000" in lines[0]  # names the shard
    assert not out.exists()


def test_what_sharding_cannot_do_is_refused_in_one_line_and_superglobal_runs_by_queries(tmp_path, capsys):
    rng = np.random.default_rng(2)
    save_features(tmp_path / "x", rng.standard_normal((20, 8)).astype(np.float32), [f"x{i}" for i in range(20)])
    for steps, word in (("kreciprocal", "k-reciprocal"), ("superglobal", "SuperGlobal")):
        argv = ["--query", tmp_path / "x", "--index", tmp_path / "x", "--output", tmp_path / "o.csv"]
        params = ["--sg-m", "6", "--sg-k", "3", "--kr-k1", "5", "--kr-k2", "3"]
        status, _, err = call_tool("search", [*argv, "--shard", "index", "--rerank", steps, *params], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and word in err and "shard" in err, err
    status, _, err = call_tool(
        "evaluate", ["--results", tmp_path / "r.csv", "--gt", tmp_path / "g.csv", "--shard", "index"], capsys
    )
    assert status == 2 and len(err.strip().splitlines()) == 1 and "labelled sets only" in err, err
    for timeout in ("inf", "nan", "1e11", "0"):  # torch's process group overflows or hangs on huge ones
        argv = ["--query", tmp_path / "x", "--index", tmp_path / "x", "--output", tmp_path / "o.csv"]
        status, _, err = call_tool("search", [*argv, "--timeout", timeout], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and "--timeout must be" in err, err
    # with queries sharding every process maps the whole index: SuperGlobal runs and equals one process
    argv = ["--query", tmp_path / "x", "--index", tmp_path / "x", "--rerank", "superglobal"]
    argv += ["--sg-m", "6", "--sg-k", "3"]
    _single(capsys, "search", [*argv, "--output", tmp_path / "a.csv"])
    _single(capsys, "search", [*argv, "--output", tmp_path / "b.csv", "--shard", "queries"])
    assert read_results_csv(tmp_path / "a.csv") == read_results_csv(tmp_path / "b.csv")


def test_one_process_cuts_its_rows_over_devices_and_shard_folders_in_place(tmp_path, capsys):
    """--devices (CPU "devices" here: the logic of several GPUs in one process, untested on GPUs) and a
    folder of shard stores searched by one process equal the search of the merged store."""
    _make_data(tmp_path)
    for query, index, merged, extra in (
        ("tq", "t", "t", ["--devices", "cpu,cpu,cpu", "--topk", "12"]),
        ("rq", "r.shards", "r", ["--devices", "cpu,cpu", "--qe", "2", "--dba", "1"]),
        ("rq", "r.shards", "r", ["--shard", "index", "--topk", "50"]),  # more than the index holds: all 37
        ("rq", "r.shards", "r", ["--shard", "auto", "--rerank", "superglobal", "--sg-m", "6", "--sg-k", "3"]),
    ):
        _single(capsys, "search", [*_search_args(tmp_path, "a.csv", query, merged), *extra[2:]])
        _single(capsys, "search", [*_search_args(tmp_path, "b.csv", query, index), *extra])
        _same_results(tmp_path, "b.csv", "a.csv")
    assert all(len(v) == 37 for v in read_results_csv(tmp_path / "b.csv").values())


# ----------------------------------------------------------------------------- several processes


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_equal_one(tmp_path, capsys):
    """Every command of ``_runs`` over 2 ranks gives the results (and metrics) of one process, and the
    refusals (SuperGlobal with index sharding; a shard that only rank 1 verifies) are one line, printed
    once. A killed run's temporary is gone after the rerun. Then the faults (see ``_WORKER``)."""
    _make_data(tmp_path)
    runs = _runs(tmp_path)
    (tmp_path / "runs.json").write_text(json.dumps([[name, [str(a) for a in argv]] for name, argv, _ in runs]))
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    stale = tmp_path / f".o_ties.csv.tmp{_dead_pid()}"  # left by a killed run
    stale.write_text("id,images\nhalf a fi")
    fault_args = [str(a) for a in _search_args(tmp_path, "o_fault.csv", "rq", "r.shards")]
    env = {"PORT2": str(free_port()), "PORT3": str(free_port()), "FAULT_ARGS": json.dumps(fault_args)}
    procs = _launch(2, [worker, tmp_path / "runs.json"], env)

    # meanwhile, the same commands in this one process (no sharding)
    for name, argv, status in runs:
        if status != 0:
            continue
        argv = [str(a) for a in argv]
        argv = [a.replace(".csv", ".single.csv").replace(".json", ".single.json") for a in argv]
        argv = [a.replace("r.shards", "r") for a in argv]
        if "--shard" in argv:
            i = argv.index("--shard")
            argv = argv[:i] + argv[i + 2 :]
        _single(capsys, name, argv)

    # index sharding of one store over W ranks = one process with chunks of ceil(N / W) rows, byte for byte
    _single(
        capsys,
        "search",
        _search_args(
            tmp_path,
            "o_rc.chunked.csv",
            "rq",
            "r",
            "--topk",
            "10",
            "--chunk-size",
            "19",
            "--scores",
            tmp_path / "o_rc.s.chunked.csv",
        ),
    )
    results = _finish(procs)
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == rank, (rank, stderr[-3000:])  # rank 1 died (exit 1) in the last run
        statuses = json.loads(stdout.split("STATUSES ")[1].splitlines()[0])
        assert statuses == [status for _, _, status in runs], (rank, statuses, stderr[-3000:])
    stdout0, stderr0 = results[0][1:]
    errors = [line for line in stderr0.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "SuperGlobal" in errors[0], stderr0[-2000:]
    assert "bad.shards/shard_0003_of_0003" in errors[1] and "do not match the digest" in errors[1], errors
    errors1 = [line for line in results[1][2].splitlines() if line.startswith("error:")]
    assert len(errors1) == 1 and errors1[0].startswith("error: rank 1: all_gather"), errors1  # woken, rank 0 gone
    assert "using queries sharding" in stdout0 + stderr0  # rank 0's own choice under auto ...
    assert "the ranks chose index, queries: using index sharding on every rank" in stdout0 + stderr0  # ... overruled
    # a stopped rank: rank 0 ends within the timeout, with one line, and writes nothing
    assert errors[2].startswith("error: rank 0: all_gather") and "timed out after 3 s" in errors[2], errors
    assert "rank 1 gave no sign of life" in errors[2] and "raise --timeout" in errors[2], errors  # names it
    status, seconds = stdout0.split("STALLED ")[1].split()[:2]
    assert status == "2" and float(seconds) < 30, stdout0
    # a dead rank: rank 0 ends at once (before the timeout of 20 s), with one line, and writes nothing
    assert errors[3].startswith("error: rank 0: all_gather") and "closed its connection" in errors[3], errors
    assert "rank 1 gave no sign of life" in errors[3], errors  # named (not under torchrun: nobody else does)
    status, seconds = stdout0.split("DEAD ")[1].split()[:2]
    assert status == "2" and float(seconds) < 20, stdout0
    assert not (tmp_path / "o_fault.csv").exists()

    _same_results(tmp_path, "o_ties.csv", "o_ties.single.csv", scores=("o_ties.s.csv", "o_ties.s.single.csv"))
    _same_results(tmp_path, "o_ties_q.csv", "o_ties_q.single.csv")
    _same_results(tmp_path, "o_t16.csv", "o_t16.single.csv")
    _same_results(tmp_path, "o_rr.csv", "o_rr.single.csv")
    _same_results(tmp_path, "o_rc.csv", "o_rc.single.csv", scores=("o_rc.s.csv", "o_rc.s.single.csv"))
    for name in ("o_rc", "o_rc.s"):
        assert (tmp_path / f"{name}.csv").read_bytes() == (tmp_path / f"{name}.chunked.csv").read_bytes(), name
    _same_results(tmp_path, "o_rr_q.csv", "o_rr_q.single.csv")
    assert not (tmp_path / "o_sg.csv").exists() and not (tmp_path / "o_bad.csv").exists() and not stale.exists()
    for name in ("e_index", "e_loo", "e_loo_q"):
        sharded = json.loads((tmp_path / f"{name}.json").read_text())
        single = json.loads((tmp_path / f"{name}.single.json").read_text())
        assert sharded == single, (name, sharded, single)
    ties = read_results_csv(tmp_path / "o_ties.csv")
    assert all(len(v) == 12 for v in ties.values())
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_three_processes_with_dba_and_qe_equal_one(tmp_path, capsys):
    """The user's command: torchrun with 3 processes over 3 shard stores of 5, 20 and 12 rows, cut
    into slices of 13, 13 and 11 rows."""
    _make_data(tmp_path)
    argv = _search_args(tmp_path, "o.csv", "rq", "r.shards", "--topk", "10", "--dba", "2", "--qe", "2")
    argv += ["--scores", tmp_path / "o.s.csv"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3"]
    procs = [
        subprocess.Popen(
            [*torchrun, "--master_port", str(free_port()), "tools/search.py", *map(str, argv)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    ]
    names = {str(tmp_path / "r.shards"): tmp_path / "r", str(tmp_path / "o.csv"): tmp_path / "single.csv"}
    names[str(tmp_path / "o.s.csv")] = tmp_path / "single.s.csv"
    single = [names.get(str(a), a) for a in argv]
    _single(capsys, "search", single)
    code, stdout, stderr = _finish(procs)[0]
    assert code == 0, stderr[-3000:]
    assert stdout.count("searched 9 queries in 37 index items") == 1 and "over 3 process(es) by index" in stdout
    _same_results(tmp_path, "o.csv", "single.csv", scores=("o.s.csv", "single.s.csv"))


def test_sigterm_from_the_launcher_ends_a_rank_with_one_line():
    """torchrun stops the other ranks with SIGTERM when one fails: each ends with one line, not silently."""
    import signal

    from metric.retrieval.sharded_pipeline import _stop_on_sigterm
    from metric.utils.errors import DistributedError

    old = _stop_on_sigterm()
    try:
        with pytest.raises(DistributedError, match="stopped by the launcher"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between two bytecodes of this thread
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, old)
