"""The deterministic demo data generator (metric/datasets/demo.py, tools/make_demo_data.py)."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from metric.datasets import demo
from metric.datasets.demo import make_demo_dataset
from metric.utils.errors import DataError
from tests.helpers import REPO, call_tool, load_tool, run_py

TINY = dict(
    num_train_classes=3,
    train_per_class=3,
    num_heldout_classes=3,
    queries_per_class=2,
    index_per_class=3,
    num_distractor_classes=2,
    image_size=32,
)


def _files(root):
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_list(root, name):
    lines = (Path(root) / name).read_text().splitlines()
    pairs = [line.split(" ") for line in lines]
    assert all(len(p) == 2 for p in pairs), name
    return [(path, int(label)) for path, label in pairs]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, make_demo_dataset(out, seed=5, **TINY)


def test_deterministic_and_seeded(tmp_path, tiny):
    out, summary = tiny
    again = make_demo_dataset(tmp_path / "again", seed=5, **TINY)
    assert summary["created"] and again["created"]
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []

    make_demo_dataset(tmp_path / "other", seed=6, **TINY)
    other = _files(tmp_path / "other")
    assert other["train/0000/000.jpg"] != first["train/0000/000.jpg"]
    assert other["retrieval_solution.csv"] != first["retrieval_solution.csv"]


def test_images_do_not_depend_on_group_sizes(tmp_path, tiny):
    # Every image depends only on (seed, group, class, index): more classes add files, change none.
    out, _ = tiny
    bigger = dict(TINY, num_train_classes=4, num_heldout_classes=4, num_distractor_classes=1)
    make_demo_dataset(tmp_path / "bigger", seed=5, **bigger)
    small, large = _files(out), _files(tmp_path / "bigger")
    images = [k for k in small if k.endswith(".jpg") and k in large]
    assert len(images) >= 3 * 3 + 3 * 5
    assert [k for k in images if small[k] != large[k]] == []


def test_lists_images_and_solution(tiny):
    out, summary = tiny
    train = _read_list(out, "train_list.txt")
    query = _read_list(out, "query_list.txt")
    index = _read_list(out, "index_list.txt")
    test = _read_list(out, "test_list.txt")
    H, D, T = TINY["num_heldout_classes"], TINY["num_distractor_classes"], TINY["num_train_classes"]
    ignored_label = H + D

    assert train[0] == ("train/0000/000.jpg", 0)
    assert len(train) == T * TINY["train_per_class"]
    assert sorted({label for _, label in train}) == list(range(T))
    assert len(query) == H * TINY["queries_per_class"] + demo.NUM_IGNORED_QUERIES
    assert len(index) == (H + D) * TINY["index_per_class"]
    assert {label for _, label in query} == set(range(H)) | {ignored_label}
    assert {label for _, label in index} == set(range(H + D))
    assert sorted(test) == sorted([q for q in query if q[1] != ignored_label] + index)
    assert summary["counts"]["query_images"] == H * TINY["queries_per_class"]
    assert summary["counts"]["index_images"] == len(index)
    assert summary["lists"]["train"] == str(out / "train_list.txt")

    # Every listed file exists and decodes to the requested size.
    for path, _ in train + query + index:
        img = cv2.imread(str(out / path))
        assert img is not None and img.shape == (32, 32, 3), path
    # Held-out file names are unique 16-hex-character ids; query and index are disjoint.
    ids = [Path(p).stem for p, _ in query + index]
    assert all(p.startswith("heldout/") for p, _ in query + index)
    assert all(len(i) == 16 and all(c in "0123456789abcdef" for c in i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert not {p for p, _ in query} & {p for p, _ in index}
    assert sorted(p.name for p in (out / "heldout").iterdir()) == sorted(i + ".jpg" for i in ids)

    # Training and held-out scenes are different scenes: no image is shared, and even the
    # closest training image is clearly different from each held-out image.
    train_px = np.stack([cv2.imread(str(out / p)).astype(np.float32) for p, _ in train])
    for path, _ in query + index:
        img = cv2.imread(str(out / path)).astype(np.float32)
        assert np.abs(train_px - img).mean(axis=(1, 2, 3)).min() > 5, path

    # Solution: one row per query, in the GLR format.
    with open(out / "retrieval_solution.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "images", "Usage"]
    rows = rows[1:]
    query_label = {Path(p).stem: label for p, label in query}
    assert sorted(r[0] for r in rows) == sorted(query_label)
    usages = [r[2] for r in rows]
    assert usages.count("Ignored") == demo.NUM_IGNORED_QUERIES
    assert abs(usages.count("Public") - usages.count("Private")) <= 1
    for qid, images, usage in rows:
        expected = sorted(Path(p).stem for p, label in index if label == query_label[qid])
        if usage == "Ignored":
            assert images == "" and query_label[qid] == ignored_label and expected == []
        else:
            assert sorted(images.split(" ")) == expected and len(expected) == TINY["index_per_class"]

    meta = json.loads((out / "meta.json").read_text())
    assert meta["version"] == demo.FORMAT_VERSION
    assert meta["params"] == dict(TINY, seed=5)
    assert meta["counts"] == summary["counts"]


def test_generate_if_missing(tmp_path):
    out = tmp_path / "demo"
    make_demo_dataset(out, **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    summary = make_demo_dataset(out, **TINY)
    assert not summary["created"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    with pytest.raises(DataError, match="other parameters") as err:
        make_demo_dataset(out, **dict(TINY, image_size=40))
    assert "\n" not in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    summary = make_demo_dataset(out, overwrite=True, **dict(TINY, image_size=40))
    assert summary["created"] and summary["params"]["image_size"] == 40
    assert cv2.imread(str(out / "train/0000/000.jpg")).shape == (40, 40, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_refuses_foreign_folder(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a demo data set"):
        make_demo_dataset(user, **TINY)
    (user / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid demo data set"):
        make_demo_dataset(user, **TINY)
    assert (user / "precious.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="num_train_classes"):
        make_demo_dataset(tmp_path / "bad", **dict(TINY, num_train_classes=0))


def test_interrupted_generation_leaves_no_output(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    calls = []
    write = demo._write_jpeg

    def failing_write(path, img):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        write(path, img)

    monkeypatch.setattr(demo, "_write_jpeg", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(out, **TINY)
    assert not out.exists()
    monkeypatch.setattr(demo, "_write_jpeg", write)

    # A folder left by a killed process (its pid no longer runs) is removed by the next call.
    stale = tmp_path / "demo.tmp-999999999"
    (stale / "train").mkdir(parents=True)
    summary = make_demo_dataset(out, **TINY)
    assert summary["created"] and (out / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_tool(tmp_path, capsys):
    assert (
        load_tool("make_demo_data").default_output() == Path(REPO).resolve() / "metric" / "datasets" / "data" / "demo"
    )
    out = tmp_path / "demo"
    argv = [
        "--output",
        str(out),
        "--quiet",
        "--seed",
        "3",
        "--num-train-classes",
        "2",
        "--train-per-class",
        "2",
        "--num-heldout-classes",
        "2",
        "--index-per-class",
        "2",
        "--num-distractor-classes",
        "1",
        "--image-size",
        "24",
    ]
    status, printed, _ = call_tool("make_demo_data", argv, capsys)
    printed = printed.strip().splitlines()
    assert status == 0 and len(printed) == 1 and "generated" in printed[0] and "4 train images" in printed[0]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["seed"] == 3 and meta["params"]["queries_per_class"] == 2

    status, printed, _ = call_tool("make_demo_data", argv, capsys)
    assert status == 0 and "already present" in printed

    status, _, err = call_tool("make_demo_data", argv + ["--train-per-class", "3"], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_tool_exit_status_subprocess(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    proc = run_py(["tools/make_demo_data.py", "--output", str(out), "--quiet"], timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and list(out.iterdir()) == []
