"""List files: one image per line, ``relative/path.jpg label`` (the original format).

Paths are relative to the data set folder (absolute paths are kept as they are). The list file
is read through the iopath path manager; images are decoded by OpenCV from local files.
"""

import logging
import math
import os

from metric.datasets.items import ItemList, parse_simple_list, release_free_memory
from metric.datasets.transforms import box_has_area
from metric.utils import io
from metric.utils.errors import DataError

logger = logging.getLogger(__name__)


def read_list(list_path, root=None, num_classes=None, with_labels=True, check_files=True, max_report=5):
    """Parse a list file into an :class:`~metric.datasets.items.ItemList` of ``(abs_path, label)``
    (label ``None`` when ``with_labels`` is False and the line has none): it behaves like the list
    ``[(abs_path, label)]`` but holds numpy arrays (GLDv2-full's 4.13M lines parse in seconds and
    forked DataLoader workers share them). The common well-formed file is parsed in numpy; any
    other goes through the line-by-line reader, which gives the errors.

    Fails with :class:`DataError` naming file and line for a malformed line or a label outside
    ``[0, num_classes)``; with ``check_files`` it also fails when images are missing, giving
    their count and the first few.
    """
    if not io.isfile(list_path):
        raise DataError(f"list file not found: {list_path}")
    root = os.path.dirname(io.abspath(list_path)) if root is None else root
    with io.open_path(list_path, "rb") as f:
        raw = f.read()
    items = parse_simple_list(raw, root, with_labels, num_classes)
    del raw
    if items is None:
        items = _read_lines(list_path, root, num_classes, with_labels)
    release_free_memory()  # the parse's temporaries: not kept in RSS, not inherited by workers
    if check_files:
        missing = [p for p, _ in items if not os.path.isfile(p)]
        if missing:
            first = ", ".join(missing[:max_report])
            raise DataError(f"{len(missing)} of {len(items)} images in {list_path} are missing, e.g. {first}")
    logger.info("read %d images from %s", len(items), list_path)
    return items


def _list_lines(list_path):
    """``(where, line, words)`` of each non-blank line of a list file (``where``: ``path:lineno``,
    for the error messages)."""
    with io.open_text(list_path, DataError, "the list file") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if parts:
                yield f"{list_path}:{lineno}", line, parts


def _read_lines(list_path, root, num_classes, with_labels):
    """The line-by-line reader of :func:`read_list` (any file, exact error messages)."""
    items = []
    for where, line, parts in _list_lines(list_path):
        if with_labels:
            if len(parts) != 2:
                raise DataError(f"{where}: expected 'relative/path.jpg label', got {line.strip()!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{where}: label {parts[1]!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise DataError(
                    f"{where}: label {label} outside [0, {num_classes}) "
                    "(set MODEL.HEADS.NUM_CLASSES to the number of classes)"
                )
        else:
            if len(parts) > 2:
                raise DataError(f"{where}: expected 'relative/path.jpg [label]', got {line.strip()!r}")
            label = int(parts[1]) if len(parts) == 2 and parts[1].lstrip("-").isdigit() else None
        if label is not None and not -(2**63) <= label < 2**63:  # labels are stored as int64 at most
            raise DataError(f"{where}: label {parts[1]} is too large (at most {2**63 - 1})")
        items.append((parts[0], label))
    if not items:
        raise DataError(f"list file {list_path} holds no images")
    return ItemList.from_pairs(items, root)


def read_box_list(list_path, root=None):
    """``[(abs_path, (x1, y1, x2, y2))]`` of a list file whose lines are ``path x1 y1 x2 y2`` or
    ``path label x1 y1 x2 y2`` (a box in pixels, floats; the label is ignored): the images to
    crop before extraction (``INFER.BOXES list``). A malformed line, or a box without area once
    rounded as PIL rounds it, is a :class:`DataError` naming the file and line."""
    if not io.isfile(list_path):
        raise DataError(f"list file not found: {list_path}")
    root = os.path.dirname(io.abspath(list_path)) if root is None else root
    items = []
    for where, line, parts in _list_lines(list_path):
        if len(parts) not in (5, 6):
            raise DataError(
                f"{where}: expected 'path x1 y1 x2 y2' or 'path label x1 y1 x2 y2' (INFER.BOXES list), "
                f"got {line.strip()!r}"
            )
        try:
            box = tuple(float(v) for v in parts[-4:])
        except ValueError:
            raise DataError(f"{where}: box {' '.join(parts[-4:])!r} is not four numbers") from None
        if not all(math.isfinite(v) for v in box) or not box_has_area(box):
            raise DataError(f"{where}: box {' '.join(parts[-4:])} has no area; expected x1 < x2 and y1 < y2")
        items.append((os.path.join(root, parts[0]), box))
    if not items:
        raise DataError(f"list file {list_path} holds no images")
    return items


def resolve_data_dir(data_dir):
    """``DATA_DIR`` as an absolute path: relative to the current folder if it exists there,
    else relative to the repository root (the folder above the ``metric`` package)."""
    if os.path.isabs(data_dir) or os.path.isdir(data_dir):
        return os.path.abspath(data_dir)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo_root, data_dir)


def dataset_list_path(data_dir, dataset, split):
    """Where the list file of ``dataset``/``split`` is, with a clear error if the folder is missing."""
    if not dataset:
        raise DataError("no data set given: set TRAIN.DATASET / TEST.DATASET to a folder under DATA_DIR")
    folder = dataset if os.path.isabs(dataset) else os.path.join(resolve_data_dir(data_dir), dataset)
    if not os.path.isdir(folder):
        raise DataError(
            f"data set folder not found: {folder} (DATA_DIR={data_dir!r}, dataset={dataset!r}); "
            "for the demo run `python tools/make_demo_data.py`"
        )
    return os.path.join(folder, split), folder
