"""Putting weights into a model: our checkpoints (resume and inference), the original
project's, and ImageNet state dicts (torchvision ResNet, ResNeSt, pycls, timm), whose kind is
decided by content in :mod:`metric.checkpoint.convert`. Missing, unexpected and mis-shaped keys
are named, never dropped silently.
"""

import hashlib
import logging

import torch

from metric.checkpoint.convert import convert_state
from metric.checkpoint.files import read_checkpoint
from metric.utils import io
from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def model_state_of(obj, source="weights"):
    """The model state dict inside a checkpoint dict or a bare state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        obj = obj["model_state"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{source}: not a checkpoint or state dict (expected a dict of tensors, or a dict with 'model_state')"
        )
    wrappers = (("module.", "a DataParallel / DDP wrapper"), ("_orig_mod.", "torch.compile"))
    stripped = True
    while stripped:  # wrappers nest in any order, e.g. torch.compile(DDP(model)): _orig_mod.module.
        stripped = False
        for prefix, what in wrappers:
            wrapped = sum(k.startswith(prefix) for k in obj)
            if wrapped:
                logger.info("%s: '%s' prefix (%s) removed from %d keys", source, prefix, what, wrapped)
                obj = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in obj.items()}
                stripped = True
    return obj


def unwrap(model):
    """The model inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``)
    wrappers, whose state dict has the model's own keys."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = model.module if hasattr(model, "module") else None
        if inner is None:
            return model
        model = inner


def select_weights(obj, kind="raw", source="weights"):
    """The checkpoint dict ``obj`` with the weights ``kind`` asks for as its ``model_state``:
    ``raw`` (as it is), ``ema`` (its ``ema_state``, the EMA of the weights: an error if it has
    none) or ``auto`` (``ema_state`` when there is one, else as it is)."""
    ema = obj.get("ema_state") if isinstance(obj, dict) else None
    if kind == "raw" or (kind == "auto" and not isinstance(ema, dict)):
        return obj
    if not isinstance(ema, dict):
        raise CheckpointError(
            f"{source} holds no EMA weights (it was trained without TRAIN.EMA.ENABLED); "
            "use TEST.WEIGHTS_KIND raw or auto"
        )
    logger.info("%s: using its EMA weights (TEST.WEIGHTS_KIND %s)", source, kind)
    return {**obj, "model_state": ema}


def _as_model_keys(state, model_keys):
    """A bare backbone state dict (no ``backbone.``/``head.`` prefix) gets ``backbone.``."""
    if any(k in model_keys for k in state):
        return state
    prefixed = {"backbone." + k: v for k, v in state.items()}
    if any(k in model_keys for k in prefixed):
        logger.info("weights look like a bare backbone state dict; loading them into model.backbone")
        return prefixed
    return state


# Keys of the margin layer; when only their first dimension (the class count) differs, the
# weights come from training on other classes and the layer is left as initialized.
CLASSIFIER_PREFIX = "head.classifier."


def _class_count_change(key, file_shape, model_shape):
    return (
        key.startswith(CLASSIFIER_PREFIX)
        and len(file_shape) == len(model_shape) >= 1
        and file_shape[1:] == model_shape[1:]
    )


def _names(keys, most=10):
    return ", ".join(keys[:most]) + (f", ... ({len(keys) - most} more)" if len(keys) > most else "")


def load_state(model, state, source="weights", fit=False):
    """Load a state dict into ``model``: missing and unexpected keys are logged by name; a
    classifier whose class count differs is skipped (logged, reported as missing); any other
    shape mismatch is an error naming the key. With ``fit`` (inference), a missing or unexpected
    key outside the training-only classifier is an error too. Returns ``(missing, unexpected)``."""
    model = unwrap(model)
    own = model.state_dict()
    state = _as_model_keys(state, own)
    state = cut_classifier_to_shard(state, model)
    adapt = getattr(getattr(model, "backbone", None), "adapt_state_dict", None)
    if adapt is not None:  # e.g. a ViT's positional embedding made for another image size
        state = adapt(state, prefix="backbone.", source=source)
    if not any(k in own for k in state):
        raise CheckpointError(f"{source}: none of its {len(state)} keys belong to this model (wrong file or config?)")
    skipped, bad = [], []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            (skipped if _class_count_change(key, value.shape, own[key].shape) else bad).append(key)
    if bad:
        key = bad[0]
        more = (
            f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})"
            if len(bad) > 1
            else ""
        )
        raise CheckpointError(
            f"{source}: shape mismatch for {key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}{more}"
        )
    if skipped:
        logger.info(
            "%s: the classifier was trained on %d classes, this model has %d: %s left as initialized "
            "(fine-tuning on new classes)",
            source,
            state[skipped[0]].shape[0],
            own[skipped[0]].shape[0],
            ", ".join(skipped),
        )
    loaded = {k: v for k, v in state.items() if k in own and k not in skipped}
    missing = sorted(k for k in own if k not in loaded)
    unexpected = sorted(k for k in state if k not in own)
    if fit:
        off = [k for k in missing + unexpected if not _is_classifier(k)]
        if off:
            what = "missing from" if off[0] in missing else "unexpected in"
            raise CheckpointError(
                f"{source} does not fit the config: {off[0]} is {what} the weights ({len(off)} such keys); "
                "use the config the weights were trained with"
            )
    model.load_state_dict(loaded, strict=False)
    not_skipped = [k for k in missing if k not in skipped]
    if not_skipped:
        logger.warning("%s: %d keys missing (left as initialized): %s", source, len(not_skipped), _names(not_skipped))
    if unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", source, len(unexpected), _names(unexpected))
    return missing, unexpected


def load_weights(model, path, fit=False, kind="raw"):
    """Load initial weights into ``model`` (``metric.load_weights``), detecting the file's kind by
    its content (see :mod:`metric.checkpoint.convert`): a checkpoint of ours or of the original
    pymetric project, a bare model or backbone state dict, a torchvision ResNet, a released
    ResNeSt or a pycls ImageNet state dict, or a timm state dict for a timm backbone.
    Returns ``(missing, unexpected)`` key lists."""
    if io.isdir(path):
        raise CheckpointError(f"weights path {path} is a folder: name the weights file in it")
    obj = select_weights(read_checkpoint(path), kind, source=path)
    state = model_state_of(obj, source=path)
    fmt, state = convert_state(obj, state, unwrap(model), source=path)
    missing, unexpected = load_state(model, state, source=path, fit=fit)
    logger.info("loaded weights from %s (%s)", path, fmt.replace("_", " "))
    return missing, unexpected


def find_classifier_shard(model):
    """``(layer, first row, rows)`` of a margin layer holding a shard of the classes (Partial FC),
    or None when the model holds every class."""
    layer = getattr(getattr(unwrap(model), "head", None), "classifier", None)
    if layer is None or not getattr(layer, "sharded", False):
        return None
    start, _ = layer.shard
    return layer, start * layer.centers, layer.weight.shape[0]


def cut_classifier_to_shard(state, model):
    """``state`` with a full classifier matrix (checkpoints always hold all classes) cut to the rows
    of the model's shard, when the model holds a Partial FC shard; else ``state`` unchanged (a
    matrix of another class count stays as it is, to be reported)."""
    found = find_classifier_shard(model)
    key = CLASSIFIER_PREFIX + "weight"
    if found is None or key not in state:
        return state
    layer, first, rows = found
    full = state[key]
    if full.ndim != 2 or full.shape[0] != layer.num_classes * layer.centers:
        return state
    return {**state, key: full[first : first + rows]}


def _is_classifier(key):
    return key.startswith("head.classifier.")


def load_inference_weights(model, path, kind="auto"):
    """Load weights for evaluation, extraction or export: like :func:`load_weights`, but every key
    outside the training-only classifier must match, so a config that does not fit the weights
    (another pooling, a BN neck more or less, ...) is an error instead of a silently different model.
    ``kind``: which weights of a checkpoint holding an EMA (:func:`select_weights`)."""
    return load_weights(model, path, fit=True, kind=kind)


def load_for_resume(model, state, path):
    """Load our own checkpoint to resume training: the model must be exactly the one saved."""
    own = unwrap(model).state_dict()
    weights = cut_classifier_to_shard(model_state_of(state, path), model)
    diff = sorted(set(own) ^ set(weights)) + sorted(k for k in own if k in weights and own[k].shape != weights[k].shape)
    if diff:
        raise CheckpointError(
            f"{path} holds a checkpoint of a different model ({diff[0]} differs); "
            "use a new OUT_DIR, or TRAIN.AUTO_RESUME False and TRAIN.WEIGHTS to start from it"
        )
    unwrap(model).load_state_dict(weights)


def config_differences(saved_yaml, cfg, sections=("MODEL", "RESNET", "BN"), ignore=()):
    """Dotted keys of ``sections`` whose values differ between a checkpoint's stored config and
    ``cfg`` (keys present in only one of them, and keys in ``ignore``, are left out)."""
    import yaml

    saved = yaml.safe_load(saved_yaml or "") or {}
    current = yaml.safe_load(cfg.dump())

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    def pick(c):
        return flat({k: c.get(k, {}) for k in sections if "." not in k}) | {
            k: _get_dotted(c, k) for k in sections if "." in k
        }

    a, b = pick(saved), pick(current)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and k not in ignore)


def _get_dotted(d, key):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def weights_digest(model):
    """A short hash of every parameter and buffer (to compare ranks, runs or extractions), except
    those each process holds its own part of (a Partial FC classifier shard: the names in
    ``_ddp_params_and_buffers_to_ignore``)."""
    h = hashlib.sha256()
    own = set(getattr(unwrap(model), "_ddp_params_and_buffers_to_ignore", ()))
    for key, value in sorted(unwrap(model).state_dict().items()):
        if key in own:
            continue
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
