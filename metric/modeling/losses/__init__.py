"""Losses (registered on import)."""

from metric.modeling.losses import classification  # noqa: F401
