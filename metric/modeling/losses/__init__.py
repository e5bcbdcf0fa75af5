"""Losses (registered on import). Each is called as ``loss(logits, embeddings, labels)``;
:class:`~metric.modeling.losses.combined.CombinedLoss` sums several with their scales."""

from metric.modeling.losses import circle, classification, triplet  # noqa: F401
