"""recall@k and mAP@R against naive per-query loops."""

import numpy as np
import pytest
import torch

from metric.retrieval.metrics import labelled_metrics
from metric.utils.errors import MetricError
from tests.helpers import unit_vectors


def naive_labelled(q, q_lab, x=None, x_lab=None, ks=(1, 5, 10)):
    loo = x is None
    if loo:
        x, x_lab = q, q_lab
    sims = (torch.as_tensor(q) @ torch.as_tensor(x).T).numpy()  # same float32 products
    hits = {k: 0 for k in ks}
    ap_sum, scored, skipped = 0.0, 0, 0
    for i in range(len(q)):
        order = [j for j in sorted(range(len(x)), key=lambda j: -sims[i, j]) if not (loo and j == i)]
        rel = [x_lab[j] == q_lab[i] for j in order]
        r = sum(rel)
        if r == 0:
            skipped += 1
            continue
        scored += 1
        for k in ks:
            hits[k] += any(rel[:k])
        correct, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                correct += 1
                ap += correct / (pos + 1)
        ap_sum += ap / r
    out = {f"recall@{k}": hits[k] / scored for k in ks}
    out["mAP@R"] = ap_sum / scored
    out["skipped"] = skipped
    return out


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", range(4))
def test_index_mode_matches_naive(seed):
    rng = np.random.default_rng(seed)
    q, x = unit_vectors(rng, 40, 6), unit_vectors(rng, 70, 6)
    q_lab, x_lab = rng.integers(0, 8, size=40), rng.integers(0, 7, size=70)  # label 7: no match
    want = naive_labelled(q, q_lab, x, x_lab)
    assert want["skipped"] > 0
    assert_same(labelled_metrics(q, q_lab, x, x_lab), want)
    assert_same(labelled_metrics(torch.as_tensor(q), torch.as_tensor(q_lab), x, x_lab, chunk_size=7), want)


@pytest.mark.parametrize("seed", range(4))
def test_leave_one_out_matches_naive(seed):
    rng = np.random.default_rng(10 + seed)
    q = unit_vectors(rng, 60, 5)
    labels = rng.integers(0, 4, size=60)  # classes of ~15: R > max(ks)
    labels[0] = 99  # a singleton: skipped
    want = naive_labelled(q, labels)
    assert want["skipped"] == 1
    assert_same(labelled_metrics(q, labels), want)
    assert_same(labelled_metrics(q, labels, chunk_size=11), want)


def test_string_labels_and_duplicates():
    rng = np.random.default_rng(3)
    q = unit_vectors(rng, 20, 4)
    q = np.concatenate([q, q[:5]])  # exact duplicates: self is excluded by position, not score
    labels = np.array([f"c{i % 3}" for i in range(20)] + [f"c{i % 3}" for i in range(5)])
    # tied scores come from duplicates, which share a label: the order among them does not matter
    assert_same(labelled_metrics(q, labels), naive_labelled(q, labels))


def test_perfect_embedding_scores_one():
    labels = np.repeat(np.arange(5), 4)
    emb = np.eye(5, dtype=np.float32)[labels]
    got = labelled_metrics(emb, labels)
    assert got == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mAP@R": 1.0, "skipped": 0}


def test_no_relevant_item_is_an_error():
    rng = np.random.default_rng(0)
    with pytest.raises(MetricError, match="no query has a relevant item"):
        labelled_metrics(unit_vectors(rng, 3, 4), [0, 1, 2], unit_vectors(rng, 3, 4), [5, 6, 7])


def test_shape_mismatch_is_an_error():
    rng = np.random.default_rng(0)
    with pytest.raises(MetricError, match="do not match"):
        labelled_metrics(unit_vectors(rng, 3, 4), [0, 1, 2], unit_vectors(rng, 3, 5), [0, 1, 2])
    with pytest.raises(MetricError, match="labels"):
        labelled_metrics(unit_vectors(rng, 3, 4), [0, 1], unit_vectors(rng, 3, 4), [0, 1, 2])


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_map_at_k_is_glr_map_at_k_with_the_labels_as_the_solution(leave_one_out):
    """mAP@k (``ap_at``, what the training evaluation records as mAP@100) equals Google Landmark
    Retrieval's metric (metric.retrieval.metrics_glr) on the same top-k lists, with classes larger and
    smaller than k (the divisor is min(R, k)) and queries without a relevant item left out."""
    from metric.retrieval.metrics_glr import glr_average_precisions

    rng = np.random.default_rng(7)
    k = 12
    x = unit_vectors(rng, 90, 16)
    x_labels = rng.integers(0, 6, 90)  # classes of about 15 (> k)
    x_labels[:10] = np.arange(6, 16)  # and classes of one
    q, q_labels = (x, x_labels) if leave_one_out else (unit_vectors(rng, 25, 16), rng.integers(0, 17, 25))
    got = labelled_metrics(q, q_labels, None if leave_one_out else x, None if leave_one_out else x_labels, ap_at=k)
    sims = q @ x.T
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    predictions, solution = {}, {}
    for i, row in enumerate(order):
        relevant = [f"x{j}" for j in np.flatnonzero(x_labels == q_labels[i]) if not (leave_one_out and j == i)]
        predictions[f"q{i}"] = [f"x{j}" for j in row]
        solution[f"q{i}"] = (relevant, "Public")  # empty: not scored, as a lone query is skipped
    want = glr_average_precisions(predictions, solution, k=k)
    assert len(want) == len(q) - got["skipped"] and 0 < len(want) < len(q)
    assert abs(got[f"mAP@{k}"] - np.mean(list(want.values()))) < 1e-12
    assert "mAP@100" not in labelled_metrics(
        q, q_labels, None if leave_one_out else x, None if leave_one_out else x_labels
    )
