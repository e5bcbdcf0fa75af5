"""float16 feature stores: round trip, verification, search equal to float32, the tools' --dtype."""

import json
import os

import numpy as np
import pytest

from metric.retrieval.results import read_results_csv
from metric.retrieval.search import search
from metric.retrieval.store import (
    EMBEDDINGS_FILE,
    META_FILE,
    import_features,
    load_features,
    merge_stores,
    save_features,
)
from metric.utils.errors import FeatureStoreError
from tests.helpers import call_tool, run_py
from tests.test_extract import TINY, _extract


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _separated(rng, n_index=400, n_query=20, d=32):
    """Queries each near one index row, with clear gaps between the scores of the top rows."""
    x = _unit(rng, n_index, d)
    q = x[rng.choice(n_index, n_query, replace=False)] + 0.05 * rng.standard_normal((n_query, d)).astype(np.float32)
    return x, q


def test_float16_round_trip_meta_and_size(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32) * 3
    ids = [f"i{k}" for k in range(50)]
    s32 = load_features(save_features(tmp_path / "a32", x, ids))
    s16 = load_features(save_features(tmp_path / "a16", x, ids, dtype="float16"))
    assert s16.embeddings.dtype == np.float16 and s16.dtype == "float16" and s16.ids == ids
    assert s16.meta["dtype"] == "float16" and s16.meta["version"] == 2
    assert s32.meta["dtype"] == "float32" and s32.meta["version"] == 1 and s32.meta["normalized"]
    # The float16 rows are the float32 rows rounded (normalized first, in float32).
    np.testing.assert_array_equal(s16.embeddings, s32.embeddings.astype(np.float16))
    assert np.abs(s16.embeddings.astype(np.float32) - s32.embeddings).max() < 1e-3
    size = lambda s: os.path.getsize(os.path.join(s.path, EMBEDDINGS_FILE))  # noqa: E731
    assert size(s16) - 128 == (size(s32) - 128) // 2


def test_float16_verification_finds_damage(tmp_path):
    rng = np.random.default_rng(1)
    path = save_features(tmp_path / "s", rng.standard_normal((30, 8)), [f"i{k}" for k in range(30)], dtype="float16")
    emb_path = os.path.join(path, EMBEDDINGS_FILE)
    arr = np.load(emb_path)
    arr[7, 3] = np.float16(np.nan)
    with open(emb_path, "r+b") as f:  # damage in place: a NaN in row 7
        f.seek(os.path.getsize(emb_path) - arr.nbytes)
        f.write(arr.tobytes())
    with pytest.raises(FeatureStoreError, match=r"row 7 \(id 'i7'\) holds NaN"):
        load_features(path)
    arr[7, 3] = np.float16(0.25)
    with open(emb_path, "r+b") as f:  # a finite change: the digest (or the norm) tells
        f.seek(os.path.getsize(emb_path) - arr.nbytes)
        f.write(arr.tobytes())
    with pytest.raises(FeatureStoreError, match=r"row 7 .*norm|do not match the digest"):
        load_features(path)
    # A meta that says float16 in a version 1 store, or an unknown dtype, is refused.
    path2 = save_features(tmp_path / "t", rng.standard_normal((3, 8)), ["a", "b", "c"])
    meta_path = os.path.join(path2, META_FILE)
    meta = json.load(open(meta_path))
    for dtype in ("float16", "int8"):
        json.dump({**meta, "dtype": dtype}, open(meta_path, "w"))
        with pytest.raises(FeatureStoreError, match=f"dtype '{dtype}' is not one of float32, float16 for a version 1"):
            load_features(path2)


def test_float16_errors_name_the_row(tmp_path):
    x = np.ones((4, 3), np.float32)
    x[2, 1] = 1e6
    with pytest.raises(FeatureStoreError, match=r"id 'c' \(row 2\) has values beyond the float16 range"):
        save_features(tmp_path / "s", x, list("abcd"), normalize=False, dtype="float16")
    assert not os.path.exists(tmp_path / "s")
    save_features(tmp_path / "ok", x, list("abcd"), normalize=True, dtype="float16")  # normalized rows fit
    x[1, 0] = np.nan
    with pytest.raises(FeatureStoreError, match=r"id 'b' \(row 1\) has NaN"):
        save_features(tmp_path / "s", x, list("abcd"), dtype="float16")
    with pytest.raises(
        FeatureStoreError, match="unknown feature store dtype 'float64'; choose one of float32, float16"
    ):
        save_features(tmp_path / "s", x, list("abcd"), dtype="float64")


def test_float16_search_ranks_like_float32(tmp_path):
    rng = np.random.default_rng(2)
    x, q = _separated(rng)
    ids = [f"i{k}" for k in range(len(x))]
    s32 = load_features(save_features(tmp_path / "x32", x, ids))
    s16 = load_features(save_features(tmp_path / "x16", x, ids, dtype="float16"))
    for backend in ("torch", "faiss"):
        sc32, i32 = search(q, s32, 10, backend=backend, chunk_size=64)
        sc16, i16 = search(q, s16, 10, backend=backend, chunk_size=64)
        # A naive reference: float32 products of the float16 rows (accumulated in float32 or better).
        ref = q.astype(np.float64) @ s16.embeddings.astype(np.float64).T
        np.testing.assert_allclose(sc16, -np.sort(-ref, axis=1)[:, :10], atol=1e-5)
        assert np.array_equal(i16[:, 0], i32[:, 0])  # the near row is first either way
        assert np.abs(sc16 - sc32).max() < 2e-3
        gaps = np.diff(sc32, axis=1)
        clear = (np.abs(gaps) > 4e-3).all(axis=1)  # rows whose scores are further apart than the rounding
        assert clear.sum() > 0 and np.array_equal(i16[clear], i32[clear])


def test_merge_and_import_with_dtype(tmp_path):
    rng = np.random.default_rng(3)
    a = save_features(tmp_path / "a", rng.standard_normal((5, 4)), [f"a{i}" for i in range(5)], dtype="float16")
    b = save_features(tmp_path / "b", rng.standard_normal((3, 4)), ["b0", "b1", "b2"])
    with pytest.raises(FeatureStoreError, match="different dtypes without --dtype"):
        merge_stores([a, b], tmp_path / "m")
    m = load_features(merge_stores([a, b], tmp_path / "m", dtype="float16"))
    assert m.dtype == "float16" and len(m) == 8
    np.testing.assert_array_equal(m.embeddings[5:], load_features(b).embeddings.astype(np.float16))
    m32 = load_features(merge_stores([a, b], tmp_path / "m32", dtype="float32"))
    np.testing.assert_array_equal(m32.embeddings[:5], load_features(a).embeddings.astype(np.float32))
    np.save(tmp_path / "x.npy", rng.standard_normal((6, 4)))
    (tmp_path / "ids.txt").write_text("".join(f"x{i}\n" for i in range(6)))
    s = import_features(str(tmp_path / "x.npy"), str(tmp_path / "ids.txt"), str(tmp_path / "i"), dtype="float16")
    assert s.dtype == "float16" and s.meta["normalized"]


def test_tools_dtype_option(tmp_path, capsys):
    rng = np.random.default_rng(4)
    x, q = _separated(rng, 200, 8, 16)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"x{i}\n" for i in range(len(x))))
    args = ["--embeddings", tmp_path / "x.npy", "--ids", tmp_path / "ids.txt"]
    status, out, _ = call_tool("import_features", args + ["--output", tmp_path / "i16", "--dtype", "float16"], capsys)
    assert status == 0 and "(float16)" in out
    status, _, err = call_tool("import_features", args + ["--output", tmp_path / "bad", "--dtype", "half"], capsys)
    assert (
        status == 2
        and err.strip() == ("error: unknown feature store dtype 'half'; choose one of float32, float16")
        and not os.path.exists(tmp_path / "bad")
    )
    status, _, err = call_tool("merge_features", [tmp_path / "i16", "--output", tmp_path / "m", "--dtype", "x"], capsys)
    assert status == 2 and err.count("\n") == 1 and "unknown feature store dtype 'x'" in err
    status, out, _ = call_tool("merge_features", [tmp_path / "i16", "--output", tmp_path / "m"], capsys)
    assert status == 0 and "float16" in out
    save_features(tmp_path / "q", q, [f"q{i}" for i in range(len(q))])
    save_features(tmp_path / "i32", x, [f"x{i}" for i in range(len(x))])
    for name in ("i16", "i32"):
        status, _, _ = call_tool(
            "search",
            [
                "--query",
                tmp_path / "q",
                "--index",
                tmp_path / name,
                "--topk",
                1,
                "--output",
                tmp_path / f"{name}.csv",
                "--qe",
                2,
                "--no-progress",
            ],
            capsys,
        )
        assert status == 0
    assert read_results_csv(tmp_path / "i16.csv") == read_results_csv(tmp_path / "i32.csv")


@pytest.mark.slow
def test_extract_tool_rejects_bad_dtype_in_one_line():
    proc = run_py(["tools/extract_features.py", "--dtype", "bfloat16", "INFER.INPUT", "x", "INFER.OUTPUT", "y"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown feature store dtype 'bfloat16'; choose one of float32, float16"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Weights of the tiny model of tests/test_extract.py."""
    import torch

    from metric import build_model, load_cfg

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("w") / "tiny.pth")
    torch.save(build_model(load_cfg(None, TINY)).state_dict(), path)
    return path


@pytest.mark.slow
def test_extract_float16_store_reruns_on_dtype_change(tiny_data, tmp_path, weights):
    src, out = os.path.join(tiny_data, "test.txt"), str(tmp_path / "store")
    assert _extract(weights, src, out).returncode == 0
    s32 = load_features(out)
    proc = _extract(weights, src, out, "--dtype", "float16")
    assert proc.returncode == 0 and "skipped" not in proc.stdout + proc.stderr  # another dtype: extracted again
    s16 = load_features(out)
    assert s16.dtype == "float16" and s16.ids == s32.ids
    assert np.abs(s16.embeddings.astype(np.float32) - s32.embeddings).max() < 1e-3
    again = _extract(weights, src, out, "--dtype", "float16")
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr
