"""αQE and DBA vs naive per-item loops written from the definitions."""

import numpy as np
import pytest

from metric.retrieval.rerank import database_augmentation, expand, query_expansion
from metric.retrieval.search import search
from metric.utils.errors import MetricError
from tests.helpers import unit_vectors


def _naive_expand(v, neighbours, sims, alpha):
    acc = v.astype(np.float64).copy()
    for y, s in zip(neighbours, sims):
        acc += max(float(s), 0.0) ** alpha * y
    return acc / np.linalg.norm(acc)


def _naive_qe(q, x, k, alpha):
    out = []
    for v in q:
        sims = x @ v
        order = sorted(range(len(x)), key=lambda j: (-sims[j], j))[:k]
        out.append(_naive_expand(v, x[order], sims[order], alpha))
    return np.array(out)


def _naive_dba(x, k, alpha):
    out = []
    for i, v in enumerate(x):
        sims = x @ v
        order = sorted((j for j in range(len(x)) if j != i), key=lambda j: (-sims[j], j))[:k]
        out.append(_naive_expand(v, x[order], sims[order], alpha))
    return np.array(out)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (5, 3.0), (10, 0.0), (60, 1.5)])
def test_query_expansion_matches_loop(k, alpha):
    rng = np.random.default_rng(0)
    q, x = unit_vectors(rng, 9, 12), unit_vectors(rng, 50, 12)
    scores, idx = search(q, x, 100)
    new_q = query_expansion(q, x, scores, idx, k, alpha)
    np.testing.assert_allclose(new_q, _naive_qe(q, x, k, alpha), atol=1e-5)
    assert new_q.dtype == np.float32


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (4, 3.0), (7, 0.0), (49, 2.0), (80, 3.0)])
def test_dba_matches_loop(k, alpha):
    rng = np.random.default_rng(1)
    x = unit_vectors(rng, 50, 12)
    np.testing.assert_allclose(database_augmentation(x, k, alpha, chunk_size=13), _naive_dba(x, k, alpha), atol=1e-5)


def test_dba_with_duplicates_excludes_self():
    rng = np.random.default_rng(2)
    base = unit_vectors(rng, 10, 6)
    x = np.concatenate([base, base[:3]])  # rows 10..12 duplicate rows 0..2
    out = database_augmentation(x, 2, 3.0, backend="torch")
    # row 10's top-3 are rows 0 and 10 (equal scores, lower index first), then the next one:
    # without self-exclusion row 10 would use itself as a neighbour.
    sims = x @ x[10]
    nxt = sorted((j for j in range(len(x)) if j not in (0, 10)), key=lambda j: (-sims[j], j))[0]
    expected = _naive_expand(x[10], x[[0, nxt]], sims[[0, nxt]], 3.0)
    np.testing.assert_allclose(out[10], expected, atol=1e-5)


def test_missing_neighbours_weight_zero_and_errors():
    rng = np.random.default_rng(3)
    q, x = unit_vectors(rng, 2, 4), unit_vectors(rng, 5, 4)
    idx = np.array([[1, -1], [-1, -1]])
    sc = np.array([[0.5, 0.9], [0.9, 0.9]], np.float32)
    out = expand(q, x, sc, idx, 1.0)
    np.testing.assert_allclose(out[0], _naive_expand(q[0], x[[1]], [0.5], 1.0), atol=1e-6)
    np.testing.assert_allclose(out[1], q[1], atol=1e-6)
    with pytest.raises(MetricError, match="K must be an integer >= 1"):
        query_expansion(q, x, sc, idx, 0, 3.0)
    with pytest.raises(MetricError, match="alpha"):
        database_augmentation(x, 2, -1.0)
