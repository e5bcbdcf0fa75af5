"""The hooks of the training loop (:class:`~metric.engine.hooks.base.HookBase`).

A training feature is one module here with one hook class, and one line in :data:`HOOKS`. The
trainer calls the hooks in this order at every point, so the order is part of the behaviour:
the EMA's buffers are averaged before the periodic checkpoint, which comes before the
evaluation; the best checkpoint follows the evaluation; TensorBoard views the records last.
"""

from metric.engine.hooks.base import HookBase  # noqa: F401
from metric.engine.hooks.best import BestCheckpointHook
from metric.engine.hooks.checkpoint import PeriodicCheckpoint
from metric.engine.hooks.class_sampling import PartialFCSampling
from metric.engine.hooks.ema import EmaHook
from metric.engine.hooks.evaluation import Evaluation
from metric.engine.hooks.freeze import FreezeBackbone
from metric.engine.hooks.margin_schedule import MarginSchedule
from metric.engine.hooks.tensorboard import TensorBoard

HOOKS = (
    MarginSchedule,  # MODEL.HEADS.MARGIN_SCHEDULE
    FreezeBackbone,  # TRAIN.FREEZE_BACKBONE_EPOCHS
    PartialFCSampling,  # MODEL.HEADS.PARTIAL_FC
    EmaHook,  # TRAIN.EMA
    PeriodicCheckpoint,  # TRAIN.CHECKPOINT_PERIOD
    Evaluation,  # TEST.DATASET, TRAIN.EVAL_PERIOD
    BestCheckpointHook,  # TRAIN.BEST_METRIC
    TensorBoard,  # LOG.TENSORBOARD
)


def build_hooks(trainer, hooks=HOOKS):
    """The hooks of ``trainer``'s config, in the order of ``hooks`` (those turned off left out)."""
    built = (cls.build(trainer) for cls in hooks)
    return [hook for hook in built if hook is not None]
