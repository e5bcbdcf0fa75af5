"""The option dataclasses of the retrieval library (SearchOptions, RerankOptions, AnnOptions,
AnnSearchOptions): defaults, validation at construction, immutability, and the explicit ``verify``
parameter that replaced the module-level verification switch."""

import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

from metric.retrieval.ann import AnnOptions, AnnSearchOptions, build_ann_index, load_ann_index
from metric.retrieval.pipeline import SearchOptions, search_stores
from metric.retrieval.rerank_plan import DEFAULT_DBA_K, DEFAULT_QE_K, RerankOptions
from metric.retrieval.results import read_results_csv
from metric.retrieval.search import search
from metric.retrieval.store import EMBEDDINGS_FILE, STORE_DTYPES, load_features, save_features
from metric.utils.cli import add_dtype_option, add_verify_option
from metric.utils.errors import FeatureStoreError, MetricError


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def stores(tmp_path):
    rng = np.random.default_rng(3)
    x, q = _unit(rng, 60, 8), _unit(rng, 5, 8)
    idx = save_features(tmp_path / "index", x, [f"x{i}" for i in range(len(x))])
    qry = save_features(tmp_path / "query", q, [f"q{i}" for i in range(len(q))])
    return tmp_path, qry, idx, q, x


# ----------------------------------------------------------------------------- RerankOptions


def test_rerank_options_resolve_steps_and_k():
    assert RerankOptions().steps == () and RerankOptions().final is None
    qe = RerankOptions(steps=["qe"])
    assert qe.steps == ("qe",) and qe.qe == DEFAULT_QE_K and qe.dba == 0
    assert qe == RerankOptions(qe=DEFAULT_QE_K)  # the same re-ranking compares equal
    both = RerankOptions(steps=("superglobal",), qe=3, dba=1)
    assert both.steps == ("dba", "qe", "superglobal") and (both.qe, both.dba) == (3, 1)
    assert both.final == "superglobal" and both.search_width(100) == 400 and both.search_width(500) == 500
    assert RerankOptions(steps=("dba", "kreciprocal")).dba == DEFAULT_DBA_K
    assert RerankOptions(steps="qe").steps == ("qe",)  # one name given as a string


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(steps=("bogus",)), "unknown re-ranker 'bogus'"),
        (dict(steps=("qe", "qe")), "names a re-ranker twice"),
        (dict(steps=("superglobal", "kreciprocal")), "cannot be combined"),
        (dict(steps=("qe", "dba")), "write --rerank dba qe"),
        (dict(qe=-1), "query expansion K must be an integer >= 1"),
        (dict(qe=2, qe_alpha=-1.0), "query expansion alpha must be a finite number >= 0"),
        (dict(dba=1, dba_alpha=float("nan")), "database augmentation alpha"),
        (dict(steps=("superglobal",), sg_m=1), "SuperGlobal M"),
        (dict(steps=("kreciprocal",), kr_lambda=2.0), "lambda must be in [0, 1]"),
        (dict(steps=("kreciprocal",), kr_graph="maybe"), "--kr-graph 'maybe'"),
    ],
)
def test_rerank_options_refuse_bad_values(kwargs, words):
    with pytest.raises(MetricError, match=words.replace("[", r"\[").replace("]", r"\]")):
        RerankOptions(**kwargs)


def test_rerank_options_leave_parameters_of_steps_that_do_not_run_unchecked():
    """As the tool always did: --sg-m 1 without --rerank superglobal is not used, so not an error."""
    assert RerankOptions(sg_m=1, kr_k2=99, qe_alpha=-1.0).steps == ()


def test_options_are_frozen():
    for options in (SearchOptions(), RerankOptions(), AnnOptions(), AnnSearchOptions()):
        field = dataclasses.fields(options)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(options, field, None)


# ----------------------------------------------------------------------------- SearchOptions


def test_search_options_defaults_and_validation():
    o = SearchOptions()
    assert (o.backend, o.device, o.chunk_size, o.query_chunk_size, o.ann, o.verify, o.progress) == (
        "auto",
        None,
        None,
        None,
        None,
        True,
        False,
    )
    assert o.rerank == RerankOptions()
    assert SearchOptions(chunk_size=np.int64(7)).chunk_size == 7
    with pytest.raises(MetricError, match="unknown search backend 'gpu'"):
        SearchOptions(backend="gpu")
    with pytest.raises(MetricError, match="chunk_size must be an integer >= 1, got 0"):
        SearchOptions(chunk_size=0)
    with pytest.raises(MetricError, match="query_chunk_size must be an integer >= 1"):
        SearchOptions(query_chunk_size=2.5)
    with pytest.raises(MetricError, match="cannot use a saved approximate index"):
        SearchOptions(ann=AnnSearchOptions(), rerank=RerankOptions(dba=2))
    with pytest.raises(TypeError, match="RerankOptions"):
        SearchOptions(rerank={"qe": 2})


def test_search_stores_with_options_matches_the_api(stores):
    tmp, qry, idx, q, x = stores
    summary = search_stores(qry, idx, tmp / "plain.csv", topk=7)
    assert summary["topk"] == 7 and summary["rerank"] == [] and "scores" not in summary
    _, ref = search(q, x, 7)
    assert read_results_csv(tmp / "plain.csv")["q2"] == [f"x{i}" for i in ref[2]]

    options = SearchOptions(
        backend="torch", device="cpu", chunk_size=11, query_chunk_size=2, rerank=RerankOptions(steps=("qe",))
    )
    summary = search_stores(qry, idx, tmp / "qe.csv", topk=7, scores_path=tmp / "s.csv", options=options)
    assert summary["rerank"] == ["qe"] and os.path.isfile(summary["scores"])
    with pytest.raises(MetricError, match="topk must be an integer >= 1"):
        search_stores(qry, idx, tmp / "bad.csv", topk=0)


def test_verify_is_a_parameter_not_a_switch(stores):
    tmp, qry, idx, _, _ = stores
    emb = np.load(os.path.join(idx, EMBEDDINGS_FILE))
    np.save(os.path.join(idx, EMBEDDINGS_FILE), -emb)  # damaged after writing: the digest no longer matches
    with pytest.raises(FeatureStoreError, match="digest"):
        search_stores(qry, idx, tmp / "r.csv", topk=3)
    search_stores(qry, idx, tmp / "r.csv", topk=3, options=SearchOptions(verify=False))
    with pytest.raises(FeatureStoreError, match="digest"):  # nothing was switched off for later reads
        load_features(idx)
    assert len(load_features(idx, verify=False)) == 60


# ----------------------------------------------------------------------------- ANN options


def test_ann_options_defaults_and_validation():
    o = AnnOptions()
    assert (o.index_type, o.nlist, o.m, o.nbits, o.nprobe, o.train_size) == ("ivfpq", None, None, 8, None, None)
    assert (o.hnsw_m, o.ef_construction, o.ef_search, o.sample, o.recall_k, o.seed) == (32, 80, 128, 1000, 100, 0)
    assert AnnOptions(nlist=np.int64(4)).nlist == 4 and type(AnnOptions(nlist=np.int64(4)).nlist) is int
    assert AnnOptions("hnsw", nlist=0, nbits=99).index_type == "hnsw"  # IVF-PQ fields unused, unchecked
    assert AnnOptions("ivfpq", hnsw_m=1).hnsw_m == 1  # HNSW fields unused, unchecked
    for kwargs, words in [
        (dict(index_type="lsh"), "unknown approximate index type 'lsh'"),
        (dict(nbits=17), "nbits must be at most 16"),
        (dict(nlist=0), "nlist must be an integer >= 1"),
        (dict(index_type="hnsw", hnsw_m=1), "hnsw_m must be an integer >= 2"),
        (dict(sample=0), "sample must be an integer >= 1"),
        (dict(seed=-1), "seed must be an integer >= 0"),
    ]:
        with pytest.raises(MetricError, match=words):
            AnnOptions(**kwargs)
    assert AnnSearchOptions().index_type is None
    with pytest.raises(MetricError, match="nprobe must be an integer >= 1"):
        AnnSearchOptions(nprobe=0)
    with pytest.raises(MetricError, match="unknown approximate index type"):
        AnnSearchOptions(index_type="flat")


def test_build_and_search_with_ann_options(stores):
    pytest.importorskip("faiss")
    tmp, qry, idx, _, _ = stores
    params = build_ann_index(idx, AnnOptions("hnsw", ef_search=24, sample=10, recall_k=5), progress=False)
    assert params["type"] == "hnsw" and params["ef_search"] == 24 and params["recall_sample"] == 10
    with open(os.path.join(idx, "faiss_hnsw.json")) as f:
        assert json.load(f)["ef_search"] == 24
    assert load_ann_index(idx, "hnsw")[1]["ef_search"] == 24
    summary = search_stores(
        qry, idx, tmp / "ann.csv", topk=5, options=SearchOptions(ann=AnnSearchOptions(ef_search=40))
    )
    assert summary["ann"] == "hnsw" and len(read_results_csv(tmp / "ann.csv")) == 5


# ----------------------------------------------------------------------------- tool plumbing in metric.utils.cli


def test_cli_store_options():
    parser = argparse.ArgumentParser()
    add_verify_option(parser)
    add_dtype_option(parser, STORE_DTYPES)
    assert vars(parser.parse_args([])) == {"no_verify": False, "dtype": "float32"}
    assert vars(parser.parse_args(["--no-verify", "--dtype", "float16"])) == {"no_verify": True, "dtype": "float16"}
    assert "float32 or float16" in parser.format_help()
