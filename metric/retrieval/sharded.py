"""Exact search sharded over processes (torch.distributed: torchrun, gloo on CPU, nccl on GPU).

Two ways to cut the work over the ``W`` ranks of the process group, both exact:

- **index** sharding: rank ``r`` memory-maps and searches only the rows
  :func:`~metric.retrieval.topk_merge.shard_rows` gives it (the cut of sharded extraction), of
  one store or of the shard stores sharded extraction writes (``OUT.shards/shard_K_of_N``; no
  merge step). Every rank searches all queries in its slice; the per-rank top-k lists, with
  global rows, are all-gathered in blocks of queries and merged with the tie rule of every
  search here (score descending, then global row ascending, :func:`merge_topk`), so every rank
  ends with the list a single process searching the whole index returns.
- **queries** sharding: every rank maps the whole index and searches a contiguous slice of the
  queries; the lists are all-gathered in query order.

:class:`ShardedIndex` holds one rank's part and does the collectives: :meth:`~ShardedIndex.topk`
(replicated queries in, the merged lists out on every rank), the rows of the neighbours that
αQE and DBA need (:meth:`~ShardedIndex.rows_of`: exactly the rows other ranks hold are
gathered), :meth:`~ShardedIndex.query_expansion` and :meth:`~ShardedIndex.augment` (DBA). The
search of a rank's own part is pluggable (``local_search``: exact by default; an approximate
per-shard index plugs in the same way, returning global rows padded with -1 / -inf). With
several ``devices`` in one process (GPUs), a rank's rows are cut once more, one contiguous part
per device searched in its own thread, and merged by the same rule (:func:`search_on_devices`).

Before any search the index is checked (:func:`open_index`): shard stores must tile it (shards
1..N of one extraction, each once, one dimension, one dtype and store version, one model and
its settings); each store is verified against its ``meta.json`` by one rank only (the rank
holding its first row), and every rank stops with the same one-line error when any rank found
one (:func:`agree`). A rank that dies or stops ends the others at the next collective within
the process group's timeout, with one line naming the collective.
"""

import dataclasses
import json
import logging
import os
import re

import numpy as np
import torch
import torch.distributed as dist

import metric.utils.distributed as du
import metric.utils.errors as errors
from metric.retrieval.rerank import GATHER_ELEMENTS as EXPAND_ELEMENTS
from metric.retrieval.rerank import check_expansion, drop_self, expand
from metric.retrieval.search import chunk_as_float32, search
from metric.retrieval.store import CONSISTENT_META_KEYS, META_FILE, load_features, verify_store
from metric.retrieval.topk_merge import merge_topk, shard_rows
from metric.utils import io
from metric.utils.errors import FeatureStoreError, MetricError
from metric.utils.machine import format_bytes, machine_memory

logger = logging.getLogger(__name__)

SHARD_MODES = ("auto", "index", "queries")
SHARD_DIR_RE = re.compile(r"^shard_(\d+)_of_(\d+)$")  # the shard stores of sharded extraction
# Elements (float64) of one all-gather of top-k lists, over all ranks.
GATHER_ELEMENTS = 1 << 24
# Index rows a rank broadcasts at a time as DBA queries (index sharding).
DBA_CHUNK_ROWS = 1 << 15
# --shard auto picks queries sharding when its estimate fits in this share of a process's memory
# and every rank gets at least QUERIES_PER_RANK queries.
AUTO_MEMORY_SHARE = 0.5
QUERIES_PER_RANK = 1000


# ----------------------------------------------------------------------------- agreeing on errors


def agree(fn, *args, **kwargs):
    """Run ``fn`` on every rank; when it raised a :class:`MetricError` on any rank, raise the
    first such error (lowest rank) on every rank, so that no rank starts a search the others
    refused. The error is marked ``every_rank`` (printed once per node, see ``run_tool``)."""
    error, result = None, None
    try:
        result = fn(*args, **kwargs)
    except errors.DistributedError:
        raise  # a peer is gone or stuck: another collective would only wait for it again
    except MetricError as err:
        error = err
    outcomes = du.all_gather_objects(None if error is None else (type(error).__name__, str(error)))
    first = next((o for o in outcomes if o is not None), None)
    if first is None:
        return result
    if error is None or str(error) != first[1]:
        cls = getattr(errors, first[0], MetricError)
        error = cls(first[1]) if isinstance(cls, type) and issubclass(cls, MetricError) else MetricError(first[1])
    error.every_rank = True
    raise error


# ----------------------------------------------------------------------------- the index layout


def index_store_paths(path):
    """The store folders of the index ``path``: ``[path]`` for a store, else the shard stores
    (``shard_K_of_N``) inside the folder ``path``, as sharded extraction writes them."""
    path = io.abspath(path)
    if not io.isdir(path):
        raise FeatureStoreError(f"index {path} does not exist; give a feature store or a folder of shard stores")
    names = io.ls(path)
    if META_FILE in names or any(n in names for n in ("embeddings.npy", "ids.txt")):
        return [path]
    shards = sorted(n for n in names if SHARD_DIR_RE.match(n))
    if not shards:
        raise FeatureStoreError(
            f"index {path} is neither a feature store nor a folder of shard stores (shard_K_of_N, as "
            "sharded extraction writes them); give one of those"
        )
    return [os.path.join(path, n) for n in shards]


def wants_sharding(index_path):
    """Whether ``tools/search.py`` / ``tools/evaluate.py`` search sharded without ``--shard``: under
    torchrun with more than one process, or when the index is a folder of shard stores."""
    if du.under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    if index_path is None:
        return False
    path = io.abspath(index_path)
    try:
        names = io.ls(path) if io.isdir(path) else []
    except OSError:
        return False
    return META_FILE not in names and any(SHARD_DIR_RE.match(n) for n in names)


def _shard_meta(store):
    shard = store.meta.get("shard")
    if not (isinstance(shard, dict) and all(isinstance(shard.get(k), int) for k in ("index", "total"))):
        raise FeatureStoreError(
            f"shard store {store.path} has no shard number in its meta.json (shard: {shard!r}); give the "
            "shard stores of one sharded extraction, or one store"
        )
    match = SHARD_DIR_RE.match(os.path.basename(store.path))
    if match and (int(match.group(1)), int(match.group(2))) != (shard["index"], shard["total"]):
        raise FeatureStoreError(
            f"shard store {store.path} holds shard {shard['index']}/{shard['total']} by its meta.json, "
            "not the one its folder name says; it was copied from another extraction, re-extract it"
        )
    return shard["index"], shard["total"]


def check_tiling(stores):
    """The stores of one index in order, after checking that they tile it: one store, or shards
    1..N of one extraction, each once (no gap, no overlap), of one dimension, dtype and store
    version, extracted with one model and settings. A one-line :class:`FeatureStoreError`
    names the offending shard."""
    if len(stores) == 1 and stores[0].meta.get("shard") in (None, {"index": 1, "total": 1}):
        return list(stores)
    numbered = {}
    totals = {}
    for store in stores:
        k, total = _shard_meta(store)
        totals.setdefault(total, store)
        if k in numbered:
            raise FeatureStoreError(
                f"shard {k}/{total} is given twice ({numbered[k].path} and {store.path}): the shards overlap; "
                "keep one of them"
            )
        numbered[k] = store
    if len(totals) > 1:
        (t1, s1), (t2, s2) = list(totals.items())[:2]
        raise FeatureStoreError(
            f"shard store {s2.path} is one of {t2} shards but {s1.path} one of {t1}: they come from "
            "different extractions; search the shards of one"
        )
    total = next(iter(totals))
    missing = [k for k in range(1, total + 1) if k not in numbered]
    if missing or any(k > total for k in numbered):
        gap = missing[0] if missing else max(numbered)
        raise FeatureStoreError(
            f"shard {gap}/{total} of the index is missing (the shards leave a gap): {len(numbered)} of "
            f"{total} shard stores found next to {stores[0].path}; extract it or give all shards"
        )
    ordered = [numbered[k] for k in range(1, total + 1)]
    first = ordered[0]
    for store in ordered[1:]:
        for what, value in (
            ("dimension", lambda s: s.dim),
            ("dtype", lambda s: s.dtype),
            ("store version", lambda s: s.meta.get("version")),
            ("normalization", lambda s: s.meta.get("normalized", True)),
        ):
            if value(store) != value(first):
                raise FeatureStoreError(
                    f"shard store {store.path} has {what} {value(store)!r} but {first.path} has "
                    f"{value(first)!r}; the shards of one index must match (re-extract that shard)"
                )
        for key in CONSISTENT_META_KEYS:
            a, b = store.meta.get(key), first.meta.get(key)
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                raise FeatureStoreError(
                    f"shard store {store.path} was extracted with another {key} ({a!r}) than {first.path} "
                    f"({b!r}): it is another version of the index; re-extract it with the same model and settings"
                )
    return ordered


@dataclasses.dataclass
class IndexLayout:
    """The stores of one index, in order, and where each starts among the global rows."""

    path: str
    stores: list
    offsets: list

    @property
    def count(self):
        return self.offsets[-1] + len(self.stores[-1]) if self.stores else 0

    @property
    def dim(self):
        return self.stores[0].dim

    @property
    def itemsize(self):
        return int(self.stores[0].embeddings.dtype.itemsize)

    @property
    def ids(self):
        """All index ids in global row order."""
        if len(self.stores) == 1:
            return self.stores[0].ids
        return [i for s in self.stores for i in s.ids]

    def pieces(self, start, stop):
        """``[(global_start, rows)]``: the stored rows of global rows [start, stop), one memmap
        view per store they fall in (nothing copied)."""
        out = []
        for store, offset in zip(self.stores, self.offsets):
            lo, hi = max(start, offset), min(stop, offset + len(store))
            if lo < hi:
                out.append((lo, store.embeddings[lo - offset : hi - offset]))
        return out


def open_index(path, world=1, rank=0, verify=True, read_ids=None):
    """The :class:`IndexLayout` of the index ``path`` (a store, or a folder of shard stores),
    memory-mapped and checked (:func:`check_tiling`). With ``verify`` each store is checked
    against its ``meta.json`` by one rank, the one holding its first row. The ids are read on rank
    0 only (it writes the results), unless ``read_ids``; another rank reads those of a store it
    verifies while it does, and lets them go."""
    read_ids = rank == 0 if read_ids is None else read_ids
    paths = index_store_paths(path)
    stores = check_tiling([load_features(p, mmap=True, verify=False, read_ids=read_ids) for p in paths])
    offsets = list(np.cumsum([0] + [len(s) for s in stores[:-1]]).tolist())
    layout = IndexLayout(io.abspath(path), stores, offsets)
    if read_ids and len(stores) > 1:
        check_no_repeats(stores)
    if verify:
        n = layout.count
        for store, offset in zip(stores, offsets):
            if len(store) and owner_of(offset, n, world) == rank:
                verify_store(store if store.ids is not None else load_features(store.path, mmap=True, verify=False))
    return layout


def check_no_repeats(stores):
    """A one-line :class:`FeatureStoreError` when an id is in two of the shard ``stores`` (shards
    that overlap: rows extracted twice)."""
    owner = {}
    for store in stores:
        for item in store.ids:
            first = owner.setdefault(item, store)
            if first is not store:
                raise FeatureStoreError(
                    f"id {item!r} is in shard store {first.path} and in {store.path}: the shards overlap; "
                    "give shards of one extraction, each once"
                )


def owner_of(row, count, world):
    """The rank whose :func:`shard_rows` slice holds global row ``row``."""
    return min(world - 1, row // max(1, -(-count // world)))


# ----------------------------------------------------------------------------- memory and mode


def estimate_memory(mode, count, dim, itemsize, queries, k, world, dba=False):
    """Bytes one process needs for sharded search in ``mode`` ("index" or "queries"): its mapped
    part of the index, the float32 queries it searches, the top-k lists (merge buffers included)
    and, with DBA, the augmented float32 rows it keeps."""
    if mode == "index":  # its rows; all queries; its lists and the merged ones; two gather blocks
        rows = -(-count // world)
        total = rows * dim * itemsize + queries * dim * 4 + queries * k * 12 * 2 + 2 * GATHER_ELEMENTS * 8
        return total + (rows * dim * 4 if dba else 0)
    # the whole index; its queries; all lists, gathered (packed in float64, twice) and unpacked
    total = count * dim * itemsize + -(-queries // world) * dim * 4 + queries * k * (16 * 2 + 12)
    return total + (2 * count * dim * 4 if dba else 0)


def choose_mode(mode, count, dim, itemsize, queries, k, world, dba=False, budget=None):
    """``mode``, or for "auto" the one to use: queries sharding when its estimate fits in
    :data:`AUTO_MEMORY_SHARE` of a process's memory and every rank gets at least
    :data:`QUERIES_PER_RANK` queries, else index sharding. Logs both estimates."""
    if mode not in SHARD_MODES:
        raise MetricError(f"--shard {mode!r}: choose one of {', '.join(SHARD_MODES)}")
    est = {m: estimate_memory(m, count, dim, itemsize, queries, k, world, dba) for m in ("index", "queries")}
    if budget is None:
        total = machine_memory()
        budget = total // du.local_processes() if total else None
    chosen = mode
    if mode == "auto" and world == 1:  # one process holds every row and query either way; queries
        chosen = "queries"  # sharding also lets SuperGlobal re-rank a folder of shard stores
    elif mode == "auto":
        fits = budget is None or est["queries"] <= AUTO_MEMORY_SHARE * budget
        chosen = "queries" if fits and queries >= QUERIES_PER_RANK * world else "index"
    logger.info(
        "sharded search over %d process(es): memory per process about %s with index sharding, %s with "
        "queries sharding (%s available per process); using %s sharding",
        world,
        format_bytes(est["index"]),
        format_bytes(est["queries"]),
        format_bytes(budget) if budget else "unknown",
        chosen,
    )
    return chosen


# ----------------------------------------------------------------------------- collectives


def _pack(scores, ids):
    return torch.from_numpy(np.concatenate([scores.astype(np.float64), ids.astype(np.float64)], axis=1))


def _unpack(packed, width):
    packed = packed.cpu().numpy()
    return packed[:, :width].astype(np.float32), packed[:, width:].astype(np.int64)


def gather_rows(x):
    """Every rank's rows of ``x`` (a CPU tensor) concatenated in rank order, as a CPU tensor."""
    if du.world_size() == 1:
        return x
    return du.all_gather_tensor(x.to(du.comm_device())).cpu()


def pad_columns(scores, ids, width):
    """``(scores, ids)`` cut or padded (score -inf, row -1) to ``width`` columns."""
    if scores.shape[1] >= width:
        return scores[:, :width], ids[:, :width]
    pad = ((0, 0), (0, width - scores.shape[1]))
    return np.pad(scores, pad, constant_values=-np.inf), np.pad(ids, pad, constant_values=-1)


class ShardedIndex:
    """One rank's part of a sharded index (``mode`` "index": its rows; "queries": all rows) and
    the collective operations of sharded search. Every method that takes queries takes the same
    queries on every rank and returns the same result on every rank.

    ``search_kwargs`` go to :func:`~metric.retrieval.search.search` (backend, device, chunk
    sizes); ``local_search(query, k) -> (scores, global rows)`` replaces the exact search of the
    rank's part (rows -1 / scores -inf pad missing results).
    """

    def __init__(self, layout, mode="index", world=1, rank=0, search_kwargs=None, local_search=None, devices=None):
        if mode not in ("index", "queries"):
            raise ValueError(f"mode {mode!r}")  # a bug in the caller: choose_mode resolves "auto"
        self.layout, self.mode, self.world, self.rank = layout, mode, world, rank
        self.count, self.dim = layout.count, layout.dim
        self.own = shard_rows(self.count, world, rank)  # the rows this rank answers for
        self.rows = self.own if mode == "index" else (0, self.count)  # the rows this rank maps
        self.pieces = layout.pieces(*self.rows)
        self.search_kwargs = dict(search_kwargs or {})
        self.devices = list(devices or [])
        self.local_search = local_search or self.exact_search
        if len(self.devices) > 1 and local_search is None:
            logger.info(
                "rank %d: its %d rows cut over %s, one part each (no replica per device)",
                rank,
                self.rows[1] - self.rows[0],
                ", ".join(map(str, self.devices)),
            )

    def exact_search(self, query, k):
        """Exact top-``k`` of ``query`` in this rank's rows, with global rows; with several
        ``devices`` the rows are cut into one contiguous part per device (no replica), each searched
        with the torch path on its device in its own thread, and the lists merged."""
        if len(self.devices) > 1:
            return search_on_devices(query, self.pieces, k, self.devices, self.search_kwargs)
        return search_pieces(query, self.pieces, k, self.search_kwargs)

    def topk(self, query, k):
        """The top-``k`` of ``query`` [Q, D] in the whole index: ``(scores, rows)`` [Q, min(k, N)],
        the same on every rank, equal to a single-process :func:`search` of the whole index."""
        width = min(k, self.count)
        nq = len(query)
        if self.mode == "queries":
            qa, qb = shard_rows(nq, self.world, self.rank)
            scores, ids = pad_columns(*self.local_search(query[qa:qb], k), width)
            with du.collective("the all-gather of the search results"):
                return _unpack(gather_rows(_pack(scores, ids)), width)
        scores, ids = pad_columns(*self.local_search(query, k), width)
        out_s = np.empty((nq, width), np.float32)
        out_i = np.empty((nq, width), np.int64)
        step = max(1, GATHER_ELEMENTS // max(1, 2 * width * self.world))
        for a in range(0, nq, step):
            b = min(nq, a + step)
            gathered = gather_rows(_pack(scores[a:b], ids[a:b]))
            parts = [_unpack(p, width) for p in gathered.split(b - a)]
            out_s[a:b], out_i[a:b] = pad_columns(*merge_topk([p[0] for p in parts], [p[1] for p in parts], k), width)
        return out_s, out_i

    def local_rows(self, rows):
        """Float32 rows of the index for global ``rows`` (sorted) that this rank maps."""
        out = np.empty((len(rows), self.dim), np.float32)
        for start, data in self.pieces:
            sel = np.flatnonzero((rows >= start) & (rows < start + len(data)))
            if sel.size:
                out[sel] = np.asarray(data[rows[sel] - start], dtype=np.float32)
        return out

    def rows_of(self, indices):
        """``(rows, vectors)``: the distinct global rows of ``indices`` (-1 ignored), sorted, and
        their float32 vectors. With index sharding each rank sends exactly the rows it holds."""
        rows = np.unique(indices[indices >= 0])
        if self.mode == "queries":
            return rows, self.local_rows(rows)
        mine = rows[(rows >= self.rows[0]) & (rows < self.rows[1])]
        with du.collective("the all-gather of neighbour vectors"):
            got_rows = gather_rows(torch.from_numpy(mine)).numpy()
            vectors = gather_rows(torch.from_numpy(self.local_rows(mine))).numpy()
        if not np.array_equal(got_rows, rows):  # every row is held by exactly one rank
            raise RuntimeError("gathered neighbour rows do not match the ones asked for")
        return rows, vectors

    def _expand(self, base, scores, indices, alpha):
        rows, vectors = self.rows_of(indices)
        if not len(rows):
            vectors = np.zeros((1, self.dim), np.float32)
        local = np.where(indices >= 0, np.searchsorted(rows, indices), -1)
        return expand(base, vectors, scores, local, alpha)

    def query_expansion(self, query, scores, indices, k, alpha=3.0):
        """αQE (:func:`~metric.retrieval.rerank.query_expansion`) with neighbours from every rank:
        the same float32 [Q, D] queries as a single process computes."""
        check_expansion(k, alpha, "query expansion")
        nq = len(query)
        out = np.empty((nq, self.dim), np.float32)
        step = max(1, EXPAND_ELEMENTS // max(1, k * self.dim))  # expand's row chunk: same chunks
        block = step * max(1, (1 << 16) // step)
        for a in range(0, nq, block):
            b = min(nq, a + block)
            out[a:b] = self._expand(query[a:b], scores[a:b, :k], indices[a:b, :k], alpha)
        return out

    def augment(self, k, alpha=3.0):
        """DBA (:func:`~metric.retrieval.rerank.database_augmentation`) of the whole index, each
        rank computing its own rows; afterwards this rank searches the augmented rows (float32)."""
        check_expansion(k, alpha, "database augmentation")
        kk = min(k + 1, self.count)
        a, b = self.own
        own = np.empty((b - a, self.dim), np.float32)
        if self.mode == "queries":
            queries = chunk_as_float32_rows(self.pieces, a, b, self.dim)
            scores, ids = pad_columns(*self.local_search(queries, kk), kk)
            scores, ids = drop_self(scores, ids, np.arange(a, b))
            rows = np.unique(ids[ids >= 0])
            local = np.where(ids >= 0, np.searchsorted(rows, ids), -1)
            own[:] = expand(queries, self.local_rows(rows), scores, local, alpha)
            with du.collective("the all-gather of the augmented index (DBA)"):
                full = gather_rows(torch.from_numpy(own)).numpy()
            self.pieces = [(0, full)]
        else:
            for src in range(self.world):
                sa, sb = shard_rows(self.count, self.world, src)
                logger.info("DBA: the rows %d..%d of rank %d as queries", sa, sb, src)
                for ca in range(sa, sb, DBA_CHUNK_ROWS):
                    cb = min(sb, ca + DBA_CHUNK_ROWS)
                    chunk = torch.empty((cb - ca, self.dim), dtype=torch.float32)
                    if src == self.rank:
                        chunk[:] = torch.from_numpy(chunk_as_float32_rows(self.pieces, ca, cb, self.dim))
                    if self.world > 1:
                        with du.collective("the broadcast of index rows (DBA)"):
                            sent = chunk.to(du.comm_device())
                            dist.broadcast(sent, src=src)
                            chunk = sent.cpu()
                    queries = chunk.numpy()
                    scores, ids = self.topk(queries, kk)
                    scores, ids = drop_self(scores, ids, np.arange(ca, cb))
                    expanded = self._expand(queries, scores, ids, alpha)
                    if src == self.rank:
                        own[ca - a : cb - a] = expanded
            self.pieces = [(a, own)] if b > a else []
        logger.info("database-side augmentation of %d vectors with K=%d, alpha=%g (sharded)", self.count, k, alpha)


def search_pieces(query, pieces, k, search_kwargs):
    """Exact top-``k`` of ``query`` in ``pieces`` (``[(global_start, rows)]``), with global rows."""
    blocks = [search(query, rows, k, **search_kwargs) for _, rows in pieces]
    if not blocks:
        return np.zeros((len(query), 0), np.float32), np.zeros((len(query), 0), np.int64)
    return merge_topk([s for s, _ in blocks], [i + start for (_, i), (start, _) in zip(blocks, pieces)], k)


def split_pieces(pieces, parts):
    """``pieces`` cut into ``parts`` lists of pieces holding contiguous, nearly equal runs of rows."""
    total = sum(len(rows) for _, rows in pieces)
    begin = pieces[0][0] if pieces else 0
    out = []
    for p in range(parts):
        a, b = shard_rows(total, parts, p)
        part = []
        for start, rows in pieces:  # the pieces are contiguous from `begin`
            lo, hi = max(a + begin, start), min(b + begin, start + len(rows))
            if lo < hi:
                part.append((lo, rows[lo - start : hi - start]))
        out.append(part)
    return out


def search_on_devices(query, pieces, k, devices, search_kwargs):
    """Exact top-``k`` of ``query`` in ``pieces`` cut over ``devices`` (torch devices, e.g. the
    GPUs of one process), one thread each with the torch path, merged by :func:`merge_topk`."""
    from concurrent.futures import ThreadPoolExecutor

    kwargs = dict(search_kwargs, backend="torch", progress=False)
    parts = split_pieces(pieces, len(devices))
    with ThreadPoolExecutor(len(devices)) as pool:
        futures = [
            pool.submit(search_pieces, query, part, k, dict(kwargs, device=str(dev)))
            for part, dev in zip(parts, devices)
        ]
        blocks = [f.result() for f in futures]
    return merge_topk([s for s, _ in blocks], [i for _, i in blocks], k)


def chunk_as_float32_rows(pieces, start, stop, dim):
    """Global rows [start, stop) of ``pieces`` (which must hold them) as one float32 array."""
    out = np.empty((stop - start, dim), np.float32)
    for begin, data in pieces:
        lo, hi = max(start, begin), min(stop, begin + len(data))
        if lo < hi:
            out[lo - start : hi - start] = chunk_as_float32(data, lo - begin, hi - begin)
    return out
