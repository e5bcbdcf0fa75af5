"""Several losses summed with per-loss scales."""

import torch.nn as nn


class CombinedLoss(nn.Module):
    """``parts`` = ``[(name, loss module, scale), ...]``; every loss module is called as
    ``loss(logits, embeddings, labels)``.

    ``forward`` returns ``(total, values)``: ``total = sum_i scale_i * loss_i`` and ``values``
    maps each name to its unscaled ``loss_i``. When no part uses the logits (only pairwise
    losses), ``0 * logits.sum()`` is added, so the margin layer stays in the graph with a zero
    gradient and DistributedDataParallel finds every parameter used.
    """

    def __init__(self, parts):
        super().__init__()
        if not parts:
            raise ValueError("CombinedLoss needs at least one loss")
        names = [name for name, _, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"a loss is listed twice: {names}")
        self.names = names
        self.scales = [float(scale) for _, _, scale in parts]
        self.losses = nn.ModuleList(loss for _, loss, _ in parts)
        self.uses_logits = any(getattr(loss, "uses_logits", True) for loss in self.losses)

    def forward(self, logits, embeddings, labels):
        values = {name: loss(logits, embeddings, labels) for name, loss in zip(self.names, self.losses)}
        total = sum(scale * values[name] for name, scale in zip(self.names, self.scales))
        if not self.uses_logits and logits is not None:
            total = total + logits.sum() * 0.0
        return total, values

    def extra_repr(self):
        return ", ".join(f"{n} x {s:g}" for n, s in zip(self.names, self.scales))


class ComputedLoss(nn.Module):
    """A loss that its "logits" already are: the cross-entropy a Partial FC head computed across
    the processes (:mod:`metric.modeling.layers.partial_fc`)."""

    uses_logits = True

    def forward(self, logits, embeddings, labels):
        return logits
