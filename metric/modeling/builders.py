"""Builders: the only place where model parts read the config."""

import logging

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from metric.modeling.layers.attention import attention_channels
from metric.modeling.layers.margin_policy import dynamic_margins, scheduled_margin
from metric.modeling.layers.partial_fc import PartialFC
from metric.modeling.losses.combined import CombinedLoss, ComputedLoss
from metric.modeling.model import MetricModel
from metric.modeling.registry import BACKBONES, HEADS, LOSSES
from metric.utils import distributed as du
from metric.utils.errors import ConfigError

logger = logging.getLogger(__name__)

# The class centres of a Partial FC head: a different shard on every process.
PARTIAL_FC_WEIGHT = "head.classifier.weight"


def build_backbone(cfg):
    return BACKBONES.get(cfg.MODEL.TYPE)(cfg)


def _backbone_channels(backbone):
    channels = getattr(backbone, "out_channels", None)
    if channels is None:
        with torch.no_grad():
            was_training = backbone.training
            channels = backbone.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
            backbone.train(was_training)
    return channels


def build_head(cfg, in_feat):
    """The head of ``MODEL.HEADS.NAME``; ``in_feat``: the channels of the map(s) it is given (a
    ``(stage-3, stage-4)`` pair for a head with ``uses_stages``)."""
    head = HEADS.get(cfg.MODEL.HEADS.NAME).from_config(cfg, in_feat)
    pfc = cfg.MODEL.HEADS.PARTIAL_FC
    if pfc.ENABLED:
        head.partial_fc = PartialFC(pfc.SAMPLE_RATE, cfg.MODEL.LOSSES.LABEL_SMOOTHING, cfg.RNG_SEED)
        start, stop = head.classifier.shard
        logger.info(
            "Partial FC: this process holds classes %d..%d of %d (%d process(es)), sample rate %g",
            start,
            stop - 1,
            cfg.MODEL.HEADS.NUM_CLASSES,
            du.world_size(),
            pfc.SAMPLE_RATE,
        )
    return head


def _stage_channels(cfg, backbone):
    """``(C3, C4)`` of a backbone that exposes its last two stages, or a ConfigError."""
    stages = getattr(backbone, "stage_channels", None)
    if stages is None or not hasattr(backbone, "forward_stages"):
        what = f"timm {cfg.MODEL.TIMM.NAME}" if cfg.MODEL.TYPE == "timm" else cfg.MODEL.TYPE
        raise ConfigError(
            f"MODEL.HEADS.NAME {cfg.MODEL.HEADS.NAME} needs the backbone's stage-3 and stage-4 feature maps, but "
            f"the {what} backbone does not expose two stages; use resnet, resnest*, resnet50x* or a timm CNN "
            "(e.g. MODEL.TYPE timm MODEL.TIMM.NAME resnet50)"
        )
    return tuple(stages)


def _check_in_feat(cfg, channels):
    """``MODEL.HEADS.IN_FEAT`` (0: any) must be the width the head pools: the backbone's
    ``channels``, or the output of the attention block ``MODEL.HEADS.ATTENTION``."""
    h = cfg.MODEL.HEADS
    if h.ATTENTION != "none" and not getattr(HEADS.get(h.NAME), "supports_attention", False):
        raise ConfigError(
            f"MODEL.HEADS.ATTENTION {h.ATTENTION} is not supported by MODEL.HEADS.NAME {h.NAME}; "
            "use MODEL.HEADS.ATTENTION none or MODEL.HEADS.NAME LinearHead"
        )
    width = attention_channels(h.ATTENTION, channels)
    if h.IN_FEAT and h.IN_FEAT != width:
        after = "" if h.ATTENTION == "none" else f" and MODEL.HEADS.ATTENTION {h.ATTENTION} turns them into {width}"
        hint = ""
        if h.ATTENTION == "none" and h.IN_FEAT == attention_channels("spatial", channels):
            hint = ", or MODEL.HEADS.ATTENTION spatial (whose output has that width)"
        raise ConfigError(
            f"MODEL.HEADS.IN_FEAT={h.IN_FEAT} but the {cfg.MODEL.TYPE} backbone outputs {channels} channels{after}; "
            f"set MODEL.HEADS.IN_FEAT {width} (or 0 to take it from the model){hint}"
        )


def build_model(cfg):
    """A :class:`MetricModel` for ``cfg`` (random initialization, CPU, train mode)."""
    backbone = build_backbone(cfg)
    channels = _backbone_channels(backbone)
    _check_in_feat(cfg, channels)
    in_feat = channels
    if getattr(HEADS.get(cfg.MODEL.HEADS.NAME), "uses_stages", False):
        in_feat = _stage_channels(cfg, backbone)
    model = MetricModel(backbone, build_head(cfg, in_feat))
    if cfg.MODEL.HEADS.PARTIAL_FC.ENABLED:
        # Each process holds its own shard of the classes: DistributedDataParallel leaves it alone.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [PARTIAL_FC_WEIGHT])
    return model


def build_loss(cfg):
    """A :class:`CombinedLoss` of the losses in ``MODEL.LOSSES.NAME``, each with its
    ``MODEL.LOSSES.<KEY>.SCALE``; called as ``loss(logits, embeddings, labels)`` it returns
    ``(total, {name: unscaled value})``. With ``MODEL.HEADS.PARTIAL_FC.ENABLED`` the head has
    computed the cross-entropy already (in place of the logits): ``cross_entropy`` passes it on."""
    names = cfg.MODEL.LOSSES.NAME
    parts = []
    for name in [names] if isinstance(names, str) else names:
        loss_cls = LOSSES.get(name)
        loss = loss_cls.from_config(cfg)
        if name == "cross_entropy" and cfg.MODEL.HEADS.PARTIAL_FC.ENABLED:
            loss = ComputedLoss()
        parts.append((name, loss, cfg.MODEL.LOSSES[loss_cls.cfg_key].SCALE))
    return CombinedLoss(parts)


# -- margins that change during training (applied by the trainer) ---------------------------


def class_counts(labels, num_classes):
    """Number of images of each class in a list of labels: a LongTensor [num_classes]."""
    labels = np.asarray(labels, dtype=np.int64)  # an array (e.g. ItemList.labels) is counted without a copy per item
    return torch.from_numpy(np.bincount(labels, minlength=num_classes).astype(np.int64))


def apply_dynamic_margins(cfg, head, labels):
    """With ``MODEL.HEADS.DYNAMIC_MARGIN``, give the margin layer per-class margins from the
    class frequencies of ``labels`` (the training list). Returns the margins or None."""
    h = cfg.MODEL.HEADS
    if not h.DYNAMIC_MARGIN:
        return None
    counts = class_counts(labels, h.NUM_CLASSES)
    margins = dynamic_margins(
        counts, h.DYNAMIC_MARGIN_A, h.DYNAMIC_MARGIN_B, h.DYNAMIC_MARGIN_LAMBDA, h.DYNAMIC_MARGIN_NORMALIZE
    )
    head.classifier.set_class_margins(margins)
    return margins


def apply_margin_schedule(cfg, head, epoch):
    """With ``MODEL.HEADS.MARGIN_SCHEDULE``, set the margin layer's margin for (0-based) ``epoch``
    and return it; without a schedule return None."""
    h = cfg.MODEL.HEADS
    if not h.MARGIN_SCHEDULE:
        return None
    margin = scheduled_margin(h.MARGIN_SCHEDULE, epoch, h.MARGIN_SCHEDULE_MODE)
    head.classifier.set_margin(margin)
    return margin
