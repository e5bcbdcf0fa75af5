"""The deep-metric-learning benchmarks, read from the files their authors distribute.

CUB-200-2011, Cars196, Stanford Online Products (SOP) and In-Shop Clothes Retrieval are split as
the metric-learning papers split them (docs/BENCHMARKS.md):

- ``cub200``: ``CUB_200_2011/images.txt`` + ``image_class_labels.txt`` + ``images/``; classes
  1-100 train, 101-200 test (not the official ``train_test_split.txt``, which splits images);
  leave-one-out retrieval over the test images.
- ``cars196``: ``cars_annos.mat`` + ``car_ims/``, or the devkit layout (``cars_train/``,
  ``cars_test/``, ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``); classes
  1-98 train, 99-196 test (not the files' ``test`` flag); leave-one-out.
- ``sop``: ``Ebay_train.txt`` / ``Ebay_test.txt`` (header line ``image_id class_id super_class_id
  path``) + the ``*_final/`` folders; the files' own train/test split; leave-one-out.
- ``inshop``: ``list_eval_partition.txt`` (line 1 the image count, line 2 the column names) +
  ``img/``; the ``train`` images train, ``query`` images search the ``gallery`` images.

Interface with metric/engine/benchmark.py and tools/benchmark.py (issue 19):
``DML_BENCHMARKS[name](data_root, allow_subset=False, check_files=True) -> LabelledSplits``.
``allow_subset=False`` (the default: real files) enforces the distributed image and class counts
(:data:`EXPECTED`) and refuses any difference with one line naming the file; ``allow_subset=True``
(the command-line flag ``--allow-subset``; tests pass it for their generated replicas) checks
everything else but not the counts, and the result says ``complete=False`` when they differ, so
that a printed row is marked as not comparable with the papers. ``write_lists(splits, out_dir)`` writes the list
files (``--make-lists OUT``).

Images listed but absent are refused (one line: the file that lists them, the count and the
first few): every published row is over the full set, and a smaller gallery or query set changes
recall@k, so a partial download must not give a number that looks comparable.
"""

import dataclasses
import logging
import os

import numpy as np

from metric.utils import io
from metric.utils.errors import DataError

logger = logging.getLogger(__name__)

# The counts of the files as distributed: images per split and classes per split.
# CUB/Cars/SOP images: pytorch-metric-learning's dataset tests (tests/datasets/test_cub.py,
# test_cars196.py, test_sop.py); SOP classes: Song et al., CVPR 2016, sec. 5; In-Shop: Liu et al.,
# CVPR 2016 (DeepFashion) as quoted by mmpretrain's InShop dataset and the DML code bases.
EXPECTED = {
    "cub200": {"train": (5864, 100), "query": (5924, 100)},
    "cars196": {"train": (8054, 98), "query": (8131, 98)},
    "sop": {"train": (59551, 11318), "query": (60502, 11316)},
    "inshop": {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
}
TOTAL_IMAGES = {"cub200": 11788, "cars196": 16185, "sop": 120053, "inshop": 52712}

# recall@k as the papers print it
KS = {"cub200": (1, 2, 4, 8), "cars196": (1, 2, 4, 8), "sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40)}


@dataclasses.dataclass
class LabelledSplits:
    """A benchmark's splits, paths relative to ``root`` (the ``data_root`` given).

    ``train``: ``[(relpath, label)]`` with labels ``0 .. num_classes - 1`` (the classes in the
    order of their ids in the files), ready for a training list. ``query`` / ``gallery``: the
    labels are the files' own class (item) numbers. ``gallery is None``: leave-one-out retrieval
    within ``query``. ``complete``: the counts were checked against the distributed files.
    ``source``: the annotation files read (for messages and the printed row).
    """

    name: str
    root: str
    train: list
    query: list
    gallery: list = None
    ks: tuple = (1,)
    complete: bool = True
    protocol: str = ""
    source: tuple = ()
    notes: list = dataclasses.field(default_factory=list)  # what differs from the distributed files

    @property
    def num_classes(self):
        """Classes of the training split (``MODEL.HEADS.NUM_CLASSES`` for its list)."""
        return len({label for _, label in self.train})


# -- helpers -------------------------------------------------------------------------------------


def _need_file(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path} (is the data root the folder the benchmark was unpacked into?)")
    return path


def _first_existing(candidates, what):
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DataError(f"{what} not found: looked for {' and '.join(candidates)}")


def _text_lines(path, what):
    """``[(lineno, fields)]`` of the non-blank lines of a UTF-8 text file."""
    with io.open_text(path, DataError, what) as f:
        return [(n, fields) for n, fields in enumerate(map(str.split, f), 1) if fields]


def _int(path, lineno, text, what):
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{path}:{lineno}: {what} {text!r} is not an integer") from None


def _check_relpath(path, lineno, rel):
    norm = "/" + rel.replace("\\", "/") + "/"
    if norm.startswith("//") or "/../" in norm:  # absolute, or a ".." component
        raise DataError(f"{path}:{lineno}: image path {rel!r} leaves the data folder; the file is not the original")


def _contiguous(items):
    """``items`` with labels renumbered ``0 .. C-1`` in the order of the original ids."""
    ids = sorted({label for _, label in items})
    index = {cid: i for i, cid in enumerate(ids)}
    return [(rel, index[label]) for rel, label in items]


def _check_counts(name, split, items, source, allow_subset, notes=None):
    """Whether ``items`` has the distributed image and class counts of the split; a
    :class:`DataError` naming ``source`` when not, unless ``allow_subset`` (then the difference
    is appended to ``notes``, for the printed row)."""
    images, classes = len(items), len({label for _, label in items})
    want_images, want_classes = EXPECTED[name][split]
    if (images, classes) == (want_images, want_classes):
        return True
    if allow_subset:
        if notes is not None:
            notes.append(f"{split} {images} images / {classes} classes (distributed: {want_images} / {want_classes})")
        return False
    raise DataError(
        f"{source}: {images} images of {classes} classes in the {split} split, the distributed {name} has "
        f"{want_images} of {want_classes}; the file is incomplete or not the original "
        "(pass --allow-subset to score a subset, which is not comparable with published numbers)"
    )


def _check_images(root, items, source, max_report=3):
    missing = [rel for rel, _ in items if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(items)} images listed in {source} are missing under {root}, e.g. "
            f"{', '.join(missing[:max_report])}; complete the download (a partial set is not comparable)"
        )


def _finish(name, root, train, query, gallery, source, allow_subset, check_files, protocol, split_source=None):
    """Check the splits (not empty, the distributed counts, the images exist) and build the result;
    ``split_source`` names the file of each split where they differ (else ``source[0]``)."""
    checked = [("train", train), ("query", query)] + ([("gallery", gallery)] if gallery is not None else [])
    complete, notes = True, []
    for split, items in checked:
        where = (split_source or {}).get(split, source[0])
        if not items:
            raise DataError(f"{where}: the {split} split of {name} is empty; the file is not the original")
        complete &= _check_counts(name, split, items, where, allow_subset, notes)
        if check_files:
            _check_images(root, items, where)
    logger.info(
        "%s: %s",
        name,
        ", ".join(
            f"{split} {len(items)} images / {len({lab for _, lab in items})} classes" for split, items in checked
        ),
    )
    return LabelledSplits(
        name=name,
        root=root,
        train=_contiguous(train),
        query=query,
        gallery=gallery,
        ks=KS[name],
        complete=complete and sum(len(items) for _, items in checked) == TOTAL_IMAGES[name],
        protocol=protocol,
        source=tuple(source),
        notes=notes,
    )


# -- CUB-200-2011 --------------------------------------------------------------------------------


def cub200(data_root, allow_subset=False, check_files=True):
    """CUB-200-2011: classes 1-100 train, 101-200 test (leave-one-out)."""
    root = os.path.abspath(data_root)
    base = "CUB_200_2011" if os.path.isdir(os.path.join(root, "CUB_200_2011")) else ""
    images_txt = _need_file(os.path.join(root, base, "images.txt"), "CUB images.txt")
    labels_txt = _need_file(os.path.join(root, base, "image_class_labels.txt"), "CUB image_class_labels.txt")
    paths = {}
    for lineno, fields in _text_lines(images_txt, "CUB images.txt"):
        if len(fields) != 2:
            raise DataError(f"{images_txt}:{lineno}: expected 'image_id path', got {' '.join(fields)!r}")
        image_id = _int(images_txt, lineno, fields[0], "image id")
        _check_relpath(images_txt, lineno, fields[1])
        if image_id in paths:
            raise DataError(f"{images_txt}:{lineno}: image id {image_id} is listed twice")
        paths[image_id] = fields[1]
    train, test, seen = [], [], set()
    for lineno, fields in _text_lines(labels_txt, "CUB image_class_labels.txt"):
        if len(fields) != 2:
            raise DataError(f"{labels_txt}:{lineno}: expected 'image_id class_id', got {' '.join(fields)!r}")
        image_id = _int(labels_txt, lineno, fields[0], "image id")
        label = _int(labels_txt, lineno, fields[1], "class id")
        if image_id not in paths:
            raise DataError(f"{labels_txt}:{lineno}: image id {image_id} is not in {images_txt}")
        if image_id in seen:
            raise DataError(f"{labels_txt}:{lineno}: image id {image_id} is labelled twice")
        if not 1 <= label <= 200:
            raise DataError(f"{labels_txt}:{lineno}: class {label} outside 1-200")
        seen.add(image_id)
        rel = os.path.join(base, "images", paths[image_id]) if base else os.path.join("images", paths[image_id])
        (train if label <= 100 else test).append((rel, label))
    unlabelled = len(paths) - len(seen)
    if unlabelled:
        raise DataError(f"{labels_txt}: {unlabelled} images of {images_txt} have no class; the files do not match")
    if not allow_subset and len(paths) != TOTAL_IMAGES["cub200"]:
        raise DataError(
            f"{images_txt}: {len(paths)} images, the distributed CUB-200-2011 has {TOTAL_IMAGES['cub200']}; "
            "the file is incomplete or not the original (pass --allow-subset to score a subset)"
        )
    return _finish(
        "cub200",
        root,
        train,
        test,
        None,
        (labels_txt, images_txt),
        allow_subset,
        check_files,
        "classes 1-100 train, 101-200 test, leave-one-out",
    )


# -- Cars196 ---------------------------------------------------------------------------------------


def _loadmat(path):
    import scipy.io

    try:
        return scipy.io.loadmat(path)
    except NotImplementedError as err:  # a MATLAB v7.3 (HDF5) file
        raise DataError(f"{path}: cannot read this .mat file ({err}); the distributed file is MATLAB v5") from None
    except Exception as err:  # scipy raises ValueError / MatReadError / TypeError on a broken file
        raise DataError(f"{path} is not a readable MATLAB .mat file ({type(err).__name__}: {err})") from None


def _mat_records(path, fields):
    """The ``annotations`` struct array of a Stanford Cars .mat file as a list of records."""
    mat = _loadmat(path)
    if "annotations" not in mat:
        names = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no 'annotations' variable (it has: {', '.join(names) or 'none'})")
    ann = np.asarray(mat["annotations"]).ravel()
    have = ann.dtype.names or ()
    missing = [f for f in fields if f not in have]
    if missing:
        raise DataError(
            f"{path}: the annotations have no field {', '.join(missing)} (they have: {', '.join(have) or 'none'})"
        )
    return ann


def _mat_scalar(value, path, index, field):
    arr = np.asarray(value).ravel()
    if arr.size != 1:
        raise DataError(f"{path}: annotation {index + 1} has {arr.size} values in field {field!r}, expected one")
    return arr[0]


def _mat_int(value, path, index, field):
    v = _mat_scalar(value, path, index, field)
    try:
        if isinstance(v, (str, np.str_)) or int(v) != v:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: annotation {index + 1} has a non-integer {field!r}: {v!r}") from None
    return int(v)


def _mat_str(value, path, index, field):
    v = _mat_scalar(value, path, index, field)
    if not isinstance(v, (str, np.str_)):
        raise DataError(f"{path}: annotation {index + 1} has a non-text {field!r}: {v!r}")
    return str(v)


def _cars_items(path, prefix, path_field):
    items = []
    for i, rec in enumerate(_mat_records(path, (path_field, "class"))):
        rel = _mat_str(rec[path_field], path, i, path_field)
        _check_relpath(path, f"annotation {i + 1}", rel)
        label = _mat_int(rec["class"], path, i, "class")
        if not 1 <= label <= 196:
            raise DataError(f"{path}: annotation {i + 1} has class {label}, outside 1-196")
        items.append((os.path.join(prefix, rel) if prefix else rel, label))
    return items


def cars196(data_root, allow_subset=False, check_files=True):
    """Cars196: classes 1-98 train, 99-196 test (leave-one-out), from ``cars_annos.mat`` or the
    devkit layout."""
    root = os.path.abspath(data_root)
    annos = os.path.join(root, "cars_annos.mat")
    if os.path.isfile(annos):
        items = _cars_items(annos, "", "relative_im_path")
        source = (annos,)
    else:
        train_annos = os.path.join(root, "devkit", "cars_train_annos.mat")
        if not os.path.isfile(train_annos):
            raise DataError(
                f"Cars196 annotations not found: neither {annos} nor the devkit's {train_annos} "
                "(give the folder holding cars_annos.mat + car_ims/, or cars_train/ + cars_test/ + devkit/)"
            )
        test_annos = _first_existing(
            [
                os.path.join(root, "cars_test_annos_withlabels.mat"),
                os.path.join(root, "devkit", "cars_test_annos_withlabels.mat"),
            ],
            "Cars196 test labels (cars_test_annos_withlabels.mat; the devkit's cars_test_annos.mat has no classes)",
        )
        items = _cars_items(train_annos, "cars_train", "fname") + _cars_items(test_annos, "cars_test", "fname")
        source = (train_annos, test_annos)
    seen = set()
    for rel, _ in items:
        if rel in seen:
            raise DataError(f"{source[-1]}: image {rel} is annotated twice; the file is not the original")
        seen.add(rel)
    if not allow_subset and len(items) != TOTAL_IMAGES["cars196"]:
        raise DataError(
            f"{' + '.join(source)}: {len(items)} images, the distributed Cars196 has {TOTAL_IMAGES['cars196']}; "
            "the file is incomplete or not the original (pass --allow-subset to score a subset)"
        )
    train = [(rel, lab) for rel, lab in items if lab <= 98]
    test = [(rel, lab) for rel, lab in items if lab > 98]
    return _finish(
        "cars196",
        root,
        train,
        test,
        None,
        source,
        allow_subset,
        check_files,
        "classes 1-98 train, 99-196 test, leave-one-out",
    )


# -- Stanford Online Products ----------------------------------------------------------------------

_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _sop_file(path, base):
    lines = _text_lines(path, "the SOP list")
    if not lines or lines[0][1] != _SOP_HEADER:
        got = " ".join(lines[0][1]) if lines else "an empty file"
        raise DataError(f"{path}:1: expected the header '{' '.join(_SOP_HEADER)}', got {got!r}")
    items, seen = [], set()
    for lineno, fields in lines[1:]:
        if len(fields) != 4:
            raise DataError(
                f"{path}:{lineno}: expected 'image_id class_id super_class_id path', got {' '.join(fields)!r}"
            )
        label = _int(path, lineno, fields[1], "class id")
        _int(path, lineno, fields[2], "super class id")
        _check_relpath(path, lineno, fields[3])
        if fields[3] in seen:
            raise DataError(f"{path}:{lineno}: image {fields[3]} is listed twice")
        seen.add(fields[3])
        items.append((os.path.join(base, fields[3]) if base else fields[3], label))
    return items


def sop(data_root, allow_subset=False, check_files=True):
    """Stanford Online Products: ``Ebay_train.txt`` trains, ``Ebay_test.txt`` is searched
    leave-one-out."""
    root = os.path.abspath(data_root)
    base = "Stanford_Online_Products" if os.path.isdir(os.path.join(root, "Stanford_Online_Products")) else ""
    train_txt = _need_file(os.path.join(root, base, "Ebay_train.txt"), "SOP Ebay_train.txt")
    test_txt = _need_file(os.path.join(root, base, "Ebay_test.txt"), "SOP Ebay_test.txt")
    train, test = _sop_file(train_txt, base), _sop_file(test_txt, base)
    shared = {lab for _, lab in train} & {lab for _, lab in test}
    if shared:
        raise DataError(
            f"{test_txt}: {len(shared)} classes also in {train_txt} (e.g. {min(shared)}); "
            "the splits must not share classes"
        )
    return _finish(
        "sop",
        root,
        train,
        test,
        None,
        (train_txt, test_txt),
        allow_subset,
        check_files,
        "Ebay_train.txt train, Ebay_test.txt leave-one-out",
        split_source={"train": train_txt, "query": test_txt},
    )


# -- In-Shop Clothes Retrieval ---------------------------------------------------------------------

_INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]


def inshop(data_root, allow_subset=False, check_files=True):
    """In-Shop: ``train`` images train; ``query`` images search the ``gallery`` images."""
    root = os.path.abspath(data_root)
    part = _first_existing(
        [os.path.join(root, "list_eval_partition.txt"), os.path.join(root, "Eval", "list_eval_partition.txt")],
        "In-Shop list_eval_partition.txt",
    )
    if os.path.isdir(os.path.join(root, "img")):
        prefix = ""
    elif os.path.isdir(os.path.join(root, "Img", "img")):
        prefix = "Img"
    elif not check_files:
        prefix = ""
    else:
        raise DataError(
            f"In-Shop image folder not found: neither {os.path.join(root, 'img')} "
            f"nor {os.path.join(root, 'Img', 'img')}"
        )
    lines = _text_lines(part, "In-Shop list_eval_partition.txt")
    if len(lines) < 2 or len(lines[0][1]) != 1 or lines[1][1] != _INSHOP_HEADER:
        raise DataError(
            f"{part}: expected the image count on line 1 and '{' '.join(_INSHOP_HEADER)}' on line 2 "
            "(the distributed file's two header lines)"
        )
    declared = _int(part, lines[0][0], lines[0][1][0], "image count")
    splits = {"train": [], "query": [], "gallery": []}
    item_of, seen = {}, set()
    for lineno, fields in lines[2:]:
        if len(fields) != 3:
            raise DataError(
                f"{part}:{lineno}: expected 'image_name item_id evaluation_status', got {' '.join(fields)!r}"
            )
        rel, item, status = fields
        if status not in splits:
            raise DataError(f"{part}:{lineno}: evaluation_status {status!r} is not train, query or gallery")
        if not (item.startswith("id_") and item[3:].isdigit()):
            raise DataError(f"{part}:{lineno}: item id {item!r} is not of the form id_<digits>")
        _check_relpath(part, lineno, rel)
        if rel in seen:
            raise DataError(f"{part}:{lineno}: image {rel} is listed twice")
        seen.add(rel)
        splits[status].append((os.path.join(prefix, rel) if prefix else rel, int(item[3:])))
        item_of.setdefault(int(item[3:]), set()).add("train" if status == "train" else "test")
    listed = len(lines) - 2
    if declared != listed:
        raise DataError(f"{part}:1: declares {declared} images but lists {listed}; the file is truncated or edited")
    both = [item for item, where in item_of.items() if len(where) > 1]
    if both:
        raise DataError(f"{part}: {len(both)} items are in both train and query/gallery (e.g. id_{min(both):08d})")
    if not allow_subset and listed != TOTAL_IMAGES["inshop"]:
        raise DataError(
            f"{part}: {listed} images, the distributed In-Shop has {TOTAL_IMAGES['inshop']}; "
            "the file is incomplete or not the original (pass --allow-subset to score a subset)"
        )
    return _finish(
        "inshop",
        root,
        splits["train"],
        splits["query"],
        splits["gallery"],
        (part,),
        allow_subset,
        check_files,
        "train items train, query vs gallery",
    )


DML_BENCHMARKS = {"cub200": cub200, "cars196": cars196, "sop": sop, "inshop": inshop}


# -- list files ------------------------------------------------------------------------------------


def _list_text(root, out_dir, items, where):
    lines = []
    for rel, label in items:
        path = os.path.relpath(os.path.join(root, rel), out_dir)
        if any(ch.isspace() for ch in path):
            raise DataError(f"{where}: image path {path!r} holds white space, which a list file cannot hold")
        lines.append(f"{path} {label}\n")
    return "".join(lines)


def write_lists(splits, out_dir):
    """Write the list files of ``splits`` into ``out_dir`` (created if needed), each atomically.

    ``train_list.txt`` (labels ``0 .. splits.num_classes - 1``) trains with ``tools/train_metric.py``
    (``TRAIN.DATASET OUT_DIR``, ``MODEL.HEADS.NUM_CLASSES`` = ``splits.num_classes``);
    ``test_list.txt`` holds the leave-one-out set (CUB, Cars, SOP: ``TEST.SPLIT test_list.txt``
    evaluates it during training), or ``query_list.txt`` and ``gallery_list.txt`` for In-Shop.
    Paths are written relative to ``out_dir`` (the list folder), so the lists work wherever the
    data root and ``out_dir`` lie relative to each other; moving one of them breaks them.

    Returns ``{"train": path, "test": path}`` (In-Shop: ``"query"`` and ``"gallery"`` for ``"test"``).
    """
    out_dir = io.check_output_path(out_dir, what="list folder", folder=True, create=True)
    io.mkdirs(out_dir, "list folder")
    out_dir = os.path.abspath(out_dir)
    parts = [("train", splits.train)]
    if splits.gallery is None:
        parts.append(("test", splits.query))
    else:
        parts += [("query", splits.query), ("gallery", splits.gallery)]
    texts = {name: _list_text(splits.root, out_dir, items, f"{splits.name} {name} split") for name, items in parts}
    written = {}
    for name, text in texts.items():
        path = os.path.join(out_dir, f"{name}_list.txt")
        io.write_text_atomic(path, text, what=f"{splits.name} {name} list")
        written[name] = path
    logger.info(
        "wrote %s lists to %s (train: %d classes: MODEL.HEADS.NUM_CLASSES %d)",
        splits.name,
        out_dir,
        splits.num_classes,
        splits.num_classes,
    )
    return written
