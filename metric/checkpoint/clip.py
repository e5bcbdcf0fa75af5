"""CLIP / OpenCLIP image-encoder weights for ``MODEL.TYPE vit``.

Two layouts are recognised by their keys (:func:`detect_clip`):

``clip``         a state dict of a whole CLIP model, OpenAI's or OpenCLIP's (``visual.conv1.weight``,
                 ``visual.class_embedding``, ..., plus the text tower: ``token_embedding.*``,
                 ``transformer.*``, ``ln_final.*``, ``text_projection``, ``logit_scale``, ...);
                 the text tower is ignored with a log line
``clip_visual``  the image encoder alone (``conv1.weight``, ``class_embedding``,
                 ``positional_embedding``, ``transformer.resblocks.{i}.*``, ``proj``, no prefix)

Their keys are the backbone's (:mod:`metric.modeling.backbones.vit`). The file must hold exactly
the backbone's keys (a missing or extra block is an error that names the key and both block
counts); a positional embedding of another grid is resampled when the weights are loaded, and any
other shape difference (another width, patch or embedding size) is reported by the loader with
the first key and both shapes.

**Input normalization.** CLIP was trained on images normalized with its own mean and std
(:data:`CLIP_MEAN`, :data:`CLIP_STD`); pymetric normalizes with ImageNet's everywhere (training,
extraction, export, the Kaggle graph). The patch convolution is linear and sees whole patches,
so the difference is folded into the weights when they are imported: ``conv1.weight`` is scaled
per input channel by ``IMAGENET_STD / CLIP_STD``, and the constant the mean shift adds to every
patch token goes into ``positional_embedding[1:]``. The imported model then computes CLIP's own
image features from pymetric's input (checked against OpenCLIP in the tests).
"""

import logging

import torch

from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

CLIP_FORMATS = ("clip", "clip_visual")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# pymetric's input normalization (metric.datasets.transforms.MEAN / STD; a test checks they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_VISUAL_KEYS = ("conv1.weight", "class_embedding", "positional_embedding")


def detect_clip(keys):
    """``"clip"``, ``"clip_visual"`` or None for a set of state-dict keys."""
    if all("visual." + k in keys for k in _VISUAL_KEYS):
        return "clip"
    if all(k in keys for k in _VISUAL_KEYS) and any(k.startswith("transformer.resblocks.") for k in keys):
        return "clip_visual"
    return None


def _blocks(keys):
    return len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")})


def _describe(state):
    """The ViT size of CLIP weights in config terms, e.g. ``WIDTH 1024 LAYERS 24 PATCH_SIZE 14 EMB_DIM 768``."""
    conv, proj = state.get("conv1.weight"), state.get("proj")
    parts = [
        f"WIDTH {conv.shape[0]}" if conv is not None and conv.dim() == 4 else None,
        f"LAYERS {_blocks(state)}",
        f"PATCH_SIZE {conv.shape[-1]}" if conv is not None and conv.dim() == 4 else None,
        f"EMB_DIM {proj.shape[1]}" if proj is not None and proj.dim() == 2 else None,
    ]
    return "the file is " + " ".join(p for p in parts if p)


def fold_normalization(conv_weight, positional_embedding):
    """``(conv1.weight, positional_embedding)`` that give on ImageNet-normalized input what the
    given ones give on CLIP-normalized input (float32)."""
    w = conv_weight.float()
    # x_clip = x_imagenet * a + b per channel, with a = std_in / std_clip, b = (mean_in - mean_clip) / std_clip
    a = torch.tensor(IMAGENET_STD) / torch.tensor(CLIP_STD)
    b = (torch.tensor(IMAGENET_MEAN) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    shift = (w * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))  # what the constant b adds to each patch token
    pe = positional_embedding.float().clone()
    pe[1:] += shift
    return w * a.view(1, 3, 1, 1), pe


def clip_to_ours(fmt, state, backbone, source="weights"):
    """The backbone part of a CLIP state dict (``fmt`` from :func:`detect_clip`) as model keys
    (``backbone.*``), its normalization folded in. A CheckpointError names the first key whose
    shape differs (after resampling the positional embedding) or that only one side has."""
    if fmt == "clip":
        other = sorted(k for k in state if not k.startswith("visual."))
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        if other:
            names = sorted({k.split(".")[0] for k in other})
            logger.info(
                "%s: a whole CLIP model: its text tower and other non-image keys ignored (%d keys: %s)",
                source,
                len(other),
                ", ".join(names),
            )
    own = backbone.state_dict()
    prefix = "visual." if fmt == "clip" else ""
    adapt = getattr(backbone, "adapt_state_dict", None)
    if adapt is not None:  # a positional embedding made for another image size is resampled
        state = adapt(state, prefix="", source=source)
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(
            f"{source}: CLIP weights of another ViT size ({_describe(state)}): shape mismatch for {prefix}{bad[0]}: "
            f"file {tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)} ({len(bad)} keys differ)"
        )
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        key, where = (extra[0], "in the file but not in this model") if extra else (missing[0], "missing from the file")
        raise CheckpointError(
            f"{source}: CLIP weights do not fit this ViT: {prefix}{key} is {where} (the file has {_blocks(state)} "
            f"blocks, MODEL.LAYERS is {_blocks(own)}; {len(missing)} keys missing, {len(extra)} extra)"
        )
    state = dict(state)
    state["conv1.weight"], state["positional_embedding"] = fold_normalization(
        state["conv1.weight"], state["positional_embedding"]
    )
    logger.info(
        "%s: CLIP's input normalization folded into conv1 and the positional embedding "
        "(pymetric's input is ImageNet-normalized)",
        source,
    )
    logger.info(
        "%s: %s weights (%d blocks), loading them into model.backbone",
        source,
        "CLIP image encoder" if fmt == "clip_visual" else "CLIP model's image encoder",
        _blocks(state),
    )
    return {"backbone." + k: v for k, v in state.items()}
