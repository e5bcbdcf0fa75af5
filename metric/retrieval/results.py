"""Kaggle retrieval results files.

Results: header ``id,images``, then one line per query ``qid,<index ids best first,
space separated>`` (an empty list when a query has no result). The optional scores
file has the same layout with header ``id,scores`` and the similarity of each
listed image. Both are written atomically (:func:`metric.utils.io.atomic_write`) and read
through the iopath path manager.
"""

import csv

import numpy as np

from metric.utils import io
from metric.utils.errors import DataError

RESULTS_HEADER = ("id", "images")
SCORES_HEADER = ("id", "scores")


def check_output_file(path, what="output"):
    """Raise :class:`~metric.utils.errors.OutputError` when an output file cannot be written
    (:func:`metric.utils.io.check_output_path`); returns its absolute path."""
    return io.check_output_path(path, what)


def _atomic_write_lines(path, lines, what="results"):
    path = check_output_file(path, what)
    with io.atomic_write(path, "w", newline="", what=what) as f:
        f.writelines(lines)
    return path


def write_results_csv(path, query_ids, index_ids, indices, scores=None, scores_path=None):
    """Write ranked index ids per query; negative indices (no result) are left out.

    ``indices`` (and ``scores``) are [Q, k] arrays in ``query_ids`` order, best first.
    Returns the absolute path of the results file.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != len(query_ids):
        raise DataError(f"indices must be [Q, k] with Q = {len(query_ids)} queries, got shape {indices.shape}")
    if scores_path is not None:
        if scores is None:
            raise DataError("a scores file was requested but no scores were given")
        scores = np.asarray(scores)
        if scores.shape != indices.shape:
            raise DataError(f"scores shape {scores.shape} differs from indices shape {indices.shape}")
        check_output_file(scores_path, "scores")
    check_output_file(path)
    for what, ids in (("query", query_ids), ("index", index_ids)):
        bad = next((i for i in ids if "," in i or '"' in i), None)
        if bad is not None:
            raise DataError(f"{what} id {bad!r} contains a comma or quote and cannot go into a results CSV")
    names = np.asarray(index_ids, dtype=object)
    valid = indices >= 0
    lines = [",".join(RESULTS_HEADER) + "\n"]
    for q, row, ok in zip(query_ids, indices, valid):
        lines.append(f"{q},{' '.join(names[row[ok]])}\n")
    out = _atomic_write_lines(path, lines)
    if scores_path is not None:
        lines = [",".join(SCORES_HEADER) + "\n"]
        for q, row, ok in zip(query_ids, scores, valid):
            lines.append(f"{q},{' '.join(f'{v:.6f}' for v in row[ok])}\n")
        _atomic_write_lines(scores_path, lines, "scores")
    return out


def _read_two_columns(path, header, what):
    if not io.isfile(path):
        raise DataError(f"{what} file {path} does not exist")
    rows = {}
    first_line = {}
    with io.open_path(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            head = next(reader, None)
            if head is None or tuple(h.strip() for h in head) != header:
                raise DataError(f"{path}: line 1 must be the header {','.join(header)!r}, got {head!r}")
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != 2:
                    raise DataError(f"{path}: line {line} has {len(row)} fields, expected 2 ({','.join(header)})")
                qid = row[0].strip()
                if not qid:
                    raise DataError(f"{path}: line {line} has an empty id")
                if qid in rows:
                    raise DataError(f"{path}: query id {qid!r} repeats on lines {first_line[qid]} and {line}")
                rows[qid] = row[1].split()
                first_line[qid] = line
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text") from None
    return rows


def read_results_csv(path):
    """Read a results file into ``{query id: [index ids best first]}``."""
    return _read_two_columns(path, RESULTS_HEADER, "results")


def read_scores_csv(path):
    """Read a scores file into ``{query id: [scores]}`` (same order as the results file)."""
    rows = _read_two_columns(path, SCORES_HEADER, "scores")
    out = {}
    for qid, values in rows.items():
        try:
            out[qid] = [float(v) for v in values]
        except ValueError:
            raise DataError(f"{path}: scores of query {qid!r} are not all numbers") from None
    return out
