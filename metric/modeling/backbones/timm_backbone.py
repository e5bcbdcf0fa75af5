"""Any timm model as a backbone (``MODEL.TYPE timm``, name in ``MODEL.TIMM.NAME``).

timm is an optional extra (``pip install timm``); it is imported only when such a
backbone is built. The model is created with ``num_classes=0, global_pool=""``, so
calling it runs its whole trunk and head up to (not including) the pooling and the
classifier (every parameter is used, as DDP requires: e.g. ConvNeXt's final norm and
MobileNetV3's conv head). Its output is returned as an NCHW feature map: NHWC maps
(Swin, MambaOut) are permuted, and token sequences (ViT-like models) lose their
prefix (class / register) tokens and are laid out on the patch grid. ``out_channels``
is timm's ``head_hidden_size`` (``num_features`` where the head adds no layer). The
timm model is ``self.model``, so its state-dict keys are ``model.<timm key>``
(``backbone.model.<timm key>`` in a :class:`MetricModel`). ``BN.*`` keys do not apply.

``MODEL.TIMM.PRETRAINED True`` downloads the weights through timm (needs network);
offline, point ``TRAIN.WEIGHTS`` at a saved timm state dict instead.
"""

import difflib
import math

import torch.nn as nn

from metric.modeling.registry import BACKBONES
from metric.utils.errors import ConfigError


def import_timm():
    """The timm module, or a one-line ConfigError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("MODEL.TYPE timm needs the optional package timm: pip install timm") from None
    return timm


class TimmBackbone(nn.Module):
    def __init__(self, name, pretrained=False):
        super().__init__()
        timm = import_timm()
        if not name:
            raise ConfigError("MODEL.TYPE timm needs a model name in MODEL.TIMM.NAME, e.g. resnet50 or convnext_tiny")
        if not timm.is_model(name):
            hint = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
            extra = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise ConfigError(f"MODEL.TIMM.NAME={name!r} is not a timm model{extra}; list them with timm.list_models()")
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
        except OSError as err:  # no network / not in the local cache
            raise ConfigError(
                f"cannot get pretrained timm weights for {name} ({_first_line(err)}); downloading needs network: "
                "set MODEL.TIMM.PRETRAINED False and TRAIN.WEIGHTS to a local file"
            ) from None
        except (AssertionError, ValueError) as err:  # timm refuses global_pool="" for a few models
            raise ConfigError(f"timm model {name} cannot return a feature map: {_first_line(err)}") from None
        self.name = name
        self.out_channels = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        self.stage_channels = _stage_channels(self.model, self.out_channels)

    def forward_stages(self, x):
        """``(f3, f4)`` for heads that use two stages (DOLG), in one pass through timm's
        ``forward_intermediates``: ``f3`` is the second-to-last feature level (ResNet: layer3),
        ``f4`` the last map, equal to ``self(x)`` (ResNet: layer4; with the trunk's final layers
        where the model has them, e.g. EfficientNet's conv_head, so every parameter is used)."""
        if self.stage_channels is None:
            raise ConfigError(f"timm model {self.name} does not expose its last two stages (see stage_channels)")
        final, (f3, _) = self.model.forward_intermediates(x, indices=2, intermediates_only=False)
        return f3, self._as_map(self.model.forward_head(final), x)

    def forward(self, x):
        return self._as_map(self.model(x), x)

    def _as_map(self, y, x):
        if y.dim() == 4:
            nhwc = self.nhwc or (y.shape[1] != self.out_channels and y.shape[3] == self.out_channels)
            return y.permute(0, 3, 1, 2).contiguous() if nhwc else y
        if y.dim() == 3:  # tokens [N, L, C] -> [N, C, h, w] on the patch grid
            y = y[:, self.num_prefix_tokens :]
            h, w = self._grid(x.shape[-2:], y.shape[1])
            return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
        raise ValueError(f"timm model {self.name} returned features of shape {tuple(y.shape)}; expected 3 or 4 dims")

    def _grid(self, im_hw, n_tokens):
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if patch is not None:
            h, w = im_hw[0] // patch[0], im_hw[1] // patch[1]
            if h * w == n_tokens:
                return h, w
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"cannot lay {n_tokens} tokens of timm model {self.name} on a grid")
        return side, side


def _stage_channels(model, out_channels):
    """``(C3, C4)``: the channels of the second-to-last feature level of a timm model and of its
    output map; None where the last two levels are not two stages (no ``forward_intermediates``
    (timm < 1.0), or one stride throughout, as in ViT)."""
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not isinstance(info, (list, tuple)) or len(info) < 2:
        return None
    try:
        (c3, r3), (_, r4) = [(int(f["num_chs"]), int(f["reduction"])) for f in info[-2:]]
    except (KeyError, TypeError, ValueError):
        return None
    return (c3, out_channels) if r4 > r3 else None


def _first_line(err):
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def build_timm(cfg):
    """A timm backbone from ``MODEL.TIMM.NAME`` and ``MODEL.TIMM.PRETRAINED``."""
    return TimmBackbone(cfg.MODEL.TIMM.NAME, pretrained=cfg.MODEL.TIMM.PRETRAINED)


BACKBONES.register("timm")(build_timm)
