"""Circle loss on pairs of embeddings within a batch (Sun et al. 2020)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.losses.pairwise import at_least_float32, cosine_similarities, no_loss, pair_masks
from metric.modeling.registry import LOSSES

_EMPTY = -1e9  # stands for an empty sum's log (a finite value keeps gradients free of NaN)


@LOSSES.register("circle")
class CircleLoss(nn.Module):
    """Pairwise Circle loss with margin ``m`` and scale ``gamma`` on cosine similarities of the
    L2-normalized embeddings. For an anchor with positive similarities ``s_p`` and negative
    ones ``s_n``::

        L = log(1 + sum_n exp(gamma a_n (s_n - m)) * sum_p exp(-gamma a_p (s_p - 1 + m)))

    with ``a_p = relu(1 + m - s_p)`` and ``a_n = relu(s_n + m)`` (not back-propagated); the mean
    over the anchors. Positives are the other samples with the anchor's label; an anchor
    without a positive or without a negative is left out, and a batch with no valid anchor
    gives 0.
    """

    uses_logits = False
    cfg_key = "CIRCLE"  # its options and SCALE live under MODEL.LOSSES.CIRCLE

    def __init__(self, margin=0.25, gamma=128.0):
        super().__init__()
        self.margin, self.gamma = margin, gamma

    def forward(self, logits, embeddings, labels):
        sim = cosine_similarities(at_least_float32(embeddings))
        pos, neg = pair_masks(labels)
        valid = pos.any(dim=1) & neg.any(dim=1)
        if not valid.any():
            return no_loss(embeddings)
        sim, pos, neg = sim[valid], pos[valid], neg[valid]
        m, g = self.margin, self.gamma
        alpha_p = (1.0 + m - sim.detach()).clamp(min=0.0)
        alpha_n = (sim.detach() + m).clamp(min=0.0)
        logit_p = torch.where(pos, -g * alpha_p * (sim - (1.0 - m)), _EMPTY)
        logit_n = torch.where(neg, g * alpha_n * (sim - m), _EMPTY)
        loss = F.softplus(torch.logsumexp(logit_n, dim=1) + torch.logsumexp(logit_p, dim=1))
        return loss.mean()

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.LOSSES.CIRCLE
        return cls(margin=c.MARGIN, gamma=c.GAMMA)
