"""ResNet / ResNeXt in the pycls layout (state-dict keys ``stem.*``, ``s1.b1.f.a``, ...).

The keys of depths 50/101/152 are exactly those of the original project's
checkpoints (see ``shared/compat``). Depths 18/34 use basic blocks with stage
widths ``w_b * (1, 2, 4, 8)``, so ``WIDTH_PER_GROUP 64`` gives torchvision's
ResNet-18/34 shapes and smaller widths give tiny models for tests and demos.
"""

import torch.nn as nn

from metric.modeling.registry import BACKBONES

STAGE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _bn(w, eps, mom):
    return nn.BatchNorm2d(w, eps=eps, momentum=mom)


def init_resnet_weights(module, zero_init_final_gamma):
    """He-normal convolutions (biases zero), BN weight 1 and bias 0; with
    ``zero_init_final_gamma`` the last BN of each residual branch (``final_bn``) starts at 0.
    Shared by the ResNet, wide-ResNet and ResNeSt backbones."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            zero = zero_init_final_gamma and getattr(m, "final_bn", False)
            nn.init.constant_(m.weight, 0.0 if zero else 1.0)
            nn.init.zeros_(m.bias)


class BasicTransform(nn.Module):
    """3x3 -> 3x3."""

    def __init__(self, w_in, w_out, stride, w_b=None, num_gs=1, stride_1x1=False, eps=1e-5, mom=0.1):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_out, 3, stride=stride, padding=1, bias=False)
        self.a_bn = _bn(w_out, eps, mom)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_out, w_out, 3, stride=1, padding=1, bias=False)
        self.b_bn = _bn(w_out, eps, mom)
        self.b_bn.final_bn = True

    def forward(self, x):
        return self.b_bn(self.b(self.a_relu(self.a_bn(self.a(x)))))


class BottleneckTransform(nn.Module):
    """1x1 -> 3x3 (grouped) -> 1x1; the stride sits on the 1x1 (MSRA) or on the 3x3."""

    def __init__(self, w_in, w_out, stride, w_b, num_gs=1, stride_1x1=False, eps=1e-5, mom=0.1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_1x1 else (1, stride)
        self.a = nn.Conv2d(w_in, w_b, 1, stride=s1, bias=False)
        self.a_bn = _bn(w_b, eps, mom)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=s3, padding=1, groups=num_gs, bias=False)
        self.b_bn = _bn(w_b, eps, mom)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = _bn(w_out, eps, mom)
        self.c_bn.final_bn = True

    def forward(self, x):
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    """``relu(x + f(x))`` with a 1x1 projection (``proj``, ``bn``) when the shape changes."""

    def __init__(self, w_in, w_out, stride, trans, w_b, num_gs, stride_1x1, eps, mom):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = _bn(w_out, eps, mom)
        self.f = trans(w_in, w_out, stride, w_b, num_gs, stride_1x1, eps, mom)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return self.relu(shortcut + self.f(x))


class ResStage(nn.Sequential):
    def __init__(self, w_in, w_out, stride, depth, trans, w_b, num_gs, stride_1x1, eps, mom):
        super().__init__()
        for i in range(depth):
            block = ResBlock(
                w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, trans, w_b, num_gs, stride_1x1, eps, mom
            )
            self.add_module(f"b{i + 1}", block)


class ResStem(nn.Module):
    """7x7/2 conv, BN, ReLU, 3x3/2 max pool."""

    def __init__(self, w_out, eps, mom):
        super().__init__()
        self.conv = nn.Conv2d(3, w_out, 7, stride=2, padding=3, bias=False)
        self.bn = _bn(w_out, eps, mom)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class ResNet(nn.Module):
    """ResNet/ResNeXt trunk; ``forward`` returns the last feature map [N, out_channels, H/32, W/32]."""

    def __init__(
        self,
        depth=50,
        trans_fun="auto",
        num_groups=1,
        width_per_group=64,
        stride_1x1=True,
        stem_width=64,
        bn_eps=1e-5,
        bn_mom=0.1,
        zero_init_final_gamma=False,
    ):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"ResNet depth {depth} not in {sorted(STAGE_DEPTHS)}")
        if trans_fun == "auto":
            trans_fun = "basic_transform" if depth < 50 else "bottleneck_transform"
        w_b = width_per_group * num_groups
        if trans_fun == "bottleneck_transform":
            trans = BottleneckTransform
            # Stage outputs 4 * stem width * 2**i: 256..2048 for ResNet and ResNeXt alike (pycls).
            widths = [4 * stem_width * 2**i for i in range(4)]
        elif trans_fun == "basic_transform":
            trans = BasicTransform
            widths = [w_b * 2**i for i in range(4)]
        else:
            raise ValueError(f"unknown ResNet block {trans_fun!r}")
        self.stem = ResStem(stem_width, bn_eps, bn_mom)
        w_in = stem_width
        for i, (d, w_out) in enumerate(zip(STAGE_DEPTHS[depth], widths)):
            stage = ResStage(
                w_in, w_out, 1 if i == 0 else 2, d, trans, w_b * 2**i, num_groups, stride_1x1, bn_eps, bn_mom
            )
            self.add_module(f"s{i + 1}", stage)
            w_in = w_out
        self.out_channels = w_in
        self.stage_channels = (widths[2], widths[3])  # of the stage-3 and stage-4 maps
        init_resnet_weights(self, zero_init_final_gamma)

    def forward(self, x):
        x = self.stem(x)
        return self.s4(self.s3(self.s2(self.s1(x))))

    def forward_stages(self, x):
        """The stage-3 and stage-4 maps ``(f3 [N, C3, H/16, W/16], f4 [N, C4, H/32, W/32])``,
        channels ``stage_channels`` (for heads that use both, e.g. DOLG)."""
        f3 = self.s3(self.s2(self.s1(self.stem(x))))
        return f3, self.s4(f3)


def build_resnet(cfg):
    """ResNet from ``MODEL.DEPTH`` and the ``RESNET.*`` / ``BN.*`` keys."""
    return ResNet(
        depth=cfg.MODEL.DEPTH,
        trans_fun=cfg.RESNET.TRANS_FUN,
        num_groups=cfg.RESNET.NUM_GROUPS,
        width_per_group=cfg.RESNET.WIDTH_PER_GROUP,
        stride_1x1=cfg.RESNET.STRIDE_1X1,
        stem_width=cfg.RESNET.STEM_WIDTH,
        bn_eps=cfg.BN.EPS,
        bn_mom=cfg.BN.MOM,
        zero_init_final_gamma=cfg.BN.ZERO_INIT_FINAL_GAMMA,
    )


BACKBONES.register("resnet")(build_resnet)
