"""Embedding a data loader with a model (used by training-time evaluation)."""

import numpy as np
import torch
import torch.nn.functional as F

from metric.utils import distributed as du


@torch.no_grad()
def embed_loader(model, loader, device, amp_dtype=None, channels_last=False):
    """Run ``model`` (eval mode) over ``loader`` batches ``(images, labels, failed)``.

    Returns L2-normalized float32 embeddings [n, D], labels [n] and a boolean
    ``failed`` mask [n] for images that could not be decoded (their rows are junk).
    """
    was_training = model.training
    model.eval()
    embs, labels, failed = [], [], []
    try:
        for images, labs, bad in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                emb = model(images)
            embs.append(F.normalize(emb.float(), dim=1).cpu())
            labels.append(labs)
            failed.append(bad > 0)
    finally:
        model.train(was_training)
    return torch.cat(embs).numpy(), torch.cat(labels).numpy(), torch.cat(failed).numpy()


def gather_interleaved(part, total):
    """Reassemble arrays sharded as ``rank::world`` (see ``ShardSampler``) on every rank."""
    parts = du.all_gather_objects(part)
    world = len(parts)
    if world == 1:
        return part
    out = np.empty((total,) + part.shape[1:], dtype=part.dtype)
    for rank, p in enumerate(parts):
        out[rank::world] = p
    return out
