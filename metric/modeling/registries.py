"""The model registries (definitions only). Implementations register themselves with a
decorator when ``metric.modeling`` imports them; builders (``metric/modeling/builders.py``)
look names up here.

An unknown name raises :class:`~metric.utils.errors.ConfigError` listing the
known names (see :class:`~metric.modeling.registry.Registry`).
"""

from metric.modeling.registry import Registry

BACKBONES = Registry("backbone", key="MODEL.TYPE")
HEADS = Registry("head", key="MODEL.HEADS.NAME")
POOL_LAYERS = Registry("pool layer", key="MODEL.HEADS.POOL_LAYER")
MARGIN_LAYERS = Registry("margin layer", key="MODEL.HEADS.CLS_LAYER")
LOSSES = Registry("loss", key="MODEL.LOSSES.NAME")
ATTENTIONS = Registry("attention block", key="MODEL.HEADS.ATTENTION")

