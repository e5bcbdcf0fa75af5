"""ResNeSt (Zhang et al. 2020, "ResNeSt: Split-Attention Networks").

The published ImageNet design: split-attention bottlenecks with radix 2 and
cardinality 1, bottleneck width 64, a deep stem (three 3x3 convolutions, stem
width 32 for ResNeSt-50 and 64 for the deeper ones), average-pool downsampling
in the shortcut (``avg_down``) and, in the first block of stages 2-4, a 3x3
average pool of stride 2 after the split-attention convolution (``avd``,
``avd_first=False``). Dilation 1, no DropBlock.

State-dict keys and shapes are those of the released ResNeSt ImageNet weights
and of the original pymetric checkpoints (``conv1.0.weight``,
``layer1.0.conv2.conv.weight``, ``layer1.0.conv2.fc1.weight``,
``layer1.0.downsample.1.weight``, ...), without the ImageNet classifier
``fc.*``. ``forward`` returns the last feature map [N, 2048, H/32, W/32].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.backbones.resnet import init_resnet_weights
from metric.modeling.registry import BACKBONES

# Blocks per stage and stem width of the published models.
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 200: (3, 24, 36, 3), 269: (3, 30, 48, 8)}
STEM_WIDTHS = {50: 32, 101: 64, 200: 64, 269: 64}


def _bn(w, eps, mom):
    return nn.BatchNorm2d(w, eps=eps, momentum=mom)


class SplitAttentionConv(nn.Module):
    """Grouped 3x3 convolution producing ``radix`` splits of ``channels`` each, weighted by
    a softmax over the splits computed from their pooled sum (fc1 -> BN -> ReLU -> fc2).

    Keys: ``conv`` (3x3, ``groups = cardinality * radix``), ``bn0``, ``fc1``, ``bn1``, ``fc2``.
    """

    def __init__(self, w_in, channels, stride=1, radix=2, cardinality=1, reduction=4, min_inter=32, eps=1e-5, mom=0.1):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality
        inter = max(w_in * radix // reduction, min_inter)
        self.conv = nn.Conv2d(
            w_in, channels * radix, 3, stride=stride, padding=1, groups=cardinality * radix, bias=False
        )
        self.bn0 = _bn(channels * radix, eps, mom)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter, 1, groups=cardinality)
        self.bn1 = _bn(inter, eps, mom)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1, groups=cardinality)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv(x)))
        n, rc = x.shape[:2]
        r, c = self.radix, rc // self.radix
        # 4-D tensors only (no 5-D views of the feature map): exports to ONNX / TensorFlow with
        # dynamic height and width.
        splits = torch.split(x, c, dim=1) if r > 1 else (x,)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        att = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        if r > 1:
            # [N, card * r * c', 1, 1] -> softmax over the radix within each cardinal group.
            att = F.softmax(att.view(n, self.cardinality, r, -1).transpose(1, 2), dim=1).reshape(n, r * c, 1, 1)
            return sum(s * a for s, a in zip(splits, torch.split(att, c, dim=1)))
        return x * torch.sigmoid(att)


class SplitAttentionBottleneck(nn.Module):
    """1x1 -> split-attention 3x3 [-> 3x3 avg pool, stride s] -> 1x1, plus the shortcut.

    Keys: ``conv1``, ``bn1``, ``conv2.*`` (:class:`SplitAttentionConv`), ``conv3``, ``bn3``
    and, when the shape changes, ``downsample.1`` (1x1 conv) and ``downsample.2`` (BN) after
    an average pool ``downsample.0``.
    """

    expansion = 4

    def __init__(
        self,
        w_in,
        planes,
        stride=1,
        radix=2,
        cardinality=1,
        bottleneck_width=64,
        avd=True,
        avd_first=False,
        eps=1e-5,
        mom=0.1,
    ):
        super().__init__()
        w_b = int(planes * (bottleneck_width / 64.0)) * cardinality
        w_out = planes * self.expansion
        block_stride = stride
        self.avd = avd and stride > 1
        self.avd_first = avd_first
        self.conv1 = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.bn1 = _bn(w_b, eps, mom)
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.conv2 = SplitAttentionConv(w_b, w_b, stride, radix, cardinality, eps=eps, mom=mom)
        self.conv3 = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.bn3 = _bn(w_out, eps, mom)
        self.bn3.final_bn = True
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if block_stride != 1 or w_in != w_out:
            self.downsample = nn.Sequential(
                nn.AvgPool2d(block_stride, block_stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(w_in, w_out, 1, bias=False),
                _bn(w_out, eps, mom),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if self.avd and self.avd_first:
            out = self.avd_layer(out)
        out = self.conv2(out)
        if self.avd and not self.avd_first:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNeSt(nn.Module):
    """ResNeSt trunk (deep stem, four stages of split-attention bottlenecks), no classifier."""

    def __init__(
        self,
        depth=50,
        stem_width=None,
        radix=2,
        cardinality=1,
        bottleneck_width=64,
        avd=True,
        avd_first=False,
        bn_eps=1e-5,
        bn_mom=0.1,
        zero_init_final_gamma=False,
    ):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"ResNeSt depth {depth} not in {sorted(STAGE_DEPTHS)}")
        stem_width = stem_width or STEM_WIDTHS[depth]
        eps, mom = bn_eps, bn_mom
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
            _bn(stem_width, eps, mom),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
            _bn(stem_width, eps, mom),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, 2 * stem_width, 3, padding=1, bias=False),
        )
        self.bn1 = _bn(2 * stem_width, eps, mom)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        w_in = 2 * stem_width
        for i, n in enumerate(STAGE_DEPTHS[depth]):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(
                    SplitAttentionBottleneck(
                        w_in,
                        planes,
                        stride if j == 0 else 1,
                        radix,
                        cardinality,
                        bottleneck_width,
                        avd,
                        avd_first,
                        eps=eps,
                        mom=mom,
                    )
                )
                w_in = planes * SplitAttentionBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = w_in
        self.stage_channels = (256 * SplitAttentionBottleneck.expansion, w_in)  # stage-3 and stage-4 maps
        self.depth = depth
        init_resnet_weights(self, zero_init_final_gamma)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_stages(self, x):
        """The stage-3 (``layer3``) and stage-4 (``layer4``) maps ``(f3, f4)``, channels
        ``stage_channels`` (for heads that use both, e.g. DOLG)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f3 = self.layer3(self.layer2(self.layer1(x)))
        return f3, self.layer4(f3)


def build_resnest(cfg, depth=None):
    """ResNeSt from ``MODEL.TYPE`` (resnest50 | resnest101 | resnest200 | resnest269, or resnest
    with ``MODEL.DEPTH``) and the ``BN.*`` keys."""
    return ResNeSt(
        depth=depth or cfg.MODEL.DEPTH,
        bn_eps=cfg.BN.EPS,
        bn_mom=cfg.BN.MOM,
        zero_init_final_gamma=cfg.BN.ZERO_INIT_FINAL_GAMMA,
    )


BACKBONES.register("resnest")(build_resnest)
for _depth in STAGE_DEPTHS:
    BACKBONES.register(f"resnest{_depth}")(lambda cfg, _d=_depth: build_resnest(cfg, _d))
