"""SuperGlobal and k-reciprocal re-ranking vs naive dense implementations written from the
published definitions (per-query loops, full similarity matrices, float64)."""

import os

import numpy as np
import pytest
import torch

from metric.retrieval.knn_graph import build_index_graph
from metric.retrieval.kreciprocal import k_reciprocal_rerank
from metric.retrieval.search import search
from metric.retrieval.superglobal import superglobal_rerank
from metric.utils.errors import MetricError
from tests.helpers import tiny_model, unit_vectors


def clustered(rng, n, d, centres=6, spread=0.35):
    """Unit vectors around a few random centres (so that neighbourhoods mean something)."""
    c = unit_vectors(rng, centres, d)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- SuperGlobal


def _order(values, desc=True):
    """Positions sorted by value (descending by default), ties to the lower position."""
    v = -np.asarray(values) if desc else np.asarray(values)
    return np.argsort(v, kind="stable")


def naive_superglobal(q, x, m, k, beta, topk):
    """SuperGlobal re-ranking, one query at a time, from the published description."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    out_i, out_s = [], []
    for v in q64:
        sims = x64 @ v
        ranking = _order(sims)
        cand = ranking[:m]
        xc = x64[cand]
        refined = []
        for a in range(len(cand)):
            s = xc @ xc[a]
            others = [j for j in _order(s) if j != a][:k]
            w = beta * s[others]
            refined.append((xc[a] + (w[:, None] * xc[others]).sum(0)) / (1 + w.sum()))
        refined = np.array(refined)
        r = refined @ v
        q_ref = refined[_order(r)[: k + 1]].max(0)
        f = (r + refined @ q_ref) / 2
        new = _order(f)
        idx = np.concatenate([cand[new], ranking[m:]])[:topk]
        sc = np.concatenate([f[new], sims[ranking[m:]]])[:topk]
        out_i.append(idx)
        out_s.append(sc)
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("m,k,beta,topk", [(40, 9, 0.15, 30), (25, 3, 0.5, 60), (80, 1, 0.0, 80), (12, 11, 1.0, 5)])
def test_superglobal_matches_naive(m, k, beta, topk):
    rng = np.random.default_rng(0)
    q, x = clustered(rng, 11, 16), clustered(rng, 80, 16)
    scores, idx = search(q, x, max(topk, m))
    new_s, new_i = superglobal_rerank(q, x, scores, idx, m=m, k=k, beta=beta)
    ref_s, ref_i = naive_superglobal(q, x, m, k, beta, max(topk, m))
    np.testing.assert_array_equal(new_i, ref_i)
    np.testing.assert_allclose(new_s, ref_s, atol=1e-5)


def test_superglobal_chunks_and_memmap_agree(tmp_path, monkeypatch):
    import metric.retrieval.superglobal as sg

    rng = np.random.default_rng(1)
    q, x = clustered(rng, 9, 8), clustered(rng, 60, 8)
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    scores, idx = search(q, x, 50)
    a = superglobal_rerank(q, x, scores, idx, m=50, k=5)
    monkeypatch.setattr(sg, "GATHER_ELEMENTS", 1)  # one query per chunk
    b = superglobal_rerank(torch.from_numpy(q), xm, scores, idx, m=50, k=5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_superglobal_missing_candidates_stay_last():
    rng = np.random.default_rng(2)
    q, x = clustered(rng, 2, 8), clustered(rng, 30, 8)
    scores, idx = search(q, x, 12)
    idx[0, 9:] = -1  # an approximate search that found only 9 items
    new_s, new_i = superglobal_rerank(q, x, scores, idx, m=12, k=3)
    assert sorted(new_i[0, :9]) == sorted(idx[0, :9]) and (new_i[0, 9:] == -1).all()
    ref_s, ref_i = naive_superglobal(q[:1], x[idx[0, :9]], 9, 3, 0.15, 9)
    np.testing.assert_array_equal(new_i[0, :9], idx[0, :9][ref_i[0]])
    assert np.isfinite(new_s[0, :9]).all()


def test_superglobal_errors():
    rng = np.random.default_rng(3)
    q, x = unit_vectors(rng, 2, 4), unit_vectors(rng, 5, 4)
    scores, idx = search(q, x, 5)
    with pytest.raises(MetricError, match="K=5 needs K\\+1=6 candidates"):
        superglobal_rerank(q, x, scores, idx, m=400, k=5)
    with pytest.raises(MetricError, match="beta"):
        superglobal_rerank(q, x, scores, idx, k=2, beta=-1)
    with pytest.raises(MetricError, match="M"):
        superglobal_rerank(q, x, scores, idx, m=1, k=2)


# ----------------------------------------------------------------------------- k-reciprocal


def naive_k_reciprocal(q, x, k1, k2, lam):
    """Dense k-reciprocal re-ranking (Zhong et al. 2017, as in the authors' code): returns the
    final distance [Q, N]. Ties in rankings go to the lower position (stable sorts)."""
    y = np.concatenate([q, x]).astype(np.float32)
    qn, an = len(q), len(y)
    s = y @ y.T
    dist = 2.0 - 2.0 * s.astype(np.float64)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(-s, axis=1, kind="stable")  # nearest first; same order as dist

    def recip(i, kk):
        fwd = rank[i, : kk + 1]
        return np.array([j for j in fwd if i in rank[j, : kk + 1]], dtype=np.int64)

    half = int(round(k1 / 2.0))
    v = np.zeros((an, an))
    for i in range(an):
        r = recip(i, k1)
        exp = list(r)
        for c in r:
            rc = recip(c, half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                exp += list(rc)
        exp = np.unique(exp)
        w = np.exp(-dist[i, exp])
        v[i, exp] = w / w.sum()
    if k2 != 1:
        v = np.array([v[rank[i, :k2]].mean(0) for i in range(an)])
    out = np.zeros((qn, an - qn))
    for i in range(qn):
        mins = np.minimum(v[i][None, :], v[qn:]).sum(1)
        jac = 1.0 - mins / (2.0 - mins)
        out[i] = (1 - lam) * jac + lam * dist[i, qn:]
    return out


def _ranked(final, topk):
    order = np.argsort(final, axis=1, kind="stable")[:, :topk]
    return order, np.take_along_axis(final, order, 1)


@pytest.mark.parametrize(
    "k1,k2,lam,topk",
    [(20, 6, 0.3, 25), (5, 3, 0.3, 90), (8, 1, 0.5, 10), (4, 5, 1.0, 30), (6, 2, 0.0, 20), (12, 6, 0.9, 7)],
)
def test_k_reciprocal_matches_naive(k1, k2, lam, topk):
    rng = np.random.default_rng(4)
    q, x = clustered(rng, 9, 12), clustered(rng, 90, 12)
    scores, idx = k_reciprocal_rerank(q, x, topk, k1=k1, k2=k2, lambda_value=lam)
    ref_i, ref_d = _ranked(naive_k_reciprocal(q, x, k1, k2, lam), topk)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, 1.0 - ref_d, atol=1e-5)


def test_k_reciprocal_chunks_graph_and_sums(monkeypatch):
    """Tiny chunks (one query per distance block, 9 index rows per product) and a given graph
    (wider than needed) give the same result, and so do the sums of the CUDA path."""
    import metric.retrieval.knn_graph as kg
    import metric.retrieval.kreciprocal as kr

    rng = np.random.default_rng(5)
    q, x = clustered(rng, 7, 10, centres=2), clustered(rng, 70, 10, centres=2)
    ref_i, ref_d = _ranked(naive_k_reciprocal(q, x, 10, 4, 0.3), 60)
    graph = build_index_graph(x, 15, chunk_size=7)
    monkeypatch.setattr(kr, "GATHER_ELEMENTS", 64)
    for mod in (kr, kg):
        monkeypatch.setattr(mod, "GRAPH_ROWS", 16)
        monkeypatch.setattr(mod, "GATHER_ELEMENTS", 64)
    for kwargs in ({}, {"graph": graph, "chunk_size": 9}):
        scores, idx = k_reciprocal_rerank(q, x, 60, k1=10, k2=4, **kwargs)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_allclose(scores, 1.0 - ref_d, atol=1e-5)
    monkeypatch.setattr(kr, "_sequential_adds", lambda dev: False)  # the sort-based sums used on CUDA
    scores, idx = k_reciprocal_rerank(q, x, 60, k1=10, k2=4)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(scores, 1.0 - ref_d, atol=1e-5)


def test_k_reciprocal_is_deterministic_and_needs_no_dense_matrix(monkeypatch):
    """No tensor of (Q+N)^2 elements is ever made: torch allocations are capped."""
    rng = np.random.default_rng(6)
    q, x = clustered(rng, 20, 8), clustered(rng, 400, 8)
    a = k_reciprocal_rerank(q, x, 10)
    b = k_reciprocal_rerank(q, x, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    import metric.retrieval.knn_graph as kg
    import metric.retrieval.kreciprocal as kr

    monkeypatch.setattr(kr, "GATHER_ELEMENTS", 2048)
    for mod in (kr, kg):
        monkeypatch.setattr(mod, "GRAPH_ROWS", 64)
        monkeypatch.setattr(mod, "GATHER_ELEMENTS", 2048)
    biggest = []
    real_zeros, real_full, real_empty = torch.zeros, torch.full, torch.empty

    def spy(real):
        def make(size, *args, **kw):
            t = real(size, *args, **kw)
            biggest.append(t.numel())
            return t

        return make

    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    monkeypatch.setattr(torch, "full", spy(real_full))
    monkeypatch.setattr(torch, "empty", spy(real_empty))
    c = k_reciprocal_rerank(q, x, 10, chunk_size=50)
    np.testing.assert_array_equal(a[1], c[1])
    assert max(biggest) < (len(q) + len(x)) ** 2 // 4


def test_k_reciprocal_errors():
    rng = np.random.default_rng(7)
    q, x = unit_vectors(rng, 2, 4), unit_vectors(rng, 10, 4)
    with pytest.raises(MetricError, match="k1=20 needs more than k1 index items"):
        k_reciprocal_rerank(q, x, 5)
    with pytest.raises(MetricError, match="k2"):
        k_reciprocal_rerank(q, x, 5, k1=3, k2=5)
    with pytest.raises(MetricError, match="lambda"):
        k_reciprocal_rerank(q, x, 5, k1=3, k2=2, lambda_value=1.5)
    with pytest.raises(MetricError, match="index graph"):
        k_reciprocal_rerank(q, x, 5, k1=3, k2=2, graph=build_index_graph(x, 3))


# ----------------------------------------------------------------------------- tools/search.py --rerank


@pytest.fixture()
def rstores(tmp_path):
    from metric.retrieval.store import save_features

    rng = np.random.default_rng(8)
    x, q = clustered(rng, 120, 8), clustered(rng, 10, 8)
    idx = save_features(tmp_path / "index", x, [f"img{i}" for i in range(len(x))])
    qry = save_features(tmp_path / "query", q, [f"q{i}" for i in range(len(q))])
    return tmp_path, qry, idx


def _results(path):
    from metric.retrieval.results import read_results_csv

    return read_results_csv(path)


def test_search_tool_rerank_matches_api(rstores, capsys):
    from metric.retrieval.rerank import database_augmentation, query_expansion
    from metric.retrieval.store import load_features
    from tests.helpers import call_tool

    tmp, qry, idx = rstores
    q, x = load_features(qry), load_features(idx)
    ids = np.array(x.ids)
    base = ["--query", qry, "--index", idx, "--topk", 20, "--no-progress"]

    status, out, _ = call_tool(
        "search", [*base, "--rerank", "superglobal", "--sg-m", 50, "--sg-k", 4, "--output", tmp / "sg.csv"], capsys
    )
    assert status == 0 and "re-ranked with superglobal" in out
    s, i = search(q.embeddings, x.embeddings, 50)
    _, ref = superglobal_rerank(q.embeddings, x.embeddings, s, i, m=50, k=4)
    assert _results(tmp / "sg.csv")["q3"] == list(ids[ref[3, :20]])

    status, out, _ = call_tool(
        "search",
        [*base, "--rerank", "dba", "qe", "kreciprocal", "--kr-k1", 8, "--kr-k2", 3, "--output", tmp / "kr.csv"],
        capsys,
    )
    assert status == 0 and "dba + qe + kreciprocal" in out
    xa = database_augmentation(x.embeddings, 2)
    s, i = search(q.embeddings, xa, 2)
    qa = query_expansion(q.embeddings, xa, s, i, 2)
    _, ref = k_reciprocal_rerank(qa, xa, 20, k1=8, k2=3)
    assert _results(tmp / "kr.csv")["q5"] == list(ids[ref[5]])

    # the saved graph gives the same results as the computed one
    status, out, _ = call_tool("build_index", ["--index", idx, "--type", "knn", "--knn", 10, "--no-progress"], capsys)
    assert status == 0 and "11 neighbours each" in out
    status, _, _ = call_tool(
        "search",
        [*base, "--rerank", "kreciprocal", "--kr-k1", 8, "--kr-graph", "compute", "--output", tmp / "a.csv"],
        capsys,
    )
    assert status == 0
    status, _, _ = call_tool(
        "search",
        [*base, "--rerank", "kreciprocal", "--kr-k1", 8, "--kr-graph", "saved", "--output", tmp / "b.csv"],
        capsys,
    )
    assert status == 0 and _results(tmp / "a.csv") == _results(tmp / "b.csv")


def test_search_tool_rerank_bad_inputs_exit_2(rstores, capsys):
    from metric.retrieval.store import save_features
    from tests.helpers import call_tool

    tmp, qry, idx = rstores
    small = save_features(tmp / "small", clustered(np.random.default_rng(9), 6, 8), [f"s{i}" for i in range(6)])
    one = save_features(tmp / "one", clustered(np.random.default_rng(9), 1, 8), ["o0"])
    raw = save_features(
        tmp / "raw", 3 * clustered(np.random.default_rng(9), 40, 8), [f"r{i}" for i in range(40)], normalize=False
    )
    out = ["--output", tmp / "r.csv", "--no-progress"]
    calls = [
        (["--index", small, "--rerank", "superglobal"], "SuperGlobal K=9 needs K+1=10 candidates"),
        (["--index", small, "--rerank", "kreciprocal", "--kr-k1", 6], "k1=6 needs more than k1 index items"),
        (["--index", small, "--qe", 7], "--qe 7 is larger than the index (6 items)"),
        (["--index", small, "--dba", 6], "--dba 6 needs more than 6 index items, the index has 6; use --dba 5 or less"),
        (["--index", one, "--dba", 1], "leave --dba out (DBA needs at least 2 index items)"),
        (["--index", idx, "--rerank", "kreciprocal", "--kr-graph", "saved"], "has no k-NN graph"),
        (["--index", raw, "--rerank", "kreciprocal", "--kr-k1", 5], "needs L2-normalized features"),
        (["--index", idx, "--rerank", "qe", "dba"], "run in the order dba, qe, then superglobal or kreciprocal"),
        (["--index", idx, "--rerank", "superglobal", "kreciprocal"], "cannot be combined"),
        (["--index", idx, "--rerank", "kreciprocal", "--ann"], "drop --ann"),
        (["--index", idx, "--rerank", "kreciprocal", "--kr-k2", 30], "k2 (local query expansion) must be at most"),
        (["--index", idx, "--rerank", "superglobal", "--sg-beta", -1], "beta must be"),
    ]
    for args, match in calls:
        status, _, err = call_tool("search", ["--query", qry, *args, *out], capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], (args, err)

    # a graph of an older version of the store, or too narrow, is refused
    status, _, _ = call_tool("build_index", ["--index", idx, "--type", "knn", "--knn", 5, "--no-progress"], capsys)
    assert status == 0
    status, _, err = call_tool(
        "search",
        ["--query", qry, "--index", idx, "--rerank", "kreciprocal", "--kr-k1", 8, "--kr-graph", "saved", *out],
        capsys,
    )
    assert status == 2 and "holds 5 neighbours per item but k-reciprocal re-ranking with k1=8 needs 8" in err
    other = save_features(tmp / "other", clustered(np.random.default_rng(10), 120, 8), [f"o{i}" for i in range(120)])
    status, _, err = call_tool(
        "search",
        ["--query", qry, "--index", other, "--rerank", "kreciprocal", "--kr-k1", 5, "--graph-dir", idx, *out],
        capsys,
    )
    assert status == 2 and "was built for a different version of store" in err
    status, _, err = call_tool("build_index", ["--index", small, "--type", "knn", "--knn", 6], capsys)
    assert status == 2 and "--knn 6 needs more than 6 items" in err


# ----------------------------------------------------------------------------- SuperGlobal extraction

TINY_MODEL = tiny_model(width=8, dim=16, num_classes=4) + ["MODEL.HEADS.POOL_LAYER", "gempool"]


def test_regional_gem_and_gem_plus_match_the_published_modules():
    """Regional-GeM as the authors write it (LPPool2d of x / (s^2)^(1/p), reflection padding) and
    GeM+ (fixed-p GeM, eps 1e-8)."""
    from metric.modeling.layers.superglobal_pooling import RegionalGeM, SuperGlobalPool

    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 3, 6, 7)).double()
    p, size = 2.5, 5
    ref = 0.5 * torch.nn.LPPool2d(p, size, stride=1)(torch.nn.ReflectionPad2d(2)(x / (size**2) ** (1 / p))) + 0.5 * x
    torch.testing.assert_close(RegionalGeM(p, size)(x), ref)
    pool = SuperGlobalPool(base=None, p=4.6)
    ref = x.clamp(min=1e-8).pow(4.6).flatten(2).mean(-1).pow(1 / 4.6)
    torch.testing.assert_close(pool(x), ref)
    small = torch.relu(torch.randn(1, 2, 2, 2))  # too small to reflect 2 positions: replicated
    assert RegionalGeM(p, size)(small).shape == small.shape


def test_scale_gem_combinations():
    from metric.engine.predictor import combine_views

    torch.manual_seed(1)
    views = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=2)
    out = combine_views(views, "max")
    torch.testing.assert_close(out, torch.nn.functional.normalize(views.max(0).values, dim=1))
    out = combine_views(views, "sgem", 10.0)
    for n in range(4):
        low = views[:, n].min()
        ref = ((views[:, n] - low) ** 10).mean(0) ** 0.1 + low
        torch.testing.assert_close(out[n], ref / ref.norm())


def test_superglobal_pooling_in_the_inference_model(tiny_data):
    """INFER.POOL_P / INFER.REGIONAL_GEM: the predictor's descriptors are the backbone's feature map,
    Regional-GeM, GeM with p = 4.6, then the embedding layer; the settings enter the store digest."""
    from metric.config import load_cfg
    from metric.datasets.transforms import decode_image
    from metric.engine.extract import settings_digest
    from metric.engine.predictor import Predictor
    from metric.modeling.layers.superglobal_pooling import RegionalGeM

    plain = load_cfg(None, TINY_MODEL + ["TEST.IM_SIZE", "64"])
    cfg = load_cfg(None, TINY_MODEL + ["TEST.IM_SIZE", "64", "INFER.POOL_P", "4.6", "INFER.REGIONAL_GEM", "True"])
    predictor = Predictor.from_cfg(cfg, device="cpu", missing_weights="ok")
    base = Predictor.from_cfg(plain, device="cpu", missing_weights="ok")
    image = decode_image(os.path.join(tiny_data, "img", sorted(os.listdir(os.path.join(tiny_data, "img")))[0]))
    got = predictor.describe([image])[0]
    model = base.model
    with torch.no_grad():
        fmap = model.backbone(predictor.preprocess(image)[0][None])
        pooled = RegionalGeM(2.5, 5)(fmap).clamp(min=1e-8).pow(4.6).mean(dim=(2, 3)).pow(1 / 4.6)
        ref = torch.nn.functional.normalize(model.head.embedding_layer(pooled), dim=1)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert not np.allclose(got, base.describe([image])[0], atol=1e-3)
    assert settings_digest(cfg, "w") != settings_digest(plain, "w")


def test_superglobal_pooling_config_errors():
    from metric.config import load_cfg
    from metric.engine.predictor import build_inference_model
    from metric.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="INFER.REGIONAL_GEM_SIZE"):
        load_cfg(None, TINY_MODEL + ["INFER.REGIONAL_GEM_SIZE", "4"])
    with pytest.raises(ConfigError, match="INFER.MULTISCALE_POOL"):
        load_cfg(None, TINY_MODEL + ["INFER.MULTISCALE_POOL", "median"])
    cfg = load_cfg(None, TINY_MODEL[:-2] + ["MODEL.HEADS.POOL_LAYER", "identity", "INFER.POOL_P", "4.6"])
    with pytest.raises(ConfigError, match="need a head that pools"):
        build_inference_model(cfg, missing_weights="ok")
