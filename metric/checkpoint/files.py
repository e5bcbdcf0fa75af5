"""Checkpoint files: names, atomic writes, reads, finding the newest complete one.

A checkpoint is ``OUT_DIR/checkpoints/model_epoch_XXXX.pyth`` (XXXX = epochs
completed), a dict with ``epoch`` (0-based index of the last completed epoch, as
in the original project), ``model_state``, ``optimizer_state``,
``scaler_state``, ``rng_states`` (one entry per process),
``cfg`` (the merged config as yaml), ``bad_images`` (unreadable training images found so
far), with ``TRAIN.EMA.ENABLED`` ``ema_state`` (the EMA of the weights, a state dict) and
``ema_updates``, in ``best.pyth`` (:func:`best_checkpoint_path`) ``best`` (metric, value, epoch),
``version`` and ``checksum``: a SHA-256 of everything else (every tensor's dtype, shape
and bytes, every other value), written with the file and checked by every read, so flipped
bits are refused instead of loaded. It is written to a temporary name and renamed into place,
so a kill at any moment leaves the previous checkpoint complete. Every read uses
``torch.load(weights_only=True)`` and refuses non-finite floating-point values.

Putting weights into a model is :mod:`metric.checkpoint.load`.
"""

import hashlib
import logging
import os
import re
import zipfile

import torch

from metric.checkpoint.formats import read_foreign
from metric.utils import io
from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)


CHECKPOINT_VERSION = 2  # 2: with "checksum"; 1 (and the original project's) have none


_NAME = "model_epoch_{:04d}.pyth"


_PATTERN = re.compile(r"model_epoch_(\d{4,})\.pyth$")


def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def best_checkpoint_path(out_dir):
    """``OUT_DIR/checkpoints/best.pyth``: the best evaluation so far (``TRAIN.BEST_METRIC``). Its
    name does not match the periodic checkpoints', so auto-resume never takes it."""
    return os.path.join(checkpoint_dir(out_dir), "best.pyth")


def checkpoint_path(out_dir, epoch):
    """Path of the checkpoint written after 0-based ``epoch``."""
    return os.path.join(checkpoint_dir(out_dir), _NAME.format(epoch + 1))


def list_checkpoints(out_dir):
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(out_dir)
    if not io.isdir(folder):
        return []
    found = []
    for name in io.ls(folder):
        m = _PATTERN.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return [p for _, p in sorted(found)]


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (:func:`metric.utils.io.atomic_write`: temporary
    ``.<name>.tmp<pid>``, fsync, rename), after removing the temporaries of killed writers.
    A full disk, read-only file system or missing permission is an OutputError naming the path."""
    folder = os.path.dirname(path)
    io.mkdirs(folder, "checkpoint")
    io.clean_stale_temps(folder)
    state = {**state, "version": CHECKPOINT_VERSION}
    state["checksum"] = state_checksum(state)
    with io.atomic_write(path, "wb", what="checkpoint") as f:
        torch.save(state, f)
    return path


def _feed(h, obj, key=""):
    """Hash ``obj`` (nested dicts, lists, tensors, plain values) in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            _feed(h, obj[k], f"{key}/{k!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{key}:seq{len(obj)}".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{key}[{i}]")
    else:
        h.update(f"{key}={obj!r};".encode())


def state_checksum(state):
    """SHA-256 (hex) of a checkpoint dict without its ``checksum`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def floating_tensors(obj, key=""):
    """``(name, tensor)`` of every floating-point tensor in nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from floating_tensors(v, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from floating_tensors(v, f"{key}[{i}]")


def verify_checkpoint(obj, path):
    """Check what was read back from ``path``: the checksum of a checkpoint of ours (version 2
    on) and that every floating-point value is finite. Raises :class:`CheckpointError`."""
    if isinstance(obj, dict) and "checksum" in obj:
        if obj["checksum"] != state_checksum(obj):
            raise CheckpointError(f"{path}: content does not match its checksum (the file is corrupted)")
    elif isinstance(obj, dict) and isinstance(obj.get("version"), int) and obj["version"] >= 2:
        raise CheckpointError(f"{path}: a version {obj['version']} checkpoint without its checksum (damaged)")
    for key, t in floating_tensors(obj):
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {key} holds non-finite values (NaN or inf); refusing to load it")
    return obj


def check_resumable(obj, path):
    """``obj`` must be a training checkpoint of ours (epoch, model and optimizer state)."""
    ok = (
        isinstance(obj, dict)
        and isinstance(obj.get("epoch"), int)
        and isinstance(obj.get("model_state"), dict)
        and obj["model_state"]
        and all(isinstance(v, torch.Tensor) for v in obj["model_state"].values())
        and isinstance(obj.get("optimizer_state"), dict)
    )
    if not ok:
        raise CheckpointError(
            f"{path}: not a training checkpoint (expected a dict with epoch, model_state and optimizer_state)"
        )
    return obj


def read_checkpoint(path):
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors."""
    if not io.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with io.open_path(path, "rb") as f:
            obj = read_foreign(f, path)  # safetensors; a TorchScript archive is refused
            if obj is None:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read weights file {path}: {first}") from None
    return verify_checkpoint(obj, path)


# The first bytes of a file of torch.save's legacy (pre-zip) format: pickle protocol 2, then
# torch's magic number as a 10-byte long.
_LEGACY_HEAD = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def incomplete_reason(path):
    """Why ``path`` is not a complete ``torch.save`` file, or ``None`` when it looks complete.

    Cheap: reads the zip archive's directory (at the end of the file, so a file cut short by a
    kill or a full disk has none), not the tensors. A file of the legacy (pre-zip) format cannot
    be checked this way and counts as complete; reading it tells.
    """
    try:
        path = io.get_local_path(path)  # through the path manager (another storage backend)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_HEAD))
        if head == _LEGACY_HEAD:
            return None
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        return f"not a complete torch.save archive ({err})"
    if not any(m.filename == "data.pkl" or m.filename.endswith("/data.pkl") for m in members):
        return "a zip archive without data.pkl, not a torch.save file"
    if any(m.header_offset + m.compress_size > size for m in members):
        return "a member ends past the end of the file"
    return None


def latest_checkpoint(out_dir):
    """``(path, state)`` of the newest complete checkpoint, or ``(None, None)``.

    Candidates are checked newest first with :func:`incomplete_reason` (no full read); only the
    one chosen is read, and if that read fails the next older candidate is tried.
    """
    for path in reversed(list_checkpoints(out_dir)):
        reason = incomplete_reason(path)
        if reason is not None:
            logger.warning("skipping unreadable checkpoint %s: %s", path, reason)
            continue
        try:
            return path, check_resumable(read_checkpoint(path), path)
        except CheckpointError as err:
            logger.warning("skipping unreadable checkpoint: %s", err)
    return None, None
