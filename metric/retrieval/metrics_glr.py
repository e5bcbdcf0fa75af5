"""Google Landmark Retrieval scoring: mAP@100 and mean precision@k (Kaggle GLR 2019/2020).

Definition (the official one of the Kaggle retrieval challenges). For a scored query q with
ground-truth set G_q and predictions p_1, p_2, ... (best first):

    AP@100(q) = 1 / min(|G_q|, 100) * sum_{k=1..100} P(k) * rel(k)

- only the first 100 predictions count;
- ``rel(k)`` is 1 when ``p_k`` is in ``G_q`` and was not already predicted at a better rank
  (a repeated prediction is skipped for relevance but still occupies its rank position);
- ``P(k)`` is the number of distinct relevant predictions in the first k, divided by k;
- a query of the solution without any prediction scores 0;
- queries with Usage ``Ignored`` and queries with an empty ground-truth list are not scored
  (predictions for them are ignored);
- a predicted query id that is not in the solution is a user error.

mAP@100 is the mean of AP@100 over the scored queries of a split (Public, Private) or of both
(All). Mean precision@k (``mP@k`` keys ``mP@1``, ``mP@5``, ``mP@10``, ``mP@100`` by default) is
the mean over all scored queries (Public and Private together) of P(k) as defined above, with a
missing prediction counting as not relevant — the ``MeanPrecisions`` of the official metric code.
A split without any scored query reports ``None``.

Everything is vectorized (100k queries x 100 predictions score in about a second of CPU): each
id is mapped to an integer once — a bit field of its 64-bit ``hash`` — and one ``np.sort`` of
packed (query, id, rank) keys finds the first occurrence of every relevant prediction. The
scoring is done with two bit fields that together cover all 64 hash bits; if they disagree (two
different ids collided), it is redone with exact dictionary codes. So the result can only be
wrong if two different ids of one query have identical 64-bit hashes (about 1e-10 per run at
GLR scale; Python's string hash is keyed per process).
"""

import itertools
import logging

import numpy as np

from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)

DEFAULT_PRECISION_KS = (1, 5, 10, 100)
USAGE_CHOICES = ("Public", "Private", "Ignored")


def glr_map_at_k(predictions, solution, k=100, precision_ks=DEFAULT_PRECISION_KS):
    """Score retrieval predictions against a GLR solution.

    Args:
        predictions: ``{query id: [index ids, best first]}`` (e.g. from ``read_results_csv``).
        solution: ``{query id: (ground-truth index ids, usage)}`` with usage ``Public``,
            ``Private`` or ``Ignored`` (e.g. from ``read_glr_solution``); a plain list of ids
            instead of the pair is a ground truth outside both splits (scored in All only).
        k: number of predictions that count (100 for the challenge).
        precision_ks: the ranks reported as mean precision (each at most ``k``).

    Returns:
        ``{"mAP@<k>": {"Public": x, "Private": y, "All": z},
        "mP@k": {"mP@1": .., "mP@5": .., "mP@10": .., "mP@100": ..}}``, fractions in [0, 1]
        (``None`` for a split without scored queries).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    precision_ks = tuple(int(p) for p in precision_ks)
    if any(p < 1 or p > k for p in precision_ks):
        raise ValueError(f"precision ranks {precision_ks} must lie in 1..{k}")

    solution = {q: _with_usage(q, value) for q, value in solution.items()}
    scored = [q for q, (gt, usage) in solution.items() if usage != "Ignored" and len(gt) > 0]
    unknown = [q for q in predictions if q not in solution]
    if unknown:
        raise MetricError(
            f"query id {unknown[0]!r} of the results is not in the ground-truth solution "
            f"({len(unknown)} unknown query ids); score results made for the same query set"
        )
    split_code = {"Public": 0, "Private": 1, None: 2}
    split_of_query = np.array([split_code[solution[q][1]] for q in scored], dtype=np.int8)
    gt_lists = [solution[q][0] for q in scored]
    pred_lists = [predictions.get(q, ()) for q in scored]

    ap, precisions = _score_lists(pred_lists, gt_lists, k, precision_ks)

    def mean_of(mask):
        return float(ap[mask].mean()) if mask.any() else None

    maps = {
        "Public": mean_of(split_of_query == 0),
        "Private": mean_of(split_of_query == 1),
        "All": mean_of(np.ones(len(scored), dtype=bool)),
    }
    mps = {f"mP@{p}": (float(precisions[:, i].mean()) if len(scored) else None) for i, p in enumerate(precision_ks)}
    logger.info("scored %d GLR queries (%d in the solution)", len(scored), len(solution))
    return {f"mAP@{k}": maps, "mP@k": mps}


def glr_average_precisions(predictions, solution, k=100):
    """AP@k of each scored query, as :func:`glr_map_at_k` defines it: ``{query id: AP}`` for the
    queries of ``solution`` that are scored (not ``Ignored``, non-empty ground truth); their mean
    is the ``All`` mAP@k. Predicted ids of queries outside the solution are not looked at."""
    solution = {q: _with_usage(q, value) for q, value in solution.items()}
    scored = [q for q, (gt, usage) in solution.items() if usage != "Ignored" and len(gt) > 0]
    ap, _ = _score_lists([predictions.get(q, ()) for q in scored], [solution[q][0] for q in scored], k, (1,))
    return dict(zip(scored, ap.tolist()))


def _with_usage(qid, value):
    """``(ids, usage)`` from a solution value: the pair itself, or a plain id list (usage None)."""
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and not isinstance(value[0], str)
        and (value[1] is None or isinstance(value[1], str))
    ):
        gt, usage = value
        if usage is not None and usage not in USAGE_CHOICES:
            raise ValueError(f"query {qid!r}: usage {usage!r} is not one of {USAGE_CHOICES}")
        return gt, usage
    return value, None


def _score_lists(pred_lists, gt_lists, k, precision_ks):
    """Per-query AP@k ``[Q]`` and precision at ``precision_ks`` ``[Q, len(ks)]`` (vectorized)."""
    num_q = len(gt_lists)
    if num_q == 0:
        return np.zeros(0), np.zeros((0, len(precision_ks)))
    pred_lists = [p if len(p) <= k else p[:k] for p in pred_lists]  # no copy when short
    gt_lens = np.fromiter(map(len, gt_lists), dtype=np.int64, count=num_q)
    pred_lens = np.fromiter(map(len, pred_lists), dtype=np.int64, count=num_q)
    num_gt, num_pred = int(gt_lens.sum()), int(pred_lens.sum())
    layout = _KeyLayout(num_q, k, gt_lens, pred_lens)

    def flat(lists):
        return itertools.chain.from_iterable(lists)

    rel = None
    if layout.id_bits >= 24:
        # Fast path: an id becomes a bit field of its 64-bit hash. Done twice, with the low and the
        # high bits (together all 64): a collision that changed anything shows as a disagreement.
        gt_hash = np.fromiter(map(hash, flat(gt_lists)), dtype=np.int64, count=num_gt)
        pred_hash = np.fromiter(map(hash, flat(pred_lists)), dtype=np.int64, count=num_pred)
        passes = [
            layout.relevance((gt_hash >> shift) & layout.id_mask, (pred_hash >> shift) & layout.id_mask)
            for shift in (0, 64 - layout.id_bits)
        ]
        if np.array_equal(passes[0], passes[1]):
            rel = passes[0]
        else:
            logger.warning("hash collision between image ids; scoring with the exact (slower) path")
    if rel is None:  # exact path: a dictionary gives each ground-truth id a small integer
        vocab = dict(zip(dict.fromkeys(flat(gt_lists)), itertools.count()))
        if len(vocab).bit_length() > layout.id_bits:
            raise MetricError(f"too many queries and ids to score at once ({num_q} queries)")
        gt_ids = np.fromiter(map(vocab.__getitem__, flat(gt_lists)), dtype=np.int64, count=num_gt)
        pred_ids = np.fromiter(map(vocab.get, flat(pred_lists), itertools.repeat(-1)), dtype=np.int64, count=num_pred)
        # an id outside every ground truth gets a code no ground truth has
        pred_ids[pred_ids < 0] = len(vocab)
        rel = layout.relevance(gt_ids, pred_ids)

    cum = np.cumsum(rel, axis=1, dtype=np.float64)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    ap = (cum / ranks * rel).sum(axis=1) / np.minimum(gt_lens, k)  # the official divisor
    precisions = cum[:, [p - 1 for p in precision_ks]] / np.asarray(precision_ks, dtype=np.float64)
    return ap, precisions


class _KeyLayout:
    """Packs (query row, id, rank column, is-prediction flag) into one sortable int64.

    Bits, high to low: row | id | column | flag. Sorting the ground-truth keys (column 0, flag 0)
    together with the prediction keys (flag 1) puts each (row, id) group's ground truth first and
    its predictions after it in rank order, so "a prediction right after a ground-truth key of
    its group" is exactly "a relevant prediction, first occurrence". One ``np.sort``, no Python
    loop over predictions.
    """

    def __init__(self, num_rows, k, gt_lens, pred_lens):
        self.num_rows, self.k = num_rows, k
        self.col_bits = max(1, (k - 1).bit_length())
        row_bits = max(1, (num_rows - 1).bit_length())
        self.low_bits = self.col_bits + 1
        self.id_bits = 63 - row_bits - self.low_bits
        self.id_mask = (1 << max(self.id_bits, 0)) - 1
        rows = np.arange(num_rows, dtype=np.int64) << (self.id_bits + self.low_bits)
        self.num_gt = int(gt_lens.sum())
        # the row and column fields do not depend on the ids: compute them once
        self.base = np.empty(self.num_gt + int(pred_lens.sum()), dtype=np.int64)
        self.base[: self.num_gt] = np.repeat(rows, gt_lens)
        pred_base = self.base[self.num_gt :]
        pred_base[:] = np.repeat(rows | 1, pred_lens)
        starts = np.repeat(np.cumsum(pred_lens) - pred_lens, pred_lens)
        pred_base |= (np.arange(len(pred_base), dtype=np.int64) - starts) << 1

    def relevance(self, gt_ids, pred_ids):
        """``rel [rows, k]`` uint8: 1 where a prediction is relevant and not a repeat."""
        keys = np.empty_like(self.base)
        np.left_shift(gt_ids, self.low_bits, out=keys[: self.num_gt])
        np.left_shift(pred_ids, self.low_bits, out=keys[self.num_gt :])
        keys |= self.base
        keys.sort()
        flags = (keys & 1).astype(bool)
        first = flags[1:] & ~flags[:-1]  # a prediction right after a ground-truth key ...
        first &= (keys[1:] - keys[:-1]) < (1 << self.low_bits)  # ... of the same (row, id)
        hits = keys[1:][first]
        rows = hits >> (self.id_bits + self.low_bits)
        cols = (hits >> 1) & ((1 << self.col_bits) - 1)
        rel = np.zeros((self.num_rows, self.k), dtype=np.uint8)
        rel[rows, cols] = 1
        return rel


def make_synthetic_glr(num_queries=100_000, num_index=1_000_000, k=100, max_gt=150, seed=0):
    """Random ``(predictions, solution)`` of a realistic shape, for benchmarks and tests.

    Each query gets 1..``max_gt`` ground-truth ids (so some have more than ``k``) and ``k``
    predictions of which about 30% are drawn from its ground truth (so some repeat) and the rest
    from the whole index; about 10% of the queries are Ignored and 2% have no prediction.
    """
    rng = np.random.default_rng(seed)
    index_ids = np.array([f"{i:016x}" for i in rng.choice(2**60, size=num_index, replace=False)])
    usages = rng.choice(np.array(USAGE_CHOICES), size=num_queries, p=[0.3, 0.6, 0.1]).tolist()
    gt_lens = rng.integers(1, max_gt + 1, size=num_queries)
    gt_flat = rng.integers(0, num_index, size=int(gt_lens.sum()))
    gt_starts = np.cumsum(gt_lens) - gt_lens
    preds = rng.integers(0, num_index, size=(num_queries, k))
    from_gt = rng.random((num_queries, k)) < 0.3
    pick = gt_starts[:, None] + (rng.random((num_queries, k)) * gt_lens[:, None]).astype(np.int64)
    preds[from_gt] = gt_flat[pick[from_gt]]
    gt_names = index_ids[gt_flat].tolist()
    pred_names = index_ids[preds].tolist()
    has_pred = (rng.random(num_queries) >= 0.02).tolist()
    solution, predictions = {}, {}
    for q, (start, length) in enumerate(zip(gt_starts.tolist(), gt_lens.tolist())):
        qid = f"q{q:08d}"
        solution[qid] = (gt_names[start : start + length], usages[q])
        if has_pred[q]:
            predictions[qid] = pred_names[q]
    return predictions, solution
