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

:func:`search_stores` runs the whole ``tools/search.py`` pipeline on two stores:
DBA, search (exact or approximate), αQE and a second search, results CSV.
"""

import logging
import os

import numpy as np

from metric.utils.errors import MetricError
from metric.retrieval.search import as_matrix, search

logger = logging.getLogger(__name__)

# Rows per gather of neighbour vectors (rows x K x D float32 in memory at once).
GATHER_ELEMENTS = 1 << 25


def check_expansion(k, alpha, what):
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
    scores, indices = search(index, index, min(k + 1, n), backend=backend, chunk_size=chunk_size,
                             device=device, progress=progress)
    kk = indices.shape[1] - 1
    is_self = indices == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True  # self pushed out by duplicates: drop the last
    keep = ~is_self
    scores = scores[keep].reshape(n, kk)
    indices = indices[keep].reshape(n, kk)
    logger.info("database-side augmentation of %d vectors with K=%d, alpha=%g", n, kk, alpha)
    return expand(index, index, scores, indices, alpha)


def search_stores(query, index, output, topk=100, scores_path=None, backend="auto", device=None,
                  chunk_size=None, query_chunk_size=None, ann=False, ann_type=None, ann_dir=None,
                  nprobe=None, ef_search=None, qe=0, qe_alpha=3.0, dba=0, dba_alpha=3.0, rerank=None,
                  rerank_params=None, progress=False):
    """Search a query store in an index store, re-rank, write the Kaggle results CSV; return a summary.

    The pipeline: DBA on the index (``dba`` > 0), search (exact, or the saved
    approximate index with ``ann``), αQE (``qe`` > 0) and a second search, then
    SuperGlobal or k-reciprocal re-ranking, then
    :func:`~metric.retrieval.results.write_results_csv`. ``rerank`` names the re-rankers
    (:mod:`metric.retrieval.rerank_plan`: order, defaults) and ``rerank_params`` their
    parameters (``sg_m``, ``sg_k``, ``sg_beta``, ``kr_k1``, ``kr_k2``, ``kr_lambda``,
    ``kr_graph``, ``graph_dir``). Everything the user gave is checked before the long work starts.
    """
    import metric.retrieval.ann as ann_mod
    import metric.retrieval.rerank_plan as rerank_plan
    from metric.retrieval.results import check_output_file, write_results_csv
    from metric.retrieval.search import check_dims, check_topk, resolve_backend
    from metric.retrieval.store import load_features

    topk = check_topk(topk)
    check_output_file(output)
    if scores_path is not None:
        check_output_file(scores_path, "scores")
    plan = rerank_plan.make_plan(rerank, qe, dba, **(rerank_params or {}))
    qe, dba = plan.qe, plan.dba
    if qe:
        check_expansion(qe, qe_alpha, "query expansion")
    if dba:
        check_expansion(dba, dba_alpha, "database augmentation")
    if ann and dba:
        raise MetricError("--dba changes the index vectors, so it cannot use a saved approximate index; drop --ann or --dba")
    resolve_backend(backend, device)
    qstore = load_features(query, mmap=True)
    istore = load_features(index, mmap=True)
    check_dims(qstore.embeddings, istore.embeddings)
    graph = rerank_plan.check_plan(plan, qstore, istore, ann)
    summary = {"queries": len(qstore), "index": len(istore), "topk": topk, "output": os.path.abspath(output),
               "rerank": list(plan.steps)}

    index_emb = istore.embeddings
    if dba:
        index_emb = database_augmentation(index_emb, dba, dba_alpha, backend=backend, chunk_size=chunk_size,
                                          device=device, progress=progress)
    if ann:
        ann_index, params = ann_mod.load_ann_index(istore, ann_type, ann_dir)
        summary["ann"] = params["type"]

        def run(q, k):
            return ann_mod.ann_search(ann_index, params, q, k, nprobe=nprobe, ef_search=ef_search, progress=progress)
    else:
        def run(q, k):
            return search(q, index_emb, k, backend=backend, chunk_size=chunk_size, device=device,
                          query_chunk_size=query_chunk_size, progress=progress)

    width = plan.search_width(topk)
    query_emb, scores, indices = qstore.embeddings, None, None
    if qe or plan.final != "kreciprocal":  # k-reciprocal searches by itself
        scores, indices = run(query_emb, max(width, qe))
    if qe:
        query_emb = query_expansion(query_emb, index_emb, scores, indices, qe, qe_alpha)
        if plan.final != "kreciprocal":
            scores, indices = run(query_emb, width)
    if plan.final:
        scores, indices = rerank_plan.final_rerank(plan, query_emb, index_emb, scores, indices, topk, graph,
                                                   backend=backend, device=device, chunk_size=chunk_size,
                                                   progress=progress)
    scores, indices = scores[:, :topk], indices[:, :topk]
    write_results_csv(output, qstore.ids, istore.ids, indices, scores=scores, scores_path=scores_path)
    if scores_path is not None:
        summary["scores"] = os.path.abspath(scores_path)
    return summary
