"""Builders: the only place where model parts read the config."""

import torch

from metric.utils.errors import ConfigError
from metric.modeling.layers.margin_policy import dynamic_margins, scheduled_margin
from metric.modeling.losses.combined import CombinedLoss
from metric.modeling.model import MetricModel
from metric.modeling.registries import BACKBONES, HEADS, LOSSES


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
    return HEADS.get(cfg.MODEL.HEADS.NAME).from_config(cfg, in_feat)


def build_model(cfg):
    """A :class:`MetricModel` for ``cfg`` (random initialization, CPU, train mode)."""
    backbone = build_backbone(cfg)
    channels = _backbone_channels(backbone)
    in_feat = cfg.MODEL.HEADS.IN_FEAT or channels
    if in_feat != channels:
        raise ConfigError(
            f"MODEL.HEADS.IN_FEAT={cfg.MODEL.HEADS.IN_FEAT} but the {cfg.MODEL.TYPE} backbone outputs "
            f"{channels} channels; set MODEL.HEADS.IN_FEAT {channels} (or 0 to take it from the backbone)"
        )
    return MetricModel(backbone, build_head(cfg, in_feat))


def build_loss(cfg):
    """A :class:`CombinedLoss` of the losses in ``MODEL.LOSSES.NAME``, each with its
    ``MODEL.LOSSES.<KEY>.SCALE``; called as ``loss(logits, embeddings, labels)`` it returns
    ``(total, {name: unscaled value})``."""
    names = cfg.MODEL.LOSSES.NAME
    parts = []
    for name in [names] if isinstance(names, str) else names:
        loss_cls = LOSSES.get(name)
        parts.append((name, loss_cls.from_config(cfg), cfg.MODEL.LOSSES[loss_cls.cfg_key].SCALE))
    return CombinedLoss(parts)


# -- margins that change during training (applied by the trainer) ---------------------------

def class_counts(labels, num_classes):
    """Number of images of each class in a list of labels: a LongTensor [num_classes]."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)


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
