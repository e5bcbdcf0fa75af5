"""Feature stores: a folder of L2-normalized embeddings and their ids.

Layout of a store folder::

    embeddings.npy   float32 (or float16) [N, D], one row per item, L2-normalized, memory-mappable
    ids.txt          N lines, one id per line, same order as the rows
    meta.json        written last: format, version, dim, count, dtype, normalized, digest,
                     plus what the writer passed (model_digest, scales, flip,
                     failed_images, shard = {"index": k, "total": n}, ...)

A float16 store (``dtype="float16"``, ``--dtype float16`` of the tools) holds the same rows
rounded to half precision: half the disk and page cache, ranks within ~5e-4 of the float32
scores; search converts it to float32 block by block and accumulates in float32
(:mod:`metric.retrieval.search`). It is written as store version 2, so that a pymetric that
knows only float32 stores refuses it in one line; float32 stores stay version 1.

A store is complete exactly when ``meta.json`` exists: the writer fills a hidden
temporary sibling folder ``.<name>.tmp<pid>`` (:func:`metric.utils.io.atomic_folder`), writes
``meta.json`` last, then renames the folder into place. An existing store is replaced by
swapping the two folders, so a kill at any moment leaves either the old complete store or the
new one under ``out_dir`` (on Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call;
elsewhere two renames, and a store interrupted between them is found again by
:func:`load_features`, which names the folder set aside). Temporaries of killed writers are
removed by the next write of the same store (:func:`metric.utils.io.clean_stale_temps`).
One writer per store: writing (saving, merging, importing, an extraction run) holds an OS lock
on ``<store>.lock`` next to it (:func:`store_lock`); a second writer stops with one line naming
the first one's pid, and a killed writer leaves no lock behind.

The embeddings are written with ordinary buffered writes (``.npy`` header, then the rows in
blocks), never through a writable memory map: a full disk is then an ``OSError`` reported in
one line (:class:`~metric.utils.errors.OutputError`), not a SIGBUS that kills the process.
Reading memory-maps ``embeddings.npy`` (through :func:`metric.utils.io.get_local_path` when the
store is on another storage backend); every other file goes through the iopath path manager.

Ids are non-empty strings without whitespace, unique within a store. ``digest``
is the SHA-256 of the embedding bytes and the ids; an approximate index built on
a store records it so that an index of a changed store is refused.
"""

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import mmap
import os

import numpy as np

from metric.utils import io, lock
from metric.utils.errors import FeatureStoreError

logger = logging.getLogger(__name__)

STORE_FORMAT = "pymetric-feature-store"
STORE_VERSION = 1  # float32 stores; float16 ones are version 2 (the version that added "dtype")
SUPPORTED_VERSIONS = (1, 2)
STORE_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
META_FILE = "meta.json"
# Keys computed by the writer; values passed in ``meta`` under these names are ignored.
RESERVED_META_KEYS = ("format", "version", "dim", "count", "normalized", "digest", "dtype")
# Extraction settings that must agree between stores that are merged.
CONSISTENT_META_KEYS = ("model_digest", "scales", "flip")
_STORE_FILES = {EMBEDDINGS_FILE, IDS_FILE, META_FILE}
_OLD_TAG = ".old-"  # a store set aside by an interrupted two-rename replace (metric.utils.io)
_BLOCK_BYTES = 64 << 20  # rows are written in blocks of about this size


@dataclasses.dataclass
class FeatureStore:
    """A loaded store; ``embeddings`` is a read-only memmap when loaded with ``mmap=True``."""

    embeddings: np.ndarray
    ids: list
    meta: dict
    path: str

    def __len__(self):
        return int(self.embeddings.shape[0])  # the ids may not be read (load_features(read_ids=False))

    @property
    def dim(self):
        return int(self.embeddings.shape[1])

    @property
    def dtype(self):
        """The stored precision: "float32" or "float16"."""
        return str(self.embeddings.dtype)


def check_dtype(dtype):
    """``dtype`` (a name or numpy dtype) as one of :data:`STORE_DTYPES`; a one-line error otherwise."""
    name = str(np.dtype(dtype)) if isinstance(dtype, type) or isinstance(dtype, np.dtype) else dtype
    if name not in STORE_DTYPES:
        raise FeatureStoreError(f"unknown feature store dtype {dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
    return name


# ----------------------------------------------------------------------------- validation


def validate_ids(ids, what="ids"):
    """Return ``ids`` as a list of str; raise when one is empty, has whitespace or repeats."""
    ids = [str(i) for i in ids]
    seen = {}
    for pos, item in enumerate(ids):
        if not item or any(ch.isspace() for ch in item):
            raise FeatureStoreError(
                f"{what}: id #{pos} ({item!r}) is empty or contains whitespace; "
                "ids must be non-empty and without spaces or newlines"
            )
        if item in seen:
            raise FeatureStoreError(
                f"{what}: id {item!r} repeats (positions {seen[item]} and {pos}); ids must be unique"
            )
        seen[item] = pos
    return ids


def normalize_rows(arr, ids=None):
    """Return a float32 copy of ``arr`` with L2-normalized rows; a zero row is an error naming it."""
    # Sums of squares in float64: in float32 they overflow for values above ~1e19 and the rows
    # would become zeros; every float32 row has a finite float64 norm.
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))
    bad = np.flatnonzero(~(norms > 0))
    if bad.size:
        which = f"id {ids[bad[0]]!r}" if ids is not None else f"row {bad[0]}"
        raise FeatureStoreError(
            f"embedding {which} (and {bad.size - 1} more) has zero norm and cannot be L2-normalized; "
            "drop those items or pass normalize=False"
        )
    return (arr / norms[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- writing


def _is_replaceable(path):
    """True when ``path`` may be replaced: empty, or holding only store files (plus faiss_* files)."""
    names = io.ls(path)
    return all(n in _STORE_FILES or n.startswith("faiss_") for n in names)


def check_output(out_dir):
    """The absolute store path; :class:`~metric.utils.errors.OutputError` when its parent folder
    is missing or not writable, FeatureStoreError when ``out_dir`` is something other than a store."""
    out_dir = io.check_output_path(out_dir, "feature store", folder=True)
    if io.is_local(out_dir) and os.path.islink(out_dir):
        raise FeatureStoreError(f"output {out_dir} exists and is not a folder; choose another --output")
    if io.isdir(out_dir) and not _is_replaceable(out_dir):
        raise FeatureStoreError(
            f"output folder {out_dir} exists and is not a feature store; "
            "choose another output (existing data is never deleted)"
        )
    return out_dir


class RowBlocks:
    """The rows of a store being written: an iterable of blocks of ``dtype`` ("float32" or "float16")."""

    def __init__(self, blocks, dtype):
        self.blocks, self.dtype = blocks, dtype

    def __iter__(self):
        return iter(self.blocks)


def _write_npy_rows(f, count, dim, blocks):
    """Write a [count, dim] ``.npy`` file to the open file ``f``: the header (as ``np.save``
    writes it), then the C-ordered rows of ``blocks`` (a :class:`RowBlocks`, or any iterable of
    float32 blocks). Returns their SHA-256 object."""
    dtype = getattr(blocks, "dtype", "float32")
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": (int(count), int(dim)),
    }
    np.lib.format.write_array_header_1_0(f, header)
    digest = hashlib.sha256()
    rows = 0
    for block in blocks:
        if block.dtype != np.dtype(dtype):
            raise RuntimeError(f"a {block.dtype} block for a {dtype} store")  # a bug in the caller
        block = np.ascontiguousarray(block)
        if not block.size:
            continue
        data = memoryview(block).cast("B")
        digest.update(data)
        f.write(data)
        rows += block.shape[0]
    if rows != count:
        raise RuntimeError(f"wrote {rows} rows of a store of {count}")  # a bug in the caller
    return digest


def _row_blocks(arr, dim):
    step = max(1, _BLOCK_BYTES // (4 * max(1, dim)))
    for start in range(0, arr.shape[0], step):
        yield arr[start : start + step]


def _as_stored(block, dtype, start, ids, what):
    """A block of float rows as the store's ``dtype``; a float16 overflow is an error naming the row."""
    if block.dtype == np.dtype(dtype):
        return block
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the row
        out = np.asarray(block, dtype=np.float32).astype(dtype)
    if dtype == "float16" and not np.isfinite(out).all():
        row = start + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise FeatureStoreError(
            f"{what} of id {ids[row]!r} (row {row}) has values beyond the float16 range (|x| > {FLOAT16_MAX:g}); "
            "store it as float32 (--dtype float32) or L2-normalize it"
        )
    return out


def store_lock(out_dir, fix="choose another output folder"):
    """Hold ``<out_dir>.lock`` next to the store while writing it (:mod:`metric.utils.lock`):
    another process writing the same store stops at once with one line naming its pid. No lock
    while the store's parent folder does not exist (the writer reports or creates it)."""
    parent = os.path.dirname(io.abspath(out_dir).rstrip("/"))
    if io.is_local(parent) and not os.path.isdir(parent):
        return contextlib.nullcontext()
    return lock.sibling_lock(out_dir, f"feature store {out_dir}", fix)


def _locks_store(fn):
    """Decorate a writer of the store named by its ``out_dir`` argument: the store's lock is
    held for the whole call (reentrant: nested writers of the same store share it)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with store_lock(sig.bind(*args, **kwargs).arguments["out_dir"]):
            return fn(*args, **kwargs)

    return locked


@_locks_store
def _write_store(out_dir, count, dim, ids, blocks, meta, normalized, dtype="float32"):
    """Write a store atomically; ``blocks`` yields its rows in order, in blocks of ``dtype``."""
    out_dir = check_output(out_dir)
    json.dumps(meta or {})  # a meta that cannot be saved fails before the long write
    parent, name = os.path.split(out_dir)
    io.clean_stale_temps(parent, name)
    with io.atomic_folder(out_dir, what="feature store") as tmp:
        emb_path = os.path.join(tmp, EMBEDDINGS_FILE)
        with io.open_path(emb_path, "wb") as f:
            digest = _write_npy_rows(f, count, dim, RowBlocks(blocks, dtype))
            f.flush()
            if io.is_local(emb_path):
                os.fsync(f.fileno())
        ids_bytes = "".join(i + "\n" for i in ids).encode("utf-8")
        digest.update(ids_bytes)
        _write_bytes(os.path.join(tmp, IDS_FILE), ids_bytes)
        full_meta = dict(meta or {})
        for key in RESERVED_META_KEYS:
            full_meta.pop(key, None)
        full_meta.update(
            format=STORE_FORMAT,
            version=STORE_VERSION if dtype == "float32" else 2,
            dtype=dtype,
            dim=int(dim),
            count=int(count),
            digest=digest.hexdigest(),
            normalized=bool(normalized),
        )
        meta_bytes = (json.dumps(full_meta, indent=1, sort_keys=True) + "\n").encode("utf-8")
        _write_bytes(os.path.join(tmp, META_FILE), meta_bytes)
    logger.info("wrote feature store %s (%d x %d, %s)", out_dir, count, dim, dtype)
    return out_dir


def _write_bytes(path, data):
    io.write_through(path, data)


@_locks_store
def save_features(out_dir, embeddings, ids, meta=None, normalize=True, dtype="float32"):
    """Write a feature store at ``out_dir`` atomically and return its absolute path.

    ``embeddings`` is an array-like [N, D] (numpy, a memmap, or torch), ``ids`` N strings.
    With ``normalize`` the rows are L2-normalized and a zero row is an error
    (a zero descriptor cannot be ranked; drop the item or store it unnormalized);
    with ``normalize=False`` rows are stored as given and ``meta["normalized"]``
    records whether they are unit length anyway (within 1e-3). N = 0 is
    allowed (an empty shard). ``dtype`` "float16" stores the rows in half precision
    (a value beyond its range is an error naming the row).
    The rows are read twice in blocks (checks and norms, then the write), so a memmap of any
    size is written without a copy in memory.
    An existing store at ``out_dir`` is replaced; any other existing non-empty
    folder is an error.
    """
    dtype = check_dtype(dtype)
    arr = _as_float_matrix(embeddings)
    ids = validate_ids(ids)
    if arr.shape[0] != len(ids):
        raise FeatureStoreError(f"{arr.shape[0]} embedding rows but {len(ids)} ids; they must match")
    dim = arr.shape[1]
    norms, stored_norms = _check_rows(arr, ids, normalize, dtype)
    if normalize:
        bad = np.flatnonzero(~(norms > 0))
        if bad.size:
            raise FeatureStoreError(
                f"embedding id {ids[bad[0]]!r} (and {bad.size - 1} more) has zero norm and cannot be L2-normalized; "
                "drop those items or pass normalize=False"
            )
        normalized = True
    else:
        normalized = bool(np.allclose(stored_norms, 1.0, atol=1e-3))

    def blocks():
        step = max(1, _BLOCK_BYTES // (4 * max(1, dim)))
        for start in range(0, arr.shape[0], step):
            block = np.asarray(arr[start : start + step], dtype=np.float32)
            if normalize:
                block = (block / norms[start : start + step, None]).astype(np.float32)
            yield _as_stored(block, dtype, start, ids, "embedding")

    return _write_store(out_dir, arr.shape[0], dim, ids, blocks(), meta, normalized, dtype)


def write_store_blocks(out_dir, count, dim, ids, blocks, meta=None, dtype="float32"):
    """Write a store of ``count`` L2-normalized rows produced block by block (``blocks`` yields
    [b, dim] float arrays in row order), for data that never exists whole in memory or on disk
    (generated benchmark indexes). Each block is checked (finite, unit norms within 1e-3) and
    converted to ``dtype`` before it is written; returns the store's absolute path."""
    dtype = check_dtype(dtype)
    ids = validate_ids(ids)
    if len(ids) != count:
        raise FeatureStoreError(f"{count} rows announced but {len(ids)} ids; they must match")

    def checked():
        start = 0
        for block in blocks:
            block = np.asarray(block)
            if block.ndim != 2 or block.shape[1] != dim:
                raise FeatureStoreError(f"a block of shape {block.shape} for a store of dimension {dim}")
            norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
            off = np.flatnonzero(~(np.abs(norms - 1.0) <= _VERIFY_NORM_TOL))
            if off.size:
                row = start + int(off[0])
                raise FeatureStoreError(
                    f"row {row} (id {ids[row]!r}) has norm {norms[off[0]]:.4g}: rows must be finite and L2-normalized"
                )
            yield _as_stored(block, dtype, start, ids, "embedding")
            start += len(block)

    return _write_store(out_dir, count, dim, ids, checked(), meta, True, dtype)


def _as_float_matrix(embeddings):
    """A 2-D real array [N, D] (float32 or float16 kept as they are, memmaps not read)."""
    if hasattr(embeddings, "detach"):  # a torch tensor
        embeddings = embeddings.detach().cpu().numpy()
    arr = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if arr.ndim != 2:
        raise FeatureStoreError(f"embeddings must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise FeatureStoreError(f"embeddings have dimension 0 (shape {arr.shape}); need D >= 1")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise FeatureStoreError(f"embeddings must be real numbers, got dtype {arr.dtype}")
    return arr


def _check_rows(arr, ids, normalize, dtype):
    """One pass over the rows in blocks: every value finite (else an error naming the first bad
    row), float16 range when stored unnormalized as float16. Returns the float64 norms of the
    rows and, without ``normalize``, the norms of the rows as they will be stored."""
    n, dim = arr.shape
    norms = np.empty(n, np.float64)
    stored = None if normalize else norms if dtype == "float32" else np.empty(n, np.float64)
    step = max(1, _BLOCK_BYTES // (4 * max(1, dim)))
    for start in range(0, n, step):
        block = np.asarray(arr[start : start + step], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise FeatureStoreError(f"embedding of id {ids[row]!r} (row {row}) has NaN or infinite values")
        # Sums of squares in float64: in float32 they overflow for values above ~1e19 and the rows
        # would become zeros; every float32 row has a finite float64 norm.
        norms[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        if stored is not None and stored is not norms:
            rounded = _as_stored(block, dtype, start, ids, "embedding").astype(np.float32)
            stored[start : start + len(block)] = np.sqrt(np.einsum("ij,ij->i", rounded, rounded, dtype=np.float64))
    return norms, stored


# ----------------------------------------------------------------------------- reading


def read_json_object(path, fix):
    """A JSON object from ``path``; a FeatureStoreError ending with ``fix`` if it is not one."""
    try:
        with io.open_path(path, "r") as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"{path} cannot be read as JSON ({err}); {fix}") from None
    if not isinstance(obj, dict):
        raise FeatureStoreError(f"{path} is not a JSON object; {fix}")
    return obj


def _read_meta(path):
    meta_path = os.path.join(path, META_FILE)
    if not io.isfile(meta_path):
        hint = "an interrupted write or not a feature store; re-run the extraction/import"
        raise FeatureStoreError(f"{path} is not a complete feature store (no {META_FILE}): {hint}")
    meta = read_json_object(meta_path, "re-create the store")
    version = meta.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise FeatureStoreError(
            f"{path}: store version {version!r} is not supported (known: {list(SUPPORTED_VERSIONS)}); "
            "re-create it with this version of pymetric"
        )
    for key in ("dim", "count"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise FeatureStoreError(f"{meta_path}: key {key!r} missing or not a count; re-create the store")
    dtype = meta.get("dtype", "float32")
    if dtype not in STORE_DTYPES or (dtype != "float32" and version < 2):
        raise FeatureStoreError(
            f"{meta_path}: dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)} for a version "
            f"{version} store; re-create the store"
        )
    return meta


def _interrupted_hint(path):
    parent, name = os.path.split(io.abspath(path))
    try:
        names = io.ls(parent)
    except OSError:
        return ""
    aside = sorted(n for n in names if n.startswith(f".{name}{_OLD_TAG}"))
    if aside:
        return (
            f" (a replace was interrupted: the previous store is at {os.path.join(parent, aside[-1])}; rename it back)"
        )
    return ""


def load_features(path, mmap=True, verify=True, read_ids=True):
    """Load a complete store; raise FeatureStoreError when it is missing, incomplete or inconsistent.

    With ``verify`` (the default) the content is checked against ``meta.json`` as well
    (:func:`verify_store`: digest, finite rows, unit norms); ``verify=False`` (the tools'
    ``--no-verify``) skips that read of the embeddings for a trusted store. ``read_ids=False``
    leaves ``ids`` None (a process of a sharded search that only searches rows; ``verify`` needs
    the ids)."""
    if verify and not read_ids:
        raise ValueError("verifying a store needs its ids")  # a bug in the caller
    path = io.abspath(path)
    if not io.isdir(path):
        raise FeatureStoreError(f"feature store {path} does not exist{_interrupted_hint(path)}")
    meta = _read_meta(path)
    emb_path = os.path.join(path, EMBEDDINGS_FILE)
    ids_path = os.path.join(path, IDS_FILE)
    for p in (emb_path, ids_path):
        if not io.isfile(p):
            raise FeatureStoreError(f"feature store {path} lacks {os.path.basename(p)}; re-create it")
    count, dim = meta["count"], meta["dim"]
    try:
        local = io.get_local_path(emb_path)  # np.memmap needs a local file
        if mmap and count > 0:
            emb = np.load(local, mmap_mode="r", allow_pickle=False)
        else:
            emb = np.load(local, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"{emb_path} is not a readable .npy array ({err}); re-create the store") from None
    dtype = meta.get("dtype", "float32")
    if emb.dtype != np.dtype(dtype) or emb.shape != (count, dim):
        raise FeatureStoreError(
            f"{emb_path} holds {emb.dtype} {tuple(emb.shape)} but {META_FILE} says {dtype} ({count}, {dim}); "
            "the store is inconsistent, re-create it"
        )
    ids = _read_ids(ids_path, count) if read_ids else None
    store = FeatureStore(embeddings=emb, ids=ids, meta=meta, path=path)
    if verify:
        verify_store(store)
    return store


def _read_ids(ids_path, count):
    try:
        with io.open_path(ids_path, "r") as f:
            ids = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FeatureStoreError(f"{ids_path} cannot be read ({err}); re-create the store") from None
    if len(ids) != count:
        raise FeatureStoreError(
            f"{ids_path} has {len(ids)} ids but {META_FILE} says {count}; the store is inconsistent, re-create it"
        )
    validate_ids(ids, what=ids_path)
    return ids


_VERIFIED = {}  # (path, size, mtime) of the embeddings -> digest, so one process reads a store once
_VERIFY_NORM_TOL = 1e-3


def _stored_blocks(emb, count, step):
    """``(start, rows)`` of ``emb`` [count, D], ``step`` rows at a time, as contiguous arrays. A
    memory-mapped local file is read with plain reads, not through the mapping: the pages of a whole
    store read once would otherwise stay in this process's resident memory while it is mapped."""
    path, offset = getattr(emb, "filename", None), getattr(emb, "offset", None)
    whole = isinstance(emb, np.memmap) and isinstance(emb.base, mmap.mmap)  # as mapped, not a view of it
    if not (whole and path and isinstance(offset, int) and emb.flags.c_contiguous and io.is_local(path)):
        for start in range(0, count, step):
            yield start, np.ascontiguousarray(emb[start : start + step])
        return
    row_bytes = emb.dtype.itemsize * int(np.prod(emb.shape[1:], dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, count, step):
            rows = min(step, count - start)
            block = np.empty((rows,) + tuple(emb.shape[1:]), emb.dtype)
            if f.readinto(memoryview(block).cast("B")) != rows * row_bytes:
                raise FeatureStoreError(
                    f"{path} ended before row {start + rows}: the store is incomplete; re-create it"
                )
            yield start, block


def verify_store(store):
    """Check that a store holds what its ``meta.json`` promises, reading the embeddings once, in
    blocks: the digest of the rows and ids, finite values, unit norms when ``normalized``.
    Raises :class:`FeatureStoreError` naming the store and the first offending row."""
    emb_path = os.path.join(store.path, EMBEDDINGS_FILE)
    key = None
    if io.is_local(emb_path):
        st = os.stat(emb_path)
        key = (emb_path, st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key) == store.meta.get("digest"):
            return store
    fix = "re-create it (or pass --no-verify if you trust it as it is)"
    digest = hashlib.sha256()
    emb, count = store.embeddings, len(store.ids)
    step = max(1, _BLOCK_BYTES // (4 * max(1, store.dim)))
    for start, block in _stored_blocks(emb, count, step):  # the stored bytes (float32 or float16)
        digest.update(memoryview(block).cast("B"))
        block = block.astype(np.float32, copy=False)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise FeatureStoreError(
                f"feature store {store.path}: row {row} (id {store.ids[row]!r}) holds NaN or infinite values; {fix}"
            )
        if store.meta.get("normalized"):
            norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
            off = np.flatnonzero(np.abs(norms - 1.0) > _VERIFY_NORM_TOL)
            if off.size:
                row = start + int(off[0])
                raise FeatureStoreError(
                    f"feature store {store.path}: row {row} (id {store.ids[row]!r}) has norm {norms[off[0]]:.4g} but "
                    f"the store says its rows are L2-normalized; {fix}"
                )
    digest.update("".join(i + "\n" for i in store.ids).encode("utf-8"))
    expected = store.meta.get("digest")
    if expected is not None and digest.hexdigest() != expected:
        raise FeatureStoreError(
            f"feature store {store.path}: its embeddings or ids do not match the digest in "
            f"{META_FILE} (changed or damaged after writing); {fix}"
        )
    if key is not None:
        _VERIFIED[key] = expected
    return store


def store_digest(store):
    """The digest recorded in ``store``'s ``meta.json`` (SHA-256 of its rows and ids): what an
    approximate index or a k-NN graph built on the store records, so that one built on another
    version of it is refused. :class:`FeatureStoreError` for a store written without one."""
    digest = store.meta.get("digest")
    if not digest:
        raise FeatureStoreError(f"store {store.path} has no digest in meta.json; re-create it with this pymetric")
    return digest


def is_complete_store(path):
    """True when ``path`` is a complete, consistent store (never raises for a bad one)."""
    try:
        load_features(path, mmap=True)
    except FeatureStoreError:
        return False
    return True


# ----------------------------------------------------------------------------- merging


def _shard_of(store):
    shard = store.meta.get("shard")
    if shard is None:
        return None
    ok = isinstance(shard, dict) and all(isinstance(shard.get(k), int) for k in ("index", "total"))
    if not ok or not 1 <= shard["index"] <= shard["total"]:
        raise FeatureStoreError(
            f'{store.path}: meta \'shard\' must be {{"index": k, "total": n}} with 1 <= k <= n, got {shard!r}'
        )
    return shard["index"], shard["total"]


def _order_shards(stores):
    shards = [_shard_of(s) for s in stores]
    if all(s is None for s in shards):
        return stores
    if any(s is None for s in shards):
        plain = [s.path for s, sh in zip(stores, shards) if sh is None]
        raise FeatureStoreError(f"cannot merge shard stores with non-shard stores: {', '.join(plain)}")
    totals = sorted({t for _, t in shards})
    if len(totals) > 1:
        raise FeatureStoreError(f"shard stores disagree on the shard total ({totals}); merge one extraction at a time")
    total = totals[0]
    by_index = {}
    for store, (k, _) in zip(stores, shards):
        if k in by_index:
            raise FeatureStoreError(f"shard {k}/{total} given twice: {by_index[k].path} and {store.path}")
        by_index[k] = store
    missing = [k for k in range(1, total + 1) if k not in by_index]
    if missing:
        raise FeatureStoreError(
            f"shards {', '.join(f'{k}/{total}' for k in missing)} are missing; extract them and merge again"
        )
    return [by_index[k] for k in range(1, total + 1)]


@_locks_store
def merge_stores(paths, out_dir, dtype=None, verify=True):
    """Concatenate stores (in shard order when they carry shard meta) into a new store at ``out_dir``.

    ``dtype`` ("float32"/"float16") converts the rows, block by block; by default the inputs must
    share one dtype, which the merged store keeps. ``verify``: check each input against its
    ``meta.json`` while loading it (:func:`load_features`)."""
    if dtype is not None:
        dtype = check_dtype(dtype)
    paths = [io.abspath(p) for p in paths]
    if not paths:
        raise FeatureStoreError("no stores to merge; give at least one store folder")
    if len(set(paths)) != len(paths):
        raise FeatureStoreError("a store is listed twice in the merge inputs; give each once")
    if io.abspath(out_dir) in paths:
        raise FeatureStoreError(f"merge output {out_dir} is also an input; choose another output folder")
    stores, bad = [], []
    for p in paths:
        try:
            stores.append(load_features(p, mmap=True, verify=verify))
        except FeatureStoreError as err:
            bad.append(f"{p} (missing)" if not io.isdir(p) else f"{p} (incomplete or inconsistent: {err})")
            logger.debug("cannot load %s: %s", p, err)
    if bad:
        raise FeatureStoreError(f"cannot merge: {len(bad)} store(s) missing or incomplete: {'; '.join(bad)}")
    dims = {s.dim for s in stores}
    if len(dims) > 1:
        listing = ", ".join(f"{s.path} (dim {s.dim})" for s in stores)
        raise FeatureStoreError(f"cannot merge stores of different dimensions: {listing}")
    for key in CONSISTENT_META_KEYS:
        values = {json.dumps(s.meta.get(key), sort_keys=True) for s in stores}
        if len(values) > 1:
            listing = ", ".join(f"{s.path} ({s.meta.get(key)!r})" for s in stores)
            raise FeatureStoreError(f"cannot merge stores with different {key!r}: {listing}")
    dtypes = sorted({s.dtype for s in stores})
    if dtype is None and len(dtypes) > 1:
        listing = ", ".join(f"{s.path} ({s.dtype})" for s in stores)
        raise FeatureStoreError(
            f"cannot merge stores of different dtypes without --dtype: {listing}; "
            "choose the merged store's with --dtype float32 or --dtype float16"
        )
    dtype = dtype or dtypes[0]
    stores = _order_shards(stores)
    owner = {}
    repeats = []
    for s in stores:
        for i in s.ids:
            if i in owner:
                repeats.append(f"{i!r} ({owner[i]} and {s.path})")
            else:
                owner[i] = s.path
    if repeats:
        more = f" and {len(repeats) - 3} more" if len(repeats) > 3 else ""
        raise FeatureStoreError(f"cannot merge: ids repeat across stores: {'; '.join(repeats[:3])}{more}")

    ids = [i for s in stores for i in s.ids]
    failed = []
    for s in stores:
        for item in s.meta.get("failed_images", []) or []:
            if item not in failed:
                failed.append(item)
    meta = {}
    for key, value in stores[0].meta.items():
        if key in RESERVED_META_KEYS or key in ("shard", "sources", "failed_images"):
            continue
        if all(s.meta.get(key) == value for s in stores[1:]):
            meta[key] = value
    meta["failed_images"] = failed
    meta["sources"] = [
        {"path": s.path, "count": len(s), "digest": s.meta.get("digest"), "shard": s.meta.get("shard")} for s in stores
    ]
    dim = stores[0].dim

    def blocks():
        row = 0
        for s in stores:
            for block in _row_blocks(s.embeddings, dim):
                yield _as_stored(np.asarray(block), dtype, row, ids, "merged embedding")
                row += len(block)

    normalized = all(s.meta.get("normalized", True) for s in stores)
    return _write_store(out_dir, len(ids), dim, ids, blocks(), meta, normalized, dtype)


# ----------------------------------------------------------------------------- importing


def read_ids_file(path):
    """Ids from a text file, one per line (surrounding whitespace and a trailing blank line ignored)."""
    if not io.isfile(path):
        raise FeatureStoreError(f"ids file {path} does not exist")
    try:
        with io.open_path(path, "r", encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError:
        raise FeatureStoreError(f"ids file {path} is not UTF-8 text") from None
    while lines and not lines[-1]:
        lines.pop()
    return validate_ids(lines, what=f"ids file {path}")


@_locks_store
def import_features(embeddings_path, ids_path, out_dir, normalize=True, meta=None, dtype="float32"):
    """Make a store from an ``.npy`` [N, D] array and an ids file; return the loaded store.

    The array is memory-mapped and read in blocks (any size, no copy in memory); ``dtype``
    is the precision of the store ("float32" or "float16")."""
    dtype = check_dtype(dtype)
    if not io.isfile(embeddings_path):
        raise FeatureStoreError(f"embeddings file {embeddings_path} does not exist")
    try:
        emb = np.load(io.get_local_path(embeddings_path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(
            f"{embeddings_path} is not a numeric .npy array ({err}); save it with numpy.save"
        ) from None
    ids = read_ids_file(ids_path)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise FeatureStoreError(
            f"{embeddings_path} has shape {emb.shape} but {ids_path} has {len(ids)} ids; "
            f"need [N, D] with N = {len(ids)}"
        )
    full_meta = {"imported_from": io.abspath(embeddings_path)}
    full_meta.update(meta or {})
    path = save_features(out_dir, emb, ids, meta=full_meta, normalize=normalize, dtype=dtype)
    return load_features(path)
