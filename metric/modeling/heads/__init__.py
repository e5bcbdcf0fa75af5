"""Heads (registered on import): feature map -> embedding (+ training logits)."""

from metric.modeling.heads import dolg_head, linear_head  # noqa: F401
