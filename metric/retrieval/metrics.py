"""Retrieval scoring: the import point for metrics, and scoring straight from files.

Metrics (pure functions on arrays / dicts, see their modules for the exact definitions):

- :func:`glr_map_at_k` — Google Landmark Retrieval mAP@100 (Public / Private / All) and mP@k;
- :func:`revisited_map` — revisited Oxford / Paris mAP and mP@1,5,10, Easy / Medium / Hard;
- :func:`labelled_metrics` — recall@1,5,10 and mAP@R on labelled query / index sets.

From files (what ``tools/evaluate.py`` runs): :func:`evaluate` picks the mode from the
arguments given, loads results / feature stores / ground truth, and returns the metrics with
exactly the keys of the JSON output; :func:`format_table` renders them and :func:`write_json`
writes them atomically.
"""

import logging

import numpy as np

from metric.retrieval.groundtruth import (
    labels_for_ids,
    read_glr_solution,
    read_labels,
    read_revisited_gnd,
)
from metric.retrieval.metrics_glr import glr_map_at_k, make_synthetic_glr
from metric.retrieval.metrics_labelled import labelled_metrics
from metric.retrieval.metrics_revisited import PROTOCOLS, rank_index, revisited_map
from metric.retrieval.results import read_results_csv
from metric.retrieval.store import load_features
from metric.utils import io
from metric.utils.errors import MetricError

__all__ = [
    "check_json_path",
    "evaluate",
    "evaluate_glr",
    "evaluate_labelled",
    "evaluate_revisited",
    "format_table",
    "glr_map_at_k",
    "labelled_metrics",
    "make_synthetic_glr",
    "rank_index",
    "revisited_map",
    "write_json",
]

logger = logging.getLogger(__name__)

MODES = ("glr", "revisited", "labelled")
USAGE_HINT = (
    "give --results and --gt (Google Landmark Retrieval), --query, --index and --gt "
    "(revisited Oxford/Paris), or --query and --query-labels [--index and --index-labels] "
    "(labelled sets)"
)


def evaluate_glr(results_path, gt_path, k=100):
    """GLR scores of a results CSV (``id,images``) against a solution CSV (``id,images,Usage``)."""
    solution = read_glr_solution(gt_path)
    predictions = read_results_csv(results_path)
    return glr_map_at_k(predictions, solution, k=k)


def _match_ids(store_ids, wanted, what, store_path, gt_path):
    """Row of each ``wanted`` id in the store; an id the store lacks is an error naming it."""
    row_of = {image_id: row for row, image_id in enumerate(store_ids)}
    missing = [w for w in wanted if w not in row_of]
    if missing:
        raise MetricError(
            f"{len(missing)} {what} images of {gt_path} are not in the feature store {store_path} "
            f"(first: {missing[0]!r}); extract features of every image listed there"
        )
    return np.fromiter((row_of[w] for w in wanted), dtype=np.int64, count=len(wanted))


def evaluate_revisited(query_dir, index_dir, gt_path, ks=(1, 5, 10), verify=True):
    """Revisited Oxford/Paris scores of a query and an index feature store.

    Store ids are matched to the ground truth's ``qimlist`` / ``imlist`` by id (image name
    without extension). Index-store ids not in ``imlist`` are kept as distractors (e.g. the
    R1M set), ranked after the ``imlist`` images they tie with; query-store ids not in
    ``qimlist`` are ignored. ``verify``: check the stores against their ``meta.json`` when loading them.
    """
    gt = read_revisited_gnd(gt_path)
    query, index = load_features(query_dir, verify=verify), load_features(index_dir, verify=verify)
    if query.dim != index.dim:
        raise MetricError(
            f"query store {query_dir} has dimension {query.dim} but index store {index_dir} has "
            f"{index.dim}; extract both with the same model"
        )
    q_rows = _match_ids(query.ids, gt["qimlist"], "query", query_dir, gt_path)
    x_rows = _match_ids(index.ids, gt["imlist"], "index", index_dir, gt_path)
    extra = np.setdiff1d(np.arange(len(index.ids)), x_rows, assume_unique=True)
    if len(extra):
        logger.info("%d index-store images not in %s are used as distractors", len(extra), gt_path)
    x_rows = np.concatenate([x_rows, extra])
    ranks = rank_index(np.asarray(query.embeddings[q_rows]), np.asarray(index.embeddings[x_rows]))
    return revisited_map(ranks, gt["gnd"], ks=ks)


def evaluate_labelled(query_dir, query_labels_path, index_dir=None, index_labels_path=None, verify=True):
    """recall@1,5,10 and mAP@R of labelled feature stores (leave-one-out without an index).

    Labels come from ``NAME LABEL`` lists (see :func:`~metric.retrieval.groundtruth.read_labels`)
    matched to store ids by exact name or file-name stem. ``verify``: check the stores against their
    ``meta.json`` when loading them.
    """
    query = load_features(query_dir, verify=verify)
    q_labels = labels_for_ids(read_labels(query_labels_path), query.ids, query_labels_path)
    if index_dir is None:
        result = labelled_metrics(np.asarray(query.embeddings), q_labels)
    else:
        index = load_features(index_dir, verify=verify)
        if query.dim != index.dim:
            raise MetricError(
                f"query store {query_dir} has dimension {query.dim} but index store {index_dir} "
                f"has {index.dim}; extract both with the same model"
            )
        x_labels = labels_for_ids(read_labels(index_labels_path), index.ids, index_labels_path)
        result = labelled_metrics(np.asarray(query.embeddings), q_labels, np.asarray(index.embeddings), x_labels)
    if result["skipped"]:
        logger.warning("%d queries have no relevant item in the index and were skipped", result["skipped"])
    return {key: result[key] for key in ("recall@1", "recall@5", "recall@10", "mAP@R")}


def evaluate(results=None, gt=None, query=None, index=None, query_labels=None, index_labels=None, verify=True):
    """Score in the mode the given arguments select; returns ``(mode, metrics)``.

    - ``results`` + ``gt`` (solution CSV): mode ``"glr"``;
    - ``query`` + ``index`` + ``gt`` (``gnd_*.pkl``): mode ``"revisited"``;
    - ``query`` + ``query_labels`` [+ ``index`` + ``index_labels``]: mode ``"labelled"``.

    Any other combination is a :class:`MetricError` that says what to give. ``verify``: check the
    feature stores against their ``meta.json`` when loading them (``--no-verify`` turns it off).
    """
    given = {
        name
        for name, value in (
            ("--results", results),
            ("--gt", gt),
            ("--query", query),
            ("--index", index),
            ("--query-labels", query_labels),
            ("--index-labels", index_labels),
        )
        if value is not None
    }

    def only(allowed, mode):
        extra = sorted(given - set(allowed))
        if extra:
            raise MetricError(f"{', '.join(extra)} cannot be used in {mode} mode; {USAGE_HINT}")

    if results is not None:
        only({"--results", "--gt"}, "Google Landmark Retrieval (--results)")
        if gt is None:
            raise MetricError("--results needs --gt, the retrieval_solution.csv ground truth")
        return "glr", evaluate_glr(results, gt)
    if query is not None and gt is not None:
        only({"--query", "--index", "--gt"}, "revisited Oxford/Paris (--query with --gt)")
        if index is None:
            raise MetricError("revisited Oxford/Paris scoring needs --index, the index feature store")
        if gt.lower().endswith(".csv"):
            raise MetricError(f"{gt} looks like a GLR solution CSV; score it with --results RESULTS.csv --gt {gt}")
        return "revisited", evaluate_revisited(query, index, gt, verify=verify)
    if query is not None and query_labels is not None:
        if (index is None) != (index_labels is None):
            raise MetricError(
                "give --index and --index-labels together, or neither (leave-one-out within the query set)"
            )
        return "labelled", evaluate_labelled(query, query_labels, index, index_labels, verify=verify)
    raise MetricError(f"nothing to score with these arguments; {USAGE_HINT}")


def _fmt(value):
    return "-" if value is None else f"{value:.4f}"


def format_table(mode, metrics):
    """A plain-text table of ``metrics`` as returned by :func:`evaluate`."""
    lines = []
    if mode == "glr":
        map_key = next(k for k in metrics if k.startswith("mAP@"))
        lines.append(f"{'':<10}{'Public':>10}{'Private':>10}{'All':>10}")
        row = metrics[map_key]
        lines.append(f"{map_key:<10}" + "".join(f"{_fmt(row[s]):>10}" for s in ("Public", "Private", "All")))
        for key, value in metrics["mP@k"].items():
            lines.append(f"{key:<10}{'':>10}{'':>10}{_fmt(value):>10}")
    elif mode == "revisited":
        keys = list(metrics[PROTOCOLS[0]])
        lines.append(f"{'':<6}" + "".join(f"{k:>10}" for k in keys))
        for protocol in PROTOCOLS:
            lines.append(f"{protocol:<6}" + "".join(f"{_fmt(metrics[protocol][k]):>10}" for k in keys))
    elif mode == "labelled":
        lines.extend(f"{key:<10}{_fmt(value):>10}" for key, value in metrics.items())
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return "\n".join(lines)


def check_json_path(path):
    """Fail early (before scoring) when the JSON output cannot be written there
    (:class:`~metric.utils.errors.OutputError`); returns the absolute path."""
    return io.check_output_path(path, "--json")


def write_json(path, metrics):
    """Write ``metrics`` as JSON (simplejson), atomically (:func:`metric.utils.io.write_json_atomic`)."""
    path = check_json_path(path)
    return io.write_json_atomic(path, metrics, what="metrics JSON", indent=2)
