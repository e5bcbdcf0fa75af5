"""Exact top-k search by inner product (cosine similarity on L2-normalized vectors).

:func:`search` streams the index in chunks (a ``np.memmap`` is read chunk by
chunk) and keeps a running top-k per query, so memory is bounded by the chunk
sizes, never by ``Q x N``. Backends:

- ``torch``: ``torch.mm`` of a query chunk and an index chunk into a reused
  buffer and ``torch.topk`` on it; the candidates of a few chunks are then
  merged exactly (numpy ``lexsort`` on CPU, two sorts on CUDA); CPU or CUDA.
- ``faiss``: ``faiss.knn`` per index chunk on CPU (BLAS + heaps), or a flat
  index over all GPUs when faiss was built with GPU support.
- ``auto``: faiss on GPUs if it has them, else torch on CUDA if available,
  else :data:`CPU_AUTO_BACKEND` (the faster exact CPU path measured by
  ``benchmarks/search_bench.py``).

Float16 stores (and any other dtype) are converted to float32 one chunk at a time
(:func:`chunk_as_float32`) before the product, so products accumulate in float32 and
faiss gets the float32 blocks it needs; the extra memory is one chunk.

Tie-breaking (all backends): results are ordered by score, highest first, and
equal scores by ascending index position; at the k-th place the lower index
wins. This makes the output a deterministic function of the computed scores.
(Computed scores of two identical index vectors can still differ in the last
bit when BLAS blocks them differently, so chunk sizes may matter for exact
duplicates.)
"""

import logging

import numpy as np
import torch

from metric.retrieval.topk_merge import sort_topk
from metric.utils.errors import DataError, MetricError

logger = logging.getLogger(__name__)


def is_int(value):
    """Whether ``value`` is a Python or numpy integer (not a bool): how re-ranking and graph
    parameters are validated."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


BACKENDS = ("auto", "faiss", "torch")
# Faster exact CPU backend on 1,000 x 100,000 x 512, top-100 (benchmarks/search_bench.py on an
# idle 2-core AVX-512 machine: faiss.knn chunks 0.47-0.49 s, the torch path 0.65 s, a bare
# torch.mm 0.57-0.59 s; under heavy load from other processes the order can flip).
CPU_AUTO_BACKEND = "faiss"
# Scores buffer of the torch backend, in float32 elements per (query chunk x index chunk).
SCORE_BUFFER_ELEMENTS = 1 << 27
DEFAULT_QUERY_CHUNK = 4096
# Index rows per faiss chunk, in float32 elements (rows x dim).
FAISS_CHUNK_ELEMENTS = 1 << 26
# Candidates (scores + indices) held between merges, in elements over all queries.
PENDING_ELEMENTS = 1 << 24
# Largest k faiss's GPU k-selection supports.
FAISS_GPU_MAX_K = 2048


def as_matrix(x, name):
    """The 2-D embeddings of ``x`` (array, memmap, tensor or FeatureStore) without copying."""
    if hasattr(x, "embeddings") and hasattr(x, "ids"):
        x = x.embeddings
    if isinstance(x, torch.Tensor):
        x = x.detach()
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"{name} embeddings must be 2-D [N, D], got shape {tuple(x.shape)}")
    return x


def check_topk(topk):
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise MetricError(f"topk must be an integer >= 1, got {topk!r}")
    return int(topk)


def check_chunk_size(name, value):
    """``value`` as an int when it is an integer >= 1, ``None`` when it is ``None`` (the default
    chunking); a one-line :class:`MetricError` naming ``name`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise MetricError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_dims(query, index):
    if query.shape[1] != index.shape[1]:
        raise DataError(
            f"query dimension {query.shape[1]} does not match index dimension {index.shape[1]}; "
            "extract query and index with the same model"
        )


def faiss_num_gpus():
    """Number of GPUs faiss can use (0 without faiss, without GPU support or without GPUs)."""
    try:
        import faiss
    except ImportError:
        return 0
    try:
        return int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError):
        return 0


def check_device(device):
    """``device`` as a torch.device (None stays None); a clear error when it is unknown or unavailable."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise MetricError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MetricError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def resolve_backend(backend, device=None):
    """Map ``auto`` to a concrete ``(backend, device)``; validate the name and the device."""
    if backend not in BACKENDS:
        raise MetricError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = check_device(device)
    if backend == "auto":
        if device is not None:  # an explicit device: CUDA means torch there, CPU the CPU choice
            if device.type != "cpu":
                return "torch", device
            backend = CPU_AUTO_BACKEND
        elif faiss_num_gpus() > 0:
            return "faiss", None
        elif torch.cuda.is_available():
            return "torch", torch.device("cuda")
        else:
            backend = CPU_AUTO_BACKEND
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise MetricError("search backend 'faiss' needs the faiss package; pip install faiss-cpu") from None
        return "faiss", None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "torch", device


def chunk_as_float32(x, start, stop):
    """Rows [start, stop) of a numpy array/memmap or tensor as a contiguous float32 numpy array
    (a float16 store's rows are converted one chunk at a time)."""
    block = x[start:stop]
    if isinstance(block, torch.Tensor):
        return block.to("cpu", torch.float32).contiguous().numpy()
    if block.dtype == np.float32 and block.flags.c_contiguous and block.flags.writeable:
        return block
    return np.array(block, dtype=np.float32, order="C")


def check_finite(block, name, start):
    """Raise :class:`DataError` naming the first row of ``block`` (a float numpy array of the
    ``name`` embeddings whose first row is row ``start``) that holds NaN or infinite values.
    Search, the k-NN graph and k-reciprocal re-ranking check every block they read with it."""
    # A sum is NaN/inf when any element is (one cheap pass, no temporary array); a float32 sum of
    # large finite values can overflow too, so only then is every element checked.
    if not np.isfinite(block.sum()) and not np.isfinite(block).all():
        row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise DataError(f"{name} embedding row {row} has NaN or infinite values; re-extract or drop it")


# ----------------------------------------------------------------------------- top-k merging


def deterministic_topk(scores, k):
    """Each row's top ``k`` of a [q, c] tensor block (unordered), ties at the k-th place to the
    lower column: the tie rule every search and re-ranker here keeps (see the module doc).

    Returns ``(columns, values)``. ``torch.topk`` does the work; rows whose k-th and
    (k+1)-th values are equal are redone with the exact rule.
    """
    c = scores.shape[1]
    if k >= c:
        return torch.arange(c, device=scores.device).expand(scores.shape[0], c), scores.clone()
    vals, idx = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
    vals, idx = vals[:, :k], idx[:, :k]
    if tied.numel():
        rows = scores[tied]
        thresh = vals[tied, k - 1 : k]
        above = rows > thresh
        equal = rows == thresh
        need = k - above.sum(dim=1, keepdim=True)
        keep = above | (equal & (torch.cumsum(equal, dim=1) <= need))
        sel = torch.nonzero(keep)[:, 1].view(len(tied), k)  # row-major: ascending within a row
        idx = idx.clone()
        vals = vals.clone()
        idx[tied] = sel
        vals[tied] = rows.gather(1, sel)
    return idx, vals


def _merge_exact(scores, indices, k):
    """The first ``k`` of each row ordered by (score descending, index ascending)."""
    if scores.device.type == "cpu":  # numpy's lexsort is much faster than torch.sort on short rows
        s, i = sort_topk(scores.numpy(), indices.numpy(), k)
        return torch.from_numpy(s), torch.from_numpy(i)
    i, perm = torch.sort(indices, dim=1)
    s, perm2 = torch.sort(scores.gather(1, perm), dim=1, descending=True, stable=True)
    return s[:, :k].contiguous(), i.gather(1, perm2[:, :k])


class RunningTopK:
    """Candidates of one set of queries from successive index chunks, merged every few chunks
    (``add(scores, indices)`` per chunk, ``result()`` at the end: the top ``k`` of each query,
    ordered by score, ties to the lower index).

    Pending candidates of all ``total_queries`` queries stay below about
    :data:`PENDING_ELEMENTS` (at least two chunks' worth are kept before a merge).
    """

    def __init__(self, k, total_queries):
        self.k = k
        self.flush_columns = max(2 * k, min(8 * k, PENDING_ELEMENTS // max(1, total_queries)))
        self.scores, self.indices, self.columns = [], [], 0

    def add(self, scores, indices):
        self.scores.append(scores)
        self.indices.append(indices)
        self.columns += scores.shape[1]
        if self.columns >= self.flush_columns:
            self._flush()

    def _flush(self):
        scores, indices = _merge_exact(torch.cat(self.scores, 1), torch.cat(self.indices, 1), self.k)
        self.scores, self.indices, self.columns = [scores], [indices], scores.shape[1]

    def result(self):
        self._flush()
        return self.scores[0], self.indices[0]


# ----------------------------------------------------------------------------- backends


def _progress(total, enabled, desc):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="vec", unit_scale=total >= 10000, dynamic_ncols=True)


def _search_torch(query, index, k, device, chunk_size, query_chunk_size, progress):
    q_count, n = query.shape[0], index.shape[0]
    qc = min(q_count, query_chunk_size or DEFAULT_QUERY_CHUNK)
    ic = chunk_size or max(k + 1, SCORE_BUFFER_ELEMENTS // qc)
    ic = min(ic, n)
    if isinstance(query, torch.Tensor):
        q_all = query.to(device, torch.float32)
    else:
        q_all = torch.from_numpy(chunk_as_float32(query, 0, q_count)).to(device)
    if not torch.isfinite(q_all).all():
        check_finite(q_all.cpu().numpy(), "query", 0)
    buf = torch.empty(qc * ic, dtype=torch.float32, device=device)
    best = [RunningTopK(k, q_count) for _ in range(0, q_count, qc)]
    bar = _progress(n, progress, "search")
    for start in range(0, n, ic):
        stop = min(n, start + ic)
        if isinstance(index, torch.Tensor):
            xb = index[start:stop].to(device, torch.float32)
            if not torch.isfinite(xb).all():
                check_finite(xb.cpu().numpy(), "index", start)
        else:
            block = chunk_as_float32(index, start, stop)
            check_finite(block, "index", start)
            xb = torch.from_numpy(block).to(device, non_blocking=True)
        xbt = xb.t()
        for j, qs in enumerate(range(0, q_count, qc)):
            qe = min(q_count, qs + qc)
            scores = buf[: (qe - qs) * (stop - start)].view(qe - qs, stop - start)
            torch.mm(q_all[qs:qe], xbt, out=scores)
            idx, vals = deterministic_topk(scores, k)
            best[j].add(vals, idx + start)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    results = [b.result() for b in best]
    scores = torch.cat([r[0] for r in results]).cpu().numpy()
    indices = torch.cat([r[1] for r in results]).cpu().numpy()
    return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def _faiss_gpu_knn(xq, xb, k):
    import faiss

    cpu_index = faiss.IndexFlatIP(xb.shape[1])
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    gpu_index = faiss.index_cpu_to_all_gpus(cpu_index, co=co)
    gpu_index.add(xb)
    scores, idx = gpu_index.search(xq, k)
    gpu_index.reset()
    return scores, idx


def _search_faiss(query, index, k, chunk_size, progress):
    import faiss

    q_count, n = query.shape[0], index.shape[0]
    xq = chunk_as_float32(query, 0, q_count)
    check_finite(xq, "query", 0)
    ic = min(n, chunk_size or max(k + 1, FAISS_CHUNK_ELEMENTS // index.shape[1]))
    use_gpu = faiss_num_gpus() > 0 and k + 1 <= FAISS_GPU_MAX_K
    if faiss_num_gpus() > 0 and not use_gpu:
        logger.info("top-%d exceeds faiss's GPU limit (%d); searching with faiss on CPU", k, FAISS_GPU_MAX_K - 1)
    if use_gpu:  # sharded, not replicated: each GPU holds 1/G of a chunk of at most `ic` rows
        logger.info(
            "faiss on %d GPU(s): index chunks of %d rows, each sharded over them (no replica)", faiss_num_gpus(), ic
        )
    best = RunningTopK(k, q_count)
    bar = _progress(n, progress, "search")
    for start in range(0, n, ic):
        stop = min(n, start + ic)
        xb = chunk_as_float32(index, start, stop)
        check_finite(xb, "index", start)
        kk = min(k + 1, stop - start)
        if use_gpu:
            s, i = _faiss_gpu_knn(xq, xb, kk)
        else:
            s, i = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
        s, i = torch.from_numpy(s), torch.from_numpy(i)
        kc = min(k, stop - start)
        if kk > kc:
            tied = torch.nonzero(s[:, kc] == s[:, kc - 1]).flatten()
            s, i = s[:, :kc], i[:, :kc]
            if tied.numel():  # redo these rows exactly so the lower index wins the tie
                rows = torch.from_numpy(xq[tied.numpy()] @ xb.T)
                sel, vals = deterministic_topk(rows, kc)
                s, i = s.clone(), i.clone()
                s[tied], i[tied] = vals, sel
        best.add(s, i + start)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    scores, indices = best.result()
    return scores.numpy().astype(np.float32, copy=False), indices.numpy().astype(np.int64, copy=False)


def search(query, index, topk, backend="auto", chunk_size=None, device=None, query_chunk_size=None, progress=False):
    """Exact top-k inner-product search of ``query`` [Q, D] in ``index`` [N, D].

    Returns ``(scores, indices)``: float32 and int64 arrays [Q, k] with
    ``k = min(topk, N)``, best first, ties by ascending index (see module doc).
    ``chunk_size`` is the number of index rows per chunk and ``query_chunk_size``
    the number of queries per matrix product (torch backend); by default they
    keep a chunk's score block at 512 MB. Inputs may be numpy arrays, memmaps
    (streamed), torch tensors or FeatureStores; rows are assumed L2-normalized.
    """
    topk = check_topk(topk)
    query, index = as_matrix(query, "query"), as_matrix(index, "index")
    check_dims(query, index)
    check_chunk_size("chunk_size", chunk_size)
    check_chunk_size("query_chunk_size", query_chunk_size)
    backend, device = resolve_backend(backend, device)
    k = min(topk, index.shape[0])
    if k == 0 or query.shape[0] == 0:
        return np.zeros((query.shape[0], k), np.float32), np.zeros((query.shape[0], k), np.int64)
    logger.debug("search %s x %s top-%d with %s on %s", tuple(query.shape), tuple(index.shape), k, backend, device)
    if backend == "faiss":
        return _search_faiss(query, index, k, chunk_size, progress)
    return _search_torch(query, index, k, device, chunk_size, query_chunk_size, progress)
