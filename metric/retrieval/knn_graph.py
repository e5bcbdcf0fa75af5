"""The exact k-NN graph of an index (for k-reciprocal re-ranking), built in bounded memory and
kept next to the feature store.

:func:`build_index_graph` gives every index row its ``width`` nearest rows (itself included,
best first, ties to the lower row), their similarities, and its smallest similarity to any row
(its farthest item, which k-reciprocal re-ranking needs to normalize distances). Blocks of
:data:`GRAPH_ROWS` rows stream the whole index once each, with torch matrix products on the CPU or
CUDA (top-k and minimum from the same product): ``N x N x D`` multiply-adds in all, memory bounded
by the blocks.

:func:`save_index_graph` writes ``knn_graph.npz`` (``neighbours``, ``scores``, ``min_sim``) and
``knn_graph.json`` (width, count, the store's digest) into the store folder or another one
(``tools/build_index.py --type knn``); :func:`load_index_graph` refuses, in one line, a graph of
another version of the store or one narrower than needed.
"""

import dataclasses
import os

import numpy as np
import torch

from metric.retrieval.search import (
    RunningTopK,
    as_matrix,
    check_finite,
    chunk_as_float32,
    deterministic_topk,
    is_int,
    resolve_backend,
)
from metric.retrieval.store import load_features, read_json_object, store_digest
from metric.utils import io
from metric.utils.errors import FeatureStoreError, MetricError

# float32 elements of a block of similarities (rows x index chunk).
GATHER_ELEMENTS = 1 << 25
# Rows per block (each block streams the whole index once).
GRAPH_ROWS = 1 << 12
GRAPH_FILES = ("knn_graph.npz", "knn_graph.json")
GRAPH_VERSION = 1


@dataclasses.dataclass
class IndexGraph:
    """The index part of the k-NN graph: each row's ``width`` nearest index rows (itself included,
    best first, ties to the lower row), their similarities, and its smallest similarity to any
    index row (its farthest item)."""

    neighbours: np.ndarray  # [N, width] int64
    scores: np.ndarray  # [N, width] float32
    min_sim: np.ndarray  # [N] float32

    @property
    def width(self):
        return int(self.neighbours.shape[1])


def block_rows(x, start, stop):
    b = x[start:stop]
    if isinstance(b, torch.Tensor):
        return b.to("cpu", torch.float32).contiguous().numpy()
    return np.array(b, dtype=np.float32, order="C")


def knn_rows(rows, base, k, dev, chunk_size=None):
    """Top-``k`` of float32 ``rows`` [r, D] in ``base`` [N, D] (best first, ties to the lower row)
    and each row's smallest similarity, in one pass of torch matrix products over ``base`` chunks
    on ``dev``: ``(scores [r, k], indices [r, k], min_sim [r])`` as numpy arrays."""
    r, n = rows.shape[0], base.shape[0]
    k = min(k, n)
    q = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(dev)
    ic = min(n, chunk_size or max(k + 1, GATHER_ELEMENTS // max(1, r)))
    best = RunningTopK(k, r)
    mins = torch.full((r,), float("inf"), device=dev)
    for start in range(0, n, ic):
        stop = min(n, start + ic)
        if isinstance(base, torch.Tensor):
            xb = base[start:stop].to(dev, torch.float32)
        else:
            xb = torch.from_numpy(chunk_as_float32(base, start, stop)).to(dev)
        sims = q @ xb.T
        idx, vals = deterministic_topk(sims, min(k, stop - start))
        best.add(vals, idx + start)
        mins = torch.minimum(mins, sims.amin(1))
        del sims
    scores, indices = best.result()
    return (
        scores.cpu().numpy().astype(np.float32, copy=False),
        indices.cpu().numpy().astype(np.int64, copy=False),
        mins.cpu().numpy(),
    )


def build_index_graph(index, width, device=None, chunk_size=None, progress=False):
    """:class:`IndexGraph` of ``index`` [N, D] with ``width`` neighbours per row: exact, with torch
    on ``device`` (default: CUDA if available), in blocks of :data:`GRAPH_ROWS` rows, each one
    pass over the index (``N x N x D`` multiply-adds in all)."""
    index = as_matrix(index, "index")
    n = index.shape[0]
    if not is_int(width) or width < 1:
        raise MetricError(f"graph width must be an integer >= 1, got {width!r}")
    _, dev = resolve_backend("torch", device)
    width = min(int(width), n)
    nb = np.zeros((n, width), np.int64)
    sc = np.zeros((n, width), np.float32)
    mins = np.zeros(n, np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="k-NN graph", unit="vec", unit_scale=n >= 10000, dynamic_ncols=True)
    for start in range(0, n, GRAPH_ROWS):
        stop = min(n, start + GRAPH_ROWS)
        block = block_rows(index, start, stop)
        check_finite(block, "index", start)
        sc[start:stop], nb[start:stop], mins[start:stop] = knn_rows(block, index, width, dev, chunk_size)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return IndexGraph(nb, sc, mins)


def graph_paths(graph_dir):
    return tuple(os.path.join(graph_dir, name) for name in GRAPH_FILES)


def save_index_graph(store, graph, graph_dir=None):
    """Save ``graph`` of ``store`` (a FeatureStore) into ``graph_dir`` (default: the store folder);
    returns the description written (with the store's digest, so a changed store is refused)."""
    graph_dir = io.abspath(graph_dir or store.path)
    if not io.isdir(graph_dir):
        raise MetricError(f"graph output folder {graph_dir} does not exist; create it first")
    npz_path, json_path = graph_paths(graph_dir)
    for path in (npz_path, json_path):
        io.check_output_path(path, "k-NN graph")
    with io.atomic_write(npz_path, "wb", what="k-NN graph") as f:
        np.savez(f, neighbours=graph.neighbours, scores=graph.scores, min_sim=graph.min_sim)
    desc = {
        "type": "knn",
        "version": GRAPH_VERSION,
        "width": graph.width,
        "count": int(len(graph.min_sim)),
        "store": store.path,
        "store_digest": store_digest(store),
        "graph_sha256": io.file_sha256(npz_path),
    }
    io.write_json_atomic(json_path, desc, what="k-NN graph description", indent=1, sort_keys=True)
    desc["path"] = npz_path
    return desc


def has_index_graph(store, graph_dir=None):
    return all(io.isfile(p) for p in graph_paths(io.abspath(graph_dir or store.path)))


def load_index_graph(store, width, graph_dir=None):
    """The saved graph of ``store`` cut to ``width`` columns; a one-line error when it is missing,
    was built for another version of the store, or is narrower than ``width``."""
    graph_dir = io.abspath(graph_dir or store.path)
    npz_path, json_path = graph_paths(graph_dir)
    fix = f"build it with tools/build_index.py --index {store.path} --type knn --knn {max(1, width - 1)}"
    if not (io.isfile(npz_path) and io.isfile(json_path)):
        raise FeatureStoreError(
            f"store {store.path} has no k-NN graph in {graph_dir} (needed for k-reciprocal "
            f"re-ranking with --kr-graph saved); {fix}"
        )
    desc = read_json_object(json_path, fix)
    if desc.get("store_digest") != store_digest(store) or desc.get("count") != len(store):
        raise FeatureStoreError(f"{npz_path} was built for a different version of store {store.path}; {fix}")
    if int(desc.get("width", 0)) < min(width, len(store)):
        raise FeatureStoreError(
            f"{npz_path} holds {int(desc.get('width', 1)) - 1} neighbours per item but "
            f"k-reciprocal re-ranking with k1={width - 1} needs {width - 1}; {fix}"
        )
    if desc.get("graph_sha256") != io.file_sha256(npz_path):
        raise FeatureStoreError(f"{npz_path} does not match {json_path} (interrupted build?); {fix}")
    with np.load(io.get_local_path(npz_path), allow_pickle=False) as data:
        nb, sc, mins = data["neighbours"], data["scores"], data["min_sim"]
    if nb.shape != (len(store), desc["width"]) or sc.shape != nb.shape or mins.shape != (len(store),):
        raise FeatureStoreError(f"{npz_path} does not match {json_path} (interrupted build?); {fix}")
    return IndexGraph(nb[:, :width].astype(np.int64), sc[:, :width].astype(np.float32), mins.astype(np.float32))


def build_store_graph(store_path, k=20, out_dir=None, device=None, progress=False, verify=True):
    """Build the graph of the store at ``store_path`` with ``k`` neighbours besides each item itself
    (width ``k + 1``, enough for k-reciprocal re-ranking with ``k1 <= k``) and save it into
    ``out_dir`` (default: the store's folder); returns the description written, with ``path``.
    ``verify``: check the store against its ``meta.json`` when loading it."""
    if not is_int(k) or k < 1:
        raise MetricError(f"--knn must be an integer >= 1, got {k!r}")
    store = load_features(store_path, mmap=True, verify=verify)
    if len(store) == 0:
        raise FeatureStoreError(f"store {store.path} is empty; nothing to build a graph of")
    if k >= len(store):
        raise MetricError(
            f"--knn {k} needs more than {k} items, the store has {len(store)}; "
            + (f"use --knn {len(store) - 1} or less" if len(store) > 1 else "a graph needs at least 2 items")
        )
    graph_dir = io.abspath(out_dir or store.path)
    if not io.isdir(graph_dir):
        raise MetricError(f"graph output folder {graph_dir} does not exist; create it first")
    for path in graph_paths(graph_dir):
        io.check_output_path(path, "k-NN graph")  # writable, before the long build
    graph = build_index_graph(store.embeddings, k + 1, device=device, progress=progress)
    return save_index_graph(store, graph, graph_dir)
