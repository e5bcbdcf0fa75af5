"""Models: backbones, heads, layers, losses and their builders."""

from metric.modeling import registries  # noqa: F401  (fills the registries)
from metric.modeling.builders import build_backbone, build_head, build_loss, build_model  # noqa: F401
from metric.modeling.model import MetricModel  # noqa: F401
