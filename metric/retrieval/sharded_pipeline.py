"""``tools/search.py`` and ``tools/evaluate.py`` (labelled sets) on a sharded index, under torchrun.

:func:`search_stores_sharded` is :func:`~metric.retrieval.pipeline.search_stores` over the ranks
of a process group (:mod:`metric.retrieval.sharded`): DBA, the search, αQE and a second search,
each sharded by index rows or by queries, then rank 0 writes the results CSV (atomically, once
every rank's part has arrived). SuperGlobal and k-reciprocal re-ranking are refused under index
sharding (they need the neighbours of every candidate, or the k-NN graph, of the whole index);
with queries sharding, where every rank maps the whole index, SuperGlobal runs on each rank's
queries. :func:`evaluate_labelled_sharded` scores recall@k and mAP@R with the same search.

Started by torchrun (``WORLD_SIZE`` > 1) the process group is joined here, with the timeout
``timeout_s`` (``DIST.TIMEOUT_S``): a rank that dies or stops ends the others within it, with
one line naming the collective (after a timeout also the rank that stopped, from the heartbeats of
:func:`~metric.utils.distributed.watch_peers`), and no results file is written. A single process runs the same
code with a world of one (an index given as a folder of shard stores is searched in place).

    torchrun --nproc_per_node 4 tools/search.py --query Q --index I.shards --output results.csv
"""

import contextlib
import logging
import os
import signal
import types

import numpy as np
import torch

import metric.retrieval.rerank_plan as rerank_plan
import metric.utils.distributed as du
from metric.retrieval.groundtruth import labels_for_ids, read_labels
from metric.retrieval.metrics_labelled import score_rankings
from metric.retrieval.rerank import drop_self
from metric.retrieval.results import check_output_file, write_results_csv
from metric.retrieval.search import check_device, check_dims, check_topk, resolve_backend
from metric.retrieval.sharded import ShardedIndex, agree, choose_mode, gather_rows, open_index
from metric.retrieval.store import load_features
from metric.retrieval.topk_merge import shard_rows
from metric.utils import errors, io
from metric.utils.errors import DistributedError, MetricError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800  # DIST.TIMEOUT_S's default
# Queries per sharded search while scoring labelled sets (each is one pass over every rank's rows).
LABELLED_QUERY_BLOCK = 1 << 14


def check_timeout(timeout_s):
    """``timeout_s`` (``--timeout``), or a MetricError: a number of seconds in
    (0, :data:`~metric.utils.distributed.MAX_TIMEOUT_S`], the limit of ``DIST.TIMEOUT_S`` too."""
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not 0 < timeout_s <= du.MAX_TIMEOUT_S  # also NaN and inf: torch's timeouts are whole milliseconds
    ):
        err = MetricError(f"--timeout must be a number of seconds in (0, {du.MAX_TIMEOUT_S:g}], got {timeout_s!r}")
        err.every_rank = True  # every process finds it: printed once per machine
        raise err
    return timeout_s


@contextlib.contextmanager
def process_group(timeout_s=DEFAULT_TIMEOUT_S):
    """Join torchrun's process group (when ``WORLD_SIZE`` > 1 and none is joined yet) with the
    timeout ``timeout_s``; yields ``(world, rank, device)``. A group joined here is left at the
    end (after a barrier when the block succeeded, at once after an error)."""
    check_timeout(timeout_s)
    joined = False
    device = None
    if du.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not du.world_size() > 1:
        cfg = types.SimpleNamespace(DIST_BACKEND="auto", DIST=types.SimpleNamespace(TIMEOUT_S=timeout_s))
        device = du.init_process(cfg).device
        joined = True
        du.watch_peers("--timeout")  # a failed collective names the rank that stopped or died
    ok = False
    restore = _stop_on_sigterm() if joined else None
    try:
        yield du.world_size(), du.rank(), device
        ok = True
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
        if joined:
            du.cleanup(wait=ok)


def _stop_on_sigterm():
    """While this rank searches, torchrun's SIGTERM (sent to every rank when one failed) ends it
    with one line too, instead of silently; returns the handler to restore (None: not the main
    thread, where no handler can be set)."""

    def stopped(signum, frame):
        raise DistributedError(
            f"rank {du.rank()}: stopped by the launcher (SIGTERM) because another process failed or was killed; "
            "the launcher's report names it"
        )

    try:
        return signal.signal(signal.SIGTERM, stopped)
    except ValueError:
        return None


def _search_kwargs(options, device, progress=False):
    backend, dev = options.backend, options.device
    if dev is None and device is not None and device.type == "cuda":
        dev = str(device)  # one GPU per rank: the torch path on this rank's GPU
        backend = "torch" if backend == "auto" else backend
    return {
        "backend": backend,
        "device": dev,
        "chunk_size": options.chunk_size,
        "query_chunk_size": options.query_chunk_size,
        "progress": progress,
    }


def _one_mode(mode, world):
    """The mode every rank uses. ``--shard auto`` decides per rank from its node's memory (and
    processes per node), so nodes that differ can decide differently: then index sharding, the
    smaller per process, for all."""
    if world == 1:
        return mode
    modes = du.all_gather_objects(mode)
    if len(set(modes)) == 1:
        return mode
    logger.info("the ranks chose %s: using index sharding on every rank", ", ".join(sorted(set(modes))))
    return "index"


def _check_rerank(plan, mode):
    if plan.final == "kreciprocal":
        raise MetricError(
            "k-reciprocal re-ranking is not supported under sharded search: it needs the k-NN graph of "
            "the whole index in one process; run one process on one index store (tools/merge_features.py "
            "joins shard stores)"
        )
    if plan.final == "superglobal" and mode == "index":
        raise MetricError(
            "SuperGlobal re-ranking is not supported with index sharding: it needs the neighbours of every "
            "candidate in the whole index; use --shard queries (if the index fits every process) or one process"
        )


def search_stores_sharded(
    query,
    index,
    output,
    topk=100,
    scores_path=None,
    options=None,
    shard="auto",
    timeout_s=DEFAULT_TIMEOUT_S,
    local_search=None,
    devices=None,
):
    """:func:`~metric.retrieval.pipeline.search_stores` sharded over the process group (see the
    module doc); ``shard`` is "auto", "index" or "queries". ``index`` is a store or a folder of
    shard stores. Returns the summary dict (on every rank) with ``shard`` and ``world`` added;
    only rank 0 writes. ``local_search(layout, world, rank, mode) -> fn(query, k)`` replaces the exact
    search of a rank's rows (the sharded approximate search plugs in here). ``devices`` (torch
    device names): cut each rank's rows over these devices of the process, one part each, searched
    with the torch path in parallel and merged (several GPUs in one process, without a replica)."""
    from metric.retrieval.pipeline import SearchOptions

    options = SearchOptions() if options is None else options
    plan = options.rerank
    topk = check_topk(topk)
    if options.ann is not None and local_search is None:
        raise MetricError("--ann under sharded search needs the per-shard IVF indexes (tools/build_index.py --shards)")
    with process_group(timeout_s) as (world, rank, device):
        kwargs = _search_kwargs(options, device, progress=options.progress and rank == 0)

        def prepare():
            if rank == 0:
                check_output_file(output)
                if scores_path is not None:
                    check_output_file(scores_path, "scores")
            resolve_backend(kwargs["backend"], kwargs["device"])
            for dev in devices or ():
                check_device(dev)
            qstore = load_features(query, mmap=True, verify=options.verify and rank == 0)
            layout = open_index(index, world, rank, verify=options.verify)
            check_dims(qstore.embeddings, layout.stores[0].embeddings)
            mode = choose_mode(
                shard, layout.count, layout.dim, layout.itemsize, len(qstore), plan.search_width(topk), world, plan.dba
            )
            rerank_plan.check_plan(plan, qstore, _Sized(layout))
            return qstore, layout, mode

        qstore, layout, mode = agree(prepare)
        mode = _one_mode(mode, world)
        agree(_check_rerank, plan, mode)  # with the mode every rank uses
        fn = local_search(layout, world, rank, mode) if local_search is not None else None
        engine = ShardedIndex(layout, mode, world, rank, kwargs, fn, devices)
        logger.info(
            "rank %d of %d: %s sharding, rows %d..%d of %d",
            rank,
            world,
            mode,
            engine.rows[0],
            engine.rows[1],
            layout.count,
        )
        if plan.dba:
            engine.augment(plan.dba, plan.dba_alpha)
        width = plan.search_width(topk)
        query_emb = qstore.embeddings
        scores, indices = engine.topk(query_emb, max(width, plan.qe))
        if plan.qe:
            query_emb = engine.query_expansion(query_emb, scores, indices, plan.qe, plan.qe_alpha)
            scores, indices = engine.topk(query_emb, width)
        if plan.final == "superglobal":  # queries sharding: every rank maps the whole index
            scores, indices = _superglobal_by_queries(plan, engine, query_emb, scores, indices, topk, kwargs)
        scores, indices = scores[:, :topk], indices[:, :topk]
        summary = {
            "queries": len(qstore),
            "index": layout.count,
            "topk": topk,
            "output": io.abspath(output),
            "rerank": list(plan.steps),
            "shard": mode,
            "world": world,
            "rank": rank,
        }
        if rank == 0:
            for path in (output, scores_path) if scores_path is not None else (output,):
                folder, name = os.path.split(io.abspath(path))
                io.clean_stale_temps(folder, name)  # a killed run's temporary
            write_results_csv(output, qstore.ids, layout.ids, indices, scores=scores, scores_path=scores_path)
        if scores_path is not None:
            summary["scores"] = io.abspath(scores_path)
        du.barrier()
    return summary


class _Sized:
    """What :func:`~metric.retrieval.rerank_plan.check_plan` reads of an index store, for a
    layout of several shard stores."""

    def __init__(self, layout):
        self.layout = layout
        self.meta = {"normalized": all(s.meta.get("normalized", True) for s in layout.stores)}
        self.path = layout.path

    def __len__(self):
        return self.layout.count


def _superglobal_by_queries(plan, engine, query_emb, scores, indices, topk, kwargs):
    """SuperGlobal on this rank's slice of the queries (queries sharding), gathered in query order."""
    index_emb = engine.pieces[0][1] if len(engine.pieces) == 1 else np.concatenate([p for _, p in engine.pieces])
    qa, qb = shard_rows(len(query_emb), engine.world, engine.rank)
    s, i = rerank_plan.final_rerank(
        plan,
        query_emb[qa:qb],
        index_emb,
        scores[qa:qb],
        indices[qa:qb],
        topk,
        None,
        kwargs["backend"],
        kwargs["device"],
    )
    width = s.shape[1]
    packed = torch.from_numpy(np.concatenate([s.astype(np.float64), i.astype(np.float64)], axis=1))
    with du.collective("the all-gather of the re-ranked results"):
        full = gather_rows(packed).numpy()
    return full[:, :width].astype(np.float32), full[:, width:].astype(np.int64)


def evaluate_labelled_sharded(
    query_dir,
    query_labels_path,
    index_dir=None,
    index_labels_path=None,
    verify=True,
    shard="index",
    timeout_s=DEFAULT_TIMEOUT_S,
    ks=(1, 5, 10),
):
    """recall@k and mAP@R of labelled stores (:func:`~metric.retrieval.metrics.evaluate_labelled`)
    ranked by a sharded exact search (leave-one-out without an index: the query store is the
    index and each query's own row is left out). Every rank returns the metrics.

    Only rank 0 reads the ids and the labels and scores the rankings: before each block of queries
    it tells the other ranks which queries and how deep to search (the depth depends on the
    labels), so the other ranks hold neither ids nor labels, only their rows of the index."""
    with process_group(timeout_s) as (world, rank, device):
        lead = rank == 0

        def prepare():
            qstore = load_features(query_dir, mmap=True, verify=verify and lead, read_ids=lead)
            layout = open_index(query_dir if index_dir is None else index_dir, world, rank, verify, read_ids=lead)
            if qstore.dim != layout.dim:
                raise MetricError(
                    f"query store {query_dir} has dimension {qstore.dim} but index {index_dir} has "
                    f"{layout.dim}; extract both with the same model"
                )
            q_labels = x_labels = None
            if lead:
                q_labels = labels_for_ids(read_labels(query_labels_path), qstore.ids, query_labels_path)
                if index_dir is not None:
                    x_labels = labels_for_ids(read_labels(index_labels_path), layout.ids, index_labels_path)
            mode = "index" if shard == "auto" else shard
            return qstore, q_labels, layout, x_labels, mode

        qstore, q_labels, layout, x_labels, mode = agree(prepare)
        engine = ShardedIndex(layout, mode, world, rank, _search_kwargs(_Plain(), device))
        leave_one_out = index_dir is None
        query = qstore.embeddings

        def rank_rows(start, stop, depth):
            if not leave_one_out:
                return engine.topk(query[start:stop], depth)[1]
            scores, ids = engine.topk(query[start:stop], depth + 1)
            return drop_self(scores, ids, np.arange(start, stop))[1]

        def lead_rows(start, stop, depth):
            du.all_gather_objects((start, stop, depth))  # the block the other ranks search with it
            return rank_rows(start, stop, depth)

        def score():
            if not lead:
                while True:  # follow rank 0's blocks until it says the end (None)
                    order = du.all_gather_objects(None)[0]
                    if order is None:
                        return None
                    rank_rows(*order)
            try:
                result = score_rankings(lead_rows, q_labels, x_labels, layout.count, ks, LABELLED_QUERY_BLOCK)
            except errors.DistributedError:
                raise
            except BaseException:
                du.all_gather_objects(None)
                raise
            du.all_gather_objects(None)
            return result

        result = du.all_gather_objects(agree(score))[0]
        du.barrier()
    if result["skipped"]:
        logger.warning("%d queries have no relevant item in the index and were skipped", result["skipped"])
    return {key: result[key] for key in [f"recall@{k}" for k in ks] + ["mAP@R"]}


class _Plain:
    backend, device, chunk_size, query_chunk_size = "auto", None, None, None
