"""Google Landmarks Dataset v2 (GLDv2) -> list files.

GLDv2 ships ``train.csv`` (``id,url,landmark_id``) or ``train_clean.csv``
(``landmark_id,images`` with space-separated image ids), and stores image ``abc123...``
at ``train/a/b/c/abc123....jpg``. :func:`convert_gldv2` maps landmark ids to
contiguous labels and writes ``train_list.txt`` (and optionally a held-out
``val_list.txt`` of whole classes for retrieval evaluation) plus ``label_map.csv``, each written
atomically (:func:`metric.utils.io.atomic_write`).
"""

import csv
import logging
import os
import random
import re
from collections import defaultdict

from metric.utils import io
from metric.utils.errors import DataError

logger = logging.getLogger(__name__)


def image_relpath(image_id, images_dir="train"):
    return f"{images_dir}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def read_gldv2_csv(path):
    """``{landmark_id: [image ids]}`` from ``train.csv`` or ``train_clean.csv``.

    Refused with a :class:`DataError` naming the file and line: text that is not UTF-8, a landmark
    id that is not an integer >= 0, an image id that is too short, looks like a path (``/``,
    ``\\``, ``..``, a leading ``.``) or holds white space, and an image listed under two landmarks.
    An image listed twice under one landmark is kept once.
    """
    if not io.isfile(path):
        raise DataError(f"GLDv2 csv not found: {path}")
    by_class = defaultdict(list)
    with io.open_text(path, DataError, "the GLDv2 csv") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty")
        cols = [h.strip() for h in header]
        if "landmark_id" not in cols or not ({"id", "images"} & set(cols)):
            raise DataError(f"{path}: expected columns id,url,landmark_id or landmark_id,images; got {','.join(cols)}")
        lid_col = cols.index("landmark_id")
        clean = "images" in cols
        img_col = cols.index("images" if clean else "id")
        owner, names, repeated = {}, {}, 0  # owner: image id -> its landmark (an image has one)
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != len(cols):
                raise DataError(f"{path}:{lineno}: expected {len(cols)} fields, got {len(row)}")
            lid = row[lid_col].strip()
            if not _INTEGER.fullmatch(lid):
                raise DataError(f"{path}:{lineno}: landmark id {lid!r} is not an integer >= 0")
            lid = str(int(lid))  # 007 and 7 are one landmark
            lid = names.setdefault(lid, lid)  # one string per landmark, however many images
            ids = row[img_col].split() if clean else [row[img_col].strip()]
            for image_id in ids:
                _check_image_id(path, lineno, image_id)
                first = owner.get(image_id)
                if first is None:
                    owner[image_id] = lid
                    by_class[lid].append(image_id)
                elif first != lid:
                    raise DataError(
                        f"{path}:{lineno}: image {image_id!r} is listed under landmark {lid} here and "
                        f"under landmark {first} before; an image belongs to one landmark: remove one"
                    )
                else:
                    repeated += 1
    if repeated:
        logger.warning("%s: %d image ids are listed twice under the same landmark: each is kept once", path, repeated)
    return dict(by_class)


_INTEGER = re.compile(r"[0-9]+")


def _check_image_id(path, lineno, image_id):
    """A GLDv2 image id is a file name without folders (it becomes ``train/a/b/c/<id>.jpg``)."""
    if len(image_id) < 3:
        raise DataError(f"{path}:{lineno}: image id {image_id!r} is too short")
    if "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("."):
        raise DataError(
            f"{path}:{lineno}: image id {image_id!r} looks like a path ('/', '\\', '..' or a leading "
            "'.'); an id is a file name without folders or extension, e.g. 6e158a47eb2ca3f6"
        )
    if not image_id.isprintable() or any(c.isspace() for c in image_id):
        raise DataError(f"{path}:{lineno}: image id {image_id!r} has white space or control characters")


def convert_gldv2(csv_path, out_dir, images_dir="train", min_images=1, val_classes=0, seed=0, check_files=False):
    """Write ``train_list.txt``, ``label_map.csv`` and (with ``val_classes``) ``val_list.txt``.

    Classes with fewer than ``min_images`` images are dropped. ``val_classes`` whole classes,
    drawn with ``seed``, go to ``val_list.txt`` (labels 0..val_classes-1) and not to training.
    Returns a summary dict.
    """
    if min_images < 1 or val_classes < 0:
        raise DataError(f"--min-images must be >= 1 and --val-classes >= 0 (got {min_images}, {val_classes})")
    by_class = read_gldv2_csv(csv_path)
    kept = sorted((lid for lid, ids in by_class.items() if len(ids) >= min_images), key=_sort_key)
    if not kept:
        raise DataError(f"no class of {csv_path} has {min_images} or more images")
    if val_classes >= len(kept):
        raise DataError(f"--val-classes {val_classes} leaves no training class (only {len(kept)} classes)")
    val = sorted(random.Random(seed).sample(kept, val_classes), key=_sort_key) if val_classes else []
    val_set = set(val)
    train = [lid for lid in kept if lid not in val_set]
    new_dirs = _missing_folders(out_dir)
    names = ["train_list.txt"] + (["val_list.txt"] if val else []) + ["label_map.csv"]
    new_files = [n for n in names if new_dirs or not io.exists(os.path.join(out_dir, n))]
    try:
        io.mkdirs(out_dir, "list")
        io.check_output_path(os.path.join(out_dir, "train_list.txt"), "list file")  # writable, before the work
        missing = _write_lists(out_dir, by_class, train, val, images_dir, check_files)
    except BaseException:
        # A failed write (full disk) leaves nothing of this run behind: the files and folders it
        # created are removed; files that were there before are left (each is complete).
        for name in new_files:
            _remove_quietly(os.path.join(out_dir, name), io.rm)
        for folder in new_dirs:  # deepest first
            _remove_quietly(folder, _rmdir_if_empty)
        raise
    summary = {
        "train_classes": len(train),
        "train_images": sum(len(by_class[c]) for c in train),
        "val_classes": len(val),
        "val_images": sum(len(by_class[c]) for c in val),
        "dropped_classes": len(by_class) - len(kept),
        "missing_files": missing if check_files else None,
    }
    logger.info("GLDv2 lists written to %s: %s", out_dir, summary)
    return summary


def _write_lists(out_dir, by_class, train, val, images_dir, check_files):
    """Write the list files and the label map; returns how many listed images are missing
    (counted with ``check_files``)."""
    missing = 0

    def write(name, classes):
        nonlocal missing
        with io.atomic_write(os.path.join(out_dir, name), "w", what="list file") as f:
            for label, lid in enumerate(classes):
                for image_id in by_class[lid]:
                    rel = image_relpath(image_id, images_dir)
                    if check_files and not io.isfile(os.path.join(out_dir, rel)):
                        missing += 1
                    f.write(f"{rel} {label}\n")

    write("train_list.txt", train)
    if val:
        write("val_list.txt", val)
    with io.atomic_write(os.path.join(out_dir, "label_map.csv"), "w", what="label map") as f:
        f.write("landmark_id,label,split\n")
        f.writelines(f"{lid},{i},train\n" for i, lid in enumerate(train))
        f.writelines(f"{lid},{i},val\n" for i, lid in enumerate(val))
    return missing


def _missing_folders(path):
    """The folders of ``path`` and its parents that do not exist yet, deepest first (on another
    storage backend than the local disk: ``path`` alone)."""
    path = io.abspath(path).rstrip("/")
    if not io.is_local(path):
        return [] if io.exists(path) else [path]
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _rmdir_if_empty(path):
    if io.is_local(path):
        os.rmdir(path)  # fails (and is left) when not empty
    elif not io.ls(path):
        io.rm(path)


def _remove_quietly(path, remove):
    try:
        if io.exists(path):
            remove(path)
    except OSError:
        pass


def _sort_key(lid):
    return (0, int(lid), "") if lid.isdigit() else (1, 0, lid)
