"""Name -> constructor registries that fail loudly on unknown names."""

import difflib

from metric.config import register_name_source
from metric.utils.errors import ConfigError


class Registry:
    """A mapping from a name to a constructor, filled with the :meth:`register` decorator.

    ``Registry("pool layer")`` is used as::

        POOL_LAYERS = Registry("pool layer", key="MODEL.HEADS.POOL_LAYER")

        @POOL_LAYERS.register("gempool")
        class GeneralizedMeanPooling(nn.Module): ...

        POOL_LAYERS.get("gempool")  # -> the class

    An unknown name raises :class:`ConfigError` listing the known names. A registry made with a
    config ``key`` is also what :func:`metric.config.validate` checks that key's value against.
    """

    def __init__(self, what, key=None):
        self.what = what
        self.key = key
        self._items = {}
        if key:  # the config checker asks this registry which names KEY allows
            register_name_source(key, self)

    def register(self, *names):
        def deco(obj):
            for name in names or (obj.__name__,):
                if name in self._items:
                    raise KeyError(f"{self.what} {name!r} registered twice")
                self._items[name] = obj
            return obj

        return deco

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items

    def get(self, name):
        if name not in self._items:
            where = f"{self.key}={name!r}" if self.key else f"{self.what} {name!r}"
            hint = difflib.get_close_matches(str(name), self.names(), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown {self.what} {where}{extra}; known: {', '.join(self.names())}")
        return self._items[name]


# The registries. Implementations register themselves with a decorator when ``metric.modeling``
# imports them; the builders (``metric/modeling/builders.py``) look names up here.
BACKBONES = Registry("backbone", key="MODEL.TYPE")
HEADS = Registry("head", key="MODEL.HEADS.NAME")
POOL_LAYERS = Registry("pool layer", key="MODEL.HEADS.POOL_LAYER")
MARGIN_LAYERS = Registry("margin layer", key="MODEL.HEADS.CLS_LAYER")
LOSSES = Registry("loss", key="MODEL.LOSSES.NAME")
ATTENTIONS = Registry("attention block", key="MODEL.HEADS.ATTENTION")
