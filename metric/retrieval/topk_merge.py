"""Merging top-k lists of index slices, and which slice of an index a rank holds.

Sharded search (:mod:`metric.retrieval.sharded`, and the sharded approximate search) splits the
index into contiguous slices; each process finds the top-k of the queries in its slice, with
**global** index rows, and :func:`merge_topk` merges the lists into the top-k of the whole index
with the tie rule of every search here (:mod:`metric.retrieval.search`): score descending, then
global index ascending. Because the rule depends only on the scores and the global rows, the
merged list is the list a single process searching the whole index returns (identical rows
where scores are distinct; scores equal up to float rounding of the products).

:func:`shard_rows` says which rows rank ``r`` of ``W`` holds: the same contiguous cut as
sharded feature extraction makes (``ceil(count / W)`` rows per rank, the last ranks possibly
fewer or none), so an index extracted by W processes and searched by W processes splits the
same way.
"""

import numpy as np

# Rows (queries) merged per lexsort, so the sort keys of a million queries stay small.
MERGE_ROWS = 1 << 16


def shard_rows(count, world, rank):
    """``(start, stop)``: the contiguous rows of ``count`` that rank ``rank`` (0-based) of ``world``
    holds; slices of ranks 0..world-1 tile ``[0, count)`` in order (some may be empty)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}")  # a bug in the caller
    per = -(-count // world)
    return min(count, rank * per), min(count, (rank + 1) * per)


def sort_topk(scores, ids, k):
    """The first ``k`` of each row of the [q, c] numpy arrays ``scores`` / ``ids`` ordered by score
    descending, then id ascending; entries with a negative id (no result) go last. Returns a new
    pair of [q, min(k, c)] arrays."""
    scores = np.asarray(scores)
    ids = np.asarray(ids)
    k = min(k, scores.shape[1])
    missing = ids < 0
    keys = (ids, -scores, missing) if missing.any() else (ids, -scores)
    order = np.lexsort(keys, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_topk(score_blocks, id_blocks, k):
    """Merge per-slice top-k lists into the global top-``k``.

    ``score_blocks``: a list of float32 [nq, k_i] arrays; ``id_blocks``: int64 [nq, k_i] arrays of
    **global** index rows (-1: no result, as an approximate search pads with score -inf).
    Returns ``(scores, ids)``, float32 and int64 [nq, min(k, sum k_i)], ordered by score
    descending, then global row ascending; no-result entries last. Exact slices each giving
    ``min(k, n_i)`` columns thus merge to ``min(k, N)`` columns, as a single-process search of
    the whole index returns; approximate ones padded to ``k`` stay padded to ``k``.
    """
    if len(score_blocks) != len(id_blocks) or not score_blocks:
        raise ValueError("merge_topk needs as many score blocks as id blocks, at least one")
    nq = score_blocks[0].shape[0]
    for s, i in zip(score_blocks, id_blocks):
        if s.shape != i.shape or s.ndim != 2 or s.shape[0] != nq:
            raise ValueError(f"top-k blocks of shapes {s.shape} and {i.shape} for {nq} queries")
    scores = np.concatenate([np.asarray(s, np.float32) for s in score_blocks], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64) for i in id_blocks], axis=1)
    width = min(k, scores.shape[1])
    out_s = np.empty((nq, width), np.float32)
    out_i = np.empty((nq, width), np.int64)
    for start in range(0, nq, MERGE_ROWS):
        stop = min(nq, start + MERGE_ROWS)
        out_s[start:stop], out_i[start:stop] = sort_topk(scores[start:stop], ids[start:stop], width)
    return out_s, out_i
