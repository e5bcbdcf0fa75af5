"""Approximate search: faiss IVF-PQ and HNSW indexes trained on a feature store.

An index of type ``T`` lives in a folder (by default the store's own folder) as
``faiss_T.index`` plus ``faiss_T.json``, which records the build parameters, the
store's digest and count, the SHA-256 of the index file and the recall@k
measured at build time. :func:`load_ann_index` refuses an index whose store has
changed since (rebuild it) or whose file does not match its json. Both files
are written atomically (:func:`metric.utils.io.atomic_write`), the json last;
faiss reads the index from a local file (:func:`metric.utils.io.get_local_path`).

Recall@k is ``|approx top-k ∩ exact top-k| / k`` averaged over sample queries
(rows of a query store when given, else random rows of the index itself).
"""

import dataclasses
import hashlib
import logging
import math
import os
from typing import Optional

import numpy as np

from metric.retrieval.search import as_matrix, check_dims, check_topk, search
from metric.retrieval.store import load_features, read_json_object, store_digest
from metric.utils import io
from metric.utils.errors import FeatureStoreError, MetricError

logger = logging.getLogger(__name__)

ANN_TYPES = ("ivfpq", "hnsw")
ADD_CHUNK_ROWS = 65536


def ann_paths(index_dir, index_type):
    return (os.path.join(index_dir, f"faiss_{index_type}.index"), os.path.join(index_dir, f"faiss_{index_type}.json"))


def _check_type(index_type):
    if index_type not in ANN_TYPES:
        raise MetricError(f"unknown approximate index type {index_type!r}; choose one of {', '.join(ANN_TYPES)}")


def _positive(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MetricError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def default_nlist(n):
    """About 4 sqrt(N) inverted lists (a power of two), at most N / 39 so k-means has data."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return max(1, min(target, n // 39))


def default_pq_m(dim):
    """Sub-quantizers for PQ: the largest divisor of ``dim`` that is at most dim / 8 (8 dims each)."""
    limit = max(1, dim // 8)
    return max(m for m in range(1, limit + 1) if dim % m == 0)


@dataclasses.dataclass(frozen=True)
class AnnOptions:
    """How :func:`build_ann_index` builds an approximate index (``tools/build_index.py``'s options).

    Only the fields of ``index_type`` are used and checked (the IVF-PQ ones for ``"ivfpq"``, the
    HNSW ones for ``"hnsw"``), plus the recall check's; a bad value is a one-line
    :class:`MetricError` at construction. ``None`` means "derived from the store" where noted.
    """

    index_type: str = "ivfpq"  # one of ANN_TYPES: "ivfpq" (faiss IVF-PQ) or "hnsw" (faiss HNSW over the vectors)
    nlist: Optional[int] = None  # IVF lists; None: default_nlist(N), about 4 sqrt(N)
    m: Optional[int] = None  # PQ sub-quantizers, must divide the dimension; None: default_pq_m(D), about D / 8
    nbits: int = 8  # bits per PQ code, 1..16
    nprobe: Optional[int] = None  # IVF lists visited per query, saved as the index's default; None: min(nlist, 32)
    train_size: Optional[int] = None  # IVF-PQ training vectors; None: max(100000, 40 nlist), at most N
    hnsw_m: int = 32  # HNSW neighbours per node, >= 2
    ef_construction: int = 80  # HNSW build depth
    ef_search: int = 128  # HNSW search depth, saved as the index's default
    sample: int = 1000  # queries of the recall check (at most the number available)
    recall_k: int = 100  # k of the recall@k measured against exact search
    seed: int = 0  # seed of the training sample and of the recall sample, >= 0

    def __post_init__(self):
        _check_type(self.index_type)
        if self.index_type == "ivfpq":
            checks = [
                ("nlist", 1, True),
                ("m", 1, True),
                ("nbits", 1, False),
                ("nprobe", 1, True),
                ("train_size", 1, True),
            ]
        else:
            checks = [("hnsw_m", 2, False), ("ef_construction", 1, False), ("ef_search", 1, False)]
        for name, low, optional in checks + [("sample", 1, False), ("recall_k", 1, False), ("seed", 0, False)]:
            value = getattr(self, name)
            if not (optional and value is None):
                object.__setattr__(self, name, _positive(name, value, low))
        if self.index_type == "ivfpq" and self.nbits > 16:
            raise MetricError(f"nbits must be at most 16, got {self.nbits}")


@dataclasses.dataclass(frozen=True)
class AnnSearchOptions:
    """Which saved approximate index a search uses, and its query-time settings
    (``tools/search.py --ann``); checked at construction (one-line :class:`MetricError`)."""

    index_type: Optional[str] = None  # one of ANN_TYPES (or "ivfflat", sharded); None: the only one in index_dir
    index_dir: Optional[str] = None  # folder of the index; None: the index store's own folder
    nprobe: Optional[int] = None  # IVF lists visited per query; None: as saved at build time
    ef_search: Optional[int] = None  # HNSW search depth; None: as saved at build time

    def __post_init__(self):
        if self.index_type is not None and self.index_type != "ivfflat":  # ivfflat: sharded indexes only
            _check_type(self.index_type)
        for name in ("nprobe", "ef_search"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive(name, getattr(self, name)))


def set_search_params(index, params, nprobe=None, ef_search=None):
    """Apply query-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW)."""
    import faiss

    if params["type"] != "hnsw":  # an IVF index: "ivfpq", or a shard of metric.retrieval.ann_sharded
        nprobe = _positive("nprobe", params["nprobe"] if nprobe is None else nprobe)
        faiss.extract_index_ivf(index).nprobe = min(nprobe, params["nlist"])
    else:
        index.hnsw.efSearch = _positive("ef_search", params["ef_search"] if ef_search is None else ef_search)


def ann_search(index, params, query, topk, nprobe=None, ef_search=None, progress=False, chunk=16384):
    """Top-k by approximate inner product; missing results have index -1 and score -inf."""
    topk = check_topk(topk)
    query = as_matrix(query, "query")
    if query.shape[1] != params["dim"]:
        raise MetricError(
            f"query dimension {query.shape[1]} does not match index dimension {params['dim']}; "
            "extract query and index with the same model"
        )
    set_search_params(index, params, nprobe, ef_search)
    k = min(topk, params["count"])
    q = query.shape[0]
    scores = np.full((q, k), -np.inf, np.float32)
    indices = np.full((q, k), -1, np.int64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=q, desc="ann search", unit="query", dynamic_ncols=True)
    for start in range(0, q, chunk):
        block = np.array(query[start : start + chunk], dtype=np.float32, order="C")
        if k:
            s, i = index.search(block, k)
            scores[start : start + len(block)] = s
            indices[start : start + len(block)] = i
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()
    scores[indices < 0] = -np.inf
    return scores, indices


def recall_at_k(approx, exact, k):
    """Mean over rows of |approx[:, :k] ∩ exact[:, :k]| / min(k, exact columns)."""
    approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    if exact.shape[1] == 0 or exact.shape[0] == 0:
        return 1.0
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / exact.shape[1])


def _make_ivfpq(dim, nlist, m, nbits):
    import faiss

    if dim % m:
        raise MetricError(f"--m {m} must divide the dimension {dim} (PQ sub-quantizers); try {default_pq_m(dim)}")
    return faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_INNER_PRODUCT)


def build_ann_index(store_path, options=None, out_dir=None, query_path=None, verify=True, progress=False):
    """Train and fill an approximate index on the store at ``store_path`` as ``options`` (an
    :class:`AnnOptions`; default: IVF-PQ with the derived settings) say, save it into ``out_dir``
    (default: the store's folder), measure recall@k against exact search on sample queries (rows
    of the store at ``query_path``, default: of the index store itself); return its parameters.
    ``verify``: check the stores against their ``meta.json`` while loading them."""
    import faiss

    options = AnnOptions() if options is None else options
    index_type = options.index_type
    store = load_features(store_path, mmap=True, verify=verify)
    out_dir = io.abspath(out_dir or store.path)
    if not io.isdir(out_dir):
        raise MetricError(f"index output folder {out_dir} does not exist; create it first")
    for path in ann_paths(out_dir, index_type):
        io.check_output_path(path, "index")  # writable, before the long build
    n, dim = len(store), store.dim
    if n == 0:
        raise FeatureStoreError(f"store {store.path} is empty; nothing to index")
    rng = np.random.default_rng(options.seed)
    params = {
        "type": index_type,
        "dim": dim,
        "count": n,
        "store": store.path,
        "store_digest": store_digest(store),
        "seed": options.seed,
    }
    if index_type == "ivfpq":
        nlist = options.nlist if options.nlist is not None else default_nlist(n)
        m = options.m if options.m is not None else default_pq_m(dim)
        nbits = options.nbits
        train_size = min(n, options.train_size if options.train_size is not None else max(100_000, 40 * nlist))
        need = max(nlist, 2**nbits)
        if train_size < need:
            raise MetricError(
                f"IVF-PQ with nlist={nlist}, nbits={nbits} needs at least {need} training vectors but the store "
                f"has {n} (train size {train_size}); lower --nlist/--nbits or use --type hnsw"
            )
        nprobe = options.nprobe if options.nprobe is not None else min(nlist, 32)
        params.update(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size)
        index = _make_ivfpq(dim, nlist, m, nbits)
        rows = np.sort(rng.choice(n, size=train_size, replace=False))
        logger.info("training %s on %d vectors", index_type, train_size)
        index.train(np.array(store.embeddings[rows], dtype=np.float32))
    else:
        params.update(hnsw_m=options.hnsw_m, ef_construction=options.ef_construction, ef_search=options.ef_search)
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"add to {index_type}", unit="vec", unit_scale=n >= 10000, dynamic_ncols=True)
    for start in range(0, n, ADD_CHUNK_ROWS):
        block = np.array(store.embeddings[start : start + ADD_CHUNK_ROWS], dtype=np.float32)
        index.add(block)
        if bar is not None:
            bar.update(len(block))
    if bar is not None:
        bar.close()

    # recall@k against exact search on sample queries
    if query_path is not None:
        queries = load_features(query_path, mmap=True, verify=verify).embeddings
        check_dims(queries, store.embeddings)
        params["recall_queries"] = io.abspath(query_path)
    else:
        queries = store.embeddings
        params["recall_queries"] = "index sample"
    sample, recall_k = min(options.sample, len(queries)), options.recall_k
    rows = np.sort(rng.choice(len(queries), size=sample, replace=False))
    sample_q = np.array(queries[rows], dtype=np.float32)
    _, exact = search(sample_q, store.embeddings, recall_k)
    _, approx = ann_search(index, params, sample_q, recall_k)
    params["recall_k"] = recall_k
    params["recall_sample"] = sample
    params["recall"] = recall_at_k(approx, exact, recall_k)

    index_path, json_path = ann_paths(out_dir, index_type)
    params["index_sha256"] = write_faiss_index(index, index_path)
    io.write_json_atomic(json_path, params, what="index description", indent=1, sort_keys=True)
    params["index_path"] = index_path
    logger.info("saved %s with recall@%d = %.4f", index_path, recall_k, params["recall"])
    return params


def write_faiss_index(index, path):
    """Write a faiss index atomically through the path manager (streamed, no second copy in
    memory); returns the SHA-256 of the bytes written."""
    import faiss

    digest = hashlib.sha256()
    with io.atomic_write(path, "wb", what="index") as f:

        def write(data):
            digest.update(data)
            f.write(data)
            return len(data)

        writer = faiss.PyCallbackIOWriter(write)
        faiss.write_index(index, writer)
        del writer  # flushes the writer's buffer
    return digest.hexdigest()


def find_ann_type(index_dir, index_type=None):
    """The index type saved in ``index_dir`` (the only one there, or ``index_type``)."""
    if index_type is not None:
        _check_type(index_type)
        return index_type
    found = [t for t in ANN_TYPES if io.isfile(ann_paths(index_dir, t)[1])]
    if not found:
        raise FeatureStoreError(f"no approximate index in {index_dir}; build one with tools/build_index.py")
    if len(found) > 1:
        raise MetricError(
            f"{index_dir} holds several approximate indexes ({', '.join(found)}); choose one with --ann-type"
        )
    return found[0]


def load_ann_index(store, index_type=None, index_dir=None, verify=True):
    """Load the saved index of ``store`` (a FeatureStore, or a path loaded with ``verify``);
    return ``(faiss index, params)``."""
    import faiss

    if not hasattr(store, "meta"):
        store = load_features(store, mmap=True, verify=verify)
    index_dir = io.abspath(index_dir or store.path)
    index_type = find_ann_type(index_dir, index_type)
    index_path, json_path = ann_paths(index_dir, index_type)
    if not io.isfile(json_path) or not io.isfile(index_path):
        raise FeatureStoreError(
            f"no {index_type} index in {index_dir}; build one with tools/build_index.py --type {index_type}"
        )
    params = read_json_object(json_path, "rebuild the index")
    if params.get("store_digest") != store_digest(store) or params.get("count") != len(store):
        raise FeatureStoreError(
            f"{index_path} was built for a different version of store {store.path}; "
            "rebuild it with tools/build_index.py"
        )
    if params.get("index_sha256") != io.file_sha256(index_path):
        raise FeatureStoreError(f"{index_path} does not match {json_path} (interrupted build?); rebuild the index")
    index = faiss.read_index(io.get_local_path(index_path))
    return index, params
