"""Attention blocks on the last feature map, before pooling (``MODEL.HEADS.ATTENTION``).

``spatial`` (:class:`SpatialAttention2d`, DELG-style, the original project's ``att.py``)::

    y = BN(conv1x1(x))                       # C -> 512
    a = softplus(conv1x1(relu(y)))           # 512 -> 1: one score per position
    out = a * y / |y|                        # the L2-normalized (over channels) map, weighted

``soa`` (:class:`SecondOrderAttention`, non-local / SOLAR-style, the original's ``soa.py``)::

    f, g = relu(BN(conv1x1(x)))              # C -> C/2 each
    h = conv1x1(x)                           # C -> C/2
    A = softmax over positions j of f_i . g_j / sqrt(C/2)
    out = x + v(sum_j A_ij h_j)              # v: conv1x1 C/2 -> C

``none`` leaves the map as it is. Each block exposes ``out_channels`` (512 for ``spatial``, ``C``
for ``soa``): the width the head pools and the embedding layer takes (``MODEL.HEADS.IN_FEAT``).
State-dict keys (under ``head.attention.``) are the original's: ``conv1``, ``bn``, ``conv2``
(spatial); ``f.0``, ``f.1``, ``g.0``, ``g.1``, ``h``, ``v`` (soa).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registry import ATTENTIONS

SPATIAL_CHANNELS = 512  # the width of the spatial attention's output (the original's)


def _init_conv(conv):
    """ResNet-style (pycls) init: normal with std sqrt(2 / fan_out), zero bias."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


@ATTENTIONS.register("spatial")
class SpatialAttention2d(nn.Module):
    def __init__(self, in_channels, mid_channels=SPATIAL_CHANNELS, bn_eps=1e-5, bn_mom=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1)
        self.bn = nn.BatchNorm2d(mid_channels, eps=bn_eps, momentum=bn_mom)
        self.conv2 = nn.Conv2d(mid_channels, 1, 1)
        self.in_channels, self.out_channels = in_channels, mid_channels
        for conv in (self.conv1, self.conv2):
            _init_conv(conv)

    def scores(self, x):
        """``(a [N, 1, H, W], y [N, 512, H, W])``: the softplus scores and the map they weight."""
        y = self.bn(self.conv1(x))
        return F.softplus(self.conv2(F.relu(y))), y

    def forward(self, x):
        a, y = self.scores(x)
        return a * F.normalize(y, p=2.0, dim=1)


@ATTENTIONS.register("soa")
class SecondOrderAttention(nn.Module):
    def __init__(self, in_channels, bn_eps=1e-5, bn_mom=0.1):
        super().__init__()
        mid = in_channels // 2
        if mid < 1:
            raise ValueError(f"second-order attention needs at least 2 channels, got {in_channels}")

        def branch():
            return nn.Sequential(
                nn.Conv2d(in_channels, mid, 1), nn.BatchNorm2d(mid, eps=bn_eps, momentum=bn_mom), nn.ReLU()
            )

        self.f, self.g = branch(), branch()
        self.h = nn.Conv2d(in_channels, mid, 1)
        self.v = nn.Conv2d(mid, in_channels, 1)
        self.in_channels = self.out_channels = in_channels
        self.mid_channels = mid
        for conv in (self.f[0], self.g[0], self.h):
            _init_conv(conv)

    def forward(self, x):
        n, _, hh, ww = x.shape
        f = self.f(x).flatten(2)  # [N, C/2, HW]
        g = self.g(x).flatten(2)
        h = self.h(x).flatten(2)
        attn = torch.softmax(torch.bmm(f.transpose(1, 2), g) * self.mid_channels**-0.5, dim=-1)  # [N, HW, HW]
        z = torch.bmm(h, attn.transpose(1, 2)).view(n, self.mid_channels, hh, ww)  # z_i = sum_j A_ij h_j
        return x + self.v(z)


@ATTENTIONS.register("none")
def no_attention(in_channels, **_):
    """No attention block: the head pools the backbone's map itself."""
    return None


def attention_channels(name, in_channels):
    """The width of the map after attention ``name`` on ``in_channels`` (without building it)."""
    return SPATIAL_CHANNELS if name == "spatial" else in_channels
