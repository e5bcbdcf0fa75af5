"""Wide ResNets in the torchvision layout: ``resnet50x1 | resnet50x2 | resnet50x4 | resnet152x1 |
resnet152x2`` (the original project's names; the SimCLR family).

Stem and every stage are ``k`` times as wide as the torchvision ResNet of that depth (``k`` from
the name): the stem has ``64 k`` channels, stage ``i`` (0-based) bottleneck width ``64 k 2^i`` and
output ``256 k 2^i``, so the last map has ``2048 k`` channels. The stride of a downsampling block
sits on its 3x3 convolution (torchvision >= 0.2 and SimCLR; ``RESNET.STRIDE_1X1`` does not apply).
State-dict keys are torchvision's without ``fc``: ``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer4.2.bn3``, ``downsample.0`` / ``downsample.1``. So a torchvision ResNet-50/152 state dict
loads into ``resnet50x1`` / ``resnet152x1`` as it is, and a converted SimCLR checkpoint
(``{'state_dict': ...}``) into the model of its width (see :mod:`metric.checkpoint.convert`).

For tiny test models ``RESNET.STEM_WIDTH`` and ``RESNET.WIDTH_PER_GROUP`` (64 and 64 by default)
replace the two 64s above, as they do for the pycls ResNet.
"""

import torch.nn as nn

from metric.modeling.backbones.resnet import init_resnet_weights
from metric.modeling.registry import BACKBONES

STAGE_DEPTHS = {50: (3, 4, 6, 3), 152: (3, 8, 36, 3)}
# The registered names: depth and width multiplier (those of the original project).
WIDE_RESNETS = {
    "resnet50x1": (50, 1),
    "resnet50x2": (50, 2),
    "resnet50x4": (50, 4),
    "resnet152x1": (152, 1),
    "resnet152x2": (152, 2),
}


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride) -> 1x1, ``relu(x + f(x))``; ``downsample``
    (1x1 conv + BN) when the shape changes. ``downsample`` is registered first, as in the original
    project, so the state-dict order is its order."""

    def __init__(self, w_in, w_b, w_out, stride, eps=1e-5, mom=0.1):
        super().__init__()
        self.downsample = None
        if stride != 1 or w_in != w_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False), nn.BatchNorm2d(w_out, eps=eps, momentum=mom)
            )
        self.conv1 = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w_b, eps=eps, momentum=mom)
        self.conv2 = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w_b, eps=eps, momentum=mom)
        self.conv3 = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w_out, eps=eps, momentum=mom)
        self.bn3.final_bn = True
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class WideResNet(nn.Module):
    """``forward`` returns the last feature map ``[N, 2048 k, H/32, W/32]`` (``out_channels``);
    ``forward_stages`` the stage-3 and stage-4 maps (``stage_channels``), e.g. for DOLG."""

    def __init__(
        self,
        depth=50,
        width_mult=1,
        stem_width=64,
        width_per_group=64,
        bn_eps=1e-5,
        bn_mom=0.1,
        zero_init_final_gamma=False,
    ):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"wide ResNet depth {depth} not in {sorted(STAGE_DEPTHS)}")
        if width_mult < 1:
            raise ValueError(f"width multiplier {width_mult} < 1")
        k = width_mult
        self.width_mult = k
        w_stem = stem_width * k
        self.conv1 = nn.Conv2d(3, w_stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w_stem, eps=bn_eps, momentum=bn_mom)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        w_in, outs = w_stem, []
        for i, n in enumerate(STAGE_DEPTHS[depth]):
            w_b, w_out = width_per_group * k * 2**i, 4 * stem_width * k * 2**i
            blocks = [
                Bottleneck(w_in if j == 0 else w_out, w_b, w_out, 2 if (i > 0 and j == 0) else 1, bn_eps, bn_mom)
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            w_in = w_out
            outs.append(w_out)
        self.out_channels = w_in
        self.stage_channels = (outs[2], outs[3])
        init_resnet_weights(self, zero_init_final_gamma)

    def _stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self._stem(x)))))

    def forward_stages(self, x):
        f3 = self.layer3(self.layer2(self.layer1(self._stem(x))))
        return f3, self.layer4(f3)


def wide_resnet_spec(name):
    """``(depth, k)`` of a registered wide-ResNet name, e.g. ``resnet50x2`` -> ``(50, 2)``; None
    for other names."""
    return WIDE_RESNETS.get(name)


def _builder(name):
    depth, k = WIDE_RESNETS[name]

    def build(cfg):  # RESNET.STEM_WIDTH / WIDTH_PER_GROUP and BN.* apply
        return WideResNet(
            depth=depth,
            width_mult=k,
            stem_width=cfg.RESNET.STEM_WIDTH,
            width_per_group=cfg.RESNET.WIDTH_PER_GROUP,
            bn_eps=cfg.BN.EPS,
            bn_mom=cfg.BN.MOM,
            zero_init_final_gamma=cfg.BN.ZERO_INIT_FINAL_GAMMA,
        )

    build.__name__ = f"build_{name}"
    return build


for _name in WIDE_RESNETS:
    BACKBONES.register(_name)(_builder(_name))
