"""SuperGlobal's test-time refinements of GeM pooling (Shao et al., ICCV 2023), on a built model.

As in the authors' published modules (``gemp``, ``rgem``, ``sgem``):

- **GeM+** (``INFER.POOL_P`` > 0): the head's pooling is replaced by GeM with a fixed exponent,
  ``(mean_hw max(x, 1e-8)^p)^(1/p)``; the paper uses ``p = 4.6`` for models trained with GeM and
  ArcFace (the trained ``p`` is ignored).
- **Regional-GeM** (``INFER.REGIONAL_GEM``): before pooling, the feature map becomes
  ``0.5 x + 0.5 (avg_{s x s}(max(x, 0)^p_r))^(1/p_r)``, the GeM of each position's ``s x s``
  neighbourhood (stride 1, reflection padding of ``(s-1)/2``; replication padding when the map is
  too small to reflect) with ``p_r = INFER.REGIONAL_GEM_P`` (2.5) and ``s = INFER.REGIONAL_GEM_SIZE``
  (5). The authors write it as ``LPPool2d(p_r, s)`` of ``x / (s^2)^(1/p_r)``: the same value.
- **Scale-GeM** combines the descriptors of the scales: ``INFER.MULTISCALE_POOL max`` (the authors'
  default, ``p = inf``: element-wise maximum of the L2-normalized view descriptors) or ``sgem``
  (``(mean_v (x_v - g)^p)^(1/p) + g`` with ``g`` the smallest value of the image's view
  descriptors and ``p = INFER.MULTISCALE_P``; paper: 10) — see
  :func:`metric.engine.predictor.combine_views`.

The first two need the backbone's feature map, so they replace the ``pool_layer`` of the head
(a :class:`~metric.modeling.heads.linear_head.LinearHead` pooling a feature map); heads without
one are refused with a :class:`ConfigError`. They are applied by
:func:`metric.engine.predictor.build_inference_model` — extraction, ``tools/test_metric.py`` and
export — not to a model being trained (evaluation during training keeps the trained pooling).
"""

import torch.nn as nn
import torch.nn.functional as F

from metric.utils.errors import ConfigError

GEM_PLUS_EPS = 1e-8  # the authors' clamp


class RegionalGeM(nn.Module):
    """``0.5 x + 0.5 GeM_{p}(size x size neighbourhood)`` of a feature map [N, C, H, W]."""

    def __init__(self, p=2.5, size=5):
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ConfigError(f"Regional-GeM window size must be an odd integer >= 1, got {size}")
        self.p, self.size = float(p), int(size)

    def forward(self, x):
        pad = (self.size - 1) // 2
        y = x.clamp(min=0)
        if pad:
            mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
            y = F.pad(y, (pad, pad, pad, pad), mode=mode)
        y = F.avg_pool2d(y.pow(self.p), self.size, stride=1).pow(1.0 / self.p)
        return 0.5 * x + 0.5 * y

    def extra_repr(self):
        return f"p={self.p}, size={self.size}"


class SuperGlobalPool(nn.Module):
    """Regional-GeM (optional) then GeM with a fixed ``p`` (GeM+) or the head's own pooling."""

    def __init__(self, base, p=0.0, regional=None):
        super().__init__()
        self.base, self.p, self.regional = base, float(p), regional

    def forward(self, x):
        if self.regional is not None:
            x = self.regional(x)
        if self.p > 0:
            return x.clamp(min=GEM_PLUS_EPS).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return self.base(x)

    def extra_repr(self):
        return f"gem_plus_p={self.p}" if self.p > 0 else "own pooling"


def apply_superglobal_pooling(model, pool_p=0.0, regional=False, regional_p=2.5, regional_size=5):
    """Replace ``model.head.pool_layer`` in place when ``pool_p`` > 0 or ``regional``; returns ``model``."""
    if pool_p <= 0 and not regional:
        return model
    head = getattr(model, "head", None)
    pool = getattr(head, "pool_layer", None)
    if pool is None or getattr(head, "uses_stages", False) or type(pool).__name__ == "IdentityPool":
        name = type(head).__name__ if head is not None else type(model).__name__
        raise ConfigError(
            f"INFER.POOL_P / INFER.REGIONAL_GEM (SuperGlobal GeM+ / Regional-GeM) need a head that pools the "
            f"backbone's feature map (LinearHead without identity pooling); {name} has none: set INFER.POOL_P 0 "
            "and INFER.REGIONAL_GEM False"
        )
    if isinstance(pool, SuperGlobalPool):
        pool = pool.base
    head.pool_layer = SuperGlobalPool(pool, pool_p, RegionalGeM(regional_p, regional_size) if regional else None)
    return model
