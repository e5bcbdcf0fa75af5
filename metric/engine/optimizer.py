"""Optimizers and learning-rate schedules.

The schedules keep the original (pycls) semantics of ``OPTIM.LR_POLICY``,
``STEPS``, ``LR_MULT``, ``GAMMA``, ``WARMUP_EPOCHS`` and ``WARMUP_FACTOR`` as a
function of the (possibly fractional) epoch. :func:`lr_at` is the learning rate of
one iteration; the trainer puts it on the parameter groups before every step, so the
schedule has no state to save: a resumed run recomputes it from the iteration. Each parameter
group multiplies it by its ``lr_scale`` (layer decay, head multiplier; see
:mod:`metric.engine.param_groups`).
"""

import math

import torch

from metric.engine.param_groups import param_groups


def build_optimizer(cfg, model):
    """SGD or AdamW over the parameter groups of :func:`metric.engine.param_groups.param_groups`
    (learning-rate factors ``lr_scale`` and weight decays from the config)."""
    groups = param_groups(cfg, model)
    o = cfg.OPTIM
    if o.OPTIMIZER == "sgd":
        return torch.optim.SGD(groups, lr=o.BASE_LR, momentum=o.MOMENTUM, dampening=o.DAMPENING, nesterov=o.NESTEROV)
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
