"""Global pooling layers: feature map [N, C, H, W] -> [N, C].

``identity`` passes through backbones that already output a vector ([N, C] or [N, C, 1, 1]).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.registry import POOL_LAYERS
from metric.utils.errors import ConfigError


@POOL_LAYERS.register("avgpool")
class AvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


@POOL_LAYERS.register("maxpool")
class MaxPool(nn.Module):
    def forward(self, x):
        return x.amax(dim=(2, 3))


@POOL_LAYERS.register("avgmaxpool")
class AvgMaxPool(nn.Module):
    """Average plus maximum over the spatial positions (same number of channels)."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))


@POOL_LAYERS.register("identity")
class IdentityPool(nn.Module):
    """No pooling, for backbones that output a vector: [N, C] stays, [N, C, 1, 1] -> [N, C]."""

    def forward(self, x):
        if x.dim() == 2:
            return x
        if x.dim() == 4 and x.shape[2] == x.shape[3] == 1:
            return x.flatten(1)
        raise ConfigError(
            f"MODEL.HEADS.POOL_LAYER identity needs backbone outputs of shape [N, C] or [N, C, 1, 1], got "
            f"{list(x.shape)}; choose avgpool, maxpool, gempool or avgmaxpool for feature maps"
        )


@POOL_LAYERS.register("gempool")
class GeM(nn.Module):
    """Generalized-mean pooling (Radenović et al.): ``(mean(clamp(x, eps) ** p)) ** (1 / p)``.

    ``p`` is a 1-element parameter (state-dict key ``p``, as in the original project);
    ``learn_p=False`` keeps it fixed (registered as a buffer-like frozen parameter so
    checkpoints keep the same keys).
    """

    def __init__(self, p=3.0, learn_p=True, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x):
        p = self.p.to(x.dtype)
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1).flatten(1)
        return pooled.pow(1.0 / p)

    def extra_repr(self):
        return f"p={self.p.item():.4f}, learn_p={self.p.requires_grad}, eps={self.eps}"
