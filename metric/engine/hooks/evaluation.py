"""Retrieval evaluation on the TEST split during training (``TEST.DATASET``): after every
``TRAIN.EVAL_PERIOD`` epochs and after the last one, and at the start of a resumed run whose last
evaluation is missing (a kill between a checkpoint and its evaluation).

:func:`evaluate` is :meth:`Trainer.evaluate`: the predictor of the live model (the EMA weights
with ``TRAIN.EMA.ENABLED`` unless ``TEST.WEIGHTS_KIND raw``) scores the TEST images
(:mod:`metric.engine.evaluator`); then the hooks' ``after_eval`` (the best checkpoint), then the
``test_epoch`` stats record, so a kill between them runs both again after the resume."""

import logging

from metric.engine.evaluator import evaluate_retrieval, format_metrics
from metric.engine.hooks.base import HookBase
from metric.engine.predictor import Predictor
from metric.utils import distributed as du

logger = logging.getLogger(__name__)


def evaluate(trainer, epoch=None):
    """Metrics of the TEST split on rank 0 (None on the others); ``epoch``: the 0-based epoch it
    follows (None: outside the schedule, no hooks are called)."""
    cfg, info = trainer.cfg, trainer.info
    use_ema = trainer.ema is not None and cfg.TEST.WEIGHTS_KIND != "raw"
    predictor = Predictor.from_cfg(
        cfg,
        model=trainer.ema.module if use_ema else trainer.model,
        device=trainer.device,
        channels_last=trainer.channels_last,
    )
    metrics = evaluate_retrieval(
        predictor,
        trainer.test_items,
        cfg.TEST.BATCH_SIZE // info.world_size,
        cfg.DATA_LOADER.NUM_WORKERS,
        info.rank,
        info.world_size,
    )
    if epoch is not None:
        trainer.call_hooks("after_eval", epoch, metrics)  # before the stats record (see above)
    if metrics is not None:
        trainer.record("test_epoch", {"epoch": None if epoch is None else epoch + 1, **metrics})
        logger.info("eval%s: %s", "" if epoch is None else f" epoch {epoch + 1}", format_metrics(metrics))
    return metrics


class Evaluation(HookBase):
    @classmethod
    def build(cls, trainer):
        return cls(trainer) if trainer.test_items is not None else None

    def due(self, epoch):
        """Whether the TEST split is evaluated after 0-based ``epoch``."""
        period, max_epoch = self.trainer.cfg.TRAIN.EVAL_PERIOD, self.trainer.cfg.OPTIM.MAX_EPOCH
        return epoch + 1 == max_epoch or bool(period and (epoch + 1) % period == 0)

    def before_train(self):
        if self._missing():
            logger.info(
                "the evaluation after epoch %d is missing (stopped before it ran): running it", self.trainer.start_epoch
            )
            self.trainer.evaluate(self.trainer.start_epoch - 1)

    def after_epoch(self, epoch):
        if self.due(epoch):
            self.trainer.evaluate(epoch)

    def _missing(self):
        """True if the epoch the run resumed after was due an evaluation that is not in the stats;
        decided on rank 0, shared."""
        done, trainer = self.trainer.start_epoch, self.trainer
        missing = False
        if trainer.info.is_master and done > 0 and self.due(done - 1):
            missing = not any(r.get("epoch") == done for r in trainer.stats.read("test_epoch"))
        return du.all_gather_objects(missing)[0]
