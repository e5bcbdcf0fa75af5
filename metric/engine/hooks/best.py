"""``TRAIN.BEST_METRIC``: ``OUT_DIR/checkpoints/best.pyth``, the checkpoint of the best evaluation
so far (:class:`metric.engine.best.BestCheckpoint`). Its value so far comes from the stats of a
resumed run (cut back to the resumed epoch), not from the checkpoint; a run that starts at epoch 1
removes an earlier run's file."""

from metric.engine.best import BestCheckpoint
from metric.engine.hooks.base import HookBase
from metric.utils import distributed as du


class BestCheckpointHook(HookBase):
    @classmethod
    def build(cls, trainer):
        return cls(trainer) if trainer.cfg.TRAIN.BEST_METRIC else None

    def __init__(self, trainer):
        super().__init__(trainer)
        self.best = BestCheckpoint(trainer.cfg.TRAIN.BEST_METRIC, trainer.cfg.OUT_DIR)
        if trainer.info.is_master and trainer.start_epoch:
            self.best.restore(trainer.stats.read("test_epoch"))
        elif trainer.info.is_master:
            self.best.forget_earlier_run()  # TEST.WEIGHTS best must not name an old run's file

    def after_eval(self, epoch, metrics):
        """Write best.pyth when ``metrics`` beat the best (decided on rank 0, where they are)."""
        trainer = self.trainer
        if not du.all_gather_objects(trainer.info.is_master and self.best.improves(metrics))[0]:
            return
        state = trainer.checkpoint_state(epoch)  # every rank takes part
        if state is not None:
            self.best.save(state, metrics, epoch)
        du.barrier()
