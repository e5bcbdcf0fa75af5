"""Shared pieces of the losses on pairs of embeddings within a batch."""

import torch
import torch.nn.functional as F


def at_least_float32(x):
    """Half-precision embeddings (autocast) are computed with in float32; float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pair_masks(labels):
    """Boolean [N, N] masks: ``pos`` (same label, not the sample itself) and ``neg`` (other label)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def euclidean_distances(x):
    """[N, N] Euclidean distances; the clamp keeps the gradient finite at distance 0."""
    sq = x.pow(2).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())
    return d2.clamp(min=1e-12).sqrt()


def cosine_similarities(x):
    x = F.normalize(x, dim=1)
    return x @ x.t()


def no_loss(embeddings):
    """A zero that is still connected to the graph (every parameter gets a zero gradient),
    for batches without a single valid pair."""
    return embeddings.sum() * 0.0
