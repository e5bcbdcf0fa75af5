"""Re-ranking by α-query-expansion (αQE) and database-side augmentation (DBA).

Both replace a vector by the L2-normalized weighted sum of itself and its
nearest index neighbours (Radenović, Tolias, Chum, TPAMI 2018; the Google
Landmark Retrieval solutions)::

    x' = normalize( 1 * x  +  sum_{j=1..K} max(s_j, 0)^alpha * y_j )

where ``y_j`` are the K nearest index vectors of ``x`` and ``s_j`` their
similarities. **K counts neighbours other than the item itself**; the item
always takes part with weight 1. For QE the query is not in the index, so its
top-K results are the neighbours. For DBA the item's own row is removed from
its top-(K+1) index results (if an exact duplicate pushed it out, the last one
is dropped instead). Negative similarities are clamped to 0 before the power,
so ``alpha = 0`` gives plain average expansion (every neighbour weight 1).
Neighbours missing from an approximate search (index -1) get weight 0.

The whole ``tools/search.py`` pipeline on two stores (DBA, search, αQE, SuperGlobal or
k-reciprocal, results CSV) is :func:`metric.retrieval.pipeline.search_stores`.
"""

import logging

import numpy as np

from metric.retrieval.search import as_matrix, search
from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

# Rows per gather of neighbour vectors (rows x K x D float32 in memory at once).
GATHER_ELEMENTS = 1 << 25


def check_expansion(k, alpha, what):
    """Validate the K and alpha of αQE / DBA (``what`` names which); one-line :class:`MetricError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricError(f"{what} K must be an integer >= 1, got {k!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise MetricError(f"{what} alpha must be a finite number >= 0, got {alpha!r}")


def _as_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x


def expand(base, index, scores, indices, alpha):
    """``normalize(base + sum_j w_j index[indices[:, j]])`` with ``w = max(scores, 0)^alpha``.

    ``base`` [M, D], ``scores``/``indices`` [M, K] (index -1 = no neighbour).
    Computed in row chunks; returns a new float32 array [M, D].
    """
    base = _as_numpy(as_matrix(base, "base"))
    index = _as_numpy(as_matrix(index, "index"))
    scores = np.asarray(scores, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    m, d = base.shape
    k = indices.shape[1] if indices.ndim == 2 else 0
    out = np.empty((m, d), dtype=np.float32)
    step = max(1, GATHER_ELEMENTS // max(1, k * d))
    for start in range(0, m, step):
        stop = min(m, start + step)
        acc = np.array(base[start:stop], dtype=np.float32)
        if k:
            idx = indices[start:stop]
            valid = idx >= 0
            w = np.power(np.maximum(scores[start:stop], 0.0), np.float32(alpha)) * valid
            neigh = np.asarray(index[np.where(valid, idx, 0)], dtype=np.float32)  # [rows, K, D]
            acc += np.einsum("rk,rkd->rd", w.astype(np.float32), neigh)
        norms = np.linalg.norm(acc, axis=1, keepdims=True)
        out[start:stop] = acc / np.maximum(norms, np.finfo(np.float32).tiny)
    return out


def query_expansion(query, index, scores, indices, k, alpha=3.0):
    """αQE: new queries from the first ``k`` columns of an initial search of ``query`` in ``index``.

    ``scores``/``indices`` come from :func:`~metric.retrieval.search.search` (or an
    approximate search) with at least ``k`` columns when the index has that many.
    Search again with the returned [Q, D] queries.
    """
    check_expansion(k, alpha, "query expansion")
    query = as_matrix(query, "query")
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != query.shape[0]:
        raise MetricError(f"query expansion: indices must be [Q, K] for {query.shape[0]} queries")
    return expand(query, index, np.asarray(scores)[:, :k], indices[:, :k], alpha)


def database_augmentation(index, k, alpha=3.0, backend="auto", chunk_size=None, device=None, progress=False):
    """DBA: every index vector becomes the weighted sum of itself and its ``k`` nearest other index vectors.

    Returns a new float32 array [N, D]; searching it replaces searching ``index``.
    """
    check_expansion(k, alpha, "database augmentation")
    index = as_matrix(index, "index")
    n = index.shape[0]
    if n == 0:
        return np.zeros(index.shape, np.float32)
    scores, indices = search(
        index, index, min(k + 1, n), backend=backend, chunk_size=chunk_size, device=device, progress=progress
    )
    scores, indices = drop_self(scores, indices, np.arange(n))
    logger.info("database-side augmentation of %d vectors with K=%d, alpha=%g", n, indices.shape[1], alpha)
    return expand(index, index, scores, indices, alpha)


def drop_self(scores, indices, rows):
    """The neighbours of index items ``rows`` [M] (global index rows) from their top-(K+1) search
    ``(scores, indices)`` [M, K+1] in the index: each row without the item itself, or, when
    exact duplicates pushed the item out of its list, without the last entry. Returns [M, K]."""
    m, kk = indices.shape[0], indices.shape[1] - 1
    is_self = indices == np.asarray(rows)[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # self pushed out by duplicates: drop the last
    keep = ~is_self
    return scores[keep].reshape(m, kk), indices[keep].reshape(m, kk)
