"""Optimizers and learning-rate schedules.

The schedules keep the original (pycls) semantics of ``OPTIM.LR_POLICY``,
``STEPS``, ``LR_MULT``, ``GAMMA``, ``WARMUP_EPOCHS`` and ``WARMUP_FACTOR`` as a
function of the (possibly fractional) epoch. :func:`lr_at` is the learning rate of
one iteration; the trainer puts it on the parameter groups before every step, so the
schedule has no state to save: a resumed run recomputes it from the iteration.
"""

import math

import torch

_NO_DECAY_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _param_groups(cfg, model):
    """Two groups when BN.USE_CUSTOM_WEIGHT_DECAY: norm weights, biases and 1-element
    parameters (the GeM exponent) get BN.CUSTOM_WEIGHT_DECAY; the rest OPTIM.WEIGHT_DECAY."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.BN.USE_CUSTOM_WEIGHT_DECAY:
        return [{"params": params, "weight_decay": cfg.OPTIM.WEIGHT_DECAY}]
    special = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NO_DECAY_TYPES) or name == "bias" or p.numel() == 1:
                special.add(id(p))
    return [
        {"params": [p for p in params if id(p) not in special], "weight_decay": cfg.OPTIM.WEIGHT_DECAY},
        {"params": [p for p in params if id(p) in special], "weight_decay": cfg.BN.CUSTOM_WEIGHT_DECAY},
    ]


def build_optimizer(cfg, model):
    groups = _param_groups(cfg, model)
    o = cfg.OPTIM
    if o.OPTIMIZER == "sgd":
        return torch.optim.SGD(
            groups, lr=o.BASE_LR, momentum=o.MOMENTUM, dampening=o.DAMPENING, nesterov=o.NESTEROV
        )
    return torch.optim.AdamW(groups, lr=o.BASE_LR, betas=tuple(o.BETAS))


def lr_policy_factor(cfg, epoch):
    """The policy's multiplier of BASE_LR at ``epoch`` (float, 0-based), warmup excluded."""
    o = cfg.OPTIM
    if o.LR_POLICY == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / o.MAX_EPOCH))
    if o.LR_POLICY == "steps":
        passed = [i for i, s in enumerate(o.STEPS) if epoch >= s]
        return o.LR_MULT ** (passed[-1] if passed else 0)
    return o.GAMMA**epoch


def lr_factor(cfg, epoch):
    """Multiplier of BASE_LR at ``epoch``, with linear warmup from WARMUP_FACTOR."""
    if cfg.OPTIM.LR_UPDATE == "epoch":
        epoch = math.floor(epoch)
    factor = lr_policy_factor(cfg, epoch)
    if epoch < cfg.OPTIM.WARMUP_EPOCHS:
        alpha = epoch / cfg.OPTIM.WARMUP_EPOCHS
        factor *= cfg.OPTIM.WARMUP_FACTOR * (1.0 - alpha) + alpha
    return factor


def get_epoch_lr(cfg, epoch):
    return cfg.OPTIM.BASE_LR * lr_factor(cfg, epoch)


def lr_at(cfg, iteration, iters_per_epoch):
    """Learning rate of 0-based ``iteration`` (counted over the whole run, ``iters_per_epoch``
    per epoch): ``BASE_LR * lr_factor(cfg, iteration / iters_per_epoch)``."""
    return cfg.OPTIM.BASE_LR * lr_factor(cfg, iteration / iters_per_epoch)
