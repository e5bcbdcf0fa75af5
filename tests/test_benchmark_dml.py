"""The deep-metric-learning benchmarks (issue 19): converters on generated replicas of the files as
distributed, and recall@k / MAP@R against pytorch-metric-learning's AccuracyCalculator."""

import logging
import os

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from metric.datasets.benchmarks.dml import DML_BENCHMARKS, EXPECTED, KS, TOTAL_IMAGES, write_lists
from metric.datasets.listfile import read_list
from metric.retrieval.metrics import labelled_metrics
from metric.utils.errors import DataError

# -- replicas of the distributed layouts -----------------------------------------------------------

_JPEG = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()


def _touch_images(root, rels):
    for rel in rels:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_JPEG)


def _cub_files(root, per_class, images=True):
    """``CUB_200_2011/`` with images.txt, image_class_labels.txt (image ids in a shuffled order, so
    the converter joins by id, not by line) and a train_test_split.txt that splits images, not
    classes (the converter must ignore it)."""
    base = os.path.join(root, "CUB_200_2011")
    os.makedirs(base, exist_ok=True)
    entries, image_id = [], 0
    for cls, count in per_class.items():
        for i in range(count):
            image_id += 1
            entries.append((image_id, f"{cls:03d}.Bird_{cls}/Bird_{cls}_{i:04d}_{image_id}.jpg", cls))
    order = np.random.default_rng(0).permutation(len(entries))
    with open(os.path.join(base, "images.txt"), "w") as f:
        f.writelines(f"{i} {rel}\n" for i, rel, _ in entries)
    with open(os.path.join(base, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{entries[j][0]} {entries[j][2]}\n" for j in order)
    with open(os.path.join(base, "train_test_split.txt"), "w") as f:
        f.writelines(f"{i} {i % 2}\n" for i, _, _ in entries)
    if images:
        _touch_images(base, [os.path.join("images", rel) for _, rel, _ in entries])
    return [(os.path.join("CUB_200_2011", "images", rel), cls) for _, rel, cls in entries]


def _mat_struct(records, fields):
    """A MATLAB struct array (1 x n) as scipy.io.savemat writes it, fields typed as in the
    distributed files (uint8/uint16 numbers, char paths)."""
    ann = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        ann[0, i] = tuple(
            rec[f] if isinstance(rec[f], str) else np.array([[rec[f]]], np.uint16 if rec[f] > 255 else np.uint8)
            for f in fields
        )
    return ann


def _cars_files(root, per_class, layout="annos", images=True):
    """``cars_annos.mat`` + ``car_ims/`` (relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2,
    class, test; the ``test`` flag splits images, not classes) or the devkit layout."""
    items, n = [], 0
    for cls, count in per_class.items():
        for _ in range(count):
            n += 1
            items.append((n, cls))
    box = {"bbox_x1": 3, "bbox_y1": 4, "bbox_x2": 300, "bbox_y2": 200}
    if layout == "annos":
        recs = [{"relative_im_path": f"car_ims/{i:06d}.jpg", **box, "class": c, "test": i % 2} for i, c in items]
        fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
        names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
        scipy.io.savemat(
            os.path.join(root, "cars_annos.mat"), {"annotations": _mat_struct(recs, fields), "class_names": names}
        )
        rels = [(f"car_ims/{i:06d}.jpg", c) for i, c in items]
    else:
        os.makedirs(os.path.join(root, "devkit"), exist_ok=True)
        fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
        halves = {"train": items[0::2], "test": items[1::2]}  # the devkit's halves mix all classes
        rels = []
        for half, part in halves.items():
            recs = [{**box, "class": c, "fname": f"{k + 1:05d}.jpg"} for k, (_, c) in enumerate(part)]
            name = "devkit/cars_train_annos.mat" if half == "train" else "cars_test_annos_withlabels.mat"
            scipy.io.savemat(os.path.join(root, name), {"annotations": _mat_struct(recs, fields)})
            rels += [(f"cars_{half}/{k + 1:05d}.jpg", c) for k, (_, c) in enumerate(part)]
        names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
        scipy.io.savemat(os.path.join(root, "devkit", "cars_meta.mat"), {"class_names": names})
    if images:
        _touch_images(root, [rel for rel, _ in rels])
    return rels


def _sop_files(root, train_classes, test_classes, per_class=2, images=True):
    """``Ebay_train.txt`` / ``Ebay_test.txt`` with their header line; test classes number on
    from the train classes, as in the distributed files."""
    out, image_id = {}, 0
    for split, classes in (("train", train_classes), ("test", test_classes)):
        lines, rels = ["image_id class_id super_class_id path\n"], []
        for cls, count in classes.items() if isinstance(classes, dict) else ((c, per_class) for c in classes):
            for i in range(count):
                image_id += 1
                rel = f"bicycle_final/{100000 + cls}_{i}.JPG"
                lines.append(f"{image_id} {cls} 1 {rel}\n")
                rels.append((rel, cls))
        with open(os.path.join(root, f"Ebay_{split}.txt"), "w") as f:
            f.writelines(lines)
        out[split] = rels
        if images:
            _touch_images(root, [rel for rel, _ in rels])
    return out


def _inshop_files(root, train_items, test_items, images=True, declared=None):
    """``list_eval_partition.txt`` (its two header lines: the image count, the column names) +
    ``img/``; ``train_items``: {item: images}; ``test_items``: {item: (queries, gallery images)}."""
    rows = []
    for item, count in train_items.items():
        rows += [(f"img/MEN/Denim/id_{item:08d}/{k:02d}_1_front.jpg", item, "train") for k in range(count)]
    for item, (queries, gallery) in test_items.items():
        rows += [(f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_1_front.jpg", item, "query") for k in range(queries)]
        rows += [(f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_2_side.jpg", item, "gallery") for k in range(gallery)]
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows) if declared is None else declared}\nimage_name item_id evaluation_status\n")
        f.writelines(f"{rel}  id_{item:08d}  {status}\n" for rel, item, status in rows)
    if images:
        _touch_images(root, [rel for rel, _, _ in rows])
    return rows


# -- converters on small replicas ------------------------------------------------------------------


def _labels(items):
    return sorted({label for _, label in items})


def test_cub_replica_splits_by_class_not_by_the_official_split(tmp_path):
    per_class = {1: 3, 2: 2, 100: 2, 101: 3, 150: 2, 200: 2}
    listed = _cub_files(str(tmp_path), per_class)
    s = DML_BENCHMARKS["cub200"](str(tmp_path), allow_subset=True)
    assert not s.complete and s.gallery is None and s.ks == (1, 2, 4, 8)
    assert sorted(s.query) == sorted((rel, c) for rel, c in listed if c > 100)
    assert _labels(s.query) == [101, 150, 200]
    assert len(s.train) == 7 and _labels(s.train) == [0, 1, 2] and s.num_classes == 3
    # train labels are the classes 1, 2, 100 renumbered in order
    assert sorted(s.train) == sorted((rel, [1, 2, 100].index(c)) for rel, c in listed if c <= 100)
    for rel, _ in s.train + s.query:
        assert os.path.isfile(os.path.join(str(tmp_path), rel))


@pytest.mark.parametrize("layout", ["annos", "devkit"])
def test_cars_replica_both_layouts_split_by_class(tmp_path, layout):
    per_class = {1: 2, 2: 3, 98: 2, 99: 2, 150: 3, 196: 2}
    listed = _cars_files(str(tmp_path), per_class, layout)
    s = DML_BENCHMARKS["cars196"](str(tmp_path), allow_subset=True)
    assert sorted(s.query) == sorted((rel, c) for rel, c in listed if c >= 99)
    assert _labels(s.query) == [99, 150, 196] and len(s.query) == 7
    assert len(s.train) == 7 and s.num_classes == 3 and s.ks == (1, 2, 4, 8)
    if layout == "devkit":  # both halves of the devkit feed both splits
        assert {rel.split("/")[0] for rel, _ in s.query} == {"cars_train", "cars_test"}


def test_sop_replica_uses_its_files_split(tmp_path):
    files = _sop_files(str(tmp_path), train_classes=[1, 2, 3], test_classes={4: 2, 5: 3, 6: 2})
    s = DML_BENCHMARKS["sop"](str(tmp_path), allow_subset=True)
    assert s.query == files["test"] and s.gallery is None and s.ks == (1, 10, 100, 1000)
    assert [label for _, label in s.train] == [0, 0, 1, 1, 2, 2]
    assert [rel for rel, _ in s.train] == [rel for rel, _ in files["train"]]


def test_inshop_replica_query_against_gallery(tmp_path):
    rows = _inshop_files(str(tmp_path), {2: 3, 7: 2}, {12: (2, 1), 13: (1, 2), 30: (1, 1)})
    s = DML_BENCHMARKS["inshop"](str(tmp_path), allow_subset=True)
    assert s.ks == (1, 10, 20, 30, 40)
    assert s.query == [(rel, item) for rel, item, st in rows if st == "query"]
    assert s.gallery == [(rel, item) for rel, item, st in rows if st == "gallery"]
    assert [label for _, label in s.train] == [0, 0, 0, 1, 1]


def test_write_lists_load_as_training_and_evaluation_lists(tmp_path):
    data, out = tmp_path / "data", tmp_path / "lists"
    data.mkdir()
    _cub_files(str(data), {1: 2, 50: 3, 101: 2, 190: 2})
    s = DML_BENCHMARKS["cub200"](str(data), allow_subset=True)
    written = write_lists(s, str(out))
    assert s.num_classes == 2 and set(written) == {"train", "test"}
    train = read_list(written["train"], str(out), num_classes=s.num_classes)  # as the loader reads it
    assert [(os.path.realpath(p), lab) for p, lab in train] == [
        (os.path.realpath(os.path.join(str(data), rel)), lab) for rel, lab in s.train
    ]
    test = read_list(written["test"], str(out))
    assert sorted(lab for _, lab in test) == [101, 101, 190, 190]
    # In-Shop: a query list and a gallery list, written into the data root itself (plain relative paths)
    (tmp_path / "shop").mkdir()
    _inshop_files(str(tmp_path / "shop"), {3: 2}, {5: (1, 2)})
    written = write_lists(DML_BENCHMARKS["inshop"](str(tmp_path / "shop"), allow_subset=True), str(tmp_path / "shop"))
    assert set(written) == {"train", "query", "gallery"}
    assert open(written["gallery"]).read().startswith("img/WOMEN/Dresses/id_00000005/00_2_side.jpg 5\n")
    assert len(read_list(written["gallery"])) == 2 and len(read_list(written["query"])) == 1


# -- the distributed counts are enforced -----------------------------------------------------------


def _spread(total, classes):
    """``classes`` class sizes adding up to ``total`` (each >= 2)."""
    base, extra = divmod(total, classes)
    return [base + (i < extra) for i in range(classes)]


def _real_count_files(name, root):
    """The annotation files of ``name`` with the distributed image and class counts (no images)."""
    exp = EXPECTED[name]
    if name == "cub200":
        sizes = _spread(exp["train"][0], 100) + _spread(exp["query"][0], 100)
        _cub_files(root, dict(zip(range(1, 201), sizes)), images=False)
        return os.path.join(root, "CUB_200_2011", "images.txt")
    if name == "sop":
        train = dict(zip(range(1, 11319), _spread(exp["train"][0], 11318)))
        test = dict(zip(range(11319, 22635), _spread(exp["query"][0], 11316)))
        _sop_files(root, train, test, images=False)
        return os.path.join(root, "Ebay_test.txt")
    train = dict(zip(range(1, 3998), _spread(exp["train"][0], 3997)))
    test = dict(zip(range(5000, 8985), zip(_spread(exp["query"][0], 3985), _spread(exp["gallery"][0], 3985))))
    _inshop_files(root, train, test, images=False)
    return os.path.join(root, "list_eval_partition.txt")


def _drop_last_image(path):
    lines = open(path).readlines()
    if path.endswith("list_eval_partition.txt"):
        lines[0] = f"{int(lines[0]) - 1}\n"
    with open(path, "w") as f:
        f.writelines(lines[:-1])
    if path.endswith("images.txt"):  # CUB: the image's class line too
        labels = os.path.join(os.path.dirname(path), "image_class_labels.txt")
        image_id = lines[-1].split()[0]
        kept = [line for line in open(labels) if line.split()[0] != image_id]
        open(labels, "w").writelines(kept)


# Cars196's full-size .mat takes seconds to write: its count check runs on a small replica below.
@pytest.mark.parametrize("name", ["cub200", "sop", "inshop"])
def test_distributed_counts_pass_and_one_image_less_is_refused(tmp_path, name):
    changed = _real_count_files(name, str(tmp_path))
    s = DML_BENCHMARKS[name](str(tmp_path), check_files=False)
    assert s.complete and s.ks == KS[name]
    sizes = {"train": s.train, "query": s.query, **({"gallery": s.gallery} if s.gallery is not None else {})}
    assert {k: (len(v), len(_labels(v))) for k, v in sizes.items()} == EXPECTED[name]
    assert sum(len(v) for v in sizes.values()) == TOTAL_IMAGES[name]
    assert s.num_classes == EXPECTED[name]["train"][1]
    if name == "cub200":  # the distributed counts are complete with or without --allow-subset
        assert DML_BENCHMARKS[name](str(tmp_path), check_files=False, allow_subset=True).complete
    _drop_last_image(changed)
    with pytest.raises(DataError) as err:
        DML_BENCHMARKS[name](str(tmp_path), check_files=False)
    msg = str(err.value)
    assert "\n" not in msg and changed in msg and "--allow-subset" in msg
    if name == "cub200":  # (the large files take seconds to parse again)
        assert DML_BENCHMARKS[name](str(tmp_path), check_files=False, allow_subset=True).complete is False


def test_cars_counts_are_enforced(tmp_path, monkeypatch):
    from metric.datasets.benchmarks import dml

    root = str(tmp_path)
    _cars_files(root, {1: 2, 98: 3, 99: 2, 196: 2}, images=False)
    annos = os.path.join(root, "cars_annos.mat")
    with pytest.raises(DataError, match=f"^{annos}: 9 images, the distributed Cars196 has 16185; .*--allow-subset"):
        DML_BENCHMARKS["cars196"](root, check_files=False)
    # the same files with the counts this replica has: accepted as complete
    monkeypatch.setitem(dml.TOTAL_IMAGES, "cars196", 9)
    monkeypatch.setitem(dml.EXPECTED, "cars196", {"train": (5, 2), "query": (4, 2)})
    assert DML_BENCHMARKS["cars196"](root, check_files=False).complete
    monkeypatch.setitem(dml.EXPECTED, "cars196", {"train": (5, 2), "query": (4, 3)})
    with pytest.raises(DataError, match="4 images of 2 classes in the query split, the distributed cars196 has 4 of 3"):
        DML_BENCHMARKS["cars196"](root, check_files=False)


# -- bad input: one line naming the file -----------------------------------------------------------


def _one_line(name, root, *words, **kwargs):
    with pytest.raises(DataError) as err:
        DML_BENCHMARKS[name](root, allow_subset=True, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_and_renamed_annotation_files(tmp_path):
    root = str(tmp_path)
    _cub_files(root, {1: 2, 101: 2})
    os.rename(
        os.path.join(root, "CUB_200_2011", "image_class_labels.txt"), os.path.join(root, "CUB_200_2011", "labels.txt")
    )
    _one_line("cub200", root, "not found", "image_class_labels.txt")
    _one_line("cars196", root, "cars_annos.mat", "cars_train_annos.mat")
    _one_line("sop", root, "not found", "Ebay_train.txt")
    _one_line("inshop", root, "list_eval_partition.txt", "not found")
    _sop_files(root, [1], [2])
    os.remove(os.path.join(root, "Ebay_test.txt"))
    _one_line("sop", root, "Ebay_test.txt")


def test_listed_but_absent_images_are_refused_with_their_count(tmp_path):
    root = str(tmp_path)
    _sop_files(root, [1, 2], [3, 4])
    for rel in ("bicycle_final/100003_0.JPG", "bicycle_final/100004_1.JPG"):
        os.remove(os.path.join(root, rel))
    _one_line("sop", root, "2 of 4 images", "Ebay_test.txt", "missing", "100003_0.JPG")
    assert len(DML_BENCHMARKS["sop"](root, allow_subset=True, check_files=False).query) == 4


def test_malformed_files_name_file_and_line(tmp_path):
    root = str(tmp_path)
    _sop_files(root, [1], [2])
    path = os.path.join(root, "Ebay_train.txt")
    lines = open(path).readlines()
    open(path, "w").writelines(lines[1:])  # header removed
    _one_line("sop", root, f"{path}:1", "header")
    open(path, "w").writelines(lines[:1] + ["3 x 1 bicycle_final/a.JPG\n"])
    _one_line("sop", root, f"{path}:2", "'x'")
    open(path, "w").writelines(lines[:1] + ["3 2 1 bicycle_final/a.JPG\n"])  # class 2 is a test class
    _one_line("sop", root, "classes also in", check_files=False)

    shop = str(tmp_path / "shop")
    os.makedirs(shop)
    _inshop_files(shop, {1: 2}, {2: (1, 1)}, declared=5)
    _one_line("inshop", shop, "declares 5 images but lists 4")
    part = os.path.join(shop, "list_eval_partition.txt")
    text = open(part).read().replace("image_name item_id evaluation_status\n", "")
    open(part, "w").write(text)
    _one_line("inshop", shop, "two header lines")

    cub = str(tmp_path / "cub")
    _cub_files(cub, {1: 2, 201: 1})
    _one_line("cub200", cub, "image_class_labels.txt:", "class 201 outside 1-200")


def test_cars_mat_problems(tmp_path):
    root = str(tmp_path)
    _cars_files(root, {1: 2, 99: 2}, layout="devkit")
    os.remove(os.path.join(root, "cars_test_annos_withlabels.mat"))
    scipy.io.savemat(  # the devkit's own test file: no class field
        os.path.join(root, "devkit", "cars_test_annos.mat"),
        {
            "annotations": _mat_struct(
                [{"bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 9, "fname": "00001.jpg"}],
                ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"],
            )
        },
    )
    _one_line("cars196", root, "cars_test_annos_withlabels.mat", "has no classes")
    annos = os.path.join(root, "cars_annos.mat")
    open(annos, "wb").write(b"this is not a mat file at all, just text")
    _one_line("cars196", root, annos, "not a readable MATLAB")
    scipy.io.savemat(
        annos,
        {"annotations": _mat_struct([{"relative_im_path": "car_ims/1.jpg", "test": 0}], ["relative_im_path", "test"])},
    )
    _one_line("cars196", root, annos, "no field class")
    scipy.io.savemat(annos, {"class_names": np.array([["a"]], dtype=object)})
    _one_line("cars196", root, annos, "no 'annotations' variable")


# -- recall@k and MAP@R against pytorch-metric-learning --------------------------------------------


def _pml():
    return pytest.importorskip(
        "pytorch_metric_learning", reason="pytorch-metric-learning is a test dependency: pip install -e .[test]"
    )


def _embeddings(rng, labels, kind, bases=None):
    """Embeddings of items with ``labels``, near their class's base vector (so the scores are far
    from chance), whose inner products and L2 distances are exact in float32 and of one norm, so
    that faiss's L2 ranking (PML's) and our inner-product ranking are the same order. ``spread``:
    signed permutations of 1..16, an item is its class's base with 3 random transpositions (few
    exact ties); ``ties``: +-1 vectors that differ in 4 coordinates, an item flips each of its
    class's 4 with probability 0.25 (16 distinct vectors: exact ties everywhere, duplicates across
    classes). ``bases``: class -> base vector, shared by query and gallery."""
    bases = {} if bases is None else bases
    out = np.empty((len(labels), 16), np.float32)
    for i, label in enumerate(labels):
        if label not in bases:
            if kind == "spread":
                bases[label] = rng.permutation(np.arange(1, 17)) * rng.choice([-1, 1], size=16)
            else:
                bases[label] = np.concatenate([rng.choice([-1, 1], size=4), np.ones(12, np.int64)])
        v = bases[label].copy()
        if kind == "spread":
            for _ in range(3):
                a, b = rng.choice(16, size=2, replace=False)
                v[[a, b]] = v[[b, a]]
        else:
            v[:4] *= np.where(rng.random(4) < 0.25, -1, 1)
        out[i] = v
    return out


def _class_labels(rng, n, singletons):
    """Labels of ``n`` items in classes of 1-8 items; ``singletons`` classes of one item."""
    sizes = []
    while sum(sizes) < n - singletons:
        sizes.append(int(rng.integers(2, 9)))
    sizes[-1] -= sum(sizes) - (n - singletons)
    if sizes[-1] < 2:  # no extra singleton
        last = sizes.pop()
        sizes[-1] += last
    sizes += [1] * singletons
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return rng.permutation(labels)


def _reference_recall(pml, q, q_lab, x, x_lab, ks):
    """recall@k from its definition (a hit if any of the k nearest has the query's label) on the
    neighbours PML's FaissKNN returns (the ones AccuracyCalculator scores), over the queries that
    have a relevant item: PML has no recall@k for k > 1 (its precision_at_k is a fraction)."""
    from pytorch_metric_learning.utils.inference import FaissKNN

    loo = x is None
    ref, ref_lab = (q, q_lab) if loo else (x, x_lab)
    _, idx = FaissKNN()(torch.as_tensor(q), len(ref) - int(loo), torch.as_tensor(ref), loo)
    hit = ref_lab[idx.numpy()] == q_lab[:, None]
    relevant = np.array([(ref_lab == lab).sum() - int(loo) for lab in q_lab]) > 0
    return {k: float(hit[relevant, :k].any(axis=1).mean()) for k in ks}


def _compare(q, q_lab, x=None, x_lab=None, ks=(1,)):
    pml = _pml()
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    logging.getLogger("PML").setLevel(logging.WARNING)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=torch.device("cpu"))
    want = calc.get_accuracy(q, q_lab) if x is None else calc.get_accuracy(q, q_lab, x, x_lab)
    got = labelled_metrics(q, q_lab, x, x_lab, ks=ks)
    # float64 averages of the same per-query terms, summed in another order: equal to 1e-15
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-12)
    assert got["mAP@R"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-12)
    reference = _reference_recall(pml, q, q_lab, x, x_lab, ks)
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(reference[k], abs=1e-12), k
    return got


_SIZES = {"cub200": 160, "cars196": 160, "sop": 1100, "inshop": (150, 170)}


@pytest.mark.parametrize("kind", ["spread", "ties"])
@pytest.mark.parametrize("name", sorted(DML_BENCHMARKS))
def test_metrics_equal_pytorch_metric_learning(name, kind):
    """Every recall@k the benchmark prints and MAP@R, leave-one-out (CUB, Cars, SOP) or query vs
    gallery (In-Shop), with singleton classes / queries without a match that PML leaves out."""
    rng = np.random.default_rng(sorted(DML_BENCHMARKS).index(name) + 10 * (kind == "ties"))
    if name == "inshop":
        nq, nx = _SIZES[name]
        x_lab = _class_labels(rng, nx, singletons=5)
        q_lab = np.concatenate([rng.choice(x_lab, nq - 6), [1000, 1001, 1002, 1003, 1004, 1005]])  # 6 with no match
        bases = {}
        q, x = _embeddings(rng, q_lab, kind, bases), _embeddings(rng, x_lab, kind, bases)
        got = _compare(q, q_lab, x, x_lab, ks=KS[name])
        assert got["skipped"] == 6
    else:
        n = _SIZES[name]
        labels = _class_labels(rng, n, singletons=7)
        got = _compare(_embeddings(rng, labels, kind), labels, ks=KS[name])
        assert got["skipped"] == 7
    assert 0 < got["mAP@R"] < 1


def test_tie_order_matters_and_is_pmls():
    """On tied data the order of the items changes the scores (so the test above can fail); on
    each order ours equals PML's: ties rank the earlier item first, as faiss's exact search does."""
    rng = np.random.default_rng(5)
    labels = _class_labels(rng, 200, singletons=3)
    x = _embeddings(rng, labels, "ties")
    perm = rng.permutation(200)
    first = _compare(x, labels, ks=(1, 2, 4, 8))
    second = _compare(x[perm], labels[perm], ks=(1, 2, 4, 8))
    assert first != second


# -- the benchmark configs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DML_BENCHMARKS))
def test_benchmark_configs_build_the_recipe(name):
    """configs/benchmarks/NAME_r50_arcface.yaml: a ResNet-50 with a 512-d embedding, an ArcFace
    layer over the benchmark's training classes, and the 224 centre-crop evaluation."""
    from metric.config import load_cfg
    from metric.engine.predictor import Preprocess
    from metric.modeling import build_model
    from tests.helpers import REPO

    cfg = load_cfg(os.path.join(REPO, "configs", "benchmarks", f"{name}_r50_arcface.yaml"))
    classes = EXPECTED[name]["train"][1]
    assert (cfg.MODEL.HEADS.NUM_CLASSES, cfg.MODEL.HEADS.CLS_LAYER) == (classes, "arcface")
    model = build_model(cfg).eval()
    assert [tuple(p.shape) for p in model.parameters() if p.shape[:1] == (classes,)] == [(classes, 512)]
    with torch.no_grad():
        assert tuple(model(torch.zeros(2, 3, 64, 64)).shape) == (2, 512)
    views = Preprocess.from_cfg(cfg)(np.zeros((300, 400, 3), np.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)]
