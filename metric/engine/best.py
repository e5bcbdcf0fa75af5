"""``TRAIN.BEST_METRIC``: keep ``OUT_DIR/checkpoints/best.pyth``, the checkpoint of the best
TEST evaluation so far (higher is better for every metric offered).

It is a complete checkpoint (the same contents as the periodic ones, so it holds the EMA
weights too when there are any) plus ``best = {"metric", "value", "epoch"}`` (``epoch``
1-based, as in the stats). It is written atomically by :func:`metric.checkpoint.save_checkpoint`;
auto-resume never takes it (:func:`metric.checkpoint.latest_checkpoint` looks at
``model_epoch_*.pyth`` only). After a resume the best value so far comes from the
``test_epoch`` records of ``stats.jsonl`` (cut back to the resumed epoch), so a run that was
stopped and resumed keeps the same best checkpoint as an uninterrupted one. The tools load it
with ``TEST.WEIGHTS best``.
"""

import logging

import metric.checkpoint as cp
import metric.utils.io as io

logger = logging.getLogger(__name__)


class BestCheckpoint:
    def __init__(self, metric, out_dir):
        self.metric, self.path = metric, cp.best_checkpoint_path(out_dir)
        self.value, self.epoch = None, None

    def restore(self, records):
        """The best so far from ``test_epoch`` stats records (dicts with ``epoch`` and metrics)."""
        for r in records:
            value = r.get(self.metric)
            if r.get("epoch") is not None and value is not None and (self.value is None or value > self.value):
                self.value, self.epoch = value, r["epoch"]
        if self.value is not None:
            logger.info("best %s so far: %.4f after epoch %d (%s)", self.metric, self.value, self.epoch, self.path)

    def forget_earlier_run(self):
        """Remove the best checkpoint an earlier run left in this OUT_DIR (a run that starts from
        epoch 0 has no best yet)."""
        with io.write_errors(self.path, "best checkpoint"):
            if io.exists(self.path):
                io.rm(self.path)
                logger.info("removed %s of an earlier run (this run starts at epoch 1)", self.path)

    def improves(self, metrics):
        """Whether ``metrics`` (rank 0's evaluation) beat the best so far."""
        value = None if metrics is None else metrics.get(self.metric)
        return value is not None and (self.value is None or value > self.value)

    def save(self, state, metrics, epoch):
        """Write ``state`` (a checkpoint dict) as the best one, ``epoch`` 0-based."""
        self.value, self.epoch = float(metrics[self.metric]), epoch + 1
        state = {**state, "best": {"metric": self.metric, "value": self.value, "epoch": self.epoch}}
        cp.save_checkpoint(self.path, state)
        logger.info("new best %s %.4f after epoch %d: wrote %s", self.metric, self.value, self.epoch, self.path)
