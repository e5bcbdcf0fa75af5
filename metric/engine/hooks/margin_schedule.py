"""``MODEL.HEADS.MARGIN_SCHEDULE``: the margin layer's margin set at the start of every epoch, and
written into the ``train_iter`` / ``train_epoch`` records (``margin``)."""

import logging

from metric.checkpoint import unwrap
from metric.engine.hooks.base import HookBase
from metric.modeling.builders import apply_margin_schedule

logger = logging.getLogger(__name__)


class MarginSchedule(HookBase):
    margin = None

    @classmethod
    def build(cls, trainer):
        return cls(trainer) if trainer.cfg.MODEL.HEADS.MARGIN_SCHEDULE else None

    def before_epoch(self, epoch):
        self.margin = apply_margin_schedule(self.trainer.cfg, unwrap(self.trainer.model).head, epoch)
        logger.info("epoch %d: margin %.4f (MODEL.HEADS.MARGIN_SCHEDULE)", epoch + 1, self.margin)

    def before_record(self, kind, record):
        if kind in ("train_iter", "train_epoch"):
            record["margin"] = self.margin
