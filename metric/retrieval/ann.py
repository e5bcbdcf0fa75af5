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

import hashlib
import logging
import math
import os

import numpy as np

from metric.utils import io
from metric.utils.errors import FeatureStoreError, MetricError
from metric.retrieval.search import as_matrix, check_dims, check_topk, search
from metric.retrieval.store import load_features, read_json_object

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


def _file_sha256(path):
    h = hashlib.sha256()
    with io.open_path(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _store_digest(store):
    digest = store.meta.get("digest")
    if not digest:
        raise FeatureStoreError(f"store {store.path} has no digest in meta.json; re-create it with this pymetric")
    return digest


def set_search_params(index, params, nprobe=None, ef_search=None):
    """Apply query-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW)."""
    import faiss

    if params["type"] == "ivfpq":
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


def _make_index(index_type, dim, n, nlist, m, nbits, hnsw_m, ef_construction):
    import faiss

    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    if dim % m:
        raise MetricError(f"--m {m} must divide the dimension {dim} (PQ sub-quantizers); try {default_pq_m(dim)}")
    return faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{nbits}", faiss.METRIC_INNER_PRODUCT)


def build_ann_index(store_path, index_type="ivfpq", out_dir=None, nlist=None, m=None, nbits=8, nprobe=None,
                    hnsw_m=32, ef_construction=80, ef_search=128, train_size=None, query_path=None,
                    sample=1000, recall_k=100, seed=0, progress=False):
    """Train and fill an approximate index on a store, save it, measure recall@k; return its parameters."""
    import faiss

    _check_type(index_type)
    store = load_features(store_path, mmap=True)
    out_dir = io.abspath(out_dir or store.path)
    if not io.isdir(out_dir):
        raise MetricError(f"index output folder {out_dir} does not exist; create it first")
    for path in ann_paths(out_dir, index_type):
        io.check_output_path(path, "index")  # writable, before the long build
    n, dim = len(store), store.dim
    if n == 0:
        raise FeatureStoreError(f"store {store.path} is empty; nothing to index")
    rng = np.random.default_rng(seed)
    params = {"type": index_type, "dim": dim, "count": n, "store": store.path,
              "store_digest": _store_digest(store), "seed": seed}
    if index_type == "ivfpq":
        nlist = _positive("nlist", nlist if nlist is not None else default_nlist(n))
        m = _positive("m", m if m is not None else default_pq_m(dim))
        nbits = _positive("nbits", nbits)
        if nbits > 16:
            raise MetricError(f"nbits must be at most 16, got {nbits}")
        train_size = _positive("train_size", train_size if train_size is not None else min(n, max(100_000, 40 * nlist)))
        train_size = min(train_size, n)
        need = max(nlist, 2 ** nbits)
        if train_size < need:
            raise MetricError(
                f"IVF-PQ with nlist={nlist}, nbits={nbits} needs at least {need} training vectors but the store "
                f"has {n} (train size {train_size}); lower --nlist/--nbits or use --type hnsw"
            )
        nprobe = _positive("nprobe", nprobe if nprobe is not None else min(nlist, 32))
        params.update(nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size)
    else:
        hnsw_m = _positive("hnsw_m", hnsw_m, 2)
        params.update(hnsw_m=hnsw_m, ef_construction=_positive("ef_construction", ef_construction),
                      ef_search=_positive("ef_search", ef_search))
    index = _make_index(index_type, dim, n, nlist, m, nbits, hnsw_m, ef_construction)
    if index_type == "ivfpq":
        rows = np.sort(rng.choice(n, size=train_size, replace=False))
        logger.info("training %s on %d vectors", index_type, train_size)
        index.train(np.array(store.embeddings[rows], dtype=np.float32))
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
        queries = load_features(query_path, mmap=True).embeddings
        check_dims(queries, store.embeddings)
        params["recall_queries"] = io.abspath(query_path)
    else:
        queries = store.embeddings
        params["recall_queries"] = "index sample"
    sample = min(_positive("sample", sample), len(queries))
    rows = np.sort(rng.choice(len(queries), size=sample, replace=False))
    sample_q = np.array(queries[rows], dtype=np.float32)
    _, exact = search(sample_q, store.embeddings, recall_k)
    _, approx = ann_search(index, params, sample_q, recall_k)
    params["recall_k"] = recall_k
    params["recall_sample"] = sample
    params["recall"] = recall_at_k(approx, exact, recall_k)

    index_path, json_path = ann_paths(out_dir, index_type)
    params["index_sha256"] = _write_index(faiss, index, index_path)
    io.write_json_atomic(json_path, params, what="index description", indent=1, sort_keys=True)
    params["index_path"] = index_path
    logger.info("saved %s with recall@%d = %.4f", index_path, recall_k, params["recall"])
    return params


def _write_index(faiss, index, path):
    """Write a faiss index atomically through the path manager (streamed, no second copy in
    memory); returns the SHA-256 of the bytes written."""
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
        raise MetricError(f"{index_dir} holds several approximate indexes ({', '.join(found)}); choose one with --ann-type")
    return found[0]


def load_ann_index(store, index_type=None, index_dir=None):
    """Load the saved index of ``store`` (a FeatureStore or path); return ``(faiss index, params)``."""
    import faiss

    if not hasattr(store, "meta"):
        store = load_features(store, mmap=True)
    index_dir = io.abspath(index_dir or store.path)
    index_type = find_ann_type(index_dir, index_type)
    index_path, json_path = ann_paths(index_dir, index_type)
    if not io.isfile(json_path) or not io.isfile(index_path):
        raise FeatureStoreError(f"no {index_type} index in {index_dir}; build one with tools/build_index.py --type {index_type}")
    params = read_json_object(json_path, "rebuild the index")
    if params.get("store_digest") != _store_digest(store) or params.get("count") != len(store):
        raise FeatureStoreError(
            f"{index_path} was built for a different version of store {store.path}; "
            "rebuild it with tools/build_index.py"
        )
    if params.get("index_sha256") != _file_sha256(index_path):
        raise FeatureStoreError(f"{index_path} does not match {json_path} (interrupted build?); rebuild the index")
    index = faiss.read_index(io.get_local_path(index_path))
    return index, params
