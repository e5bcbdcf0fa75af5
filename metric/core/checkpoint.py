"""Checkpoints: atomic writes, auto-resume, weight loading.

A checkpoint is ``OUT_DIR/checkpoints/model_epoch_XXXX.pyth`` (XXXX = epochs
completed), a dict with ``epoch`` (0-based index of the last completed epoch, as
in the original project), ``model_state``, ``optimizer_state``,
``scheduler_state``, ``scaler_state``, ``rng_states`` (one entry per process),
``cfg`` (the merged config as yaml) and ``version``. It is written to a temporary
name and renamed into place, so a kill at any moment leaves the previous
checkpoint complete. Every read uses ``torch.load(weights_only=True)``.
"""

import glob
import logging
import os
import re

import torch

from metric.core.errors import CheckpointError

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


def model_state_of(obj, source="weights"):
    """The model state dict inside a checkpoint dict or a bare state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        obj = obj["model_state"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: not a checkpoint or state dict (expected a dict of tensors or {'model_state': ...})")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def _as_model_keys(state, model_keys):
    """A bare backbone state dict (no ``backbone.``/``head.`` prefix) gets ``backbone.``."""
    if any(k in model_keys for k in state):
        return state
    prefixed = {"backbone." + k: v for k, v in state.items()}
    if any(k in model_keys for k in prefixed):
        logger.info("weights look like a bare backbone state dict; loading them into model.backbone")
        return prefixed
    return state


def load_state(model, state, source="weights"):
    """Load a state dict into ``model``: missing and unexpected keys are logged by name,
    a shape mismatch is an error naming the key. Returns ``(missing, unexpected)``."""
    model = unwrap(model)
    own = model.state_dict()
    state = _as_model_keys(state, own)
    if not any(k in own for k in state):
        raise CheckpointError(f"{source}: none of its {len(state)} keys belong to this model (wrong file or config?)")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if missing:
        logger.warning("%s: %d keys missing (left as initialized): %s", source, len(missing), ", ".join(missing))
    if unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", source, len(unexpected), ", ".join(unexpected))
    return missing, unexpected


def load_weights(model, path):
    """Load initial weights from a checkpoint of ours / the original project or a bare state dict."""
    state = model_state_of(read_checkpoint(path), source=path)
    missing, unexpected = load_state(model, state, source=path)
    logger.info("loaded weights from %s", path)
    return missing, unexpected
