"""GLR mAP@100 / mP@k against a naive reference written from the official definition."""

import logging
import random
import zlib

import pytest

from metric.retrieval import metrics_glr
from metric.retrieval.groundtruth import read_glr_solution
from metric.retrieval.metrics import glr_map_at_k, make_synthetic_glr
from metric.utils.errors import MetricError


def naive_glr(predictions, solution, k=100, precision_ks=(1, 5, 10, 100)):
    """Straight from the definition, one query and one prediction at a time."""
    for qid in predictions:
        if qid not in solution:
            raise KeyError(qid)
    ap_by_split = {"Public": [], "Private": []}
    precisions = {p: [] for p in precision_ks}
    for qid, (gt, usage) in solution.items():
        if usage == "Ignored" or not gt:
            continue
        preds = predictions.get(qid, [])[:k]
        seen, correct, ap = set(), 0, 0.0
        prec_at = {}
        for i in range(k):
            if i < len(preds):
                p = preds[i]
                if p not in seen:
                    seen.add(p)
                    if p in gt:
                        correct += 1
                        ap += correct / (i + 1)
            prec_at[i + 1] = correct / (i + 1)
        ap_by_split[usage].append(ap / min(len(gt), k))
        for p in precision_ks:
            precisions[p].append(prec_at[p])
    every = ap_by_split["Public"] + ap_by_split["Private"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        f"mAP@{k}": {
            "Public": mean(ap_by_split["Public"]),
            "Private": mean(ap_by_split["Private"]),
            "All": mean(every),
        },
        "mP@k": {f"mP@{p}": mean(precisions[p]) for p in precision_ks},
    }


def random_case(rng, num_queries=40, vocab=60, max_gt=130, max_pred=130):
    """Small vocabulary so predictions repeat; some queries ignored, empty, missing, long."""
    ids = [f"img{i}" for i in range(vocab)] + [f"{i:016x}" for i in range(vocab)]
    solution, predictions = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        usage = rng.choice(["Public", "Private", "Ignored"])
        gt = [] if rng.random() < 0.1 else rng.sample(ids, rng.randint(1, min(max_gt, len(ids))))
        solution[qid] = (gt, usage)  # an Ignored query keeps its list: still not scored
        if rng.random() < 0.15:
            continue  # missing prediction: scores 0
        pool = gt + ids if gt else ids
        predictions[qid] = [rng.choice(pool) for _ in range(rng.randint(0, max_pred))]
    return predictions, solution


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].keys() == want[key].keys()
        for sub, value in want[key].items():
            if value is None:
                assert got[key][sub] is None
            else:
                assert got[key][sub] == pytest.approx(value, abs=1e-12), (key, sub)


@pytest.mark.parametrize("seed", range(12))
def test_matches_naive_reference(seed):
    rng = random.Random(seed)
    predictions, solution = random_case(rng)
    assert_same(glr_map_at_k(predictions, solution), naive_glr(predictions, solution))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_small_k(k):
    predictions, solution = random_case(random.Random(100 + k), max_pred=20)
    ks = tuple(p for p in (1, 2, 3, 5, 10) if p <= k)
    assert_same(
        glr_map_at_k(predictions, solution, k=k, precision_ks=ks),
        naive_glr(predictions, solution, k=k, precision_ks=ks),
    )


def test_hand_computed_example():
    solution = {
        "a": (["x", "y", "z"], "Public"),
        "b": (["x"], "Private"),
        "c": (["x"], "Ignored"),
        "d": ([], "Private"),
        "e": (["y"], "Private"),  # no prediction: 0
    }
    predictions = {
        "a": ["x", "x", "w", "y"],  # hits at ranks 1 and 4 (the repeat occupies rank 2)
        "b": ["w", "x"],
        "c": ["x"],
    }
    result = glr_map_at_k(predictions, solution)
    ap_a = (1 / 1 + 2 / 4) / 3
    ap_b = (1 / 2) / 1
    assert result["mAP@100"]["Public"] == pytest.approx(ap_a)
    assert result["mAP@100"]["Private"] == pytest.approx((ap_b + 0) / 2)
    assert result["mAP@100"]["All"] == pytest.approx((ap_a + ap_b) / 3)
    assert result["mP@k"]["mP@1"] == pytest.approx(1 / 3)
    assert result["mP@k"]["mP@5"] == pytest.approx((2 / 5 + 1 / 5) / 3)


def test_only_first_k_predictions_count():
    solution = {"q": (["hit"], "Public")}
    assert glr_map_at_k({"q": ["miss"] * 100 + ["hit"]}, solution)["mAP@100"]["All"] == 0.0
    assert glr_map_at_k({"q": ["miss"] * 99 + ["hit"]}, solution)["mAP@100"]["All"] == 0.01


def test_unknown_query_is_an_error():
    with pytest.raises(MetricError, match="'zzz'"):
        glr_map_at_k({"zzz": ["x"]}, {"q": (["x"], "Public")})


def test_split_without_queries_is_none():
    result = glr_map_at_k({"q": ["x"]}, {"q": (["x"], "Public")})
    assert result["mAP@100"] == {"Public": 1.0, "Private": None, "All": 1.0}


def test_hash_collision_falls_back_to_exact_path(monkeypatch, caplog):
    """Ids whose hashes collide in the first bit field must not change the score."""

    def colliding_hash(s):
        return (zlib.crc32(str(s).encode()) & 0x7FFFFF) << 40  # low 40 bits always zero

    monkeypatch.setattr(metrics_glr, "hash", colliding_hash, raising=False)
    predictions, solution = random_case(random.Random(7))
    with caplog.at_level(logging.WARNING):
        got = glr_map_at_k(predictions, solution)
    assert "collision" in caplog.text
    assert_same(got, naive_glr(predictions, solution))


def test_synthetic_helper_matches_naive():
    predictions, solution = make_synthetic_glr(num_queries=300, num_index=2000, seed=3)
    assert_same(glr_map_at_k(predictions, solution), naive_glr(predictions, solution))


# ---------------------------------------------------------------------------- solution reader


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_solution(tmp_path):
    path = write(tmp_path / "s.csv", "id,images,Usage\nq1,a b c,Public\nq2,,Private\nq3,None,Ignored\nq4,d,private\n")
    assert read_glr_solution(path) == {
        "q1": (["a", "b", "c"], "Public"),
        "q2": ([], "Private"),
        "q3": ([], "Ignored"),
        "q4": (["d"], "Private"),
    }


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,images\nq1,a\n", "header"),
        ("id,images,Usage\nq1,a,Public\nq2,b\n", r":3: expected 3 fields"),
        ("id,images,Usage\nq1,a,Secret\n", r":2: unknown Usage 'Secret'"),
        ("id,images,Usage\nq1,a,Public\nq1,b,Private\n", r":3: query id 'q1' appears twice"),
    ],
)
def test_read_solution_errors(tmp_path, text, match):
    with pytest.raises(MetricError, match=match):
        read_glr_solution(write(tmp_path / "s.csv", text))


def test_read_solution_missing_file(tmp_path):
    with pytest.raises(MetricError, match="does not exist"):
        read_glr_solution(str(tmp_path / "nope.csv"))


def test_plain_id_lists_are_scored_in_all_only():
    predictions, solution = random_case(random.Random(11))
    plain = {q: gt for q, (gt, usage) in solution.items() if usage != "Ignored"}
    predictions = {q: p for q, p in predictions.items() if q in plain}
    got = glr_map_at_k(predictions, plain)
    want = naive_glr(predictions, {q: (gt, "Public") for q, gt in plain.items()})
    assert got["mAP@100"]["Public"] is None and got["mAP@100"]["Private"] is None
    assert got["mAP@100"]["All"] == pytest.approx(want["mAP@100"]["All"], abs=1e-12)
    assert got["mP@k"] == pytest.approx(want["mP@k"], abs=1e-12)
