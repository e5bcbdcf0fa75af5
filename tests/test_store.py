"""Feature store: round trip, atomic replace, interrupted writes, merging, importing."""

import json
import os

import numpy as np
import pytest

from metric.retrieval import store as store_mod
from metric.retrieval.store import (
    import_features,
    is_complete_store,
    load_features,
    merge_stores,
    save_features,
)
from metric.utils import io as io_mod
from metric.utils.errors import FeatureStoreError


def _data(n=20, d=8, seed=0, prefix="x"):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), [f"{prefix}{i}" for i in range(n)]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, mmap):
    x, ids = _data()
    path = save_features(
        tmp_path / "s",
        x,
        ids,
        meta={"model_digest": "abc", "scales": [1.0], "flip": False, "failed_images": ["bad.jpg"], "count": 999},
    )
    st = load_features(path, mmap=mmap)
    assert isinstance(st.embeddings, np.memmap) == mmap
    np.testing.assert_allclose(st.embeddings, _unit(x), rtol=1e-6)
    assert st.embeddings.dtype == np.float32
    assert st.ids == ids and len(st) == 20 and st.dim == 8
    assert st.meta["count"] == 20 and st.meta["dim"] == 8 and st.meta["version"] == 1  # reserved keys win
    assert st.meta["model_digest"] == "abc" and st.meta["failed_images"] == ["bad.jpg"]
    assert st.meta["normalized"] is True and len(st.meta["digest"]) == 64
    assert is_complete_store(path)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temporary folder left


def test_no_normalize_and_empty_store(tmp_path):
    x, ids = _data()
    st = load_features(save_features(tmp_path / "raw", x, ids, normalize=False))
    np.testing.assert_array_equal(st.embeddings, x)
    assert st.meta["normalized"] is False
    empty = load_features(save_features(tmp_path / "empty", np.zeros((0, 8)), []))
    assert len(empty) == 0 and empty.dim == 8


@pytest.mark.parametrize(
    "emb, ids, match",
    [
        (np.ones((3,)), ["a", "b", "c"], "2-D"),
        (np.ones((3, 2)), ["a", "b"], "3 embedding rows but 2 ids"),
        (np.ones((2, 2)), ["a", "a"], "repeats"),
        (np.ones((2, 2)), ["a", "b c"], "whitespace"),
        (np.ones((2, 2)), ["a", ""], "empty"),
        (np.array([[1.0, np.nan], [1, 1]]), ["a", "b"], "NaN"),
        (np.array([[0.0, 0.0], [1, 1]]), ["a", "b"], "zero norm"),
    ],
)
def test_save_rejects_bad_input(tmp_path, emb, ids, match):
    with pytest.raises(FeatureStoreError, match=match):
        save_features(tmp_path / "s", emb, ids)
    assert not (tmp_path / "s").exists()


def test_replace_existing_store_and_refuse_user_folder(tmp_path):
    x, ids = _data()
    path = save_features(tmp_path / "s", x, ids)
    y, yids = _data(5, 8, seed=1, prefix="y")
    save_features(path, y, yids)
    assert load_features(path).ids == yids
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(FeatureStoreError, match="not a feature store"):
        save_features(user, x, ids)
    assert (user / "notes.txt").read_text() == "precious"
    (tmp_path / "emptydir").mkdir()
    assert is_complete_store(save_features(tmp_path / "emptydir", x, ids))


def test_replace_without_rename_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(io_mod, "_rename_exchange", lambda a, b: False)
    x, ids = _data()
    path = save_features(tmp_path / "s", x, ids)
    save_features(path, x[:3], ids[:3])
    assert len(load_features(path)) == 3
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_killed_during_write_leaves_old_store(tmp_path, monkeypatch):
    """A kill after the embeddings and ids are written but before meta.json: nothing looks complete."""
    x, ids = _data()
    path = save_features(tmp_path / "s", x, ids)
    real_write = store_mod._write_bytes

    def write_then_die(p, data):
        if p.endswith("meta.json"):
            raise KeyboardInterrupt  # stands for SIGKILL: no cleanup below
        real_write(p, data)

    monkeypatch.setattr(store_mod, "_write_bytes", write_then_die)
    monkeypatch.setattr(io_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        save_features(path, x[:4] * 2, ids[:4])
    with pytest.raises(KeyboardInterrupt):
        save_features(tmp_path / "new", x, ids)
    monkeypatch.undo()
    assert load_features(path).ids == ids  # old store intact
    assert not (tmp_path / "new").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 2
    for p in leftovers:
        assert (p / "embeddings.npy").exists() and not (p / "meta.json").exists()
        assert not is_complete_store(p)
        with pytest.raises(FeatureStoreError, match="not a complete feature store"):
            load_features(p)


def test_interrupted_swap_is_named(tmp_path):
    x, ids = _data()
    path = save_features(tmp_path / "s", x, ids)
    os.rename(path, tmp_path / ".s.old-1234")
    with pytest.raises(FeatureStoreError, match=r"previous store is at .*\.s\.old-1234"):
        load_features(path)


def test_load_detects_inconsistency(tmp_path):
    x, ids = _data()
    path = save_features(tmp_path / "s", x, ids)
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, count=21), open(meta_path, "w"))
    with pytest.raises(FeatureStoreError, match="inconsistent"):
        load_features(path)
    json.dump(dict(meta, version=99), open(meta_path, "w"))
    with pytest.raises(FeatureStoreError, match="version 99"):
        load_features(path)
    json.dump(meta, open(meta_path, "w"))
    with open(os.path.join(path, "ids.txt"), "a") as f:
        f.write("extra\n")
    with pytest.raises(FeatureStoreError, match="21 ids"):
        load_features(path)
    assert not is_complete_store(path)
    assert not is_complete_store(tmp_path / "missing")


def _shards(tmp_path, total=3, n=6, d=4, **meta):
    x, ids = _data(n * total, d)
    paths = []
    for k in range(total):
        sl = slice(k * n, (k + 1) * n)
        m = {
            "shard": {"index": k + 1, "total": total},
            "failed_images": [f"bad{k}.jpg", "common.jpg"],
            "model_digest": "m1",
            **meta,
        }
        paths.append(save_features(tmp_path / f"shard{k + 1}", x[sl], ids[sl], meta=m))
    return x, ids, paths


def test_merge_shards_in_order(tmp_path):
    x, ids, paths = _shards(tmp_path)
    out = merge_stores(list(reversed(paths)), tmp_path / "merged")
    st = load_features(out)
    assert st.ids == ids
    np.testing.assert_allclose(st.embeddings, _unit(x), rtol=1e-6)
    assert st.meta["failed_images"] == ["bad0.jpg", "common.jpg", "bad1.jpg", "bad2.jpg"]
    assert [s["shard"]["index"] for s in st.meta["sources"]] == [1, 2, 3]
    assert st.meta["model_digest"] == "m1" and "shard" not in st.meta
    # the digest of a merged store equals that of the same data saved at once
    whole = load_features(save_features(tmp_path / "whole", x, ids))
    assert whole.meta["digest"] == st.meta["digest"]


def test_merge_refusals(tmp_path):
    x, ids, paths = _shards(tmp_path)
    with pytest.raises(FeatureStoreError, match="shards 2/3 are missing"):
        merge_stores([paths[0], paths[2]], tmp_path / "m")
    os.remove(os.path.join(paths[1], "meta.json"))
    with pytest.raises(FeatureStoreError, match="shard2 \\(incomplete"):
        merge_stores(paths, tmp_path / "m")
    with pytest.raises(FeatureStoreError, match="nowhere \\(missing\\)"):
        merge_stores([paths[0], str(tmp_path / "nowhere")], tmp_path / "m")
    a = save_features(tmp_path / "a", *_data(3, 4, prefix="a"))
    b = save_features(tmp_path / "b", *_data(3, 5, prefix="b"))
    with pytest.raises(FeatureStoreError, match="different dimensions"):
        merge_stores([a, b], tmp_path / "m")
    c = save_features(tmp_path / "c", *_data(3, 4, prefix="a"))
    with pytest.raises(FeatureStoreError, match="ids repeat.*'a0'"):
        merge_stores([a, c], tmp_path / "m")
    d = save_features(tmp_path / "d", *_data(3, 4, prefix="d"), meta={"model_digest": "other"})
    with pytest.raises(FeatureStoreError, match="different 'model_digest'"):
        merge_stores([a, d], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_plain_stores(tmp_path):
    a = save_features(tmp_path / "a", *_data(3, 4, prefix="a"))
    b = save_features(tmp_path / "b", *_data(2, 4, prefix="b"))
    st = load_features(merge_stores([a, b], tmp_path / "m"))
    assert st.ids == ["a0", "a1", "a2", "b0", "b1"]


def test_import_features(tmp_path):
    x, ids = _data(7, 3)
    np.save(tmp_path / "x.npy", x.astype(np.float64))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    st = import_features(str(tmp_path / "x.npy"), str(tmp_path / "ids.txt"), tmp_path / "s")
    assert st.ids == ids
    np.testing.assert_allclose(st.embeddings, _unit(x), rtol=1e-6)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FeatureStoreError, match="not a numeric .npy"):
        import_features(str(tmp_path / "obj.npy"), str(tmp_path / "ids.txt"), tmp_path / "t")
