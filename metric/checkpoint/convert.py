"""Which weights file is this, and how do its keys map onto a model?

:func:`detect_format` looks at the content of a loaded file (never its name):

``pymetric``          a checkpoint of ours (``{'model_state', ..., 'version'}``) or a bare
                      ``MetricModel`` state dict (``backbone.*`` and ``head.*`` keys)
``pymetric_original`` a checkpoint of the original pymetric project: ``{'epoch', 'model_state',
                      'optimizer_state', 'cfg'}`` without ``version``; same keys as ours
``pycls_resnet``      a bare pycls ResNet state dict or a pycls ImageNet checkpoint: pycls keys
                      (``stem.*``, ``s1.b1.*``) without the ``backbone.`` prefix (+ ``head.fc.*``)
``torchvision_resnet`` a torchvision (or timm) ResNet/ResNeXt state dict: ``conv1.weight``,
                      ``bn1.*``, ``layer1.0.conv1.weight``, ..., ``fc.*``; also a converted SimCLR
                      checkpoint (``{'state_dict': ...}``, same keys): into a wide ResNet
                      (``MODEL.TYPE resnet50x1`` ...) by name, ``fc.*`` dropped with a log line
``resnest_imagenet``  a released ResNeSt state dict: ``conv1.0.weight``,
                      ``layer1.0.conv2.conv.weight``, ..., ``fc.*``
``dolg``              a checkpoint (or state dict) of the authors' DOLG project: ``globalmodel.*``
                      (a pycls ResNet), ``localmodel.*``, ``pool_g.p``, ``fc_t.*``, ``fc.*``,
                      ``desc_cls.*``; loads into ``MODEL.TYPE resnet`` + ``MODEL.HEADS.NAME DOLGHead``
``clip``              a whole CLIP / OpenCLIP model (``visual.conv1.weight``, ``visual.class_embedding``,
                      ...): its image encoder into ``MODEL.TYPE vit``, the text tower ignored
``clip_visual``       a CLIP image encoder alone (``conv1.weight``, ``class_embedding``,
                      ``transformer.resblocks.*``); see :mod:`metric.checkpoint.clip`
``state_dict``        any other dict of tensors (loaded by name, into the backbone if its keys
                      are backbone keys)

:func:`convert_state` then returns a state dict with the model's key names: torchvision keys
are renamed onto the pycls layout, bare backbone keys get the ``backbone.`` prefix (or
``backbone.model.`` for a timm backbone) and ImageNet classifiers are dropped with a log line.
"""

import logging
import re

import yaml

from metric.checkpoint.clip import CLIP_FORMATS, clip_to_ours, detect_clip
from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

# torchvision BasicBlock/Bottleneck module names -> pycls ResBlock names.
_TV_BLOCK = {
    "conv1": "f.a",
    "bn1": "f.a_bn",
    "conv2": "f.b",
    "bn2": "f.b_bn",
    "conv3": "f.c",
    "bn3": "f.c_bn",
    "downsample.0": "proj",
    "downsample.1": "bn",
}
_TV_BLOCK_RE = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(.+)$")


def detect_format(obj, state):
    """The format name of a loaded file ``obj`` whose model state dict is ``state``."""
    keys = set(state)
    if (
        "fc_t.weight" in keys
        and any(k.startswith("globalmodel.") for k in keys)
        and any(k.startswith("localmodel.") for k in keys)
    ):
        return "dolg"
    pycls_trunk = "stem.conv.weight" in keys and any(k.startswith("s1.b1.") for k in keys)
    if any(k.startswith("backbone.") for k in keys) and not pycls_trunk:
        if isinstance(obj, dict) and "model_state" in obj and "version" not in obj:
            return "pymetric_original"
        return "pymetric"
    if pycls_trunk:
        return "pycls_resnet"
    if "conv1.0.weight" in keys and "layer1.0.conv2.conv.weight" in keys:
        return "resnest_imagenet"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision_resnet"
    clip = detect_clip(keys)
    if clip:
        return clip
    return "state_dict"


def torchvision_to_pycls(state):
    """Rename torchvision ResNet keys onto the pycls layout; ``fc.*`` is left out.

    ``conv1``/``bn1`` -> ``stem.conv``/``stem.bn``; ``layerS.I.conv1`` -> ``sS.b{I+1}.f.a`` (``bn1`` ->
    ``f.a_bn``, ``conv2``/``bn2`` -> ``f.b``/``f.b_bn``, ``conv3``/``bn3`` -> ``f.c``/``f.c_bn``);
    ``downsample.0``/``.1`` -> ``proj``/``bn``. Unknown keys keep their names.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            new = "stem.conv." + key[len("conv1.") :]
        elif key.startswith("bn1."):
            new = "stem.bn." + key[len("bn1.") :]
        else:
            m = _TV_BLOCK_RE.match(key)
            new = f"s{m.group(1)}.b{int(m.group(2)) + 1}.{_TV_BLOCK[m.group(3)]}.{m.group(4)}" if m else key
        out[new] = value
    return out


# The authors' DOLG module names -> ours (the first matching prefix applies).
_DOLG_PREFIXES = (
    ("globalmodel.", "backbone."),
    ("pool_g.", "head.pool_layer."),
    ("fc_t.", "head.global_fc."),
    ("fc.", "head.embedding_layer."),
    ("desc_cls.", "head.classifier."),
    ("localmodel.aspp.aspp.", "head.local_branch.multi_atrous.convs."),
    ("localmodel.aspp.im_pool.", "head.local_branch.multi_atrous.image_pool."),
    ("localmodel.aspp.conv_after.", "head.local_branch.multi_atrous.fuse."),
    ("localmodel.", "head.local_branch."),
)


def dolg_to_ours(state):
    """Rename the keys of an authors' DOLG state dict onto a ``MetricModel`` with a pycls ResNet
    backbone and a :class:`~metric.modeling.heads.dolg_head.DOLGHead` (see ``_DOLG_PREFIXES``;
    ``desc_cls`` is their CurricularFace margin layer). Unknown keys keep their names."""
    out = {}
    for key, value in state.items():
        for old, new in _DOLG_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _check_dolg(obj, state, model, kind, source):
    if kind != "resnet":
        _refuse("dolg", "MODEL.TYPE resnet (its global model is a pycls ResNet)", kind, source)
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    logger.info("%s: checkpoint of the authors' DOLG project (epoch %s)", source, epoch)
    head = getattr(model, "head", None)
    if not getattr(head, "uses_stages", False):
        logger.info(
            "%s: a DOLG checkpoint into a %s: only its backbone (globalmodel.*) fits", source, type(head).__name__
        )
        return
    theirs = any(k.startswith("localmodel.aspp.") for k in state)
    ours = getattr(getattr(head, "local_branch", None), "multi_atrous", None) is not None
    if theirs != ours:
        raise CheckpointError(
            f"{source}: the DOLG checkpoint was trained {'with' if theirs else 'without'} the multi-atrous "
            f"module (localmodel.aspp.*), this model {'has' if ours else 'has not'}; set MODEL.DOLG.MULTI_ATROUS "
            f"{theirs}"
        )


def _backbone_kind(backbone):
    from metric.modeling.backbones.resnest import ResNeSt
    from metric.modeling.backbones.resnet import ResNet
    from metric.modeling.backbones.resnet_wide import WideResNet
    from metric.modeling.backbones.timm_backbone import TimmBackbone

    if isinstance(backbone, WideResNet):
        return "wide_resnet"
    from metric.modeling.backbones.vit import VisionTransformer

    for cls, kind in ((ResNet, "resnet"), (ResNeSt, "resnest"), (TimmBackbone, "timm"), (VisionTransformer, "vit")):
        if isinstance(backbone, cls):
            return kind
    return type(backbone).__name__


def _drop(state, prefixes, source, what):
    dropped = sorted(k for k in state if k.startswith(prefixes))
    if dropped:
        logger.info("%s: %s ignored: %s", source, what, ", ".join(dropped))
    return {k: v for k, v in state.items() if k not in dropped}


def _check_stride_convention(backbone, source):
    """torchvision puts the stride on the 3x3 conv: warn when the model has it on the 1x1."""
    block = getattr(getattr(backbone, "s2", None), "b1", None)
    f = getattr(block, "f", None)
    if f is not None and hasattr(f, "c") and f.a.stride != (1, 1):
        logger.warning(
            "%s: torchvision ResNets put the stride on the 3x3 conv, but this model has it on the 1x1 "
            "(RESNET.STRIDE_1X1 True): the weights load but compute different features; set "
            "RESNET.STRIDE_1X1 False to reproduce torchvision",
            source,
        )


def _refuse(fmt, wanted, kind, source):
    raise CheckpointError(f"{source}: a {fmt.replace('_', ' ')} state dict loads into {wanted}, not MODEL.TYPE {kind}")


def convert_state(obj, state, model, source="weights"):
    """``(format, state)``: ``state`` (from file ``obj``) renamed onto ``model``'s keys."""
    fmt = detect_format(obj, state)
    backbone = getattr(model, "backbone", None)
    kind = _backbone_kind(backbone) if backbone is not None else None
    if fmt == "pymetric_original":
        _compare_original_cfg(obj, model, source)
    if fmt == "dolg" and backbone is not None:
        _check_dolg(obj, state, model, kind, source)
        return fmt, dolg_to_ours(state)
    if fmt in ("pymetric", "pymetric_original") or backbone is None:
        return fmt, state
    if fmt in CLIP_FORMATS:
        if kind != "vit":
            _refuse(fmt, "MODEL.TYPE vit", kind, source)
        return fmt, clip_to_ours(fmt, state, backbone, source)
    if kind == "timm":  # timm's own key names; its classifier is left out (the backbone has none)
        own = set(backbone.state_dict())
        state = {"model." + k: v for k, v in state.items()}
        extra = sorted(k for k in state if k not in own)
        if extra and len(extra) < len(state):
            logger.info(
                "%s: keys the timm backbone does not have (its classifier) ignored: %s", source, ", ".join(extra)
            )
            state = {k: v for k, v in state.items() if k in own}
    elif fmt == "state_dict":
        return fmt, state
    elif fmt == "torchvision_resnet" and kind == "wide_resnet":  # torchvision's own layout: names kept
        state = _drop(state, ("fc.",), source, "classifier (fc)")
    elif fmt == "torchvision_resnet":
        if kind != "resnet":
            _refuse(fmt, "MODEL.TYPE resnet (RESNET.STRIDE_1X1 False), resnet50x1 .. resnet152x2 or timm", kind, source)
        _drop(state, ("fc.",), source, "ImageNet classifier")  # for the log line
        state = torchvision_to_pycls(state)
        _check_stride_convention(backbone, source)
    elif fmt == "resnest_imagenet":
        if kind != "resnest":
            _refuse(fmt, "MODEL.TYPE resnest50 | resnest101 | resnest200 | resnest269 or timm", kind, source)
        state = _drop(state, ("fc.",), source, "ImageNet classifier")
    elif fmt == "pycls_resnet":
        if kind != "resnet":
            _refuse(fmt, "MODEL.TYPE resnet", kind, source)
        state = _drop(state, ("head.fc.",), source, "ImageNet classifier")
    logger.info("%s: %s weights, loading them into model.backbone", source, fmt.replace("_", " "))
    return fmt, {"backbone." + k: v for k, v in state.items()}


# --- the original project's config, for information ---------------------------------------


def _registry_name(registry, obj):
    for name in registry.names():
        if type(obj) is registry.get(name):
            return name
    return type(obj).__name__


def model_summary(model):
    """The config-like description of a built MetricModel, from its modules."""
    from metric.modeling.registry import MARGIN_LAYERS, POOL_LAYERS

    head = getattr(model, "head", None)
    out = {}
    for key, attr, registry in (("POOL_LAYER", "pool_layer", POOL_LAYERS), ("CLS_LAYER", "classifier", MARGIN_LAYERS)):
        if hasattr(head, attr):
            out[key] = _registry_name(registry, getattr(head, attr))
    if hasattr(head, "embedding_dim"):
        out["REDUCTION_DIM"] = head.embedding_dim
    if hasattr(head, "num_classes"):
        out["NUM_CLASSES"] = head.num_classes
    return out


def _compare_original_cfg(obj, model, source):
    """Log the original checkpoint's model and where this model's head differs from it."""
    text = obj.get("cfg")
    try:
        data = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        logger.info(
            "%s: checkpoint of the original pymetric project (epoch %s), config not readable", source, obj.get("epoch")
        )
        return
    m = data.get("MODEL") if isinstance(data.get("MODEL"), dict) else {}
    heads = m.get("HEADS") if isinstance(m.get("HEADS"), dict) else {}
    theirs = {k: heads.get(k) for k in ("POOL_LAYER", "CLS_LAYER", "REDUCTION_DIM", "NUM_CLASSES")}
    if theirs["CLS_LAYER"] == "arcface" and "VERSION" not in data:
        theirs["CLS_LAYER"] = "curricularface"  # the original 'arcface' was CurricularFace
    logger.info(
        "%s: checkpoint of the original pymetric project (MODEL.TYPE %s, DEPTH %s, epoch %s)",
        source,
        m.get("TYPE"),
        m.get("DEPTH"),
        obj.get("epoch"),
    )
    ours = model_summary(model)
    diffs = [
        f"{k} {theirs[k]} (checkpoint) vs {ours[k]} (model)"
        for k in theirs
        if theirs[k] is not None and k in ours and str(theirs[k]) != str(ours[k])
    ]
    if diffs:
        logger.info("%s: this model's head differs from the checkpoint's config: %s", source, "; ".join(diffs))
