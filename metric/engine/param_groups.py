"""Parameter groups of the optimizer: layer-wise learning-rate decay, the head's learning-rate
multiplier and the weight decay of norms, biases and embeddings (the fine-tuning recipe).

Every group carries ``lr_scale``, its multiplier of the schedule's learning rate (the trainer sets
``lr = lr_at(iteration) * lr_scale`` before every step, :meth:`Trainer.set_lr`), and its
``weight_decay``. Groups are saved with the optimizer state, so a resumed run has them too.

* ``OPTIM.LAYER_DECAY`` (``d``): a backbone parameter of depth ``i`` gets ``d ** (T - i)``, the head
  depth ``T`` (factor 1). The depth comes from the backbone's ``layer_id(name)`` (the ViT: 0 for
  the embedding, ``i + 1`` for block ``i``, ``LAYERS + 1`` for ``ln_post``/``proj``) with
  ``T = num_layer_ids - 1`` (or ``num_layers - 1``); a backbone without them is read as a ResNet:
  0 for the stem (``stem``, ``conv1``, ``bn1``), ``i`` for stage ``i`` (``s{i}``, ``layer{i}``),
  ``T = 5`` (the pycls ResNet, ResNeSt, the wide ResNets and timm ResNets).
* ``OPTIM.HEAD_LR_MULT``: times the head's factor.
* Norm weights, biases, one-element / one-dimensional parameters and names a module lists in its
  ``no_weight_decay()`` (the ViT's class token and positional embedding, timm's ``pos_embed``)
  get ``BN.CUSTOM_WEIGHT_DECAY`` with ``BN.USE_CUSTOM_WEIGHT_DECAY``, else no weight decay when
  ``OPTIM.NO_DECAY_NORM_BIAS`` is on (``auto``: with adamw), else ``OPTIM.WEIGHT_DECAY``.

With none of these the model is one group (two with a separate decay for norms and biases), as
before, so the optimizer states of older checkpoints still load.
"""

import logging
import re

import torch

from metric.utils.errors import ConfigError

logger = logging.getLogger(__name__)

_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
_STEM = re.compile(r"(stem|conv1|bn1)(\.|$)")
_STAGE = re.compile(r"(?:s|layer)([1-4])\.")
RESNET_TOP = 5  # stem 0, stages 1..4, the head 5


def no_decay_on(cfg):
    """Whether norms, biases and embeddings are spared weight decay (``OPTIM.NO_DECAY_NORM_BIAS``)."""
    value = cfg.OPTIM.NO_DECAY_NORM_BIAS
    return value == "True" or (value == "auto" and cfg.OPTIM.OPTIMIZER == "adamw")


def _no_decay_names(model):
    """Full parameter names listed by modules' ``no_weight_decay()`` (timm's convention)."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def _special_params(model):
    """ids of norm weights, biases, 1-d / 1-element parameters and ``no_weight_decay`` names."""
    listed = _no_decay_names(model)
    special = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{name}" if mod_name else name
            if (
                isinstance(module, _NORM_TYPES)
                or name.endswith("bias")
                or p.ndim <= 1
                or p.numel() == 1
                or full in listed
            ):
                special.add(id(p))
    return special


def backbone_depths(backbone, what="backbone"):
    """``(depth of each backbone parameter name, top depth T)``; see the module docstring."""
    names = [n for n, _ in backbone.named_parameters()]
    if callable(getattr(backbone, "layer_id", None)):
        count = getattr(backbone, "num_layer_ids", None) or getattr(backbone, "num_layers", None)
        depths = {n: int(backbone.layer_id(n)) for n in names}
        return depths, (count - 1 if count else max(depths.values(), default=0))
    depths = {}
    for n in names:
        bare = n[len("model.") :] if n.startswith("model.") else n  # a timm backbone's own names
        stage = _STAGE.match(bare)
        if stage:
            depths[n] = int(stage.group(1))
        elif _STEM.match(bare):
            depths[n] = 0
        else:
            raise ConfigError(
                f"OPTIM.LAYER_DECAY needs the depth of every backbone parameter, but the {what} backbone's {n} "
                "is neither in the stem nor in a stage (it works for vit, resnet, resnest*, the wide ResNets and "
                "timm ResNets); set OPTIM.LAYER_DECAY 1"
            )
    return depths, RESNET_TOP


def param_groups(cfg, model):
    """The optimizer's parameter groups for ``model`` (a MetricModel, or any module: then every
    parameter counts as backbone). Each is ``{"params", "lr", "lr_scale", "weight_decay",
    "name"}``; parameters without ``requires_grad`` are left out."""
    o = cfg.OPTIM
    model = getattr(model, "module", model)
    special_wd = cfg.BN.CUSTOM_WEIGHT_DECAY if cfg.BN.USE_CUSTOM_WEIGHT_DECAY else (0.0 if no_decay_on(cfg) else None)
    special = _special_params(model) if special_wd is not None else set()
    backbone = getattr(model, "backbone", None)
    depths, top = {}, 0
    if o.LAYER_DECAY != 1.0 and backbone is not None:
        depths, top = backbone_depths(backbone, cfg.MODEL.TYPE)
    split_head = o.HEAD_LR_MULT != 1.0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = backbone is not None and not name.startswith("backbone.")
        depth = top if is_head else depths.get(name[len("backbone.") :], top)
        key = (depth, is_head and split_head, id(p) in special)
        groups.setdefault(key, []).append(p)
    out = []
    for depth, head, is_special in sorted(groups):
        scale = o.LAYER_DECAY ** (top - depth) * (o.HEAD_LR_MULT if head else 1.0)
        name = ("head" if head else f"depth {depth}" if depths else "all") + (" no-decay" if is_special else "")
        out.append(
            {
                "params": groups[(depth, head, is_special)],
                "lr": o.BASE_LR * scale,
                "lr_scale": scale,
                "weight_decay": special_wd if is_special else o.WEIGHT_DECAY,
                "name": name,
            }
        )
    return out


def describe_groups(optimizer):
    """One line per group: name, learning-rate factor, weight decay and size (for the log)."""
    return "; ".join(
        f"{g.get('name', i)}: lr x{g.get('lr_scale', 1.0):.4g}, wd {g['weight_decay']:g}, "
        f"{sum(p.numel() for p in g['params'])} params"
        for i, g in enumerate(optimizer.param_groups)
    )


def reapply_group_settings(optimizer, settings):
    """Put ``settings`` (``[(lr_scale, weight_decay, name)]`` of the groups the config builds)
    back on ``optimizer`` after a checkpoint's state was loaded into it (which brings its own)."""
    for group, (scale, wd, name) in zip(optimizer.param_groups, settings):
        group.update(lr_scale=scale, weight_decay=wd, name=name)


def group_settings(optimizer):
    return [(g.get("lr_scale", 1.0), g["weight_decay"], g.get("name", "")) for g in optimizer.param_groups]
