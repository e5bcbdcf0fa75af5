"""Compact item lists (metric.datasets.items): equivalence with the list of tuples they replace."""

import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from metric.datasets.dataset import ListDataset, check_readable_classes
from metric.datasets.items import ItemList, parse_simple_list
from metric.datasets.listfile import _read_lines, read_list
from metric.datasets.samplers import PKSampler, max_pk_batches
from metric.datasets.transforms import TrainTransform
from metric.modeling.builders import class_counts
from metric.utils.errors import DataError


def _naive_read(text, root, with_labels=True):
    """The obviously correct parse of a well-formed list: split lines, join to the root."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts:
            label = int(parts[1]) if len(parts) == 2 else None
            out.append((os.path.join(root, parts[0]), label))
    return out


def _random_list(rng, n, classes):
    lines = []
    for i in range(n):
        sep = rng.choice([" ", "\t", "  ", " \t "])
        end = rng.choice(["\n", "\r\n", " \n"])
        name = rng.choice(["train/a/b/c/", "x/", "/abs/", "é/ü/", ""]) + f"{i:07x}.jpg"
        lines.append(f"{name}{sep}{rng.randrange(classes)}{end}")
        if rng.random() < 0.05:
            lines.append(rng.choice(["\n", "  \n", "\t\r\n"]))
    return "".join(lines)


def test_item_list_round_trip_and_list_behaviour():
    pairs = [("/r/a.jpg", 3), ("/r/b/ü.jpg", 0), ("c.jpg", 3), ("/r/d.jpg", None)]
    items = ItemList.from_pairs(pairs)
    assert list(items) == pairs and items == pairs and len(items) == 4
    assert items[1] == pairs[1] and items[-1] == pairs[-1] and items[3][1] is None
    assert items[1:3] == pairs[1:3] and items[::-2] == pairs[::-2]
    assert items.take(np.array([2, 0])) == [pairs[2], pairs[0]]
    assert items[:2] + [("e.jpg", 7)] + items[2:] == pairs[:2] + [("e.jpg", 7)] + pairs[2:]
    assert items.labels.dtype == np.int32 and items.labels.tolist() == [3, 0, 3, -1]
    assert items.index_of(["/r/b/ü.jpg", "c.jpg", "/r/zzz.jpg", "/r/a"]) == {"/r/b/ü.jpg": 1, "c.jpg": 2}
    assert pickle.loads(pickle.dumps(items)) == pairs  # spawned DataLoader workers get a pickled copy
    with pytest.raises(IndexError):
        items[4]


def test_item_list_root_is_joined_and_lookups_work():
    items = ItemList.from_pairs([("img/a.jpg", 1), ("/abs/b.jpg", 2), ("img/a.jpgx", 3)], root="/data/set")
    assert list(items) == [("/data/set/img/a.jpg", 1), ("/abs/b.jpg", 2), ("/data/set/img/a.jpgx", 3)]
    assert items.index_of(["/data/set/img/a.jpg", "/abs/b.jpg", "/data/set/img/a.jpgx"]) == {
        "/data/set/img/a.jpg": 0,
        "/abs/b.jpg": 1,
        "/data/set/img/a.jpgx": 2,
    }
    other = ItemList.from_pairs([("z.jpg", 0)], root="/elsewhere")
    assert list(items + other) == list(items) + [("/elsewhere/z.jpg", 0)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_parse_equals_line_reader_and_naive(tmp_path, seed):
    rng = random.Random(seed)
    text = _random_list(rng, 500, 37)
    path = tmp_path / "list.txt"
    path.write_bytes(("\ufeff" if seed == 1 else "").encode() + text.encode("utf-8"))
    fast = parse_simple_list(path.read_bytes(), "/root", with_labels=True, num_classes=37)
    assert fast is not None  # the numpy path took it
    slow = _read_lines(str(path), "/root", 37, True)
    naive = _naive_read(text, "/root")
    assert list(fast) == list(slow) == naive
    assert fast.labels.dtype == np.int32
    assert list(read_list(str(path), "/root", 37, check_files=False)) == naive


def test_fast_parse_without_labels(tmp_path):
    text = "a.jpg\nb.jpg 12\n\n c.jpg\t007 \n"
    fast = parse_simple_list(text.encode(), "/r", with_labels=False)
    assert list(fast) == [("/r/a.jpg", None), ("/r/b.jpg", 12), ("/r/c.jpg", 7)]
    # A label that is not plain digits is left to the line reader (here: no label).
    path = tmp_path / "l.txt"
    path.write_text("a.jpg x1\nb.jpg -3\n")
    assert parse_simple_list(path.read_bytes(), "/r", with_labels=False) is None
    assert list(read_list(str(path), "/r", with_labels=False, check_files=False)) == [
        ("/r/a.jpg", None),
        ("/r/b.jpg", -3),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg 0\nb.jpg\n", ":2: expected 'relative/path.jpg label', got 'b.jpg'"),
        ("a.jpg 0\nb.jpg 1 2\n", ":2: expected 'relative/path.jpg label'"),
        ("a.jpg +1\nb.jpg 1x\n", ":2: label '1x' is not an integer"),
        ("a.jpg 0\nb.jpg 9\n", ":2: label 9 outside [0, 4)"),
        ("a.jpg 0\nb.jpg -1\n", ":2: label -1 outside [0, 4)"),
        ("a.jpg 0\nb.jpg 99999999999999999999999\n", ":2: label 99999999999999999999999 outside [0, 4)"),
        ("a.jpg 0\nb\u3000c.jpg 1\n", ":2: expected 'relative/path.jpg label'"),  # an ideographic space splits
        ("\n \n", "holds no images"),
    ],
)
def test_errors_are_the_line_reader_s(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_list(str(path), "/r", num_classes=4, check_files=False)
    assert message in str(err.value) and "\n" not in str(err.value)


class _Probe(Dataset):
    """What a worker sees: the path and label of item i, from the dataset's ItemList."""

    def __init__(self, items):
        self.items = ItemList.from_pairs(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return i, path, -1 if label is None else label, torch.utils.data.get_worker_info().id


def test_workers_see_the_same_items(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text(_random_list(random.Random(5), 300, 11))
    items = read_list(str(path), "/root", 11, check_files=False)
    loader = DataLoader(_Probe(items), batch_size=16, num_workers=2)
    seen, workers = {}, set()
    for idx, paths, labels, wid in loader:
        workers.update(wid.tolist())
        for i, p, lab in zip(idx.tolist(), paths, labels.tolist()):
            seen[i] = (p, lab)
    assert [seen[i] for i in range(len(items))] == list(items) and workers == {0, 1}


def test_class_statistics_from_arrays(tiny_data, tmp_path):
    items = read_list(os.path.join(tiny_data, "train.txt"), tiny_data, num_classes=4)
    labels = [lab for _, lab in items]
    assert class_counts(items.labels, 6).tolist() == [labels.count(c) for c in range(6)]
    # The P x K sampler's plan is the same from an array and from a list.
    a = PKSampler(items.labels, 8, 2, num_replicas=1, rank=0, seed=3)
    b = PKSampler(labels, 8, 2, num_replicas=1, rank=0, seed=3)
    assert a.members == b.members and a.classes == [0, 1, 2, 3] and a.epoch_plan() == b.epoch_plan()
    assert all(labels[i] == c for c, m in zip(a.classes, a.members) for i in m)
    chunks = [5, 1, 3, 0, 7]
    naive = max(b_ for b_ in range(20) if sum(min(k, b_) for k in chunks) >= 2 * b_)
    assert max_pk_batches(chunks, 2) == naive
    # The same-class replacement of a bad image draws from the class's members.
    ds = ListDataset(items, TrainTransform(16), seed=0)
    assert ds._class_members(2).tolist() == [i for i, lab in enumerate(labels) if lab == 2]


def test_check_readable_classes_on_item_list(tiny_data, tmp_path):
    items = read_list(os.path.join(tiny_data, "train.txt"), tiny_data, num_classes=4)
    check_readable_classes(items, "train.txt")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"junk")
    bad = items + [(str(junk), 9), (str(junk), 7), (str(junk), 9)]
    with pytest.raises(
        DataError,
        match=r"class 9 of train.txt has no readable image: none of its 2 image\(s\) .*"
        r"junk.jpg\); 1 more class\(es\) have none either: 7;",
    ):
        check_readable_classes(bad, "train.txt")


def test_label_beyond_int64_is_one_data_error(tmp_path):
    """A label too large for the int64 arrays is named with its line, not an OverflowError."""
    from metric.datasets.listfile import read_list
    from metric.utils.errors import DataError

    path = tmp_path / "list.txt"
    path.write_text("a.jpg 1\nb.jpg 99999999999999999999\n")
    for with_labels in (True, False):
        with pytest.raises(DataError, match=r"list.txt:2: label 99999999999999999999 is too large"):
            read_list(str(path), check_files=False, with_labels=with_labels)
