"""Retrieval metrics on labelled sets: recall@k and mAP@R (Musgrave et al., ECCV 2020).

For a query q with label y, the relevant items are the index items labelled y (in leave-one-out
mode, when the query set is its own index, every other query item labelled y: the query itself is
excluded). With R the number of relevant items and the index ranked by inner product:

- recall@k: 1 if at least one of the first k items is relevant, else 0 (the usual metric-learning
  "recall@k", i.e. hit rate);
- AP@R = 1/R * sum_{i=1..R} P(i) * rel(i), P(i) = relevant items among the first i, divided by i;
- with ``ap_at=k`` also mAP@k as Google Landmark Retrieval defines it (the metric of
  :func:`~metric.retrieval.metrics_glr.glr_map_at_k`, here with the labels as the solution):
  AP@k = 1/min(R, k) * sum_{i=1..k} P(i) * rel(i). The training evaluation records mAP@100.

Both are averaged over the queries that have at least one relevant item; the others (a class
with one image in leave-one-out mode, a query label absent from the index) are counted in
``skipped`` and left out of every average, as pytorch-metric-learning's ``AccuracyCalculator``
leaves out its "lone" queries. Similarities are computed in torch, a chunk of queries at a time, so
memory stays bounded; the work runs on the device of ``query_emb`` (CPU or CUDA).

Ties in similarity rank the item that comes first in the index first (stable sorts, on any
device): the order of faiss's exact L2 search (``IndexFlatL2``, what ``AccuracyCalculator`` ranks
with by default), so on the same embeddings the two agree exactly, ties included
(tests/test_benchmark_dml.py).
recall@1 is then ``AccuracyCalculator``'s ``precision_at_1`` and mAP@R its
``mean_average_precision_at_r``; recall@k for k > 1 ("any of the first k") has no counterpart there.
"""

import logging

import numpy as np
import torch

from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

# at most this many similarity entries (float32) per chunk: 64 Mi entries = 256 MiB
_MAX_CHUNK_ELEMENTS = 1 << 26


def _as_tensor(x, device=None):
    if isinstance(x, torch.Tensor):
        return x.detach().to(device) if device is not None else x.detach()
    x = np.asarray(x)
    if not x.flags.writeable:  # e.g. a read-only memmap of a feature store
        x = x.copy()
    return torch.as_tensor(x, device=device)


def _label_codes(query_labels, index_labels):
    """Map labels of any type (ints, strings) to int64 codes shared by query and index."""

    def to_numpy(labels):
        if isinstance(labels, torch.Tensor):
            return labels.detach().cpu().numpy()
        return np.asarray(labels)

    q = to_numpy(query_labels).ravel()
    x = to_numpy(index_labels).ravel() if index_labels is not None else q[:0]
    _, codes = np.unique(np.concatenate([q, x]), return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    return codes[: len(q)], codes[len(q) :]


def _top_in_order(sims, depth):
    """Column indices of the ``depth`` most similar items of each row, most similar first, ties in
    the order of the columns (the lower index first). ``torch.topk`` orders ties arbitrarily, so
    rows with ties are put in order afterwards: those whose ``depth``-th value is tied with the
    next one (topk chose which of the tied items to keep) are sorted whole, stably; those with
    ties inside the first ``depth`` are reordered there. Rows without ties (nearly all, with
    float embeddings) cost one extra topk column."""
    extra = 1 if depth < sims.shape[1] else 0
    vals, top = torch.topk(sims, depth + extra, dim=1)
    if extra:
        crossing = vals[:, depth] == vals[:, depth - 1]
        vals, top = vals[:, :depth], top[:, :depth]
        if bool(crossing.any()):
            rows = crossing.nonzero().squeeze(1)
            row_vals, row_top = torch.sort(sims[rows], dim=1, descending=True, stable=True)
            vals[rows], top[rows] = row_vals[:, :depth], row_top[:, :depth]
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        by_index = torch.argsort(top[rows], dim=1)
        row_top, row_vals = top[rows].gather(1, by_index), vals[rows].gather(1, by_index)
        top[rows] = row_top.gather(1, torch.sort(row_vals, dim=1, descending=True, stable=True).indices)
    return top


def labelled_metrics(
    query_emb, query_labels, index_emb=None, index_labels=None, ks=(1, 5, 10), chunk_size=1024, ap_at=None
):
    """recall@k and mAP@R of a labelled query set against a labelled index.

    Args:
        query_emb: ``[Q, D]`` L2-normalized embeddings (numpy array or torch tensor).
        query_labels: ``[Q]`` labels (ints or strings).
        index_emb, index_labels: ``[N, D]`` and ``[N]``; ``None`` for leave-one-out within the
            query set.
        ks: the k of the reported recall@k.
        chunk_size: queries per chunk (also capped so a chunk holds at most 64 Mi similarities).
        ap_at: also ``mAP@<ap_at>`` (GLR's definition, see the module doc), or None.

    Returns:
        ``{"recall@1": .., "recall@5": .., "recall@10": .., "mAP@R": .., "skipped": n}``,
        fractions in [0, 1]; ``skipped`` counts queries without any relevant item.
    """
    leave_one_out = index_emb is None
    if leave_one_out != (index_labels is None):
        raise ValueError("give index_emb and index_labels together, or neither (leave-one-out)")
    query = _as_tensor(query_emb)
    device = query.device
    query = query.float()
    index = query if leave_one_out else _as_tensor(index_emb, device).float()
    q_codes, x_codes = _label_codes(query_labels, index_labels)
    if leave_one_out:
        x_codes = q_codes
    if query.ndim != 2 or index.ndim != 2 or query.shape[1] != index.shape[1]:
        raise MetricError(
            f"embedding shapes {tuple(query.shape)} (query) and {tuple(index.shape)} (index) "
            "do not match; both must be [count, dim] with the same dim"
        )
    if len(q_codes) != query.shape[0] or len(x_codes) != index.shape[0]:
        raise MetricError(
            f"{len(q_codes)} query labels for {query.shape[0]} query embeddings, "
            f"{len(x_codes)} index labels for {index.shape[0]} index embeddings; counts must match"
        )

    for name, emb in (("query", query), ("index", index)):
        if not bool(torch.isfinite(emb).all()):
            raise MetricError(f"the {name} embeddings hold NaN or infinite values; re-extract them")
    num_x = index.shape[0]

    def rank(start, stop, depth):
        sims = query[start:stop] @ index.T
        if leave_one_out:
            own = torch.arange(start, stop, device=device)
            sims[own - start, own] = float("-inf")
        return _top_in_order(sims, depth)

    rows = max(1, min(int(chunk_size), _MAX_CHUNK_ELEMENTS // max(num_x, 1)))
    return score_rankings(rank, query_labels, index_labels, num_x, ks, rows, device, ap_at)


def _precision_sum(rel):
    """Per row of the boolean ``[c, depth]`` relevance of a ranking: the sum over the relevant
    positions i of P(i), the relevant items among the first i divided by i (float64)."""
    rel = rel.double()
    precision = rel.cumsum(dim=1) / torch.arange(1, rel.shape[1] + 1, device=rel.device)
    return (precision * rel).sum(dim=1)


def score_rankings(rank, query_labels, index_labels, num_x, ks=(1, 5, 10), rows=1024, device=None, ap_at=None):
    """recall@k and mAP@R (the dict :func:`labelled_metrics` returns) from rankings of the index:
    ``rank(start, stop, depth)`` returns the ``[stop - start, depth]`` index rows most similar to
    queries ``start .. stop - 1``, best first, asked for ``rows`` queries at a time.
    ``index_labels`` None is leave-one-out mode (the queries are the index, of ``num_x`` items;
    ``rank`` leaves each query itself out). Sharded evaluation
    (:mod:`metric.retrieval.sharded_pipeline`) ranks with a sharded search."""
    leave_one_out = index_labels is None
    q_codes, x_codes = _label_codes(query_labels, index_labels)
    if leave_one_out:
        x_codes = q_codes
    num_q = len(q_codes)
    class_size = np.bincount(x_codes, minlength=int(max(q_codes.max(initial=0), x_codes.max(initial=0))) + 1)
    num_relevant = class_size[q_codes] - (1 if leave_one_out else 0)
    ks = tuple(int(k) for k in ks)
    kmax = max(ks)
    if ap_at is not None:
        ap_at = int(ap_at)
        if ap_at < 1:
            raise MetricError(f"mAP@k needs k >= 1, got {ap_at}")
        kmax = max(kmax, ap_at)

    q_lab = torch.as_tensor(q_codes, device=device)
    x_lab = torch.as_tensor(x_codes, device=device)
    relevant_t = torch.as_tensor(num_relevant, device=device)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    apk_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, num_q, rows):
        stop = min(start + rows, num_q)
        r = relevant_t[start:stop]
        available = num_x - (1 if leave_one_out else 0)
        depth = min(max(kmax, int(r.max())), available)
        if depth <= 0:
            continue
        top = torch.as_tensor(rank(start, stop, depth), device=device)
        rel = x_lab[top] == q_lab[start:stop, None]  # [c, depth]
        keep = r > 0
        for i, k in enumerate(ks):
            hits[i] += (rel[:, :k].any(dim=1) & keep).sum()
        # AP@R: only the first R positions count
        within_r = torch.arange(depth, device=device)[None, :] < r[:, None]
        ap_sum += (_precision_sum(rel & within_r) / r.clamp(min=1))[keep].sum()
        if ap_at is not None:  # GLR's AP@k: the first k positions, divided by min(R, k)
            apk_sum += (_precision_sum(rel[:, :ap_at]) / r.clamp(min=1, max=ap_at))[keep].sum()

    scored = int((num_relevant > 0).sum())
    skipped = num_q - scored
    if scored == 0:
        raise MetricError("no query has a relevant item in the index (no shared labels); check the label files")
    if skipped:
        logger.info("%d of %d queries have no relevant item and were skipped", skipped, num_q)
    out = {f"recall@{k}": float(hits[i] / scored) for i, k in enumerate(ks)}
    out["mAP@R"] = float(ap_sum / scored)
    if ap_at is not None:
        out[f"mAP@{ap_at}"] = float(apk_sum / scored)
    out["skipped"] = skipped
    return out
