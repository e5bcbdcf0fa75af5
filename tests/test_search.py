"""Exact search vs numpy brute force; tie-breaking; inputs; results CSV round trip."""

import numpy as np
import pytest
import torch

from metric.retrieval.results import read_results_csv, read_scores_csv, write_results_csv
from metric.retrieval.search import resolve_backend, search
from metric.retrieval.store import load_features, save_features
from metric.utils.errors import DataError, MetricError, OutputError
from tests.helpers import unit_vectors


def _brute(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit_vectors(rng, 23, 16), unit_vectors(rng, 300, 16)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk,qchunk", [(None, None), (7, 4), (64, 23), (300, 1)])
@pytest.mark.parametrize("topk", [1, 10, 500])
def test_matches_brute_force(data, backend, chunk, qchunk, topk):
    q, x = data
    scores, idx = search(
        q,
        x,
        topk,
        backend=backend,
        chunk_size=chunk,
        query_chunk_size=qchunk,
        device="cpu" if backend == "torch" else None,
    )
    ref_s, ref_i = _brute(q, x, min(topk, len(x)))
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert idx.shape == (len(q), min(topk, len(x)))
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk", [None, 9, 33])
def test_ties_go_to_lower_index(backend, chunk):
    rng = np.random.default_rng(1)
    # values on a coarse grid: many exactly equal dot products, duplicates in the index
    x = np.round(rng.standard_normal((120, 6)) * 2) / 2
    x = np.concatenate([x, x[::3], x[::7]]).astype(np.float32)
    q = (np.round(rng.standard_normal((15, 6)) * 2) / 2).astype(np.float32)
    for k in (1, 4, 17, 200):
        _, idx = search(q, x, k, backend=backend, chunk_size=chunk, query_chunk_size=4)
        np.testing.assert_array_equal(idx, _brute(q, x, k)[1])


def test_inputs_memmap_tensor_store(tmp_path, data):
    q, x = data
    path = save_features(tmp_path / "idx", x, [f"i{j}" for j in range(len(x))])
    st = load_features(path, mmap=True)
    ref = search(q, x, 5, backend="torch")[1]
    np.testing.assert_array_equal(search(q, st.embeddings, 5, backend="torch", chunk_size=50)[1], ref)
    np.testing.assert_array_equal(search(q, st, 5, backend="faiss", chunk_size=50)[1], ref)
    np.testing.assert_array_equal(search(torch.from_numpy(q), torch.from_numpy(x), 5, backend="torch")[1], ref)
    np.testing.assert_array_equal(search(q.astype(np.float64), x, 5, backend="faiss")[1], ref)


def test_edge_cases_and_errors(data):
    q, x = data
    s, i = search(q, x[:0], 5)
    assert s.shape == (len(q), 0) and i.shape == (len(q), 0)
    s, i = search(q[:0], x, 5)
    assert i.shape == (0, 5)
    with pytest.raises(DataError, match="query dimension 16 does not match index dimension 8"):
        search(q, x[:, :8], 5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(MetricError, match="topk"):
            search(q, x, bad)
    with pytest.raises(MetricError, match="unknown search backend 'annoy'"):
        search(q, x, 5, backend="annoy")
    xn = x.copy()
    xn[7, 3] = np.nan
    for backend in ("torch", "faiss"):
        with pytest.raises(DataError, match="row 7 has NaN"):
            search(q, xn, 5, backend=backend)
    assert resolve_backend("auto", "cpu")[0] in ("torch", "faiss")


def test_results_csv_round_trip(tmp_path):
    qids, iids = ["q1", "q2", "q3"], ["a", "b", "c", "d"]
    idx = np.array([[2, 0, 1], [3, -1, -1], [-1, -1, -1]])
    sc = np.array([[0.9, 0.5, 0.25], [0.75, -np.inf, -np.inf], [-np.inf] * 3], np.float32)
    out = write_results_csv(tmp_path / "r.csv", qids, iids, idx, scores=sc, scores_path=tmp_path / "s.csv")
    assert open(out).read() == "id,images\nq1,c a b\nq2,d\nq3,\n"
    assert read_results_csv(out) == {"q1": ["c", "a", "b"], "q2": ["d"], "q3": []}
    assert read_scores_csv(tmp_path / "s.csv") == {"q1": [0.9, 0.5, 0.25], "q2": [0.75], "q3": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "s.csv"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,image\nq1,a\n", "line 1 must be the header"),
        ("id,images\nq1,a b\nq2,a,b\n", "line 3 has 3 fields"),
        ("id,images\nq1,a\n\nq1,b\n", "'q1' repeats on lines 2 and 4"),
        ("id,images\n,a\n", "line 2 has an empty id"),
    ],
)
def test_read_results_errors(tmp_path, text, match):
    (tmp_path / "r.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        read_results_csv(tmp_path / "r.csv")


def test_write_results_errors(tmp_path):
    with pytest.raises(OutputError, match="folder .*nodir does not exist"):
        write_results_csv(tmp_path / "nodir" / "r.csv", ["q"], ["a"], np.array([[0]]))
    with pytest.raises(DataError, match="comma"):
        write_results_csv(tmp_path / "r.csv", ["q,1"], ["a"], np.array([[0]]))
    assert read_results_csv.__name__ and not (tmp_path / "r.csv").exists()


def test_device_errors(data):
    q, x = data
    with pytest.raises(MetricError, match="unknown device 'gpu'"):
        search(q, x, 3, backend="torch", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(MetricError, match="CUDA is not available"):
            search(q, x, 3, device="cuda")
