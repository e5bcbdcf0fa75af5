"""Building blocks of heads: pooling and margin layers (registered on import)."""

from metric.modeling.layers import adacos, margins, pooling  # noqa: F401
