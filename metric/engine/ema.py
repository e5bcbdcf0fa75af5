"""Exponential moving average (EMA) of a model's weights (``TRAIN.EMA``).

The decay follows timm's ``ModelEmaV3`` with ``update_after_step=0`` and ``min_decay=0``: at
the ``n``-th update (``n`` = optimizer steps so far, 1 for the first), ``s = n - 1``; for
``s <= 0`` the decay is 0 (the EMA becomes a copy of the weights), else with warm-up
``d = min(DECAY, 1 - (1 + s / gamma) ** -power)`` and without it ``d = DECAY``. Then for every
floating-point parameter and buffer ``ema = d * ema + (1 - d) * value`` (``Tensor.lerp_``);
integer buffers (BN's ``num_batches_tracked``) are copied. The copy is float32 whatever the
model's dtype, and has no gradients.

Under DDP every rank updates its own copy: the parameters are equal on every rank, so their
averages are too; the BN statistics differ between ranks during an epoch, so the EMA's
buffers are averaged over the ranks where the trainer averages the model's (the end of every
epoch) — the EMA is linear in its inputs, so that equals the EMA of rank-averaged buffers.
A Partial FC classifier is split over the ranks: each rank averages its own rows, checkpoints
hold the EMA of all of them (gathered on rank 0, as the model's), and a resume cuts them back
(the config check refuses TRAIN.EMA with MODEL.HEADS.PARTIAL_FC for now, so this is not tested).
"""

import copy
import logging

import torch

from metric.checkpoint.load import CLASSIFIER_PREFIX, cut_classifier_to_shard, find_classifier_shard, unwrap
from metric.utils import distributed as du

logger = logging.getLogger(__name__)


def ema_decay(updates, decay, warmup=True, gamma=1.0, power=0.75):
    """The decay of update number ``updates`` (1-based), as timm's ``ModelEmaV3.get_decay``."""
    step = updates - 1
    if step <= 0:
        return 0.0
    if not warmup:
        return float(decay)
    return max(0.0, min(float(decay), 1.0 - (1.0 + step / gamma) ** -power))


class ModelEma:
    """A float32, gradient-free copy of ``model`` (unwrapped from DDP / torch.compile) in eval
    mode, on the model's device, averaged by :meth:`update` after each optimizer step."""

    def __init__(self, model, decay, warmup=True, gamma=1.0, power=0.75):
        self.module = copy.deepcopy(unwrap(model)).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.gamma, self.power = float(decay), bool(warmup), float(gamma), float(power)
        self.updates = 0

    @classmethod
    def from_cfg(cls, cfg, model):
        """The EMA of ``TRAIN.EMA``, or ``None`` when it is off."""
        e = cfg.TRAIN.EMA
        if not e.ENABLED:
            return None
        return cls(model, e.DECAY, e.WARMUP, e.WARMUP_GAMMA, e.WARMUP_POWER)

    def current_decay(self):
        return ema_decay(self.updates, self.decay, self.warmup, self.gamma, self.power)

    @torch.no_grad()
    def update(self, model):
        """One EMA step towards the weights of ``model``; returns the decay used."""
        self.updates += 1
        d = self.current_decay()
        source = unwrap(model).state_dict()
        for key, ema in self.module.state_dict().items():
            value = source[key]
            if not ema.is_floating_point() or d == 0.0:
                ema.copy_(value)
            else:
                ema.lerp_(value.to(ema.dtype), 1.0 - d)
        return d

    def sync_buffers(self):
        """Average the floating-point buffers over the ranks (a no-op in one process)."""
        du.average_buffers(self.module)

    def state(self):
        """What a checkpoint holds: ``{"ema_state": state dict, "ema_updates": n}``. Every rank
        calls it: a Partial FC shard of the classifier is gathered into the full matrix on rank 0
        (the other ranks' result is not complete)."""
        state = self.module.state_dict()
        found = find_classifier_shard(self.module)
        if found is not None:
            layer, first, _ = found
            full = du.gather_rows_to_master(layer.weight, layer.num_classes * layer.centers, first)
            state = {**state, CLASSIFIER_PREFIX + "weight": full}
        return {"ema_state": state, "ema_updates": self.updates}

    def load(self, state, path):
        """Restore from a checkpoint dict; one without EMA weights leaves the copy of the model's
        (resumed) weights, and says so. Returns whether EMA weights were loaded."""
        ema_state = state.get("ema_state")
        if not isinstance(ema_state, dict):
            logger.warning(
                "%s holds no EMA weights (trained without TRAIN.EMA.ENABLED): the EMA starts from the resumed weights",
                path,
            )
            return False
        self.module.load_state_dict(cut_classifier_to_shard(ema_state, self.module))  # Partial FC: this rank's rows
        self.updates = int(state.get("ema_updates", 0))
        return True
