"""Partial FC: the classification loss of a margin layer whose class centres are split over the
processes (model parallel; An et al., "Partial FC", 2021, as in insightface).

Process ``r`` of ``W`` holds the rows of classes ``r * ceil(C / W) .. min(C, (r + 1) * ceil(C / W)) - 1``
(:func:`shard_of`; a margin layer built with ``shard=``), and only their optimizer state. Each
training step:

1. the embeddings and labels of all processes are all-gathered (the gather's backward returns
   each process the gradient of its own rows, summed over the processes:
   :func:`metric.utils.distributed.all_gather_rows`);
2. each process computes the cosines of every gathered embedding with its classes, and the
   margin layer's :meth:`margin_logits` applies the margin to the targets it owns (the target
   cosine of every sample is all-reduced first, for CurricularFace's ``t`` and hard negatives and
   AdaCos's median angle; AdaCos's sum over the classes is all-reduced);
3. the softmax cross-entropy (with label smoothing) is computed across the processes
   (:class:`_ShardedCrossEntropy`: all-reduce of the row maxima, of the sums of exponentials and
   of the target logits), so no process ever holds ``[batch, C]``.

With ``sample_rate < 1`` each process keeps, per step, the positive classes of the global batch
in its shard plus a uniform sample of its other classes, ``max(positives, ceil(rate * classes))``
in all (drawn from a generator seeded with the seed, the step and the shard), and computes
logits for those only. Their rows are a separate leaf tensor (``self.sampled``), so only they get
a gradient; :func:`metric.engine.classifier_shards.sampled_rows` steps the optimizer on them alone.

The value returned is the cross-entropy averaged over the global batch (the same on every
process); every process's gradient of the class centres is that of this mean, and the gradient
of the embeddings is scaled by ``W`` so that DistributedDataParallel's averaging of the
backbone's gradients gives the single-process gradient of the global batch.
"""

import math

import torch
import torch.nn as nn

from metric.utils import distributed as du


def shard_of(num_classes, world, rank):
    """``(start, stop)``: the classes held by process ``rank`` of ``world``; ``ceil(C / W)`` each, the
    last ones fewer (or none)."""
    per = math.ceil(num_classes / world)
    start = min(num_classes, rank * per)
    return start, min(num_classes, start + per)


def sample_classes(classes, positives, rate, generator):
    """Sorted indices (LongTensor) of the classes ``0 .. classes - 1`` a step keeps: all of
    ``positives`` (a LongTensor of distinct classes) and uniformly drawn others, ``max(len(positives),
    ceil(rate * classes))`` in all."""
    keep = min(classes, max(int(positives.numel()), math.ceil(rate * classes)))
    score = torch.rand(classes, generator=generator)
    score[positives] = 2.0  # above every uniform draw: positives always kept
    return torch.topk(score, keep, sorted=False).indices.sort().values


def sampling_generator(seed, step, start):
    """The generator of the classes sampled at ``step`` by the shard starting at class ``start``."""
    mixed = ((int(seed) * 1_000_003 + int(step)) * 65_537 + int(start)) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits split by columns over the processes.

    ``logits`` [N, c] (this process's classes), ``cols`` [N]: column of each sample's target here
    or -1, ``eps``: label smoothing over ``total`` classes (all processes' columns)."""

    @staticmethod
    def forward(ctx, logits, cols, eps, total):
        n, c = logits.shape
        owned = cols >= 0
        local_max = logits.amax(dim=1) if c else logits.new_full((n,), float("-inf"))
        mx = du.all_reduce_max(local_max)
        e = torch.exp(logits - mx[:, None])
        sums = du.all_reduce_sum(e.sum(dim=1))
        lse = sums.log() + mx
        idx = cols.clamp(min=0)[:, None]
        z_t = torch.where(owned, logits.gather(1, idx).squeeze(1), 0.0) if c else logits.new_zeros(n)
        z_t = du.all_reduce_sum(z_t)
        loss = lse - z_t
        if eps > 0:
            z_mean = du.all_reduce_sum(logits.sum(dim=1)) / total
            loss = (1.0 - eps) * loss + eps * (lse - z_mean)
        e.div_(sums[:, None])  # the softmax, kept for backward
        ctx.save_for_backward(e, cols)
        ctx.eps, ctx.total = eps, total
        return loss.mean()

    @staticmethod
    def backward(ctx, grad):
        p, cols = ctx.saved_tensors
        g = p  # d loss_i / d z_ic = p_ic - (1 - eps) [c = y_i] - eps / total; reused in place
        if g.shape[1]:
            if ctx.eps > 0:
                g.sub_(ctx.eps / ctx.total)
            rows = torch.nonzero(cols >= 0).squeeze(1)
            g[rows, cols[rows]] -= 1.0 - ctx.eps
        g.mul_(grad / p.shape[0])
        return g, None, None, None


def sharded_cross_entropy(logits, cols, label_smoothing=0.0, total=None):
    """The mean over the rows of the softmax cross-entropy of logits whose columns are split over
    the processes (see :class:`_ShardedCrossEntropy`); ``total``: the number of columns of all
    processes (all-reduced when None). A single process gives ``F.cross_entropy``."""
    if total is None:
        total = int(du.all_reduce_sum(torch.tensor([logits.shape[1]], device=logits.device)).item())
    return _ShardedCrossEntropy.apply(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), cols, float(label_smoothing), total
    )


class PartialFC(nn.Module):
    """The loss of a sharded margin layer (no parameters of its own: the head's ``classifier``
    holds the shard). ``forward(layer, embeddings, labels)`` -> the mean cross-entropy of the
    global batch. ``set_step(i)`` names the iteration (the sampling's seed); after a forward with
    sampling, ``sampled`` is ``(rows, sub)``: the indices of the kept rows of ``layer.weight`` and
    the leaf tensor of their values that got the gradient."""

    def __init__(self, sample_rate=1.0, label_smoothing=0.0, seed=0):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate, self.label_smoothing, self.seed = float(sample_rate), float(label_smoothing), int(seed)
        self.step = 0
        self.sampled = None

    def set_step(self, step):
        self.step = int(step)

    def extra_repr(self):
        return f"sample_rate={self.sample_rate:g}, label_smoothing={self.label_smoothing:g}"

    def forward(self, layer, embeddings, labels):
        emb = du.all_gather_rows(embeddings)
        labels = du.all_gather_tensor(labels)
        start, stop = layer.shard
        owned = (labels >= start) & (labels < stop)
        local = torch.where(owned, labels - start, -1)
        self.sampled = None
        weight, total = None, layer.num_classes
        if self.sample_rate < 1.0 and self.training:
            classes = stop - start
            positives = torch.unique(local[owned]).cpu()
            keep = sample_classes(
                classes, positives, self.sample_rate, sampling_generator(self.seed, self.step, start)
            ).to(labels.device)
            column = torch.full((classes,), -1, dtype=torch.long, device=labels.device)
            column[keep] = torch.arange(keep.numel(), device=labels.device)
            if classes:
                local = torch.where(owned, column[local.clamp(min=0)], -1)
            k = layer.centers
            rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).flatten()
            weight = layer.weight.detach()[rows].requires_grad_()
            self.sampled = (rows, weight)
            total = None  # the sampled classes of all processes
        scores = layer.class_scores(emb, weight)
        if scores.shape[1]:
            mine = scores.gather(1, local.clamp(min=0)[:, None]).squeeze(1)
            mine = torch.where(owned, mine, torch.zeros_like(mine))
        else:
            mine = scores.new_zeros(scores.shape[0])
        everyone = du.all_reduce_sum(mine.detach().to(torch.promote_types(mine.dtype, torch.float32))).to(scores.dtype)
        target = torch.where(owned, mine, everyone)[:, None]  # this process's targets keep their gradient
        logits = layer.margin_logits(scores, labels, local, target=target, all_sum=du.all_reduce_sum)
        return sharded_cross_entropy(logits, local, self.label_smoothing, total)
