"""The search pipeline of ``tools/search.py``: a query store and an index store in, a results CSV out.

:func:`search_stores` runs, in this order: DBA on the index vectors, the search (exact, or with a
saved approximate index), αQE and a second search, then SuperGlobal or k-reciprocal re-ranking,
and writes the Kaggle results CSV (:func:`~metric.retrieval.results.write_results_csv`). What to
search for and where to write are its arguments; how to search is one :class:`SearchOptions`,
which holds the re-ranking (:class:`~metric.retrieval.rerank_plan.RerankOptions`) and the saved
approximate index to use (:class:`~metric.retrieval.ann.AnnSearchOptions`). Options are checked
when they are made, the stores and outputs before the long work starts.

    from metric.retrieval import RerankOptions, SearchOptions, search_stores
    search_stores("feats/query", "feats/index", "results.csv", topk=100,
                  options=SearchOptions(rerank=RerankOptions(steps=("qe", "superglobal"))))
"""

import dataclasses
import os
from typing import Optional

import metric.retrieval.rerank_plan as rerank_plan
from metric.retrieval.ann import AnnSearchOptions, ann_search, load_ann_index
from metric.retrieval.rerank import database_augmentation, query_expansion
from metric.retrieval.rerank_plan import RerankOptions
from metric.retrieval.results import check_output_file, write_results_csv
from metric.retrieval.search import BACKENDS, check_chunk_size, check_dims, check_topk, resolve_backend, search
from metric.retrieval.store import load_features
from metric.utils.errors import MetricError


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How :func:`search_stores` searches (``tools/search.py``'s options besides its inputs and
    outputs). Checked at construction: a bad value is a one-line :class:`MetricError`; whether
    ``device`` exists is checked when the search starts."""

    backend: str = "auto"  # exact search backend, one of BACKENDS (see metric.retrieval.search)
    device: Optional[str] = None  # torch device, e.g. "cpu" or "cuda:0"; None: the backend's choice
    chunk_size: Optional[int] = None  # index rows per chunk; None: about 512 MB of scores
    query_chunk_size: Optional[int] = None  # queries per matrix product (torch backend); None: 4096
    ann: Optional[AnnSearchOptions] = None  # search the saved approximate index; None: exact search
    rerank: RerankOptions = dataclasses.field(default_factory=RerankOptions)  # default: no re-ranking
    verify: bool = True  # check both stores against their meta.json when loading them (False: --no-verify)
    progress: bool = False  # show progress bars

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise MetricError(f"unknown search backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "chunk_size", check_chunk_size("chunk_size", self.chunk_size))
        object.__setattr__(self, "query_chunk_size", check_chunk_size("query_chunk_size", self.query_chunk_size))
        if self.ann is not None and not isinstance(self.ann, AnnSearchOptions):
            raise TypeError(f"SearchOptions.ann must be an AnnSearchOptions or None, got {type(self.ann).__name__}")
        if not isinstance(self.rerank, RerankOptions):
            raise TypeError(f"SearchOptions.rerank must be a RerankOptions, got {type(self.rerank).__name__}")
        if self.ann is not None and self.rerank.dba:
            raise MetricError(
                "--dba changes the index vectors, so it cannot use a saved approximate index; drop --ann or --dba"
            )


def search_stores(query, index, output, topk=100, scores_path=None, options=None):
    """Search the query store ``query`` in the index store ``index`` (folders), re-rank, write the
    results CSV ``output`` (and the scores CSV ``scores_path`` when given); return a summary dict
    (``queries``, ``index``, ``topk``, ``output``, ``rerank``, and ``ann`` / ``scores`` when used).

    ``topk`` results per query; ``options`` (a :class:`SearchOptions`, default: exact search, no
    re-ranking) say how. Everything the user gave is checked before the long work starts.
    """
    options = SearchOptions() if options is None else options
    plan, ann, progress = options.rerank, options.ann, options.progress
    backend, device, chunk_size = options.backend, options.device, options.chunk_size
    topk = check_topk(topk)
    check_output_file(output)
    if scores_path is not None:
        check_output_file(scores_path, "scores")
    resolve_backend(backend, device)
    qstore = load_features(query, mmap=True, verify=options.verify)
    istore = load_features(index, mmap=True, verify=options.verify)
    check_dims(qstore.embeddings, istore.embeddings)
    graph = rerank_plan.check_plan(plan, qstore, istore, ann is not None)
    summary = {
        "queries": len(qstore),
        "index": len(istore),
        "topk": topk,
        "output": os.path.abspath(output),
        "rerank": list(plan.steps),
    }

    index_emb = istore.embeddings
    if plan.dba:
        index_emb = database_augmentation(
            index_emb,
            plan.dba,
            plan.dba_alpha,
            backend=backend,
            chunk_size=chunk_size,
            device=device,
            progress=progress,
        )
    if ann is not None:
        ann_index, params = load_ann_index(istore, ann.index_type, ann.index_dir)
        summary["ann"] = params["type"]

        def run(q, k):
            return ann_search(ann_index, params, q, k, nprobe=ann.nprobe, ef_search=ann.ef_search, progress=progress)
    else:

        def run(q, k):
            return search(
                q,
                index_emb,
                k,
                backend=backend,
                chunk_size=chunk_size,
                device=device,
                query_chunk_size=options.query_chunk_size,
                progress=progress,
            )

    width = plan.search_width(topk)
    query_emb, scores, indices = qstore.embeddings, None, None
    if plan.qe or plan.final != "kreciprocal":  # k-reciprocal searches by itself
        scores, indices = run(query_emb, max(width, plan.qe))
    if plan.qe:
        query_emb = query_expansion(query_emb, index_emb, scores, indices, plan.qe, plan.qe_alpha)
        if plan.final != "kreciprocal":
            scores, indices = run(query_emb, width)
    if plan.final:
        scores, indices = rerank_plan.final_rerank(
            plan,
            query_emb,
            index_emb,
            scores,
            indices,
            topk,
            graph,
            backend=backend,
            device=device,
            chunk_size=chunk_size,
            progress=progress,
        )
    scores, indices = scores[:, :topk], indices[:, :topk]
    write_results_csv(output, qstore.ids, istore.ids, indices, scores=scores, scores_path=scores_path)
    if scores_path is not None:
        summary["scores"] = os.path.abspath(scores_path)
    return summary
