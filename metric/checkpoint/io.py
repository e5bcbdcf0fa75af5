"""Checkpoint files: names, atomic writes, reads, finding the newest complete one.

A checkpoint is ``OUT_DIR/checkpoints/model_epoch_XXXX.pyth`` (XXXX = epochs
completed), a dict with ``epoch`` (0-based index of the last completed epoch, as
in the original project), ``model_state``, ``optimizer_state``,
``scheduler_state``, ``scaler_state``, ``rng_states`` (one entry per process),
``cfg`` (the merged config as yaml) and ``version``. It is written to a temporary
name and renamed into place, so a kill at any moment leaves the previous
checkpoint complete. Every read uses ``torch.load(weights_only=True)``.

Putting weights into a model is :mod:`metric.checkpoint.load`.
"""

import glob
import logging
import os
import re

import torch

from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)


CHECKPOINT_VERSION = 1


_NAME = "model_epoch_{:04d}.pyth"


_PATTERN = re.compile(r"model_epoch_(\d{4,})\.pyth$")


def checkpoint_dir(out_dir):
    return os.path.join(out_dir, "checkpoints")


def checkpoint_path(out_dir, epoch):
    """Path of the checkpoint written after 0-based ``epoch``."""
    return os.path.join(checkpoint_dir(out_dir), _NAME.format(epoch + 1))


def list_checkpoints(out_dir):
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(out_dir), "model_epoch_*.pyth")):
        m = _PATTERN.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "version": CHECKPOINT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path):
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read weights file {path}: {first}") from None


def latest_checkpoint(out_dir):
    """``(path, state)`` of the newest readable checkpoint, or ``(None, None)``."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            logger.warning("skipping unreadable checkpoint: %s", err)
    return None, None

