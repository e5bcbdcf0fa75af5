"""Revisited Oxford/Paris protocol against a naive reference; the restricted gnd unpickler."""

import os
import pickle

import numpy as np
import pytest
import torch

from metric.retrieval.groundtruth import read_revisited_gnd
from metric.retrieval.metrics import rank_index, revisited_map
from metric.utils.errors import MetricError


def naive_revisited(ranks, gnd, ks=(1, 5, 10)):
    """From the definitions: drop junk from the ranking, trapezoidal AP, capped P@k."""
    out = {}
    for protocol in ("E", "M", "H"):
        aps, prs = [], []
        for ranking, entry in zip(ranks, gnd):
            easy, hard, junk = list(entry["easy"]), list(entry["hard"]), list(entry["junk"])
            ok, bad = {"E": (easy, junk + hard), "M": (easy + hard, junk), "H": (hard, junk + easy)}[protocol]
            if not ok:
                continue
            kept = [int(i) for i in ranking if int(i) not in set(bad)]
            pos = [r for r, i in enumerate(kept) if i in set(ok)]  # 0-based, sorted
            ap = 0.0
            for j, r in enumerate(pos):
                p0 = 1.0 if r == 0 else j / r
                p1 = (j + 1) / (r + 1)
                ap += (p0 + p1) / 2 / len(ok)
            aps.append(ap)
            row = []
            for k in ks:
                if not pos:
                    row.append(0.0)
                    continue
                cut = min(pos[-1] + 1, k)
                row.append(sum(1 for r in pos if r + 1 <= cut) / cut)
            prs.append(row)
        result = {"mAP": sum(aps) / len(aps) if aps else None}
        for i, k in enumerate(ks):
            result[f"mP@{k}"] = sum(r[i] for r in prs) / len(prs) if prs else None
        out[protocol] = result
    return out


def random_gnd(rng, num_queries, num_index):
    gnd = []
    for _ in range(num_queries):
        perm = rng.permutation(num_index)
        n_easy, n_hard, n_junk = rng.integers(0, 8, size=3)
        if rng.random() < 0.2:
            n_easy = 0  # skipped in E
        if rng.random() < 0.2:
            n_hard = 0  # skipped in H
        easy = perm[:n_easy]
        hard = perm[n_easy : n_easy + n_hard]
        junk = perm[n_easy + n_hard : n_easy + n_hard + n_junk]
        gnd.append({"easy": easy.tolist(), "hard": np.asarray(hard), "junk": junk.tolist()})
    return gnd


def assert_same(got, want):
    assert got.keys() == want.keys()
    for protocol in want:
        assert got[protocol].keys() == want[protocol].keys()
        for key, value in want[protocol].items():
            if value is None:
                assert got[protocol][key] is None
            else:
                assert got[protocol][key] == pytest.approx(value, abs=1e-12), (protocol, key)


@pytest.mark.parametrize("seed", range(10))
def test_matches_naive_reference(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_index = 9, 40
    gnd = random_gnd(rng, num_queries, num_index)
    ranks = np.stack([rng.permutation(num_index) for _ in range(num_queries)])
    assert_same(revisited_map(ranks, gnd), naive_revisited(ranks, gnd))
    # torch input and other ks give the same
    ks = (1, 3, 20)
    assert_same(revisited_map(torch.as_tensor(ranks), gnd, ks=ks), naive_revisited(ranks, gnd, ks=ks))


def test_partial_ranking_counts_missing_positives():
    rng = np.random.default_rng(5)
    gnd = random_gnd(rng, 6, 50)
    ranks = np.stack([rng.permutation(50)[:12] for _ in range(6)])
    assert_same(revisited_map(ranks, gnd), naive_revisited(ranks, gnd))


def test_hand_computed_example():
    # index items 0..5 ranked 4,0,1,5,2,3: easy {4, 1}, hard {2}, junk {0}
    gnd = [{"easy": [4, 1], "hard": [2], "junk": [0]}]
    ranks = np.array([[4, 0, 1, 5, 2, 3]])
    got = revisited_map(ranks, gnd)
    # E: ok {4,1}, junk {0,2}: kept ranking 4,1,5,3 -> positives at 0,1 -> AP 1, P@5 = 2/2
    assert got["E"] == {"mAP": 1.0, "mP@1": 1.0, "mP@5": 1.0, "mP@10": 1.0}
    # M: ok {4,1,2}, junk {0}: kept 4,1,5,2,3 -> positives at 0,1,3
    ap = ((1 + 1) / 2 + (1 + 1) / 2 + (2 / 3 + 3 / 4) / 2) / 3
    assert got["M"]["mAP"] == pytest.approx(ap)
    assert got["M"]["mP@5"] == pytest.approx(3 / 4)  # cut at the last positive's rank 4
    assert got["M"]["mP@1"] == 1.0
    # H: ok {2}, junk {0,4,1}: kept 5,2,3 -> positive at 1
    assert got["H"]["mAP"] == pytest.approx((0 / 1 + 1 / 2) / 2)  # j=0, r=1: P0 = 0, P1 = 1/2
    assert got["H"]["mP@1"] == 0.0 and got["H"]["mP@5"] == pytest.approx(1 / 2)


def test_all_queries_skipped_gives_none():
    got = revisited_map(np.array([[0, 1]]), [{"easy": [], "hard": [1], "junk": []}])
    assert got["E"] == {"mAP": None, "mP@1": None, "mP@5": None, "mP@10": None}
    assert got["H"]["mAP"] == pytest.approx(0.25) and got["M"]["mP@10"] == pytest.approx(0.5)


def test_rank_index_sorts_by_inner_product():
    rng = np.random.default_rng(0)
    q, x = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")
    assert np.array_equal(rank_index(q, x, chunk_size=2), want)


# ---------------------------------------------------------------------------- restricted unpickler


def gnd_dict():
    return {
        "imlist": ["all_souls_000000", "all_souls_000001", "radcliffe_000002", "x"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {
                "easy": np.array([0, 1]),
                "hard": [2],
                "junk": np.array([3], dtype=np.int32),
                "bbx": [np.float64(1.5), 2.0, 30.0, 40.0],
            },
            {"easy": [], "hard": np.array([], dtype=np.int64), "junk": [0], "bbx": None},
        ],
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_plain_pickle(tmp_path, protocol):
    path = tmp_path / "gnd_test.pkl"
    path.write_bytes(pickle.dumps(gnd_dict(), protocol=protocol))
    gt = read_revisited_gnd(str(path))
    assert gt["qimlist"] == ["q0", "q1"] and gt["imlist"][2] == "radcliffe_000002"
    assert gt["gnd"][0]["easy"].tolist() == [0, 1] and gt["gnd"][0]["junk"].dtype == np.int64
    assert gt["gnd"][0]["bbx"][0] == 1.5
    assert gt["gnd"][1]["easy"].tolist() == []


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Plain:
    pass


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    data = gnd_dict()
    data["gnd"][0]["bbx"] = _RunsCommand(marker)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(MetricError, match=r"(posix|os)\.system"):
        read_revisited_gnd(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [_Plain(), pickle.loads, __import__("collections").OrderedDict(a=1)])
def test_refuses_other_classes(tmp_path, payload):
    data = gnd_dict()
    data["extra"] = payload
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(MetricError, match="refusing"):
        read_revisited_gnd(str(path))


@pytest.mark.parametrize(
    "content, match",
    [
        (pickle.dumps(gnd_dict())[:40], "not a readable"),
        (b"hello world", "not a readable"),
        (pickle.dumps([1, 2, 3]), "expected a dict"),
        (
            pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}),
            "outside imlist",
        ),
        (pickle.dumps({"imlist": ["a"], "qimlist": ["q", "r"], "gnd": []}), "2"),
    ],
)
def test_malformed_gnd(tmp_path, content, match):
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(MetricError, match=match):
        read_revisited_gnd(str(path))


def test_missing_gnd(tmp_path):
    with pytest.raises(MetricError, match="does not exist"):
        read_revisited_gnd(str(tmp_path / "none.pkl"))
