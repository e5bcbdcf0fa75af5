"""Which re-rankers ``tools/search.py`` runs, in which order, with which parameters: :class:`RerankOptions`.

The order is fixed: **DBA** (changes the index vectors, before the search), the search, **αQE**
(a new query and a second search), then at most one final re-scoring of the list: **SuperGlobal**
(re-scores the top-M of the last search) or **k-reciprocal** (re-ranks the whole index with the
query and index vectors as they are after DBA/αQE). ``--rerank`` lists a subset in that order
(``dba qe superglobal``, ``qe kreciprocal``, ...); any other order, a repeated name, or
SuperGlobal together with k-reciprocal (each replaces the scores of the final list) is refused.

:func:`check_plan` also refuses, before any long work, parameters that need more items than the
index has and inputs a re-ranker cannot use (k-reciprocal with ``--ann``, features that are not
L2-normalized, a missing or stale saved k-NN graph with ``--kr-graph saved``).
"""

import dataclasses
from typing import Optional

import metric.retrieval.kreciprocal as kr
import metric.retrieval.superglobal as sg
from metric.retrieval.knn_graph import has_index_graph, load_index_graph
from metric.retrieval.rerank import check_expansion
from metric.utils.errors import FeatureStoreError, MetricError

RERANKERS = ("dba", "qe", "superglobal", "kreciprocal")
ORDER = "dba, qe, then superglobal or kreciprocal"
DEFAULT_QE_K = 2
DEFAULT_DBA_K = 2
GRAPH_MODES = ("auto", "saved", "compute")


@dataclasses.dataclass(frozen=True)
class RerankOptions:
    """Which re-rankers :func:`metric.retrieval.pipeline.search_stores` runs and their parameters
    (``tools/search.py``'s ``--rerank``, ``--qe``, ``--sg-*``, ``--kr-*``, ...).

    ``steps`` names re-rankers of :data:`RERANKERS` in their fixed order; ``qe`` / ``dba`` > 0 turn
    αQE / DBA on as well (as ``--qe K`` / ``--dba K`` always did), and a step named without its K
    gets :data:`DEFAULT_QE_K` / :data:`DEFAULT_DBA_K`. After construction ``steps`` holds every step
    that runs, in order, and ``qe`` / ``dba`` the K that each runs with (0: off), so two options
    that run the same re-ranking compare equal. Everything is checked at construction: an unknown
    name, a repeated one, a wrong order, SuperGlobal with k-reciprocal, or a bad parameter of a
    step that runs is a one-line :class:`MetricError` (parameters of steps that do not run are
    not used and not checked).
    """

    steps: tuple = ()  # re-rankers by name, a subsequence of RERANKERS (dba, qe, superglobal | kreciprocal)
    qe: int = 0  # αQE neighbours K; > 0 turns αQE on; 0 with "qe" in steps: DEFAULT_QE_K
    qe_alpha: float = 3.0  # αQE weight exponent, finite and >= 0
    dba: int = 0  # DBA neighbours K; > 0 turns DBA on; 0 with "dba" in steps: DEFAULT_DBA_K
    dba_alpha: float = 3.0  # DBA weight exponent, finite and >= 0
    sg_m: int = sg.DEFAULT_M  # SuperGlobal: candidates re-ranked per query, >= 2
    sg_k: int = sg.DEFAULT_K  # SuperGlobal: neighbours per candidate, >= 1
    sg_beta: float = sg.DEFAULT_BETA  # SuperGlobal: neighbour weight, finite and >= 0
    kr_k1: int = kr.DEFAULT_K1  # k-reciprocal: k1, the reciprocal neighbourhood, >= 1 (below the index size)
    kr_k2: int = kr.DEFAULT_K2  # k-reciprocal: k2, the local query expansion, 1..k1 + 1
    kr_lambda: float = kr.DEFAULT_LAMBDA  # k-reciprocal: weight of the original distance, in [0, 1]
    kr_graph: str = "auto"  # k-reciprocal index graph, one of GRAPH_MODES: the saved one if valid, only it, or computed
    graph_dir: Optional[str] = None  # folder of the saved k-NN graph; None: the index store's folder

    def __post_init__(self):
        names = [self.steps] if isinstance(self.steps, str) else list(self.steps or ())
        for name in names:
            if name not in RERANKERS:
                raise MetricError(f"unknown re-ranker {name!r}; choose from {', '.join(RERANKERS)}")
        if len(set(names)) != len(names):
            raise MetricError(f"--rerank {' '.join(names)} names a re-ranker twice")
        if "superglobal" in names and "kreciprocal" in names:
            raise MetricError(
                "--rerank superglobal and kreciprocal cannot be combined: each re-scores the final list; choose one"
            )
        positions = [RERANKERS.index(n) for n in names]
        if positions != sorted(positions):
            raise MetricError(
                f"--rerank {' '.join(names)}: re-rankers run in the order {ORDER}; "
                f"write --rerank {' '.join(sorted(names, key=RERANKERS.index))}"
            )
        for name, k in (("qe", self.qe), ("dba", self.dba)):
            if k and name not in names:
                names.append(name)
        steps = tuple(sorted(names, key=RERANKERS.index))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "qe", (self.qe or DEFAULT_QE_K) if "qe" in steps else 0)
        object.__setattr__(self, "dba", (self.dba or DEFAULT_DBA_K) if "dba" in steps else 0)
        if self.qe:
            check_expansion(self.qe, self.qe_alpha, "query expansion")
        if self.dba:
            check_expansion(self.dba, self.dba_alpha, "database augmentation")
        if self.final == "superglobal":
            sg.check_superglobal(self.sg_m, self.sg_k, self.sg_beta)
        if self.final == "kreciprocal":
            kr.check_kreciprocal(self.kr_k1, self.kr_k2, self.kr_lambda)
            if self.kr_graph not in GRAPH_MODES:
                raise MetricError(f"--kr-graph {self.kr_graph!r}: choose one of {', '.join(GRAPH_MODES)}")

    @property
    def final(self):
        """``"superglobal"``, ``"kreciprocal"`` or ``None``."""
        return next((s for s in self.steps if s in ("superglobal", "kreciprocal")), None)

    def search_width(self, topk):
        """Columns the (last) search must return."""
        return max(topk, self.sg_m) if self.final == "superglobal" else topk


def check_plan(plan, qstore, istore, ann=False):
    """Refuse, in one line, what the stores cannot do with the re-ranking ``plan`` (a
    :class:`RerankOptions`); returns the saved index graph to use (or None)."""
    n = len(istore)
    if plan.qe > n:
        raise MetricError(f"--qe {plan.qe} is larger than the index ({n} items); use --qe {max(1, n)} or less")
    if plan.dba and plan.dba >= n:
        raise MetricError(
            f"--dba {plan.dba} needs more than {plan.dba} index items, the index has {n}; "
            + (f"use --dba {n - 1} or less" if n > 1 else "leave --dba out (DBA needs at least 2 index items)")
        )
    if plan.final == "superglobal":
        sg.check_superglobal_size(plan.sg_m, plan.sg_k, n)
    if plan.final != "kreciprocal":
        return None
    kr.check_kreciprocal_size(plan.kr_k1, n)
    if ann:
        raise MetricError(
            "k-reciprocal re-ranking needs exact similarities between all query and index items; drop --ann"
        )
    for store in (qstore, istore):
        if store.meta.get("normalized") is False:
            raise FeatureStoreError(
                f"k-reciprocal re-ranking needs L2-normalized features (its distance is "
                f"2 - 2 x.y), but store {store.path} was imported with --no-normalize; "
                "import it again without it"
            )
    width = plan.kr_k1 + 1
    if plan.kr_graph == "compute":
        return None
    if plan.dba:
        if plan.kr_graph == "saved":
            raise MetricError(
                "--kr-graph saved: the saved k-NN graph is of the index store's vectors, not of the "
                "DBA-augmented ones; drop --dba or use --kr-graph auto"
            )
        return None
    if plan.kr_graph == "saved" or has_index_graph(istore, plan.graph_dir):
        return load_index_graph(istore, width, plan.graph_dir)
    return None


def final_rerank(
    plan, query, index, scores, indices, topk, graph=None, backend="auto", device=None, chunk_size=None, progress=False
):
    """The final re-scoring of ``plan`` (a :class:`RerankOptions`) of the last search ``(scores,
    indices)``; returns the new pair.
    (k-reciprocal searches with torch on ``device`` by itself; ``backend`` is the search's.)"""
    if plan.final == "superglobal":
        return sg.superglobal_rerank(
            query, index, scores, indices, m=plan.sg_m, k=plan.sg_k, beta=plan.sg_beta, device=device, progress=progress
        )
    return kr.k_reciprocal_rerank(
        query,
        index,
        topk,
        k1=plan.kr_k1,
        k2=plan.kr_k2,
        lambda_value=plan.kr_lambda,
        device=device,
        chunk_size=chunk_size,
        graph=graph,
        progress=progress,
    )
