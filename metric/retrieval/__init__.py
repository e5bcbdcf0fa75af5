"""Retrieval: feature stores, search, re-ranking, scoring (see docs/RETRIEVAL.md). Needs no model:
extraction, which runs one, is :mod:`metric.engine.extract`.

The Python API::

    from metric.retrieval import save_features, load_features, search, glr_map_at_k
    save_features("feats/index", embeddings, ids)        # float32 [N, D] + N ids -> a store
    store = load_features("feats/index")                  # .embeddings (memmap), .ids, .meta
    scores, indices = search(query, store.embeddings, topk=100)
    scores, indices = superglobal_rerank(query, store.embeddings, *search(query, store.embeddings, 400))
    scores, indices = k_reciprocal_rerank(query, store.embeddings, topk=100)
    search_stores("feats/query", "feats/index", "results.csv", topk=100,   # the tools/search.py pipeline
                  options=SearchOptions(rerank=RerankOptions(steps=("dba", "qe"))))
    search_stores_sharded("feats/query", "feats/index.shards", "results.csv")  # the same under torchrun
"""

from metric.retrieval.knn_graph import build_index_graph
from metric.retrieval.kreciprocal import k_reciprocal_rerank
from metric.retrieval.metrics import glr_map_at_k, labelled_metrics, revisited_map
from metric.retrieval.pipeline import SearchOptions, search_stores
from metric.retrieval.rerank import database_augmentation, query_expansion
from metric.retrieval.rerank_plan import RerankOptions
from metric.retrieval.results import read_results_csv, write_results_csv
from metric.retrieval.search import search
from metric.retrieval.sharded_pipeline import evaluate_labelled_sharded, search_stores_sharded
from metric.retrieval.store import FeatureStore, import_features, load_features, merge_stores, save_features
from metric.retrieval.superglobal import superglobal_rerank
from metric.retrieval.topk_merge import merge_topk, shard_rows

__all__ = [
    "FeatureStore",
    "save_features",
    "load_features",
    "merge_stores",
    "import_features",
    "search",
    "query_expansion",
    "database_augmentation",
    "superglobal_rerank",
    "k_reciprocal_rerank",
    "build_index_graph",
    "search_stores",
    "search_stores_sharded",
    "evaluate_labelled_sharded",
    "merge_topk",
    "shard_rows",
    "SearchOptions",
    "RerankOptions",
    "write_results_csv",
    "read_results_csv",
    "glr_map_at_k",
    "revisited_map",
    "labelled_metrics",
]
