"""``TRAIN.EMA``: the exponential moving average of the weights (:class:`metric.engine.ema.ModelEma`),
a copy of the loaded or resumed weights, updated after every optimizer step; its floating-point
buffers are averaged over the processes after each epoch (before the checkpoint and evaluation).
Its checkpoint entries are ``ema_state`` and ``ema_updates``; the ``final`` record gets
``ema_digests``. The trainer's ``ema`` is it (evaluation uses it unless ``TEST.WEIGHTS_KIND raw``)."""

from metric.checkpoint import weights_digest
from metric.engine.ema import ModelEma
from metric.engine.hooks.base import HookBase
from metric.utils import distributed as du


class EmaHook(HookBase):
    @classmethod
    def build(cls, trainer):
        ema = ModelEma.from_cfg(trainer.cfg, trainer.model)
        return None if ema is None else cls(trainer, ema)

    def __init__(self, trainer, ema):
        super().__init__(trainer)
        self.ema = trainer.ema = ema

    def after_step(self, iteration):
        self.ema.update(self.trainer.model)

    def after_epoch(self, epoch):
        self.ema.sync_buffers()  # the EMA of the rank-averaged BN statistics (metric.engine.ema)

    def before_record(self, kind, record):
        if kind == "final":
            record["ema_digests"] = du.all_gather_objects(weights_digest(self.ema.module))

    def state_dict(self):
        return self.ema.state()  # every rank: a Partial FC shard is gathered

    def load_state_dict(self, checkpoint, path):
        self.ema.load(checkpoint, path)
