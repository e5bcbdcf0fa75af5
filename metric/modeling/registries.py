"""The model registries. Implementations register themselves with a decorator;
builders (``metric/modeling/builders.py``) look names up here.

An unknown name raises :class:`~metric.core.errors.ConfigError` listing the
known names (see :class:`~metric.modeling.registry.Registry`).
"""

from metric.modeling.registry import Registry

BACKBONES = Registry("backbone", key="MODEL.TYPE")
HEADS = Registry("head", key="MODEL.HEADS.NAME")
POOL_LAYERS = Registry("pool layer", key="MODEL.HEADS.POOL_LAYER")
MARGIN_LAYERS = Registry("margin layer", key="MODEL.HEADS.CLS_LAYER")
LOSSES = Registry("loss", key="MODEL.LOSSES.NAME")

# Importing the implementation packages fills the registries.
from metric.modeling import backbones, heads, layers, losses  # noqa: E402,F401
