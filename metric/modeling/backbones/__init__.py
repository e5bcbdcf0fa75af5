"""Backbones (registered on import). A backbone maps images [N, 3, H, W] to its last
feature map [N, C, h, w] and exposes ``out_channels``."""

from metric.modeling.backbones import resnest, resnet, resnet_wide, timm_backbone, vit  # noqa: F401
