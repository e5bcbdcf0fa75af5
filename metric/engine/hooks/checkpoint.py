"""The periodic checkpoint: after every ``TRAIN.CHECKPOINT_PERIOD`` epochs and after the last one
(:meth:`Trainer.save_checkpoint`, atomic). In the hook list it comes after the hooks that finish
an epoch's state (the EMA's buffers) and before the evaluation, so a kill during an evaluation
resumes from the checkpoint it follows."""

from metric.engine.hooks.base import HookBase


class PeriodicCheckpoint(HookBase):
    def after_epoch(self, epoch):
        cfg = self.trainer.cfg
        if epoch + 1 == cfg.OPTIM.MAX_EPOCH or (epoch + 1) % cfg.TRAIN.CHECKPOINT_PERIOD == 0:
            self.trainer.save_checkpoint(epoch)
