"""Building blocks of heads: pooling, attention and margin layers (registered on import)."""

from metric.modeling.layers import adacos, attention, margins, pooling  # noqa: F401
