"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017) on the k-NN graph, in bounded memory.

The items are the queries and the index items together (``A = Q + N``, queries first), as in the
authors' published code. With ``s`` the inner product of L2-normalized descriptors:

- distance ``d(i, j) = (2 - 2 s_ij) / max_l (2 - 2 s_il)``: the squared Euclidean distance divided
  by the largest one of item ``i`` (the authors' code normalizes each row by its maximum);
- ``N(i, k)``: the ``k`` nearest items of ``i`` among all ``A`` (itself included, ties to the
  lower position);
- ``R(i, k) = {j in N(i, k+1) : i in N(j, k+1)}`` (k-reciprocal neighbours);
- ``R*(i) = R(i, k1)`` united with every ``R(c, round(k1/2))``, ``c in R(i, k1)``, that shares
  more than 2/3 of its members with ``R(i, k1)``;
- ``V_i`` = ``exp(-d(i, j))`` on ``R*(i)``, normalized to sum 1 (zero elsewhere);
- local query expansion: ``V_i <- mean of V_j over j in N(i, k2)`` (``k2 = 1``: none);
- Jaccard distance ``d_J(i, g) = 1 - sum_l min(V_il, V_gl) / sum_l max(V_il, V_gl)``;
- final distance ``d*(q, g) = (1 - lambda) d_J(q, g) + lambda d(q, g)``; smaller is better.

Defaults are the published ones: ``k1 = 20``, ``k2 = 6``, ``lambda = 0.3``. Results are ordered
by ``d*`` (ties: lower index) and reported with the score ``1 - d*``.

Nothing of size ``A x A`` is formed. The quadratic work is the exact k-NN graph — each item's
``k1 + 1`` nearest items and its farthest one (for the row maximum), from chunked matrix
products (:mod:`metric.retrieval.knn_graph`; the query rows with
:func:`~metric.retrieval.search.search`) — and one ``Q x N`` product for the final distances.
Everything else works on sparse rows (at most ``(k1+1)(round(k1/2)+2)`` entries per ``V_i``,
``k2`` times that after the expansion) in chunks of items, with torch on CPU or CUDA. The Jaccard
sums go through an inverted index of the gallery's ``V`` (only gallery items sharing a non-zero
entry with the query have ``d_J < 1``); a block of ``[chunk, N]`` final distances per query chunk
gives the top-k exactly. Sums are ordered (sort + cumulative sums in float64, or ``index_add_``,
which adds in sequence on the CPU; never atomic adds on CUDA), so results are deterministic.

The index part of the graph depends on the index alone (:mod:`metric.retrieval.knn_graph`); it can
be saved next to the store (``tools/build_index.py --type knn``) instead of being recomputed for
every query set.
"""

import logging

import numpy as np
import torch

from metric.retrieval.knn_graph import GRAPH_ROWS, IndexGraph, block_rows, build_index_graph, knn_rows
from metric.retrieval.search import (
    as_matrix,
    check_dims,
    check_finite,
    check_topk,
    deterministic_topk,
    is_int,
    resolve_backend,
)
from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

DEFAULT_K1 = 20
DEFAULT_K2 = 6
DEFAULT_LAMBDA = 0.3
# float32 elements of the largest temporary per item chunk (entries x dim, entries x candidates).
GATHER_ELEMENTS = 1 << 25


def check_kreciprocal(k1, k2, lambda_value):
    """Validate the parameters (one-line :class:`MetricError`)."""
    if not is_int(k1) or k1 < 1:
        raise MetricError(f"k-reciprocal k1 must be an integer >= 1, got {k1!r}")
    if not is_int(k2) or k2 < 1:
        raise MetricError(f"k-reciprocal k2 must be an integer >= 1, got {k2!r}")
    if k2 > k1 + 1:
        raise MetricError(f"k-reciprocal k2 (local query expansion) must be at most k1 + 1 = {k1 + 1}, got {k2}")
    if not np.isfinite(lambda_value) or not 0.0 <= lambda_value <= 1.0:
        raise MetricError(f"k-reciprocal lambda must be in [0, 1], got {lambda_value!r}")


def check_kreciprocal_size(k1, count):
    if k1 >= count:
        raise MetricError(
            f"k-reciprocal k1={k1} needs more than k1 index items, but the index has {count}; "
            f"lower --kr-k1 below {count}"
        )


# ----------------------------------------------------------------------------- sparse helpers


def _merge(parts, width):
    """First ``width`` of the concatenated ``(scores, positions)`` parts, by (score desc, position asc)."""
    s = np.concatenate([p[0] for p in parts], 1)
    i = np.concatenate([p[1] for p in parts], 1)
    order = np.lexsort((i, -s), axis=1)[:, :width]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _segment_sum(seg, vals, nseg):
    """Sums of ``vals`` per segment id (``seg`` sorted ascending, ids < nseg), float64, ordered."""
    counts = torch.bincount(seg, minlength=nseg)
    end = torch.cumsum(counts, 0)
    cs = torch.cat([torch.zeros(1, dtype=torch.float64, device=vals.device), torch.cumsum(vals.double(), 0)])
    return cs[end] - cs[end - counts]


def _sum_by_key(keys, vals):
    """Distinct ``keys`` (ascending) and the float64 sum of ``vals`` of each (stable order)."""
    order = torch.sort(keys, stable=True).indices
    k, v = keys[order], vals[order].double()
    if k.numel() == 0:
        return k, v
    last = torch.ones_like(k, dtype=torch.bool)
    last[:-1] = k[1:] != k[:-1]
    cs = torch.cumsum(v, 0)
    ends = cs[last]
    return k[last], torch.diff(ends, prepend=ends.new_zeros(1))


def _csr_to_padded(rows, cols, vals, nrows):
    """Row-sorted entries -> padded ``[nrows, P]`` (column -1 and value 0 where empty)."""
    dev = cols.device
    counts = torch.bincount(rows, minlength=nrows)
    width = int(counts.max()) if rows.numel() else 1
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=dev) - start[rows]
    idx = torch.full((nrows, width), -1, dtype=torch.int64, device=dev)
    val = torch.zeros((nrows, width), dtype=torch.float32, device=dev)
    idx[rows, slot] = cols
    val[rows, slot] = vals.float()
    return idx, val


class _Items:
    """Descriptors of all items (queries first) as one float32 tensor on the device."""

    def __init__(self, query, index, dev):
        self.q_count = query.shape[0]
        self.y = torch.cat(
            [
                torch.from_numpy(block_rows(query, 0, query.shape[0])),
                torch.from_numpy(block_rows(index, 0, index.shape[0])),
            ]
        ).to(dev)

    def dots(self, a, b):
        """Inner products of item pairs ``(a[t], b[t])`` (1-D position tensors), chunked."""
        out = torch.empty(a.numel(), dtype=torch.float32, device=a.device)
        step = max(1, GATHER_ELEMENTS // (2 * self.y.shape[1]))
        for s in range(0, a.numel(), step):
            e = min(a.numel(), s + step)
            out[s:e] = (self.y[a[s:e]] * self.y[b[s:e]]).sum(1)
        return out


# ----------------------------------------------------------------------------- the algorithm


def _graph_all(query, index, graph, width, dev, chunk_size):
    """k-NN lists of all items (queries first): positions and similarities [A, width], and the
    smallest similarity of each item [A]."""
    q_count, n = query.shape[0], index.shape[0]
    qb = block_rows(query, 0, q_count)
    check_finite(qb, "query", 0)
    qx_s, qx_i, min_qx = knn_rows(qb, index, width, dev, chunk_size)
    qq_s, qq_i, min_qq = knn_rows(qb, qb, width, dev)
    s_q, knn_q = _merge([(qq_s, qq_i), (qx_s, qx_i + q_count)], width)
    min_q = np.minimum(min_qx, min_qq)
    knn_x = np.zeros((n, width), np.int64)
    s_x = np.zeros((n, width), np.float32)
    min_x = np.zeros(n, np.float32)
    for start in range(0, n, GRAPH_ROWS):
        stop = min(n, start + GRAPH_ROWS)
        s, i, m = knn_rows(block_rows(index, start, stop), qb, width, dev)
        s_x[start:stop], knn_x[start:stop] = _merge(
            [(s, i), (graph.scores[start:stop], graph.neighbours[start:stop] + q_count)], width
        )
        min_x[start:stop] = np.minimum(m, graph.min_sim[start:stop])
    return np.concatenate([knn_q, knn_x]), np.concatenate([s_q, s_x]), np.concatenate([min_q, min_x])


def _reciprocal_sets(knn, knn_s, maxd, items, k1, progress):
    """``V`` (normalized weights on R*) of every item as padded ``(cols, vals)`` [A, P]."""
    a_count, width = knn.shape
    dev = knn.device
    half = int(round(k1 / 2.0)) + 1
    ids = torch.arange(a_count, device=dev)
    fh = knn[:, :half]
    half_mask = torch.empty((a_count, half), dtype=torch.bool, device=dev)
    step = max(1, GATHER_ELEMENTS // (half * half))
    for s in range(0, a_count, step):
        e = min(a_count, s + step)
        half_mask[s:e] = (fh[fh[s:e]] == ids[s:e, None, None]).any(-1)
    step = max(1, GATHER_ELEMENTS // (width * width * half))
    rows_all, cols_all, vals_all = [], [], []
    missing = 0
    for s in range(0, a_count, step):
        e = min(a_count, s + step)
        c = e - s
        f = knn[s:e]  # [c, W]
        recip = (knn[f] == ids[s:e, None, None]).any(-1)  # [c, W]: R(i, k1) within N(i, k1+1)
        r_pad = torch.where(recip, f, torch.full_like(f, -1))
        hs = fh[f]  # [c, W, H]: the candidates' half-size neighbour lists
        hv = half_mask[f]
        hset = torch.where(hv, hs, torch.full_like(hs, -2))
        n_int = (hset[..., None] == r_pad[:, None, None, :]).any(-1).sum(-1)  # |R(c, k1/2) & R(i, k1)|
        qualify = recip & (3 * n_int > 2 * hv.sum(-1))
        extra = torch.where(qualify[..., None] & hv, hs, torch.full_like(hs, -1)).flatten(1)
        cand = torch.cat([r_pad, extra], 1)  # [c, W + W*H], -1 = none
        local = torch.arange(c, device=dev)[:, None].expand_as(cand)
        ok = cand >= 0
        keys = torch.unique(local[ok] * a_count + cand[ok])  # sorted: by row, then column
        row, col = keys // a_count + s, keys % a_count
        # similarities: from the k-NN lists where the pair is there, else computed
        hit = knn[row] == col[:, None]
        found = hit.any(1)
        sim = (knn_s[row] * hit).sum(1)
        miss = torch.nonzero(~found).flatten()
        if miss.numel():
            sim[miss] = items.dots(row[miss], col[miss])
            missing += miss.numel()
        dist = (2.0 - 2.0 * sim.double()) / maxd[row]
        w = torch.exp(-dist)
        total = _segment_sum(row - s, w, c)
        rows_all.append(row)
        cols_all.append(col)
        vals_all.append((w / total[row - s]).float())
        if progress is not None:
            progress.update(c)
    rows, cols = torch.cat(rows_all), torch.cat(cols_all)
    logger.debug("k-reciprocal: %d entries in R*, %d outside the k-NN lists", rows.numel(), missing)
    return _csr_to_padded(rows, cols, torch.cat(vals_all), a_count)


def _expand(knn, v_idx, v_val, k2):
    """Local query expansion: row-sorted CSR ``(rows, cols, vals)`` of mean ``V`` over ``N(i, k2)``."""
    a_count, p = v_idx.shape
    dev = v_idx.device
    if k2 == 1:
        ok = v_idx >= 0
        rows = torch.arange(a_count, device=dev)[:, None].expand_as(v_idx)
        return rows[ok], v_idx[ok], v_val[ok]
    rows_all, cols_all, vals_all = [], [], []
    step = max(1, GATHER_ELEMENTS // (4 * k2 * p))  # several int64 temporaries of [step, k2 * P]
    for s in range(0, a_count, step):
        e = min(a_count, s + step)
        nb = knn[s:e, :k2]
        gi, gv = v_idx[nb].flatten(1), v_val[nb].flatten(1)  # [c, k2*P]
        local = torch.arange(e - s, device=dev)[:, None].expand_as(gi)
        ok = gi >= 0
        keys, sums = _sum_by_key(local[ok] * a_count + gi[ok], gv[ok])
        rows_all.append(keys // a_count + s)
        cols_all.append(keys % a_count)
        vals_all.append((sums / k2).float())
    return torch.cat(rows_all), torch.cat(cols_all), torch.cat(vals_all)


class _InvertedIndex:
    """The gallery rows of the expanded ``V`` by column: for a column ``l``, the gallery items
    ``g`` with ``V_gl > 0`` and these values."""

    def __init__(self, rows, cols, vals, q_count, a_count):
        gal = rows >= q_count
        g_rows, g_cols, g_vals = rows[gal], cols[gal], vals[gal]
        order = torch.sort(g_cols, stable=True).indices  # by column, rows ascending within one
        self.rows, self.vals = g_rows[order] - q_count, g_vals[order]
        self.count = torch.bincount(g_cols, minlength=a_count)
        self.start = torch.cumsum(self.count, 0) - self.count

    def min_sums(self, q_local, q_cols, q_vals, n, out=None):
        """``sum_l min(V_ql, V_gl)`` for the queries' entries ``(q_local, q_cols, q_vals)`` (sorted
        by query) and every gallery item ``g`` that shares one: added into ``out`` [c, N] float64 on
        the CPU (``index_add_``, sequential there), else returned as ``(keys = q_local * n + g,
        sums)`` (sort + ordered sums: deterministic on CUDA too)."""
        dev = q_cols.device
        ln = self.count[q_cols]
        total = int(ln.sum())
        if not total:
            return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, dtype=torch.float64, device=dev)
        ent = torch.repeat_interleave(torch.arange(q_cols.numel(), device=dev), ln)
        first = torch.cumsum(ln, 0) - ln
        pos = self.start[q_cols][ent] + torch.arange(total, device=dev) - first[ent]
        mins = torch.minimum(q_vals[ent], self.vals[pos])
        keys = q_local[ent] * n + self.rows[pos]
        if out is not None:
            out.view(-1).index_add_(0, keys, mins.double())
            return None
        return _sum_by_key(keys, mins)


def _sequential_adds(dev):
    """Whether ``index_add_`` adds in a fixed order on ``dev`` (the CPU); else sums are sorted."""
    return dev.type == "cpu"


def _final_topk(items, inv, rows, cols, vals, maxd, lam, k, progress):
    """Top-``k`` of every query by ``d*`` (ties: lower index): ``(d* [Q, k] float64, indices)``.

    Query chunks are scored against the whole index: a ``[chunk, N]`` block of distances
    (bounded by :data:`GATHER_ELEMENTS`), with the Jaccard term where a gallery item shares an
    entry of ``V`` with the query (elsewhere ``d_J = 1``)."""
    q_count = items.q_count
    n = items.y.shape[0] - q_count
    dev = items.y.device
    gallery = items.y[q_count:]
    q_entries = torch.cumsum(torch.bincount(rows[rows < q_count], minlength=q_count), 0).cpu().numpy()
    out_d = np.zeros((q_count, k), np.float64)
    out_i = np.zeros((q_count, k), np.int64)
    step = max(1, min(q_count, GATHER_ELEMENTS // (4 * n)))
    for s in range(0, q_count, step):
        e = min(q_count, s + step)
        e0, e1 = (q_entries[s - 1] if s else 0), q_entries[e - 1]
        part = (rows[e0:e1] - s, cols[e0:e1], vals[e0:e1], n)
        # score = -d* = -(1 - lambda) (1 - m / (2 - m)) - lambda d, built in place in one [c, N] block
        score = (items.y[s:e] @ gallery.T).double()
        score.mul_(2.0).sub_(2.0).div_(maxd[s:e, None]).mul_(lam).sub_(1.0 - lam)
        if _sequential_adds(dev):
            m = torch.zeros_like(score)
            inv.min_sums(*part, out=m)
            score.add_(m.div_(2.0 - m), alpha=1.0 - lam)
            del m
        else:
            keys, m = inv.min_sums(*part)
            score.view(-1)[keys] += (1.0 - lam) * m / (2.0 - m)
        idx, neg = deterministic_topk(score, k)  # ties at the k-th place: lower index
        del score
        order = torch.sort(idx, dim=1).indices
        idx, neg = idx.gather(1, order), neg.gather(1, order)
        order = torch.sort(neg, dim=1, descending=True, stable=True).indices
        out_i[s:e] = idx.gather(1, order).cpu().numpy()
        out_d[s:e] = -neg.gather(1, order).cpu().numpy()
        if progress is not None:
            progress.update(e - s)
    return out_d, out_i


def k_reciprocal_rerank(
    query,
    index,
    topk,
    k1=DEFAULT_K1,
    k2=DEFAULT_K2,
    lambda_value=DEFAULT_LAMBDA,
    device=None,
    chunk_size=None,
    graph=None,
    progress=False,
):
    """k-reciprocal re-ranking of ``query`` [Q, D] in ``index`` [N, D] (rows L2-normalized).

    Returns ``(scores, indices)`` [Q, min(topk, N)], ordered by the final distance ``d*``
    (ties: lower index), with ``scores = 1 - d*``. ``graph`` is the index's
    :class:`IndexGraph` (at least ``k1 + 1`` wide; computed when ``None``). Everything runs with
    torch on ``device`` (default: CUDA if available, else CPU); ``chunk_size`` is the number of
    index rows per matrix product of the graph passes (default: about 128 MB of similarities).
    """
    check_kreciprocal(k1, k2, lambda_value)
    topk = check_topk(topk)
    query, index = as_matrix(query, "query"), as_matrix(index, "index")
    check_dims(query, index)
    q_count, n = query.shape[0], index.shape[0]
    check_kreciprocal_size(k1, n)
    k = min(topk, n)
    if q_count == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    width = k1 + 1
    _, dev = resolve_backend("torch", device)
    if graph is None:
        logger.info("k-reciprocal: building the k-NN graph of %d index items (width %d)", n, width)
        graph = build_index_graph(index, width, device=device, chunk_size=chunk_size, progress=progress)
    elif graph.width < width or len(graph.min_sim) != n:
        raise MetricError(
            f"k-reciprocal needs an index graph of {n} rows with at least k1+1 = {width} neighbours, "
            f"got {len(graph.min_sim)} rows x {graph.width}"
        )
    else:
        graph = IndexGraph(graph.neighbours[:, :width], graph.scores[:, :width], graph.min_sim)
    knn, knn_s, min_sim = _graph_all(query, index, graph, width, dev, chunk_size)
    a_count = q_count + n

    items = _Items(query, index, dev)
    knn_t, knn_st = torch.from_numpy(knn).to(dev), torch.from_numpy(knn_s).to(dev)
    maxd = 2.0 - 2.0 * torch.from_numpy(min_sim).to(dev).double()
    maxd = torch.where(maxd > 0, maxd, torch.ones_like(maxd))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=a_count + q_count, desc="k-reciprocal", unit="item", unit_scale=a_count >= 10000, dynamic_ncols=True
        )
    v_idx, v_val = _reciprocal_sets(knn_t, knn_st, maxd, items, k1, bar)
    rows, cols, vals = _expand(knn_t, v_idx, v_val, k2)
    del v_idx, v_val
    inv = _InvertedIndex(rows, cols, vals, q_count, a_count)
    final, out_i = _final_topk(items, inv, rows, cols, vals, maxd, float(lambda_value), k, bar)
    if bar is not None:
        bar.close()
    logger.info(
        "k-reciprocal re-ranking of %d queries in %d items: k1=%d, k2=%d, lambda=%g", q_count, n, k1, k2, lambda_value
    )
    return (1.0 - final).astype(np.float32), out_i
