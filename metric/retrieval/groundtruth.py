"""Ground-truth readers: GLR solution CSV, revisited Oxford/Paris ``gnd_*.pkl``, label lists.

- :func:`read_glr_solution` reads the official Kaggle ``id,images,Usage`` file.
- :func:`read_revisited_gnd` reads ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` through a
  restricted unpickler that can rebuild only plain containers, numbers, strings and numpy arrays;
  any other class or function named in the file is refused before anything runs.
- :func:`read_labels` reads a label list (``NAME LABEL`` per line); :func:`labels_for_ids`
  matches it to feature-store ids.
"""

import csv
import io
import logging
import os

import numpy as np

from metric.utils.errors import MetricError
from metric.utils.io import isfile, open_text
from metric.utils.safe_pickle import RestrictedUnpickler, restricted_load  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

USAGES = ("Public", "Private", "Ignored")


def _open_text(path, what):
    if not isfile(path):
        raise MetricError(f"{what} {path!r} does not exist or is not a file; check the path")
    with open_text(path, MetricError, f"the {what}") as lines:
        return "".join(lines)


def read_glr_solution(path):
    """Read a GLR retrieval solution: ``{query id: (ground-truth index ids, usage)}``.

    The file is a CSV with header ``id,images,Usage``; ``images`` holds space-separated index
    ids; ``Usage`` is ``Public``, ``Private`` or ``Ignored`` (any letter case). An ``Ignored``
    row's images are not read (the official files put ``None`` there).
    """
    text = _open_text(path, "ground-truth solution")
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header] != ["id", "images", "Usage"]:
        raise MetricError(
            f"{path}:1: expected the header 'id,images,Usage' of a GLR retrieval solution, "
            f"got {','.join(header or [])!r}"
        )
    canonical = {u.lower(): u for u in USAGES}
    solution = {}
    for row in rows:
        line = rows.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 3:
            raise MetricError(
                f"{path}:{line}: expected 3 fields 'id,images,Usage', got {len(row)}; fix or remove the line"
            )
        qid, images, usage = (field.strip() for field in row)
        if not qid:
            raise MetricError(f"{path}:{line}: empty query id")
        if usage.lower() not in canonical:
            raise MetricError(
                f"{path}:{line}: unknown Usage {usage!r} for query {qid!r}; expected Public, Private or Ignored"
            )
        if qid in solution:
            raise MetricError(f"{path}:{line}: query id {qid!r} appears twice; keep one row")
        usage = canonical[usage.lower()]
        solution[qid] = ([] if usage == "Ignored" else images.split(), usage)
    logger.debug("read %d solution rows from %s", len(solution), path)
    return solution


# Restricted unpickling of the revisited Oxford/Paris ground truth: metric.utils.safe_pickle


def read_revisited_gnd(path):
    """Read ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` safely.

    Returns ``{"imlist": [ids], "qimlist": [ids], "gnd": [{"easy", "hard", "junk": int64
    arrays, "bbx": list or None}]}``; ``gnd[i]`` belongs to query ``qimlist[i]`` and its numbers
    are positions in ``imlist``.
    """
    data = restricted_load(path)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise MetricError(
            f"{path} is not a revisited ground-truth file: expected a dict with keys 'imlist', 'qimlist' and 'gnd'"
        )
    imlist = [str(x) for x in data["imlist"]]
    qimlist = [str(x) for x in data["qimlist"]]
    if len(data["gnd"]) != len(qimlist):
        raise MetricError(f"{path}: 'gnd' has {len(data['gnd'])} entries but 'qimlist' has {len(qimlist)}")
    gnd = []
    for i, entry in enumerate(data["gnd"]):
        if not isinstance(entry, dict):
            raise MetricError(f"{path}: gnd[{i}] is not a dict with 'easy', 'hard' and 'junk'")
        clean = {"bbx": entry.get("bbx")}
        for key in ("easy", "hard", "junk"):
            try:
                values = np.asarray(entry.get(key, []), dtype=np.int64).ravel()
            except (TypeError, ValueError):
                raise MetricError(f"{path}: gnd[{i}]['{key}'] is not a list of integers") from None
            if len(values) and (values.min() < 0 or values.max() >= len(imlist)):
                raise MetricError(f"{path}: gnd[{i}]['{key}'] holds positions outside imlist (0..{len(imlist) - 1})")
            clean[key] = values
        gnd.append(clean)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


# ---------------------------------------------------------------------------------------------
# Label lists


def read_labels(path):
    """Read a label list: ``{name: label}`` (labels as strings).

    One item per line, ``NAME LABEL`` separated by whitespace (the label is the last field, so a
    name may contain spaces); blank lines and lines starting with ``#`` are skipped. ``NAME`` is
    an image id or an image path, so the training list-file format ``path/to/img.jpg 17`` works
    as is; :func:`labels_for_ids` matches names to feature-store ids.
    """
    text = _open_text(path, "label file")
    labels = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise MetricError(f"{path}:{line_no}: expected 'NAME LABEL', got {line!r}")
        name, label = parts
        if labels.get(name, label) != label:
            raise MetricError(
                f"{path}:{line_no}: {name!r} is labelled both {labels[name]!r} and {label!r}; keep one label per image"
            )
        labels[name] = label
    return labels


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def labels_for_ids(labels, ids, source):
    """Labels of feature-store ``ids``, in order.

    An id matches a name written exactly like it, else a name whose file-name stem (directory and
    extension removed: the Kaggle id convention the extractor uses) equals it. A store id without
    a label, or whose stem matches names with different labels, is an error naming it.
    """
    by_stem = {}
    for name, label in labels.items():
        stem = _stem(name)
        by_stem[stem] = label if by_stem.get(stem, label) == label else None  # None: ambiguous
    out, missing = [], []
    for image_id in ids:
        label = labels.get(image_id)
        if label is None:
            if image_id in by_stem and by_stem[image_id] is None:
                raise MetricError(
                    f"{source}: several names with stem {image_id!r} carry different labels; "
                    "write the id exactly as in the feature store"
                )
            label = by_stem.get(image_id)
        if label is None:
            missing.append(image_id)
        out.append(label)
    if missing:
        raise MetricError(
            f"{len(missing)} feature-store ids have no label in {source} (first: {missing[0]!r}); "
            "every image of the store needs a line 'NAME LABEL'"
        )
    return out
