"""Feature stores: a folder of L2-normalized embeddings and their ids.

Layout of a store folder::

    embeddings.npy   float32 [N, D], one row per item, L2-normalized, memory-mappable
    ids.txt          N lines, one id per line, same order as the rows
    meta.json        written last: format, version, dim, count, normalized, digest,
                     plus what the writer passed (model_digest, scales, flip,
                     failed_images, shard = {"index": k, "total": n}, ...)

A store is complete exactly when ``meta.json`` exists: the writer fills a hidden
temporary sibling folder, writes ``meta.json`` last, then renames the folder into
place. An existing store is replaced by swapping the two folders, so a kill at
any moment leaves either the old complete store or the new one under ``out_dir``
(on Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call; elsewhere two
renames, and a store interrupted between them is found again by
:func:`load_features`, which names the folder set aside).

Ids are non-empty strings without whitespace, unique within a store. ``digest``
is the SHA-256 of the embedding bytes and the ids; an approximate index built on
a store records it so that an index of a changed store is refused.
"""

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid

import numpy as np

from metric.utils.errors import FeatureStoreError

logger = logging.getLogger(__name__)

STORE_FORMAT = "pymetric-feature-store"
STORE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
META_FILE = "meta.json"
# Keys computed by the writer; values passed in ``meta`` under these names are ignored.
RESERVED_META_KEYS = ("format", "version", "dim", "count", "normalized", "digest")
# Extraction settings that must agree between stores that are merged.
CONSISTENT_META_KEYS = ("model_digest", "scales", "flip")
_STORE_FILES = {EMBEDDINGS_FILE, IDS_FILE, META_FILE}
_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


@dataclasses.dataclass
class FeatureStore:
    """A loaded store; ``embeddings`` is a read-only memmap when loaded with ``mmap=True``."""

    embeddings: np.ndarray
    ids: list
    meta: dict
    path: str

    def __len__(self):
        return len(self.ids)

    @property
    def dim(self):
        return int(self.embeddings.shape[1])


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


def _as_float32_matrix(embeddings):
    if hasattr(embeddings, "detach"):  # a torch tensor
        embeddings = embeddings.detach().cpu().numpy()
    arr = np.asarray(embeddings)
    if arr.ndim != 2:
        raise FeatureStoreError(f"embeddings must be a 2-D array [N, D], got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise FeatureStoreError(f"embeddings have dimension 0 (shape {arr.shape}); need D >= 1")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise FeatureStoreError(f"embeddings must be real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def normalize_rows(arr, ids=None):
    """Return a float32 copy of ``arr`` with L2-normalized rows; a zero row is an error naming it."""
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(~(norms > 0))
    if bad.size:
        which = f"id {ids[bad[0]]!r}" if ids is not None else f"row {bad[0]}"
        raise FeatureStoreError(
            f"embedding {which} (and {bad.size - 1} more) has zero norm and cannot be L2-normalized; "
            "drop those items or pass normalize=False"
        )
    return (arr / norms[:, None]).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- writing


def _rename_exchange(a, b):
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_replaceable(path):
    """True when ``path`` may be replaced: empty, or holding only store files (plus faiss_* files)."""
    names = os.listdir(path)
    return all(n in _STORE_FILES or n.startswith("faiss_") for n in names)


def check_output(out_dir):
    """The absolute store path, or a FeatureStoreError if a store cannot be written there."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise FeatureStoreError(f"output folder's parent {parent} does not exist; create it first")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise FeatureStoreError(f"output {out_dir} exists and is not a folder; choose another --output")
        if not _is_replaceable(out_dir):
            raise FeatureStoreError(
                f"output folder {out_dir} exists and is not a feature store; "
                "choose another output (existing data is never deleted)"
            )
    return out_dir


def _write_store(out_dir, count, dim, ids, fill, meta, normalized):
    """Write a store atomically. ``fill(memmap)`` writes the rows and returns their SHA-256 object."""
    out_dir = check_output(out_dir)
    json.dumps(meta or {})  # a meta that cannot be saved fails before the long write
    parent, name = os.path.split(out_dir)
    tmp = os.path.join(parent, f".{name}{_TMP_TAG}{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        emb_path = os.path.join(tmp, EMBEDDINGS_FILE)
        if count:
            mm = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(count, dim))
            digest = fill(mm)
            mm.flush()
            del mm
        else:  # numpy cannot memory-map an empty file
            np.save(emb_path, np.zeros((0, dim), np.float32), allow_pickle=False)
            digest = hashlib.sha256()
        with open(emb_path, "rb+") as f:
            os.fsync(f.fileno())
        ids_bytes = "".join(i + "\n" for i in ids).encode("utf-8")
        digest.update(ids_bytes)
        _write_bytes(os.path.join(tmp, IDS_FILE), ids_bytes)
        full_meta = dict(meta or {})
        for key in RESERVED_META_KEYS:
            full_meta.pop(key, None)
        full_meta.update(
            format=STORE_FORMAT,
            version=STORE_VERSION,
            dim=int(dim),
            count=int(count),
            digest=digest.hexdigest(),
            normalized=bool(normalized),
        )
        meta_bytes = (json.dumps(full_meta, indent=1, sort_keys=True) + "\n").encode("utf-8")
        _write_bytes(os.path.join(tmp, META_FILE), meta_bytes)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote feature store %s (%d x %d)", out_dir, count, dim)
    return out_dir


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp, out_dir):
    parent, name = os.path.split(out_dir)
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
    elif _rename_exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # now holds the old store
    else:
        aside = os.path.join(parent, f".{name}{_OLD_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, aside)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(aside, out_dir)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(parent)


def save_features(out_dir, embeddings, ids, meta=None, normalize=True):
    """Write a feature store at ``out_dir`` atomically and return its absolute path.

    ``embeddings`` is an array-like [N, D] (numpy or torch), ``ids`` N strings.
    With ``normalize`` the rows are L2-normalized and a zero row is an error
    (a zero descriptor cannot be ranked; drop the item or store it unnormalized);
    with ``normalize=False`` rows are stored as given and ``meta["normalized"]``
    records whether they are unit length anyway (within 1e-3). N = 0 is
    allowed (an empty shard).
    An existing store at ``out_dir`` is replaced; any other existing non-empty
    folder is an error.
    """
    arr = _as_float32_matrix(embeddings)
    ids = validate_ids(ids)
    if arr.shape[0] != len(ids):
        raise FeatureStoreError(f"{arr.shape[0]} embedding rows but {len(ids)} ids; they must match")
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise FeatureStoreError(f"embedding of id {ids[row]!r} (row {row}) has NaN or infinite values")
    if normalize:
        arr = normalize_rows(arr, ids)
        normalized = True
    else:
        normalized = bool(np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-3))

    def fill(mm):
        mm[:] = arr
        return hashlib.sha256(memoryview(arr).cast("B"))

    return _write_store(out_dir, arr.shape[0], arr.shape[1], ids, fill, meta, normalized)


# ----------------------------------------------------------------------------- reading


def read_json_object(path, fix):
    """A JSON object from ``path``; a FeatureStoreError ending with ``fix`` if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"{path} cannot be read as JSON ({err}); {fix}") from None
    if not isinstance(obj, dict):
        raise FeatureStoreError(f"{path} is not a JSON object; {fix}")
    return obj


def _read_meta(path):
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
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
    return meta


def _interrupted_hint(path):
    parent, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(parent)
    except OSError:
        return ""
    aside = sorted(n for n in names if n.startswith(f".{name}{_OLD_TAG}"))
    if aside:
        return f" (a replace was interrupted: the previous store is at {os.path.join(parent, aside[-1])}; rename it back)"
    return ""


def load_features(path, mmap=True):
    """Load a complete store; raise FeatureStoreError when it is missing, incomplete or inconsistent."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FeatureStoreError(f"feature store {path} does not exist{_interrupted_hint(path)}")
    meta = _read_meta(path)
    emb_path = os.path.join(path, EMBEDDINGS_FILE)
    ids_path = os.path.join(path, IDS_FILE)
    for p in (emb_path, ids_path):
        if not os.path.isfile(p):
            raise FeatureStoreError(f"feature store {path} lacks {os.path.basename(p)}; re-create it")
    count, dim = meta["count"], meta["dim"]
    try:
        if mmap and count > 0:
            emb = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        else:
            emb = np.load(emb_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(f"{emb_path} is not a readable .npy array ({err}); re-create the store") from None
    if emb.dtype != np.float32 or emb.shape != (count, dim):
        raise FeatureStoreError(
            f"{emb_path} holds {emb.dtype} {tuple(emb.shape)} but {META_FILE} says float32 ({count}, {dim}); "
            "the store is inconsistent, re-create it"
        )
    try:
        with open(ids_path, encoding="utf-8") as f:
            ids = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise FeatureStoreError(f"{ids_path} cannot be read ({err}); re-create the store") from None
    if len(ids) != count:
        raise FeatureStoreError(
            f"{ids_path} has {len(ids)} ids but {META_FILE} says {count}; the store is inconsistent, re-create it"
        )
    if len(set(ids)) != count:
        validate_ids(ids, what=ids_path)
    return FeatureStore(embeddings=emb, ids=ids, meta=meta, path=path)


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
            f"{store.path}: meta 'shard' must be {{\"index\": k, \"total\": n}} with 1 <= k <= n, got {shard!r}"
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


def merge_stores(paths, out_dir):
    """Concatenate stores (in shard order when they carry shard meta) into a new store at ``out_dir``."""
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise FeatureStoreError("no stores to merge; give at least one store folder")
    if len(set(paths)) != len(paths):
        raise FeatureStoreError("a store is listed twice in the merge inputs; give each once")
    if os.path.abspath(os.fspath(out_dir)) in paths:
        raise FeatureStoreError(f"merge output {out_dir} is also an input; choose another output folder")
    stores, bad = [], []
    for p in paths:
        try:
            stores.append(load_features(p, mmap=True))
        except FeatureStoreError as err:
            bad.append(f"{p} ({'missing' if not os.path.isdir(p) else 'incomplete or inconsistent'})")
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
        {"path": s.path, "count": len(s), "digest": s.meta.get("digest"), "shard": s.meta.get("shard")}
        for s in stores
    ]
    dim = stores[0].dim

    def fill(mm):
        digest = hashlib.sha256()
        row = 0
        step = max(1, (64 << 20) // (4 * dim))
        for s in stores:
            for start in range(0, len(s), step):
                block = np.ascontiguousarray(s.embeddings[start : start + step])
                mm[row : row + len(block)] = block
                digest.update(memoryview(block).cast("B"))
                row += len(block)
        return digest

    normalized = all(s.meta.get("normalized", True) for s in stores)
    return _write_store(out_dir, len(ids), dim, ids, fill, meta, normalized)


# ----------------------------------------------------------------------------- importing


def read_ids_file(path):
    """Ids from a text file, one per line (surrounding whitespace and a trailing blank line ignored)."""
    if not os.path.isfile(path):
        raise FeatureStoreError(f"ids file {path} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError:
        raise FeatureStoreError(f"ids file {path} is not UTF-8 text") from None
    while lines and not lines[-1]:
        lines.pop()
    return validate_ids(lines, what=f"ids file {path}")


def import_features(embeddings_path, ids_path, out_dir, normalize=True, meta=None):
    """Make a store from an ``.npy`` [N, D] array and an ids file; return the loaded store."""
    if not os.path.isfile(embeddings_path):
        raise FeatureStoreError(f"embeddings file {embeddings_path} does not exist")
    try:
        emb = np.load(embeddings_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise FeatureStoreError(
            f"{embeddings_path} is not a numeric .npy array ({err}); save it with numpy.save"
        ) from None
    ids = read_ids_file(ids_path)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise FeatureStoreError(
            f"{embeddings_path} has shape {emb.shape} but {ids_path} has {len(ids)} ids; need [N, D] with N = {len(ids)}"
        )
    full_meta = {"imported_from": os.path.abspath(embeddings_path)}
    full_meta.update(meta or {})
    path = save_features(out_dir, emb, ids, meta=full_meta, normalize=normalize)
    return load_features(path)
