"""IVF indexes past one machine: one trained quantizer, one faiss IVF(-PQ) index per shard.

The index of a sharded search (:mod:`metric.retrieval.sharded`: one store, or the shard stores of
a sharded extraction) is cut into shards (:func:`plan_shards`): the contiguous global rows that
:func:`~metric.retrieval.topk_merge.shard_rows` gives rank ``r`` of ``W`` (the cut of sharded
search), or one shard per shard store. :func:`train_ivf` trains the coarse quantizer (and the PQ
codebooks) ONCE, on a sample drawn uniformly across all rows of all stores; :func:`build_ivf_shards`
adds each shard's rows to a copy of that trained index in chunks of :data:`ADD_CHUNK_ROWS`
(memory: one chunk, the training sample and the shard's index, never a store) and writes one
index per shard. Because every shard starts from the same trained index, a list of shard ``r``
holds exactly the rows of that list of a single index built from the same quantizer, so a search
of all shards merged by score (:func:`~metric.retrieval.topk_merge.merge_topk`) returns what the
single index returns with the same ``nprobe``.

Files in the index folder (``tools/build_index.py --shards W``; by default the index folder)::

    faiss_<type>.trained              the trained, empty index (quantizer + PQ codebooks)
    faiss_<type>.trained.json         its settings, SHA-256 ("quantizer digest") and training sample
    faiss_<type>.shard-R-of-W.index   shard R (0-based) of W
    faiss_<type>.shard-R-of-W.json    written last: the quantizer digest, the stores (digest, count)
                                      and the global rows [start, stop) of the shard, the file's SHA-256

:func:`load_ivf_shard` refuses, in one line naming the shard file, a shard that is missing,
built for other stores (another version, count or order), of another dimension, or whose file
does not match its json; :func:`check_shard_group` refuses shards of one search built from
different trained quantizers, for different layouts, or that do not tile the rows. Training and
the shard builds can run on different machines: train once (``--train-only``), then build shard
R anywhere the stores are (``--shard-rank R``) with the trained file. Under torchrun,
``tools/search.py --ann`` plugs :func:`ivf_local_search` into the sharded search.
"""

import dataclasses
import hashlib
import logging
import os
import re
from typing import Optional

import numpy as np

from metric.retrieval.ann import ann_search, default_nlist, default_pq_m, recall_at_k, write_faiss_index
from metric.retrieval.search import search
from metric.retrieval.sharded import agree
from metric.retrieval.store import read_json_object, store_digest
from metric.retrieval.topk_merge import merge_topk, shard_rows
from metric.utils import distributed as du
from metric.utils import io, lock
from metric.utils.errors import FeatureStoreError, MetricError

logger = logging.getLogger(__name__)

SHARDED_TYPES = ("ivfpq", "ivfflat")  # IVF with PQ codes; IVF with the float32 vectors (exact scores)
ADD_CHUNK_ROWS = 65536  # rows converted to float32 and added to a shard's index at a time
SAMPLE_CHUNK_ROWS = 65536  # training rows gathered from the stores at a time
FORMAT = "pymetric-ivf-shard"


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MetricError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ShardedIvfOptions:
    """How :func:`train_ivf` / :func:`build_ivf_shards` build (``tools/build_index.py --shards``).
    Checked at construction (one-line :class:`MetricError`); ``None`` means derived from the stores."""

    index_type: str = "ivfpq"  # one of SHARDED_TYPES
    nlist: Optional[int] = None  # IVF lists; None: default_nlist(total rows), about 4 sqrt(N)
    m: Optional[int] = None  # ivfpq: PQ sub-quantizers, must divide the dimension; None: about D / 8
    nbits: int = 8  # ivfpq: bits per PQ code, 1..16
    nprobe: Optional[int] = None  # lists visited per query, saved as the default; None: min(nlist, 32)
    train_size: Optional[int] = None  # training rows; None: max(100000, 40 nlist), at most N
    sample: int = 1000  # queries (rows of the shard) of each shard's recall check; 0: no check
    recall_k: int = 100  # k of that recall@k
    seed: int = 0  # seed of the training sample and of the recall samples

    def __post_init__(self):
        if self.index_type not in SHARDED_TYPES:
            raise MetricError(
                f"sharded indexes are IVF ones: choose --type {' or '.join(SHARDED_TYPES)}, not {self.index_type!r}"
            )
        for name, low in (("nlist", 1), ("m", 1), ("nprobe", 1), ("train_size", 1)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _int_at_least(name, getattr(self, name), low))
        for name, low in (("nbits", 1), ("sample", 0), ("recall_k", 1), ("seed", 0)):
            object.__setattr__(self, name, _int_at_least(name, getattr(self, name), low))
        if self.nbits > 16:
            raise MetricError(f"nbits must be at most 16, got {self.nbits}")


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``rank`` of ``world``: the global rows [start, stop) of the index."""

    rank: int
    world: int
    start: int
    stop: int

    @property
    def count(self):
        return self.stop - self.start


def store_layout(layout):
    """What a shard records of the stores of the index ``layout`` (an
    :class:`~metric.retrieval.sharded.IndexLayout`): ``[{"digest", "count", "path"}]`` in order."""
    return [{"digest": store_digest(s), "count": len(s), "path": s.path} for s in layout.stores]


def plan_shards(layout, world=None):
    """The shards of the index ``layout``: with ``world``, the contiguous row cut of sharded
    search (:func:`shard_rows` of all rows); without it, one shard per store (the shard stores
    of sharded extraction; one shard for a single store)."""
    if world is None:
        return [
            Shard(r, len(layout.stores), o, o + len(s)) for r, (s, o) in enumerate(zip(layout.stores, layout.offsets))
        ]
    world = _int_at_least("shards", world, 1)
    return [Shard(r, world, *shard_rows(layout.count, world, r)) for r in range(world)]


def shard_paths(index_dir, index_type, rank, world):
    base = os.path.join(index_dir, f"faiss_{index_type}.shard-{rank}-of-{world}")
    return base + ".index", base + ".json"


def trained_paths(index_dir, index_type):
    base = os.path.join(index_dir, f"faiss_{index_type}.trained")
    return base, base + ".json"


# ----------------------------------------------------------------------------- training


def _make_ivf(dim, index_type, nlist, m, nbits):
    import faiss

    if index_type == "ivfpq":
        if dim % m:
            raise MetricError(f"--m {m} must divide the dimension {dim} (PQ sub-quantizers); try {default_pq_m(dim)}")
        spec = f"IVF{nlist},PQ{m}x{nbits}"
    else:
        spec = f"IVF{nlist},Flat"
    return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)


def _gather_rows(layout, rows):
    """Global ``rows`` (sorted) of ``layout`` as a float32 array, read in chunks."""
    out = np.empty((len(rows), layout.dim), np.float32)
    bounds = np.asarray(list(layout.offsets) + [layout.count])
    for start in range(0, len(rows), SAMPLE_CHUNK_ROWS):
        part = rows[start : start + SAMPLE_CHUNK_ROWS]
        which = np.searchsorted(bounds, part, side="right") - 1
        block = out[start : start + len(part)]
        for k in np.unique(which):
            sel = which == k
            block[sel] = layout.stores[k].embeddings[part[sel] - bounds[k]]
    return out


def serialized_digest(index):
    """SHA-256 of a faiss index as faiss serializes it: the "quantizer digest" of a trained index."""
    import faiss

    return hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()


def train_ivf(layout, options=None, out_dir=None):
    """Train the IVF(-PQ) of ``options`` once on a sample of all rows of the index ``layout`` and
    save it (``faiss_<type>.trained`` + json in ``out_dir``, when given); return
    ``(trained faiss index, its params)``."""
    options = ShardedIvfOptions() if options is None else options
    n, dim = layout.count, layout.dim
    if n == 0:
        raise FeatureStoreError(f"the index {layout.path} is empty; nothing to index")
    nlist = options.nlist if options.nlist is not None else default_nlist(n)
    m = options.m if options.m is not None else default_pq_m(dim)
    train_size = min(n, options.train_size if options.train_size is not None else max(100_000, 40 * nlist))
    need = max(nlist, 2**options.nbits if options.index_type == "ivfpq" else 1)
    if train_size < need:
        raise MetricError(
            f"{options.index_type} with nlist={nlist}"
            + (f", nbits={options.nbits}" if options.index_type == "ivfpq" else "")
            + f" needs at least {need} training vectors, but there are {n} rows (train size {train_size}); "
            "lower --nlist/--nbits or raise --train-size"
        )
    index = _make_ivf(dim, options.index_type, nlist, m, options.nbits)
    rng = np.random.default_rng(options.seed)
    rows = np.sort(rng.choice(n, size=train_size, replace=False))
    logger.info("training %s (nlist %d) on %d of %d rows", options.index_type, nlist, train_size, n)
    index.train(_gather_rows(layout, rows))
    params = {
        "format": FORMAT,
        "type": options.index_type,
        "dim": dim,
        "nlist": nlist,
        "nprobe": options.nprobe if options.nprobe is not None else min(nlist, 32),
        "train_size": train_size,
        "seed": options.seed,
        "trained_on": store_layout(layout),
        "quantizer_sha256": serialized_digest(index),
    }
    if options.index_type == "ivfpq":
        params.update(m=m, nbits=options.nbits)
    if out_dir is not None:
        path, json_path = trained_paths(out_dir, options.index_type)
        params["file_sha256"] = write_faiss_index(index, path)
        io.write_json_atomic(json_path, params, what="trained quantizer description", indent=1, sort_keys=True)
        params["path"] = path
        logger.info("saved the trained %s to %s", options.index_type, path)
    return index, params


def load_trained(path, dim=None):
    """A trained quantizer saved by :func:`train_ivf` (``path``: the ``.trained`` file);
    returns ``(faiss index, params)``, checked against its json (and ``dim``)."""
    import faiss

    json_path = path + ".json"
    if not io.isfile(path) or not io.isfile(json_path):
        raise FeatureStoreError(
            f"no trained quantizer at {path} (with {os.path.basename(json_path)}); "
            "train one with tools/build_index.py --train-only"
        )
    params = read_json_object(json_path, "train the quantizer again")
    if params.get("format") != FORMAT or params.get("type") not in SHARDED_TYPES:
        raise FeatureStoreError(f"{json_path} does not describe a trained IVF quantizer; train it again")
    if params.get("file_sha256") != io.file_sha256(path):
        raise FeatureStoreError(f"{path} does not match {json_path} (interrupted write?); train the quantizer again")
    index = faiss.read_index(io.get_local_path(path))
    if not index.is_trained or index.ntotal != 0 or serialized_digest(index) != params.get("quantizer_sha256"):
        raise FeatureStoreError(f"{path} is not the empty trained index its json describes; train it again")
    if dim is not None and index.d != dim:
        raise FeatureStoreError(f"the trained quantizer {path} has dimension {index.d}, the index {dim}; retrain it")
    params["path"] = io.abspath(path)
    return index, params


# ----------------------------------------------------------------------------- building


def build_ivf_shards(layout, shards, trained, trained_params, out_dir, ranks=None, options=None, progress=False):
    """Write the indexes of ``shards`` (of :func:`plan_shards`; ``ranks``: only these, default
    all) of the index ``layout`` into ``out_dir``, each a copy of the ``trained`` index filled with
    its rows in chunks of :data:`ADD_CHUNK_ROWS`; returns their params. Each shard's files are
    locked while it is built (``<index>.lock``): builds of other shards may share the folder."""
    options = ShardedIvfOptions(index_type=trained_params["type"]) if options is None else options
    world = len(shards)
    ranks = list(range(world)) if ranks is None else list(ranks)
    for r in ranks:
        if not 0 <= r < world:
            raise MetricError(f"--shard-rank {r} is not a shard of {world} (0..{world - 1})")
        for path in shard_paths(out_dir, trained_params["type"], r, world):
            io.check_output_path(path, "shard index")  # writable, before the long build
    if layout.dim != trained_params["dim"]:
        raise FeatureStoreError(
            f"the trained quantizer has dimension {trained_params['dim']}, the index {layout.dim}; retrain it"
        )
    results = []
    for r in ranks:
        index_path = shard_paths(out_dir, trained_params["type"], r, world)[0]
        label, fix = f"shard index {index_path}", "wait for the other build or choose another --output-dir"
        with lock.sibling_lock(index_path, label, fix):
            results.append(_build_shard(layout, shards[r], trained, trained_params, out_dir, options, progress))
    return results


def _build_shard(layout, shard, trained, trained_params, out_dir, options, progress):
    import faiss

    r, world = shard.rank, shard.world
    index = faiss.clone_index(trained)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=shard.count, desc=f"shard {r}/{world}", unit="vec", unit_scale=True, dynamic_ncols=True)
    for _, rows in layout.pieces(shard.start, shard.stop):
        for a in range(0, len(rows), ADD_CHUNK_ROWS):
            block = np.array(rows[a : a + ADD_CHUNK_ROWS], dtype=np.float32)
            index.add(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()
    keys = ("format", "type", "dim", "nlist", "nprobe", "m", "nbits", "quantizer_sha256")
    params = {k: trained_params[k] for k in keys if k in trained_params}
    params.update(rank=r, world=world, stores=store_layout(layout), start=shard.start, stop=shard.stop)
    params.update(count=shard.count, total=layout.count)
    params.update(_shard_recall(index, params, layout, shard, options))
    index_path, json_path = shard_paths(out_dir, params["type"], r, world)
    params["index_sha256"] = write_faiss_index(index, index_path)
    io.write_json_atomic(json_path, params, what="shard index description", indent=1, sort_keys=True)
    params["index_path"] = index_path
    logger.info("saved shard %d of %d (rows %d..%d) to %s", r, world, shard.start, shard.stop, index_path)
    return params


def _shard_recall(index, params, layout, shard, options):
    """Recall@k of a shard's index against exact search of its rows, sample rows as queries."""
    sample = min(options.sample, shard.count)
    if sample == 0:
        return {"recall": None}
    rng = np.random.default_rng(options.seed + 1 + shard.rank)
    queries = _gather_rows(layout, shard.start + np.sort(rng.choice(shard.count, size=sample, replace=False)))
    found = [search(queries, rows, options.recall_k) for _, rows in layout.pieces(shard.start, shard.stop)]
    starts = [a for a, _ in layout.pieces(shard.start, shard.stop)]
    _, exact = merge_topk([s for s, _ in found], [i + a for (_, i), a in zip(found, starts)], options.recall_k)
    _, approx = search_ivf_shard(index, params, queries, options.recall_k)
    return {
        "recall": recall_at_k(approx, exact, options.recall_k),
        "recall_k": options.recall_k,
        "recall_sample": sample,
    }


def build_sharded_index(
    layout, world=None, options=None, out_dir=None, quantizer=None, ranks=None, train_only=False, progress=False
):
    """What ``tools/build_index.py`` runs for a sharded IVF index of ``layout`` (an
    :class:`~metric.retrieval.sharded.IndexLayout`): cut into ``world`` row slices, or one shard
    per store when ``world`` is None (:func:`plan_shards`). ``quantizer``: the path of a trained
    quantizer to use instead of training one; ``ranks``: build only these shards (they need
    ``quantizer``, or one saved in ``out_dir`` by an earlier ``train_only`` run); ``train_only``:
    train and save, build nothing. ``out_dir``: default the index folder. Returns
    ``{"trained": params, "shards": [params of each shard built]}``."""
    options = ShardedIvfOptions() if options is None else options
    shards = plan_shards(layout, world)
    out_dir = io.abspath(out_dir or layout.path)
    if not io.isdir(out_dir):
        raise MetricError(f"index output folder {out_dir} does not exist; create it first")
    if quantizer is None and ranks is not None and not train_only:
        saved = trained_paths(out_dir, options.index_type)[0]
        if not io.isfile(saved):
            raise MetricError(
                "building single shards (--shard-rank) needs the trained quantizer: train it first with "
                f"--train-only (into {out_dir}) or give --quantizer"
            )
        quantizer = saved
    if quantizer is not None:
        trained, tparams = load_trained(io.abspath(quantizer), layout.dim)
        if tparams["type"] != options.index_type:
            raise MetricError(f"the quantizer {quantizer} is a {tparams['type']} one, not --type {options.index_type}")
        if options.nprobe is not None:
            tparams["nprobe"] = options.nprobe
    else:
        for path in trained_paths(out_dir, options.index_type):
            io.check_output_path(path, "trained quantizer")
        path = trained_paths(out_dir, options.index_type)[0]
        fix = "wait for the other build or choose another --output-dir"
        with lock.sibling_lock(path, f"trained quantizer {path}", fix):
            trained, tparams = train_ivf(layout, options, out_dir)
    if train_only:
        return {"trained": tparams, "shards": []}
    built = build_ivf_shards(layout, shards, trained, tparams, out_dir, ranks, options, progress)
    return {"trained": tparams, "shards": built}


# ----------------------------------------------------------------------------- searching


def find_sharded_type(index_dir, world, index_type=None):
    """The IVF type whose shards of ``world`` are saved in ``index_dir`` (the only one, or ``index_type``)."""
    types = [index_type] if index_type is not None else list(SHARDED_TYPES)
    found = [t for t in types if io.isfile(shard_paths(index_dir, t, 0, world)[1])]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise MetricError(
            f"{index_dir} holds sharded indexes of several types ({', '.join(found)}); choose with --ann-type"
        )
    names = [n for n in (io.ls(index_dir) if io.isdir(index_dir) else []) if ".shard-" in n and n.endswith(".json")]
    have = f" (it holds {', '.join(sorted(names)[:4])})" if names else ""
    raise FeatureStoreError(
        f"no sharded IVF index of {world} shards in {index_dir}{have}; build one with "
        f"tools/build_index.py --index ... --shards {world}"
    )


def load_ivf_shard(layout, world, rank, index_dir=None, index_type=None):
    """Load shard ``rank`` of ``world`` of the sharded IVF index of ``layout`` (the index being
    searched); returns ``(faiss index, params)``. One line naming the shard file when it was built
    for other stores (another version, count or order), another dimension, or is damaged; that the
    shards of all ranks fit together is :func:`check_shard_group`'s check."""
    import faiss

    index_dir = io.abspath(index_dir or layout.path)
    index_type = find_sharded_type(index_dir, world, index_type)
    index_path, json_path = shard_paths(index_dir, index_type, rank, world)
    fix = f"rebuild it with tools/build_index.py --shards {world}"
    if not io.isfile(json_path) or not io.isfile(index_path):
        raise FeatureStoreError(
            f"shard {rank} of {world} is missing in {index_dir} ({os.path.basename(json_path)}); "
            f"build it with tools/build_index.py --shards {world} --shard-rank {rank}"
        )
    params = read_json_object(json_path, "rebuild the shard")
    if params.get("format") != FORMAT or params.get("rank") != rank or params.get("world") != world:
        raise FeatureStoreError(f"{json_path} is not shard {rank} of {world} of a sharded IVF index; {fix}")
    if _digests(params) != [(d["digest"], d["count"]) for d in store_layout(layout)]:
        raise FeatureStoreError(
            f"{index_path} was built for other index stores (another version, count or order of the stores of "
            f"{layout.path}); {fix}"
        )
    if params.get("dim") != layout.dim:
        raise FeatureStoreError(f"{index_path} has dimension {params.get('dim')}, the index {layout.dim}; {fix}")
    if params.get("index_sha256") != io.file_sha256(index_path):
        raise FeatureStoreError(f"{index_path} does not match {json_path} (interrupted build?); {fix}")
    index = faiss.read_index(io.get_local_path(index_path))
    count = params.get("stop", 0) - params.get("start", 0)
    if index.ntotal != count or index.d != layout.dim:
        raise FeatureStoreError(f"{index_path} holds {index.ntotal} vectors, its json says {count}; {fix}")
    params["index_path"] = index_path
    return index, params


def _digests(params):
    return [(s.get("digest"), s.get("count")) for s in params.get("stores", [])]


def check_shard_group(params_list):
    """All ranks' shard params (rank order) belong to one sharded index: one trained quantizer,
    one layout, shards 0..W-1 tiling the global rows in order. A :class:`FeatureStoreError` names
    the first shard that does not (compared with shard 0)."""
    first = params_list[0]
    first_name = first.get("index_path", "shard 0")
    expect = 0
    for r, p in enumerate(params_list):
        name = p.get("index_path", f"shard {r}")
        if p.get("quantizer_sha256") != first.get("quantizer_sha256"):
            raise FeatureStoreError(
                f"{name} was built from another trained quantizer than {first_name}; build all shards from one "
                "(tools/build_index.py --shards W, or --quantizer FILE)"
            )
        same = all(p.get(k) == first.get(k) for k in ("type", "nlist", "world", "total"))
        same = same and _digests(p) == _digests(first)  # not the paths: shards may be built on other machines
        if not same or p.get("rank") != r or p.get("start") != expect:
            raise FeatureStoreError(
                f"{name} does not fit with {first_name} (another layout, or rows {p.get('start')}..{p.get('stop')} "
                f"where shard {r} should start at row {expect}); rebuild the shards together"
            )
        expect = p.get("stop", expect)
    if expect != first.get("total"):
        raise FeatureStoreError(f"the shards end at row {expect}, the index has {first.get('total')}; rebuild them")


def open_ivf_shard(layout, world, rank, index_dir=None, index_type=None):
    """This rank's shard of the sharded IVF index (:func:`load_ivf_shard`), after checking with
    every rank (an all-gather of the shard params) that the shards fit together
    (:func:`check_shard_group`): every rank stops with the same one-line error, before any search,
    when one shard is missing, damaged or does not fit."""
    index, params = agree(load_ivf_shard, layout, world, rank, index_dir, index_type)
    agree(check_shard_group, du.all_gather_objects(params))
    return index, params


def ann_shard_mode(shard):
    """The sharding of ``tools/search.py --ann --shard SHARD``: "queries" as asked (every rank loads
    every shard's IVF index and searches its slice of the queries), else index sharding (each rank
    searches its own shard's index; "auto" too: the memory estimate of queries sharding is that of
    exact search)."""
    return "queries" if shard == "queries" else "index"


SHARD_JSON_RE = re.compile(r"^faiss_([a-z]+)\.shard-(\d+)-of-(\d+)\.json$")


def saved_shard_counts(index_dir, index_type=None):
    """The shard counts W of the sharded IVF indexes saved in ``index_dir`` (of ``index_type``
    when given), sorted; empty when there are none."""
    names = io.ls(index_dir) if io.isdir(index_dir) else []
    found = {int(m.group(3)) for m in map(SHARD_JSON_RE.match, names) if m and index_type in (None, m.group(1))}
    return sorted(found)


def wants_sharded_ivf(ann, index_path):
    """Whether a single-process ``tools/search.py --ann`` must search a sharded IVF index: the
    index folder holds shards (:func:`saved_shard_counts`) and no single approximate index of the
    asked type (:mod:`metric.retrieval.ann`)."""
    from metric.retrieval.ann import ANN_TYPES, ann_paths

    index_dir = io.abspath(ann.index_dir or index_path)
    if not saved_shard_counts(index_dir, ann.index_type):
        return False
    types = [ann.index_type] if ann.index_type else list(ANN_TYPES)
    return not any(t in ANN_TYPES and io.isfile(ann_paths(index_dir, t)[1]) for t in types)


def _all_shards_search(layout, ann, world):
    """Every shard of a sharded IVF index, searched one after the other and merged as W ranks
    merge them (the same lists): a single process, or each rank of a queries-sharded search. The
    shards of ``world`` processes when saved, else the only set of shards saved."""
    index_dir = io.abspath(ann.index_dir or layout.path)
    counts = saved_shard_counts(index_dir, ann.index_type)
    if world not in counts and len(counts) > 1:
        raise MetricError(
            f"{index_dir} holds sharded IVF indexes for {', '.join(map(str, counts))} processes; run under torchrun "
            "with one of those, or keep one set of shards"
        )
    shards = world if world in counts or not counts else counts[0]
    parts = [load_ivf_shard(layout, shards, r, ann.index_dir, ann.index_type) for r in range(shards)]
    check_shard_group([p for _, p in parts])
    logger.info("the %d shards of %s searched one after the other and merged", shards, index_dir)

    def local_search(query, k):
        found = [search_ivf_shard(index, params, query, k, nprobe=ann.nprobe) for index, params in parts]
        return merge_topk([f[0] for f in found], [f[1] for f in found], k)

    return local_search


def ivf_local_search(ann):
    """The ``local_search`` of :func:`~metric.retrieval.sharded_pipeline.search_stores_sharded`
    for ``tools/search.py --ann`` with index sharding: ``(layout, world, rank) -> fn(query, k)``
    searching this rank's shard index (``ann``: an :class:`~metric.retrieval.ann.AnnSearchOptions`,
    its index folder, type and ``nprobe``)."""

    def factory(layout, world, rank, mode="index"):
        index_dir = io.abspath(ann.index_dir or layout.path)
        if mode == "queries" or (world == 1 and 1 not in saved_shard_counts(index_dir, ann.index_type)):
            return agree(_all_shards_search, layout, ann, world)  # every shard in this process
        index, params = open_ivf_shard(layout, world, rank, ann.index_dir, ann.index_type)
        logger.info(
            "rank %d: %s shard %s, rows %d..%d, nprobe %d",
            rank,
            params["type"],
            params["index_path"],
            params["start"],
            params["stop"],
            ann.nprobe or params["nprobe"],
        )

        def local_search(query, k):
            return search_ivf_shard(index, params, query, k, nprobe=ann.nprobe)

        return local_search

    return factory


def search_ivf_shard(index, params, query, topk, nprobe=None, progress=False):
    """Top-``topk`` of ``query`` in one shard's index with **global** rows, padded to ``topk``
    columns with row -1 / score -inf: ready for :func:`~metric.retrieval.topk_merge.merge_topk`."""
    scores, rows = ann_search(index, params, query, topk, nprobe=nprobe, progress=progress)
    rows = np.where(rows >= 0, rows + params["start"], -1)
    if scores.shape[1] < topk:  # an empty or small shard: every rank sends [q, topk]
        pad = ((0, 0), (0, topk - scores.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        rows = np.pad(rows, pad, constant_values=-1)
    return scores, rows
