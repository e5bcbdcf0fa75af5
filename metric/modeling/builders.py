"""Builders: the only place where model parts read the config."""

import torch

from metric.core.errors import ConfigError
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
    return LOSSES.get(cfg.MODEL.LOSSES.NAME).from_config(cfg)
