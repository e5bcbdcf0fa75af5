"""Landmark-retrieval benchmarks as their authors distribute them -> query / index image lists.

- ``roxford5k``, ``rparis6k`` (revisitop, Radenović et al. CVPR 2018): ``jpg/`` and
  ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (a pickle of ``imlist``, ``qimlist`` and ``gnd``,
  read with the restricted unpickler of :mod:`metric.utils.safe_pickle`). Queries are the
  ``qimlist`` images cropped to their ``bbx``; the index is ``imlist``, whole.
- ``+r1m``: the revisitop1m distractors, ``revisitop1m.txt`` (one path per line, relative to
  ``jpg/``, extension included, as revisitop's ``configdataset`` reads it) and its ``jpg/`` tree,
  appended to the index.
- ``gldv2-retrieval`` (Google Landmarks v2, Weyand et al. CVPR 2020): the ``index/`` and
  ``test/`` trees (image ``abc...`` at ``a/b/c/abc....jpg``) and ``retrieval_solution_v2.1.csv``
  (beside them, or in ``metadata/`` or ``test/``);
  the queries are the test images the solution scores (Usage Public or Private), the index every
  image of ``index/``.

Every converter checks what it reads against the distributed counts (ROxf 4,993 + 70 queries,
RPar 6,322 + 70, R1M 1,001,001, GLDv2 761,757 index images and 1,129 scored queries, Public
and Private together); a difference is a :class:`DataError` naming the file, unless ``allow_subset``
is set (a replica or a part of the data: the caller marks its results as not comparable). A
listed image that is absent is refused (the scores would silently change), and so is a ground
truth of the other data set (``gnd_rparis6k.pkl`` given for ``roxford5k``: all Paris names start
with ``paris_``, no Oxford name does).
"""

import csv
import dataclasses
import functools
import logging
import math
import os
from typing import Optional

from metric.datasets.transforms import box_has_area
from metric.utils import io
from metric.utils.errors import DataError, MetricError
from metric.utils.safe_pickle import restricted_load

logger = logging.getLogger(__name__)

# name -> (index images, queries) as distributed
REVISITED_COUNTS = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
R1M_COUNT = 1_001_001
R1M_LIST = "revisitop1m.txt"
GLDV2_SOLUTION = "retrieval_solution_v2.1.csv"
GLDV2_INDEX_COUNT = 761_757
GLDV2_SCORED = 1_129  # queries with ground truth (Public + Private)


@dataclasses.dataclass
class LandmarkSplits:
    """What a landmark benchmark is made of. Paths are relative to ``data_root``
    (``distractor_root`` for the distractors); ids are the names the ground truth uses."""

    name: str  # e.g. "roxford5k", "roxford5k+r1m", "gldv2-retrieval"
    kind: str  # "revisited" or "glr"
    data_root: str
    query: list[tuple[str, str]]  # (id, relpath)
    index: list[tuple[str, str]]  # (id, relpath)
    ground_truth: str  # the gnd_*.pkl or the solution csv (absolute)
    query_boxes: Optional[list] = None  # one (x1, y1, x2, y2) per query, or None
    distractor_root: Optional[str] = None
    distractors: Optional[list[tuple[str, str]]] = None  # (id, relpath under distractor_root)
    complete: bool = True  # the counts equal the distributed ones (else allowed by allow_subset; see notes)
    notes: list = dataclasses.field(default_factory=list)  # what differs from the distributed files


def _count_check(what, path, got, want, allow_subset, notes):
    if got == want:
        return
    if not allow_subset:
        raise DataError(
            f"{path}: {got} {what}, but the distributed files have {want}; give the complete data "
            "(or --allow-subset for a replica or part of it: the row is then marked as not comparable)"
        )
    notes.append(f"{got} {what} (distributed: {want})")


def _check_present(root, rels, what, source):
    missing = [rel for rel in rels if not os.path.isfile(os.path.join(root, rel))]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(rels)} {what} listed in {source} are absent under {root} "
            f"(first: {missing[0]}); the benchmark needs every image (download or unpack them again)"
        )


def _find_root(data_root, marker, name):
    """``data_root`` itself when it holds ``marker``, else ``data_root/name`` when that does."""
    for root in (data_root, os.path.join(data_root, name)):
        if os.path.isfile(os.path.join(root, marker)):
            return os.path.abspath(root)
    return None


def revisited(name, data_root, allow_subset=False, check_files=True):
    """:class:`LandmarkSplits` of ``roxford5k`` or ``rparis6k`` from ``data_root`` (the folder
    holding ``jpg/`` and ``gnd_<name>.pkl``, or its parent)."""
    gnd_name = f"gnd_{name}.pkl"
    root = _find_root(data_root, gnd_name, name)
    if root is None:
        others = [n for n in REVISITED_COUNTS if n != name and _find_root(data_root, f"gnd_{n}.pkl", n)]
        hint = f" (it holds gnd_{others[0]}.pkl: is it the {others[0]} folder?)" if others else ""
        raise DataError(
            f"annotation file {gnd_name} not found in {data_root} or {os.path.join(data_root, name)}{hint}; "
            f"--data-root must hold revisitop's jpg/ and {gnd_name}"
        )
    gnd_path = os.path.join(root, gnd_name)
    try:
        data = restricted_load(gnd_path)
    except MetricError as err:
        raise DataError(str(err)) from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DataError(f"{gnd_path} is not a revisitop ground truth: expected a dict with imlist, qimlist and gnd")
    imlist, qimlist = [str(x) for x in data["imlist"]], [str(x) for x in data["qimlist"]]
    if len(data["gnd"]) != len(qimlist):
        raise DataError(f"{gnd_path}: 'gnd' has {len(data['gnd'])} entries but 'qimlist' has {len(qimlist)}")
    paris = [n.startswith("paris_") for n in imlist + qimlist]
    is_paris = name == "rparis6k"
    if not all(p == is_paris for p in paris):
        other = "rparis6k" if not is_paris else "roxford5k"
        wrong = next(n for n, p in zip(imlist + qimlist, paris) if p != is_paris)
        raise DataError(
            f"{gnd_path} is not the {name} ground truth: it names {wrong!r}, an image of {other} "
            f"(is it gnd_{other}.pkl renamed?); use the {gnd_name} revisitop distributes"
        )
    notes = []
    n_index, n_query = REVISITED_COUNTS[name]
    _count_check("index images (imlist)", gnd_path, len(imlist), n_index, allow_subset, notes)
    _count_check("queries (qimlist)", gnd_path, len(qimlist), n_query, allow_subset, notes)
    boxes = []
    for i, entry in enumerate(data["gnd"]):
        bbx = entry.get("bbx") if isinstance(entry, dict) else None
        try:
            box = tuple(float(v) for v in bbx)
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or not box_has_area(box):
            raise DataError(f"{gnd_path}: query {qimlist[i]!r} (gnd[{i}]) has no usable bbx: {bbx!r}")
        boxes.append(box)
    query = [(n, f"jpg/{n}.jpg") for n in qimlist]
    index = [(n, f"jpg/{n}.jpg") for n in imlist]
    if check_files:
        _check_present(root, [r for _, r in query], "query images", gnd_path)
        _check_present(root, [r for _, r in index], "index images", gnd_path)
    return LandmarkSplits(name, "revisited", root, query, index, gnd_path, boxes, complete=not notes, notes=notes)


def _stem(rel):
    return os.path.splitext(os.path.basename(rel))[0]


def r1m(distractor_root, allow_subset=False, check_files=True):
    """``(root, [(id, relpath under root)], notes)`` of the revisitop1m distractors: the lines of
    ``revisitop1m.txt`` (paths relative to ``jpg/``) under ``root/jpg``. ``check_files``: stat every
    image (a million: the caller caches the result)."""
    if not distractor_root:
        raise DataError("the +r1m benchmarks need --distractors DIR, the folder of revisitop1m.txt and jpg/")
    root = _find_root(distractor_root, R1M_LIST, "revisitop1m")
    if root is None:
        raise DataError(
            f"annotation file {R1M_LIST} not found in {distractor_root}; --distractors must hold "
            "revisitop's revisitop1m.txt and its jpg/ tree"
        )
    list_path = os.path.join(root, R1M_LIST)
    with io.open_text(list_path, DataError, "the distractor list") as f:
        rels = [line.strip() for line in f if line.strip()]
    notes = []
    _count_check("distractor images", list_path, len(rels), R1M_COUNT, allow_subset, notes)
    items, seen = [], {}
    for rel in rels:
        image_id = "r1m/" + os.path.splitext(rel)[0].replace(os.sep, "/")
        if image_id in seen:
            raise DataError(f"{list_path}: {rel} is listed twice")
        seen[image_id] = rel
        items.append((image_id, f"jpg/{rel}"))
    if check_files:
        _check_present(root, [r for _, r in items], "distractor images", list_path)
    return root, items, notes


def with_r1m(splits, distractor_root, allow_subset=False, check_files=True):
    """``splits`` of roxford5k / rparis6k with the revisitop1m distractors appended."""
    root, items, notes = r1m(distractor_root, allow_subset, check_files)
    return dataclasses.replace(
        splits,
        name=f"{splits.name}+r1m",
        distractor_root=root,
        distractors=items,
        complete=splits.complete and not notes,
        notes=splits.notes + notes,
    )


def gldv2_relpath(image_id, folder):
    return f"{folder}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def gldv2_retrieval(data_root, allow_subset=False, check_files=True):
    """:class:`LandmarkSplits` of the Google Landmark Retrieval set (GLDv2 ``index/``, ``test/``
    and ``retrieval_solution_v2.1.csv`` in ``data_root``)."""
    root = _find_root(data_root, GLDV2_SOLUTION, "gldv2")
    solution = None if root is None else os.path.join(root, GLDV2_SOLUTION)
    for sub in ("metadata", "test"):  # where other tools keep it (mmpretrain's layout: metadata/)
        if solution is None and os.path.isfile(os.path.join(data_root, sub, GLDV2_SOLUTION)):
            root = os.path.abspath(data_root)
            solution = os.path.join(root, sub, GLDV2_SOLUTION)
    if solution is None:
        raise DataError(
            f"annotation file {GLDV2_SOLUTION} not found in {data_root} (nor in its metadata/ or test/); "
            f"--data-root must hold GLDv2's index/ and test/ trees and {GLDV2_SOLUTION}"
        )
    for folder in ("index", "test"):
        if not os.path.isdir(os.path.join(root, folder)):
            raise DataError(f"{os.path.join(root, folder)} is missing; GLDv2 retrieval needs the {folder}/ tree")
    queries, usage_count = [], {"Public": 0, "Private": 0}
    with io.open_text(solution, DataError, "the retrieval solution") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if header != ["id", "images", "Usage"]:
            raise DataError(f"{solution}:1: expected the header 'id,images,Usage', got {','.join(header)!r}")
        for line, row in enumerate(rows, 2):
            if len(row) == 3 and row[2].strip() in usage_count and row[1].strip():
                if len(row[0].strip()) < 3:  # the image lives under test/<id[0]>/<id[1]>/<id[2]>/
                    raise DataError(f"{solution}:{line}: {row[0].strip()!r} is not a GLDv2 image id (16 hex digits)")
                usage_count[row[2].strip()] += 1
                queries.append((row[0].strip(), gldv2_relpath(row[0].strip(), "test")))
    notes = []
    scored = usage_count["Public"] + usage_count["Private"]
    _count_check("scored queries (Public + Private)", solution, scored, GLDV2_SCORED, allow_subset, notes)
    if check_files:
        _check_present(root, [r for _, r in queries], "query images", solution)
    index_root = os.path.join(root, "index")
    index = []
    for dirpath, dirnames, filenames in os.walk(index_root):
        dirnames.sort()
        for fname in sorted(filenames):
            if fname.lower().endswith(".jpg"):
                rel = os.path.relpath(os.path.join(dirpath, fname), root).replace(os.sep, "/")
                index.append((_stem(fname), rel))
    if not index:
        raise DataError(f"no .jpg images under {index_root}")
    _count_check("index images", index_root, len(index), GLDV2_INDEX_COUNT, allow_subset, notes)
    return LandmarkSplits("gldv2-retrieval", "glr", root, queries, index, solution, complete=not notes, notes=notes)


LANDMARK_BENCHMARKS = {
    "roxford5k": functools.partial(revisited, "roxford5k"),
    "rparis6k": functools.partial(revisited, "rparis6k"),
    "gldv2-retrieval": gldv2_retrieval,
}
R1M_BASES = ("roxford5k", "rparis6k")
