"""Revisited Oxford/Paris scores with a million distractors (+R1M), in bounded memory.

The standard evaluation ranks the whole index (ROxf 4,993 images + 1,001,001 revisitop1m
distractors) for each of the 70 queries: a ``[70, 1,005,994]`` int64 ranking (563 MB) plus the
scores. Here nothing of size ``Q x (N + M)`` is formed. A distractor is never a positive or junk,
so only the place of each index image in the merged ranking matters: with the index ranked by
score (ties by index order, as :func:`~metric.retrieval.metrics_revisited.rank_index`), the
index image at rank ``r`` moves down by the number of distractors that score strictly higher
than it (a distractor that ties with an index image comes after it, exactly as when the
distractors are appended to the index and ranked together with a stable sort).

Those counts come from one pass over the distractors in blocks: per query, each distractor's
score is located among the sorted index scores (``searchsorted``) and counted in a histogram of
``N + 1`` bins. Memory: the ``[Q, N]`` index scores and histograms plus one block; the distractor
store is read with plain file reads (not a memory map, so its pages are not added to the
process's resident memory). The scoring is :func:`~metric.retrieval.metrics_revisited.revisited_map`
itself, given each query's ranking (index images at their merged positions, distractors as a
placeholder), truncated after the last positive or junk image, which changes no score.
"""

import logging

import numpy as np

from metric.retrieval.metrics_revisited import revisited_map
from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

# Distractor rows per block, in float32 elements (rows x dim): 16 Mi elements = 64 MiB.
BLOCK_ELEMENTS = 1 << 24


def iter_row_blocks(embeddings, rows=None):
    """Blocks ``[b, D]`` float32 of an ``[M, D]`` array, in order. A memory-mapped ``.npy``
    (a feature store's ``embeddings.npy``) is read with ordinary file reads, so the resident
    memory stays one block whatever the store's size."""
    count, dim = embeddings.shape
    rows = rows or max(1, BLOCK_ELEMENTS // max(1, dim))
    filename = getattr(embeddings, "filename", None)
    if isinstance(embeddings, np.memmap) and filename and embeddings.flags.c_contiguous:
        dtype = embeddings.dtype
        base = int(embeddings.offset)
        with open(filename, "rb") as f:
            for start in range(0, count, rows):
                n = min(rows, count - start)
                f.seek(base + start * dim * dtype.itemsize)
                block = np.fromfile(f, dtype=dtype, count=n * dim)
                if block.size != n * dim:
                    raise MetricError(f"{filename} ends before row {start + n} of {count}; re-create the store")
                yield block.reshape(n, dim).astype(np.float32, copy=False)
        return
    for start in range(0, count, rows):
        yield np.asarray(embeddings[start : start + rows], dtype=np.float32)


def distractors_above(query, index, distractor_blocks, progress=None):
    """``(order, above)``: ``order [Q, N]`` the index ranked per query (descending score, ties
    by index position) and ``above [Q, N]`` the number of distractors scoring strictly higher
    than the index image at each rank. ``distractor_blocks`` yields float32 ``[b, D]`` blocks;
    ``progress`` (a tqdm bar or None) is advanced by the rows of each block."""
    query = np.ascontiguousarray(query, dtype=np.float32)
    index = np.ascontiguousarray(index, dtype=np.float32)
    scores = query @ index.T  # [Q, N]
    order = np.argsort(-scores, axis=1, kind="stable")
    ascending = np.take_along_axis(scores, order, axis=1)[:, ::-1].copy()  # ascending per query
    num_q, num_x = scores.shape
    hist = np.zeros((num_q, num_x + 1), np.int64)
    seen = 0
    for block in distractor_blocks:
        if block.shape[1] != query.shape[1]:
            raise MetricError(
                f"distractor dimension {block.shape[1]} does not match the query dimension {query.shape[1]}; "
                "extract the distractors with the same model"
            )
        d = query @ block.T  # [Q, b]
        for q in range(num_q):
            # index images with a lower score than each distractor: the distractor is above those
            below = np.searchsorted(ascending[q], d[q], side="left")
            hist[q] += np.bincount(below, minlength=num_x + 1)
        seen += block.shape[0]
        if progress is not None:
            progress.update(block.shape[0])
    # the index image at ascending position i is below every distractor counted in a bin > i
    above_ascending = hist[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]  # [Q, N]: sum of hist[i + 1:]
    above = above_ascending[:, ::-1]  # by descending rank
    logger.debug("counted %d distractors against %d queries x %d index images", seen, num_q, num_x)
    return order, np.ascontiguousarray(above)


def merged_ranking(order_q, above_q, needed, placeholder):
    """Query ``q``'s ranking of the index with the distractors merged in (each distractor as
    ``placeholder``, an id that is no index image), up to and including the last of the index
    images ``needed`` (its positives and junk): the part of the ranking that decides its scores."""
    merged = np.arange(len(order_q), dtype=np.int64) + above_q  # merged position of each rank
    if len(needed):
        rank_of = np.empty(len(order_q), np.int64)
        rank_of[order_q] = np.arange(len(order_q))
        last = int(rank_of[np.asarray(needed, np.int64)].max())
    else:
        last = 0
    length = int(merged[last]) + 1
    ranking = np.full(length, placeholder, np.int64)
    ranking[merged[: last + 1]] = order_q[: last + 1]
    return ranking


def revisited_map_with_distractors(query, index, distractor_blocks, gnd, ks=(1, 5, 10), progress=None):
    """:func:`~metric.retrieval.metrics_revisited.revisited_map` of the index followed by the
    distractors (``distractor_blocks``: float32 ``[b, D]`` blocks, e.g. :func:`iter_row_blocks`
    of a store's embeddings), equal to ranking ``index + distractors`` together with
    :func:`~metric.retrieval.metrics_revisited.rank_index`, without forming that ranking (on
    float features, up to near-ties whose float32 products round differently in the two
    computations: ``benchmarks/r1m_scale.py --compare-full`` measures it)."""
    order, above = distractors_above(query, index, distractor_blocks, progress)
    num_x = order.shape[1]
    needed = []
    for entry in gnd:
        parts = [np.asarray(entry.get(k, []), np.int64).ravel() for k in ("easy", "hard", "junk")]
        needed.append(np.concatenate(parts))

    def ranking_of(q):
        return merged_ranking(order[q], above[q], needed[q], num_x)

    return revisited_map(ranking_of, gnd, ks=ks)
