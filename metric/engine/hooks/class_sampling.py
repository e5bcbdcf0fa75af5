"""Partial FC sampling (``MODEL.HEADS.PARTIAL_FC``): each step's forward samples the classes of
its iteration, and the optimizer steps the sampled rows alone (:mod:`metric.engine.classifier_shards`,
whose functions this hook calls; the checkpoints' gathering of the classifier is the trainer's
:class:`~metric.checkpoint.Checkpointer`, given that module's functions)."""

from metric.engine import classifier_shards as pfc
from metric.engine.hooks.base import HookBase


class PartialFCSampling(HookBase):
    @classmethod
    def build(cls, trainer):
        return cls(trainer) if pfc.partial_fc(trainer.model) is not None else None

    def before_step(self, iteration, batches):
        pfc.set_step(self.trainer.model, iteration)  # deterministic: the classes of this iteration

    def around_optimizer_step(self):
        return pfc.sampled_rows(self.trainer.optimizer, self.trainer.model)
