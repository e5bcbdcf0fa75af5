"""AdaCos (Zhang et al. 2019): cosine logits ``s * cos`` with no margin and a scale chosen
from the number of classes (fixed) or from the batch (adaptive)."""

import math

import torch

from metric.modeling.layers.margins import ClassWeights
from metric.modeling.registry import MARGIN_LAYERS


def fixed_adacos_scale(num_classes):
    """The fixed AdaCos scale ``sqrt(2) * ln(C - 1)``."""
    if num_classes < 3:
        raise ValueError(f"AdaCos needs at least 3 classes (its scale is sqrt(2) ln(C - 1)), got {num_classes}")
    return math.sqrt(2.0) * math.log(num_classes - 1)


@MARGIN_LAYERS.register("adacos")
class AdaCos(ClassWeights):
    """Logits ``s * cos(theta)``; ``s`` is the buffer ``scale`` (state-dict key ``scale``).

    It starts at the fixed scale ``sqrt(2) * ln(C - 1)``. With ``adaptive=True`` every
    training forward with labels first updates it from the batch, without gradient::

        B = mean_i sum_{k != y_i} exp(s * cos_ik)       (with the previous s)
        s = ln(B) / cos(min(pi / 4, theta_med))

    where ``theta_med`` is the median (the lower one for an even batch) of the target
    angles, then returns ``s * cos`` with the new ``s``. ``adaptive=False`` keeps the fixed
    scale. In evaluation mode the scale does not change. On a block of the classes
    (:meth:`margin_logits` with ``all_sum``), the sum over k is summed over the blocks.
    """

    def __init__(self, in_features, num_classes, adaptive=True, shard=None, init_seed=None, **unused):
        super().__init__(in_features, num_classes, shard=shard, init_seed=init_seed)
        self.adaptive = adaptive
        self.register_buffer("scale", torch.full((1,), fixed_adacos_scale(num_classes)))

    def margin_logits(self, cos, labels, cols, target=None, all_sum=None):
        if labels is not None and self.adaptive and self.training:
            with torch.no_grad():
                c = cos.detach().float().clamp(-1.0, 1.0)
                owned = cols >= 0
                if target is None:
                    target = c.gather(1, cols[:, None])
                target = target.detach().float().clamp(-1.0, 1.0).squeeze(1)
                others = torch.exp(self.scale * c)
                if c.shape[1]:  # the target (where it is in this block) is left out of the sum
                    idx = cols.clamp(min=0)[:, None]
                    others = others.scatter(1, idx, torch.where(owned[:, None], 0.0, others.gather(1, idx)))
                sums = others.sum(dim=1)
                if all_sum is not None:
                    sums = all_sum(sums)
                b_avg = sums.mean()
                theta_med = torch.acos(target).median()
                new = torch.log(b_avg) / torch.cos(theta_med.clamp(max=math.pi / 4))
                self.scale.copy_(new.reshape(1))
        return cos * self.scale.to(cos.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, adaptive={self.adaptive}"
