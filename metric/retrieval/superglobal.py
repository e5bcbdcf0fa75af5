"""SuperGlobal re-ranking (Shao, Chen, Karpur, Cui, Araujo, Cao, ICCV 2023), global descriptors only.

For each query ``q`` and its initial ranking, the first ``M`` index items (the candidates
``x_1..x_M``, best first) are re-scored; everything is computed from their descriptors, as in the
authors' published implementation (``MDescAug`` + ``RerankwMDA``, which reproduces the paper's
numbers):

1. **Refine the candidates** (top-M descriptor augmentation). Within the candidate set only, each
   ``x_m`` is replaced by the weighted mean of itself and its ``K`` nearest *other* candidates::

       x~_m = (x_m + sum_{j in NN_K(m)} beta * s_mj * x_j) / (1 + sum_{j in NN_K(m)} beta * s_mj)

   with ``s_mj = x_m . x_j`` (the item itself weighs 1). ``x~_m`` is not re-normalized.
2. **Refine the query** (maximum descriptor aggregation): ``q~`` is the element-wise maximum of the
   ``K + 1`` refined candidates with the highest ``q . x~_m`` (the query itself is not part of it,
   as in the authors' code).
3. **Re-score**: ``f_m = (q . x~_m + q~ . x~_m) / 2``; the ``M`` candidates are sorted by ``f``
   (ties: initial rank). Items after the first ``M`` keep their initial order and similarity.

Defaults are the published ones: ``M = 400``, ``K = 9``, ``beta = 0.15``. Cost per query: one
``M x M x D`` matrix product (the candidate similarities, for the neighbour sets); the scores
``q . x~_m`` follow from ``q . x_m`` through the sparse weights, and only the ``K + 1`` refined
vectors of step 2 are formed. 1,000 queries with ``M = 400``, ``D = 512``: about 0.16 TFLOP. Memory is bounded by query
chunks of about :data:`GATHER_ELEMENTS` floats. Neighbour sets and the final order are deterministic: equal
similarities go to the better initial rank.
"""

import logging

import numpy as np
import torch

from metric.retrieval.search import as_matrix, deterministic_topk, is_int, resolve_backend
from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

DEFAULT_M = 400
DEFAULT_K = 9
DEFAULT_BETA = 0.15
# float32 elements of the largest temporary per query chunk (candidates x max(candidates, dim)).
GATHER_ELEMENTS = 1 << 25


def check_superglobal(m, k, beta):
    """Validate the parameters (one-line :class:`MetricError`)."""
    if not is_int(m) or m < 2:
        raise MetricError(f"SuperGlobal M (candidates re-ranked per query) must be an integer >= 2, got {m!r}")
    if not is_int(k) or k < 1:
        raise MetricError(f"SuperGlobal K (neighbours per candidate) must be an integer >= 1, got {k!r}")
    if not np.isfinite(beta) or beta < 0:
        raise MetricError(f"SuperGlobal beta must be a finite number >= 0, got {beta!r}")


def check_superglobal_size(m, k, count):
    """The number of candidates actually re-ranked for an index of ``count`` items; raises when
    ``K`` needs more candidates than there are (K + 1 <= min(M, count))."""
    mm = min(m, count)
    if k + 1 > mm:
        raise MetricError(
            f"SuperGlobal K={k} needs K+1={k + 1} candidates per query, but only {mm} are re-ranked "
            f"(M={m}, index of {count} items); lower --sg-k below {mm}"
        )
    return mm


def _rows(x, positions):
    """Rows of ``x`` (array, memmap or tensor) at integer ``positions`` (any shape) as float32 numpy."""
    flat = np.asarray(positions).reshape(-1)
    if isinstance(x, torch.Tensor):
        out = x[torch.from_numpy(flat)].to("cpu", torch.float32).numpy()
    else:
        out = np.asarray(x[flat], dtype=np.float32)
    return out.reshape(*np.shape(positions), x.shape[1])


def superglobal_rerank(
    query, index, scores, indices, m=DEFAULT_M, k=DEFAULT_K, beta=DEFAULT_BETA, device=None, progress=False
):
    """Re-rank the first ``m`` columns of an initial search of ``query`` [Q, D] in ``index`` [N, D].

    ``scores``/``indices`` [Q, T] are the initial results (best first, e.g. from
    :func:`~metric.retrieval.search.search` with ``topk >= m``; index -1 = no result, kept
    last). Returns new ``(scores, indices)`` of the same shape: the first ``min(m, T)`` columns
    re-ordered by the SuperGlobal score ``f`` (which replaces their similarity), the others as
    given. Runs with torch on ``device`` (default: CUDA if available, else CPU).
    """
    check_superglobal(m, k, beta)
    query, index = as_matrix(query, "query"), as_matrix(index, "index")
    scores = np.asarray(scores, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 2 or indices.shape[0] != query.shape[0] or scores.shape != indices.shape:
        raise MetricError(f"SuperGlobal: scores and indices must both be [Q, T] for {query.shape[0]} queries")
    q_count, t = indices.shape
    out_s, out_i = scores.copy(), indices.copy()
    if q_count == 0 or t == 0:
        return out_s, out_i
    mm = check_superglobal_size(m, k, t)
    _, dev = resolve_backend("torch", device)
    d = query.shape[1]
    step = max(1, GATHER_ELEMENTS // (mm * max(mm, d)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=q_count, desc="SuperGlobal", unit="query", dynamic_ncols=True)
    neg_inf = float("-inf")
    for start in range(0, q_count, step):
        stop = min(q_count, start + step)
        c = stop - start
        cand = indices[start:stop, :mm]
        valid_np = cand >= 0
        valid = torch.from_numpy(valid_np).to(dev)
        x = torch.from_numpy(_rows(index, np.where(valid_np, cand, 0))).to(dev) * valid[..., None]  # [c, M, D]
        q = torch.from_numpy(_rows(query, np.arange(start, stop))).to(dev)  # [c, D]

        # 1. candidates refined by their K nearest other candidates (self excluded, weight 1)
        sim = torch.bmm(x, x.transpose(1, 2))  # [c, M, M]
        sim.diagonal(dim1=1, dim2=2).fill_(neg_inf)
        sim.masked_fill_(~valid[:, None, :], neg_inf)
        nbr, s_nbr = deterministic_topk(sim.view(c * mm, mm), k)  # [c*M, K], ties to the better rank
        del sim
        nbr = nbr.reshape(c, mm, k)
        w = torch.where(torch.isfinite(s_nbr), beta * s_nbr, torch.zeros_like(s_nbr)).view(c, mm, k)
        norm = 1.0 + w.sum(-1)  # [c, M]

        def refine(v):
            """``v . x~_m`` for all m, from ``v . x_m`` [c, M] (x~ is linear in the candidates)."""
            # used within this iteration only: the loop variables are the ones meant
            return (v + (w * v.gather(1, nbr.reshape(c, mm * k)).view(c, mm, k)).sum(-1)) / norm  # noqa: B023

        # 2. query refined by the element-wise max of its K+1 best refined candidates
        r = refine(torch.einsum("cd,cmd->cm", q, x)).masked_fill(~valid, neg_inf)  # q . x~_m
        top, top_r = deterministic_topk(r, k + 1)  # [c, K+1]
        rows = torch.arange(c, device=dev)[:, None]
        top_nbr = nbr[rows, top]  # [c, K+1, K]
        sel = x[rows, top] + torch.einsum("ctk,ctkd->ctd", w[rows, top], x[rows[..., None], top_nbr])
        sel = sel / norm[rows, top][..., None]
        sel = sel.masked_fill(~torch.isfinite(top_r)[..., None], neg_inf)
        q_ref = sel.max(1).values  # [c, D]

        # 3. re-score and sort (stable: equal scores keep the initial order)
        f = (r + refine(torch.einsum("cd,cmd->cm", q_ref, x))) / 2.0
        f = torch.where(valid, f, torch.full_like(f, neg_inf))
        order = torch.sort(f, dim=1, descending=True, stable=True).indices.cpu().numpy()
        f_sorted = np.take_along_axis(f.cpu().numpy(), order, 1)
        old_sorted = np.take_along_axis(scores[start:stop, :mm], order, 1)
        out_i[start:stop, :mm] = np.take_along_axis(cand, order, 1)
        out_s[start:stop, :mm] = np.where(np.take_along_axis(valid_np, order, 1), f_sorted, old_sorted)
        if bar is not None:
            bar.update(c)
    if bar is not None:
        bar.close()
    logger.info("SuperGlobal re-ranking of %d queries: M=%d, K=%d, beta=%g", q_count, mm, k, beta)
    return out_s, out_i
