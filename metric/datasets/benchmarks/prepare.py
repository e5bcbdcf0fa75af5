"""Preparing a benchmark's files for :mod:`metric.engine.benchmark`: the conversion of
:func:`metric.datasets.benchmarks.convert`, cached for the landmark benchmarks (a rerun does not
stat a million distractors again), and the list files of ``tools/benchmark.py --make-lists``."""

import dataclasses
import json
import logging
import os

from metric.datasets import benchmarks as bm
from metric.datasets.benchmarks.landmarks import LandmarkSplits
from metric.utils import io

logger = logging.getLogger(__name__)

R1M_STORE = "revisitop1m"  # the distractors' store and list name, one for both data sets
CONVERSION_VERSION = 1


# --- conversion (cached) ----------------------------------------------------------------------


def _signature(paths):
    """Size and modification time of each path (a file or a folder), or None where absent."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, st.st_size if os.path.isfile(p) else -1, st.st_mtime_ns])
        except OSError:
            out.append([p, None, None])
    return out


def _landmark_sources(splits):
    if splits.kind == "revisited":
        paths = [splits.ground_truth, os.path.join(splits.data_root, "jpg")]
    else:
        paths = [splits.ground_truth] + [os.path.join(splits.data_root, f) for f in ("index", "test")]
    if splits.distractor_root:
        paths += [os.path.join(splits.distractor_root, "revisitop1m.txt"), os.path.join(splits.distractor_root, "jpg")]
    return paths


def convert_cached(name, data_root, distractors, allow_subset, cache_dir):
    """:func:`metric.datasets.benchmarks.convert`, with landmark results cached in ``cache_dir``
    (``conversion.json``): reused while the annotation files and image folders keep their size and
    time (a file removed deep inside a folder is not noticed; it then fails at extraction)."""
    if not bm.is_landmark(name):
        return bm.convert(name, data_root, distractors, allow_subset)
    cache = os.path.join(cache_dir, "conversion.json")
    args = {"name": name, "data_root": os.path.abspath(data_root), "allow_subset": bool(allow_subset)}
    args["distractors"] = os.path.abspath(distractors) if distractors else None
    if os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("version") == CONVERSION_VERSION and old.get("args") == args:
                splits = LandmarkSplits(**old["splits"])
                if old.get("sources") == _signature(_landmark_sources(splits)):
                    logger.info("conversion of %s reused from %s", name, cache)
                    return _as_tuples(splits)
        except (OSError, ValueError, TypeError, KeyError):
            logger.info("conversion cache %s unreadable: converting again", cache)
    splits = bm.convert(name, data_root, distractors, allow_subset)
    io.mkdirs(cache_dir, "benchmark cache")
    record = {
        "version": CONVERSION_VERSION,
        "args": args,
        "splits": dataclasses.asdict(splits),
        "sources": _signature(_landmark_sources(splits)),
    }
    io.write_json_atomic(cache, record, what="benchmark conversion cache")
    return splits


def _as_tuples(splits):
    def pairs(items):
        return None if items is None else [tuple(x) for x in items]

    boxes = None if splits.query_boxes is None else [tuple(b) for b in splits.query_boxes]
    return dataclasses.replace(
        splits,
        query=pairs(splits.query),
        index=pairs(splits.index),
        distractors=pairs(splits.distractors),
        query_boxes=boxes,
    )


# --- list files (--make-lists) ---------------------------------------------------------------------


def write_landmark_lists(splits, out_dir):
    """List files of a landmark benchmark (absolute paths; the query list with its boxes, for
    ``tools/extract_features.py ... INFER.BOXES list``); returns the paths written."""
    io.mkdirs(out_dir, "list folder")
    base = splits.name.split("+")[0]
    written = []

    def write(fname, lines):
        path = os.path.join(out_dir, fname)
        io.write_text_atomic(path, "".join(line + "\n" for line in lines), what=f"{fname} list")
        written.append(path)

    boxes = splits.query_boxes or [None] * len(splits.query)
    write(
        f"{base}_query.txt",
        [
            os.path.join(splits.data_root, rel) + ("" if box is None else " " + " ".join(repr(float(v)) for v in box))
            for (_, rel), box in zip(splits.query, boxes)
        ],
    )
    write(f"{base}_index.txt", [os.path.join(splits.data_root, rel) for _, rel in splits.index])
    if splits.distractors:
        write(f"{R1M_STORE}_index.txt", [os.path.join(splits.distractor_root, rel) for _, rel in splits.distractors])
    return written


def make_lists(name, data_root, out_dir, distractors=None, allow_subset=False):
    """``--make-lists OUT``: the list files of benchmark ``name`` (no model needed)."""
    splits = bm.convert(name, data_root, distractors, allow_subset)
    if isinstance(splits, LandmarkSplits):
        return write_landmark_lists(splits, out_dir)
    from metric.datasets.benchmarks.dml import write_lists

    written = write_lists(splits, out_dir)
    return list(written.values()) if isinstance(written, dict) else written
