"""Models: backbones, heads, layers, losses and their builders."""

# Importing the implementation packages fills the registries of metric.modeling.registry.
from metric.modeling import backbones, heads, layers, losses  # noqa: F401
from metric.modeling.builders import build_backbone, build_head, build_loss, build_model  # noqa: F401
from metric.modeling.model import MetricModel  # noqa: F401
