"""``LOG.TENSORBOARD``: the event files in ``OUT_DIR/tb`` (:mod:`metric.engine.tb_writer`), a view
of the stats records: ``train_iter``, ``train_epoch`` and the ``test_epoch`` records of the
schedule, at the step of the iterations done, plus a grid of the first training batch. Only rank
0 writes (on the others, and with TensorBoard off, the board does nothing); a resume purges the
events after its checkpoint. The trainer's ``tb`` is the board."""

from metric.engine.hooks.base import HookBase
from metric.engine.tb_writer import build_training_board


class TensorBoard(HookBase):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.board = trainer.tb = build_training_board(
            trainer.cfg, trainer.info.is_master, trainer.start_epoch * trainer.iters_per_epoch
        )

    def before_step(self, iteration, batches):
        images, labels = batches[0][0], batches[0][1]
        self.board.log_images(iteration + 1, images, labels)  # the first call only

    def after_record(self, kind, record):
        ipe = self.trainer.iters_per_epoch
        if kind == "train_iter":
            step = (record["epoch"] - 1) * record["iters"] + record["iter"]
            self.board.log_iter(step, record, self.trainer.optimizer.param_groups)
        elif kind == "train_epoch":
            self.board.log_epoch(record["epoch"] * ipe, record)
        elif kind == "test_epoch" and record["epoch"] is not None:
            self.board.log_eval(record["epoch"] * ipe, {k: v for k, v in record.items() if k != "epoch"})

    def after_train(self):
        self.board.close()  # flushed however training ends
