"""Revisited Oxford / Paris scoring (Radenović et al., CVPR 2018): mAP and mP@k, Easy/Medium/Hard.

Protocols (per query, from the ground-truth lists ``easy``, ``hard`` and ``junk``):

    Easy (E):   positives = easy,        junk = junk + hard
    Medium (M): positives = easy + hard, junk = junk
    Hard (H):   positives = hard,        junk = junk + easy

Junk images are removed from the ranking before scoring; a query without positives in a
protocol is skipped in that protocol. With ``r_1 < r_2 < ...`` the 0-based positions of the
positives in the junk-free ranking and ``n`` the number of positives, AP is the area under the
precision-recall curve by trapezoids, as in the standard evaluation code:

    AP = 1/n * sum_j (P0_j + P1_j) / 2,   P0_j = j / r_j (1 when r_j = 0),   P1_j = (j + 1) / (r_j + 1)

(j counts positives from 0). A positive missing from a partial ranking adds nothing (it still
counts in n). Mean precision@k follows the standard protocol exactly: with positions made 1-based,
``k' = min(k, position of the last positive)`` and ``P@k = #positives within the first k' / k'``
— the cut-off shrinks to the last positive's rank, so a query with only 2 positives found at
ranks 1 and 2 scores P@10 = 1. A query none of whose positives appear in a partial ranking scores
P@k = 0. Results are fractions in [0, 1] (the original code reports percentages).
"""

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

PROTOCOLS = ("E", "M", "H")


def protocol_lists(entry, protocol):
    """``(positives, junk)`` int64 arrays of one ground-truth entry under protocol E, M or H."""
    easy, hard, junk = (np.asarray(entry.get(key, []), dtype=np.int64).ravel() for key in ("easy", "hard", "junk"))
    if protocol == "E":
        return easy, np.concatenate([junk, hard])
    if protocol == "M":
        return np.concatenate([easy, hard]), junk
    if protocol == "H":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def average_precision_and_precisions(ranking, positives, junk, ks):
    """AP and P@k (as defined in the module docstring) of one query, or ``None`` if it has no
    positives. ``ranking`` is the 1-D array of index positions, best first."""
    if len(positives) == 0:
        return None
    size = int(max(ranking.max(initial=-1), positives.max(initial=-1), junk.max(initial=-1))) + 1
    is_pos = np.zeros(size, dtype=bool)
    is_pos[positives] = True
    is_junk = np.zeros(size, dtype=bool)
    is_junk[junk] = True
    ranked_pos = is_pos[ranking]
    ranked_junk = is_junk[ranking]
    junk_before = np.cumsum(ranked_junk) - ranked_junk  # junk strictly before each position
    where = np.flatnonzero(ranked_pos)
    pos = (where - junk_before[where]).astype(np.float64)  # 0-based positions without junk

    j = np.arange(len(pos), dtype=np.float64)
    precision_0 = np.divide(j, pos, out=np.ones_like(pos), where=pos > 0)
    precision_1 = (j + 1) / (pos + 1)
    ap = float(((precision_0 + precision_1) / 2).sum() / len(positives))

    precisions = []
    for k in ks:
        if len(pos) == 0:
            precisions.append(0.0)
            continue
        cut = min(float(pos[-1] + 1), float(k))
        precisions.append(float((pos + 1 <= cut).sum() / cut))
    return ap, precisions


def revisited_map(ranks, gnd, ks=(1, 5, 10)):
    """mAP and mP@k of the Easy, Medium and Hard protocols.

    Args:
        ranks: ``[Q, N]`` index positions sorted best first (numpy array or torch tensor); a
            full ranking of the index for the standard numbers. Or a function ``q -> ranking``
            giving query ``q``'s 1-D ranking (called once per query and protocol), for rankings
            too large to hold together (an index with a million distractors, see
            :mod:`metric.retrieval.distractors`).
        gnd: list of ``Q`` dicts with ``easy``, ``hard`` and ``junk`` lists of index positions.
        ks: ranks of the reported mean precision.

    Returns:
        ``{"E": {"mAP": .., "mP@1": .., ...}, "M": {...}, "H": {...}}`` (``None`` where every
        query of a protocol was skipped).
    """
    if callable(ranks):
        ranking_of = ranks
    else:
        if isinstance(ranks, torch.Tensor):
            ranks = ranks.detach().cpu().numpy()
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
            raise ValueError(f"ranks must be [Q, N] with Q = {len(gnd)} queries, got {ranks.shape}")
        ranking_of = ranks.astype(np.int64, copy=False).__getitem__
    out = {}
    for protocol in PROTOCOLS:
        aps, precisions, skipped = [], [], 0
        for q, entry in enumerate(gnd):
            positives, junk = protocol_lists(entry, protocol)
            scored = average_precision_and_precisions(np.asarray(ranking_of(q), np.int64), positives, junk, ks)
            if scored is None:
                skipped += 1
                continue
            aps.append(scored[0])
            precisions.append(scored[1])
        if skipped:
            logger.info("protocol %s: %d queries without positives skipped", protocol, skipped)
        result = {"mAP": float(np.mean(aps)) if aps else None}
        means = np.mean(precisions, axis=0) if precisions else [None] * len(ks)
        for k, value in zip(ks, means):
            result[f"mP@{k}"] = None if value is None else float(value)
        out[protocol] = result
    return out


def rank_index(query_emb, index_emb, chunk_size=256):
    """Full ranking ``[Q, N]`` (int64 numpy) of the index for each query by inner product,
    best first (ties keep index order). Computed in chunks of queries."""
    query = torch.as_tensor(query_emb, dtype=torch.float32)
    index = torch.as_tensor(index_emb, dtype=torch.float32)
    out = np.empty((query.shape[0], index.shape[0]), dtype=np.int64)
    for start in range(0, query.shape[0], chunk_size):
        sims = query[start : start + chunk_size] @ index.T
        order = torch.argsort(sims, dim=1, descending=True, stable=True)
        out[start : start + chunk_size] = order.numpy()
    return out
