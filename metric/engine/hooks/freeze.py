"""``TRAIN.FREEZE_BACKBONE_EPOCHS``: during the first epochs the backbone runs in eval mode and its
parameters do not require gradients (so the optimizer skips them: no update, no weight decay, no
state); under DDP the model is wrapped again when that changes (DDP skips parameters without
gradients, so the hook is built before the first wrap)."""

import logging

from metric.checkpoint import unwrap
from metric.engine.hooks.base import HookBase

logger = logging.getLogger(__name__)


class FreezeBackbone(HookBase):
    @classmethod
    def build(cls, trainer):
        return cls(trainer) if trainer.cfg.TRAIN.FREEZE_BACKBONE_EPOCHS > 0 else None

    def __init__(self, trainer):
        super().__init__(trainer)
        self.epochs = trainer.cfg.TRAIN.FREEZE_BACKBONE_EPOCHS
        # The backbone parameters that train at all (a model may keep some frozen for good).
        self.trainable = [p for p in unwrap(trainer.model).backbone.parameters() if p.requires_grad]
        self.frozen = None
        self._apply(trainer.start_epoch)

    def before_epoch(self, epoch):
        self._apply(epoch)

    def _apply(self, epoch):
        frozen = epoch < self.epochs
        model = unwrap(self.trainer.model)
        if frozen:
            model.backbone.eval()  # after model.train(), at every epoch start
        if frozen == self.frozen:
            return
        for p in self.trainable:
            p.requires_grad_(not frozen)
        changed, self.frozen = self.frozen is not None, frozen
        if frozen or changed:
            logger.info(
                "epoch %d: backbone %s (TRAIN.FREEZE_BACKBONE_EPOCHS %d)",
                epoch + 1,
                "frozen" if frozen else "trains from now on",
                self.epochs,
            )
        if changed and self.trainer.info.distributed:
            self.trainer.model = self.trainer.wrap_ddp(model)
