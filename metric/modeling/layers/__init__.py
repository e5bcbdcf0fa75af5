"""Building blocks of heads: pooling and margin layers (registered on import)."""

from metric.modeling.layers import margins, pooling  # noqa: F401
