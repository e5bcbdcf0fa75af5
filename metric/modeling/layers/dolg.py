"""The parts of DOLG (Yang et al., "DOLG: Single-Stage Image Retrieval with Deep Orthogonal
Fusion of Local and Global Features", ICCV 2021) that are not plain layers: the multi-atrous
module, the attention-weighted local branch and the orthogonal fusion.

They compute what the authors' code computes (``SpatialAttention2d``, ``ASPP`` and the fusion
in ``DOLG.forward``); their state-dict keys are mapped from the authors' ones by
:mod:`metric.checkpoint.convert` (``localmodel.conv1`` -> ``local_branch.conv1``,
``localmodel.aspp.aspp.i`` -> ``local_branch.multi_atrous.convs.i``, ``localmodel.aspp.im_pool.1``
-> ``local_branch.multi_atrous.image_pool.1``, ``localmodel.aspp.conv_after.0`` ->
``local_branch.multi_atrous.fuse.0``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

ATROUS_DILATIONS = (6, 12, 18)
ATROUS_WIDTH = 512


class MultiAtrous(nn.Module):
    """1x1 conv and three 3x3 convs of dilation 6/12/18 (``width`` channels each, with bias, no
    activation), plus an image-pooling branch (global average pool -> 1x1 conv -> ReLU, spread
    back over the map); concatenated as [image pool, 1x1, d6, d12, d18] (the authors' order)
    -> 1x1 conv to ``out_channels`` -> ReLU."""

    def __init__(self, in_channels, out_channels, width=ATROUS_WIDTH, dilations=ATROUS_DILATIONS):
        super().__init__()
        convs = [nn.Conv2d(in_channels, width, 1)]
        convs += [nn.Conv2d(in_channels, width, 3, padding=d, dilation=d) for d in dilations]
        self.convs = nn.ModuleList(convs)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, 1), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(width * (len(convs) + 1), out_channels, 1), nn.ReLU())

    def forward(self, x):
        # The authors upsample the pooled 1x1 map bilinearly to the map size (every position gets
        # the same value) and concatenate it first. The fusing 1x1 conv is linear, so its part on
        # that constant map is computed once per image on the 1x1 map and broadcast: the same
        # numbers, without a [N, width, H, W] copy, and it converts to TensorFlow (an ``expand``
        # to the dynamic map size does not).
        width = self.image_pool[1].out_channels
        fuse = self.fuse[0]
        out = F.conv2d(torch.cat([conv(x) for conv in self.convs], dim=1), fuse.weight[:, width:], fuse.bias)
        return self.fuse[1](out + F.conv2d(self.image_pool(x), fuse.weight[:, :width]))


class LocalBranch(nn.Module):
    """DOLG's local branch on the stage-3 map: [multi-atrous ->] 1x1 conv (with bias) -> BN = ``x``;
    returns ``normalize(x) * softplus(conv2(relu(x)))`` (channel-wise L2 normalization, one
    attention score per position)."""

    def __init__(self, channels, multi_atrous=False, bn_eps=1e-5, bn_mom=0.1):
        super().__init__()
        self.multi_atrous = MultiAtrous(channels, channels) if multi_atrous else None
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_mom)
        self.conv2 = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        if self.multi_atrous is not None:
            x = self.multi_atrous(x)
        x = self.bn(self.conv1(x))
        attention = F.softplus(self.conv2(F.relu(x)))
        # F.normalize, written out: its ``expand`` of the norm does not convert to TensorFlow.
        return x / x.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12) * attention


def orthogonal_fusion(fl, fg, eps=1e-12):
    """DOLG's orthogonal fusion: at each position of the local map ``fl`` [N, C, H, W], remove
    its projection ``(fl . fg) / |fg|^2 * fg`` on the global descriptor ``fg`` [N, C]; then
    average over the positions -> ``fo`` [N, C]. (``eps`` only guards an all-zero ``fg``.)"""
    g = fg[:, :, None, None]
    coef = (fl * g).sum(dim=1, keepdim=True) / fg.pow(2).sum(dim=1).clamp(min=eps)[:, None, None, None]
    return (fl - coef * g).mean(dim=(2, 3))
