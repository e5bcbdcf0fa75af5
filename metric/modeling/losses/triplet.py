"""Triplet loss with batch-hard or softmax-weighted mining (Hermans et al. 2017 for batch-hard)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from metric.modeling.losses.pairwise import at_least_float32, euclidean_distances, no_loss, pair_masks
from metric.modeling.registry import LOSSES


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """For every anchor of the batch, a positive distance ``d_p`` and a negative distance
    ``d_n`` (Euclidean, between L2-normalized embeddings if ``normalize``), then
    ``relu(d_p - d_n + margin)``, or ``softplus(d_p - d_n)`` with ``soft_margin``; the mean
    over the anchors.

    ``hard_mining=True`` (batch-hard): ``d_p`` is the farthest positive, ``d_n`` the nearest
    negative. ``hard_mining=False`` (soft-weighted): ``d_p = sum_j w_j d_aj`` over the positives
    with ``w = softmax(d_aj)``, ``d_n`` likewise over the negatives with ``w = softmax(-d_aj)``;
    the weights are treated as constants (no gradient through them).

    Positives are the other samples with the anchor's label. An anchor without a positive or
    without a negative in the batch is left out; a batch with no valid anchor gives 0.
    """

    uses_logits = False
    cfg_key = "TRIPLET"  # its options and SCALE live under MODEL.LOSSES.TRIPLET

    def __init__(self, margin=0.3, soft_margin=False, hard_mining=True, normalize=True):
        super().__init__()
        self.margin, self.soft_margin = margin, soft_margin
        self.hard_mining, self.normalize = hard_mining, normalize

    def forward(self, logits, embeddings, labels):
        x = at_least_float32(embeddings)
        if self.normalize:
            x = F.normalize(x, dim=1)
        dist = euclidean_distances(x)
        pos, neg = pair_masks(labels)
        valid = pos.any(dim=1) & neg.any(dim=1)
        if not valid.any():
            return no_loss(embeddings)
        dist, pos, neg = dist[valid], pos[valid], neg[valid]
        if self.hard_mining:
            d_p = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
            d_n = dist.masked_fill(~neg, float("inf")).amin(dim=1)
        else:
            d_p = (_masked_softmax(dist.detach(), pos) * dist).sum(dim=1)
            d_n = (_masked_softmax(-dist.detach(), neg) * dist).sum(dim=1)
        gap = d_p - d_n
        loss = F.softplus(gap) if self.soft_margin else F.relu(gap + self.margin)
        return loss.mean()

    @classmethod
    def from_config(cls, cfg):
        t = cfg.MODEL.LOSSES.TRIPLET
        return cls(margin=t.MARGIN, soft_margin=t.SOFT_MARGIN, hard_mining=t.HARD_MINING, normalize=t.NORM_FEAT)


def _masked_softmax(values, mask):
    """Row-wise softmax over the entries where ``mask`` is True (each row has at least one)."""
    values = values.masked_fill(~mask, float("-inf"))
    return torch.softmax(values, dim=1)
