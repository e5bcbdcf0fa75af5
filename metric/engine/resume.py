"""How a training run starts: from the newest complete checkpoint of ``OUT_DIR``
(``TRAIN.AUTO_RESUME``), from the weights of ``TRAIN.WEIGHTS``, or from its random
initialization (:func:`resume_or_load`, called by the trainer before its hooks are built).

A resume refuses a checkpoint of another model or data config, and one of another optimizer or
schedule unless ``TRAIN.RESUME_CHANGED_CONFIG``; it puts back the model, optimizer, scaler and
RNG state (:class:`metric.checkpoint.Checkpointer`), the config's parameter-group settings, the
unreadable training images known so far, and cuts ``stats.jsonl`` back to the checkpoint.
"""

import logging

import metric.checkpoint as cp
from metric.engine import classifier_shards as pfc
from metric.engine.param_groups import reapply_group_settings
from metric.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

# Settings that must not change for a resume unless TRAIN.RESUME_CHANGED_CONFIG (OPTIM.MAX_EPOCH may).
SCHEDULE = ("OPTIM", "TRAIN.BATCH_SIZE", "TRAIN.GRAD_CLIP", "TRAIN.FREEZE_BACKBONE_EPOCHS", "TRAIN.ACCUM_STEPS")


def resume_or_load(trainer):
    """The ``(checkpoint, path)`` ``trainer`` resumed from, else None (the weights of
    TRAIN.WEIGHTS loaded, or none). Every rank calls it."""
    cfg = trainer.cfg
    path, state = trainer.checkpointer.latest(cfg.OUT_DIR) if cfg.TRAIN.AUTO_RESUME else (None, None)
    if path is None:
        if cfg.TRAIN.WEIGHTS:
            cp.load_weights(trainer.model, cfg.TRAIN.WEIGHTS)
        return None
    check_resume_config(state, cfg, path)
    trainer.checkpointer.restore(state, path)  # model, optimizer, scaler, RNG state
    # The config's learning-rate factors and weight decays (the same unless resumed with
    # TRAIN.RESUME_CHANGED_CONFIG).
    reapply_group_settings(trainer.optimizer, trainer.group_settings)
    restore_bad_images(trainer, state.get("bad_images") or [])
    logger.info("resumed from %s (epoch %d done)", path, state["epoch"] + 1)
    if trainer.info.is_master:
        done = state["epoch"] + 1
        dropped = trainer.stats.truncate(done, keep_final=done >= cfg.OPTIM.MAX_EPOCH)
        if dropped:
            logger.info("dropped %d stats records written after that checkpoint", dropped)
    return state, path


def check_resume_config(state, cfg, path):
    """Refuse a checkpoint of another model or data config, and one of another optimizer or
    schedule unless TRAIN.RESUME_CHANGED_CONFIG (then a warning names what changed)."""
    changed = cp.config_differences(state.get("cfg"), cfg, ignore=pfc.RESUMABLE_CHANGES)
    if changed:
        raise CheckpointError(
            f"{path} was trained with another {changed[0]}; use a new OUT_DIR, or "
            "TRAIN.AUTO_RESUME False and TRAIN.WEIGHTS to start from it"
        )
    changed = cp.config_differences(state.get("cfg"), cfg, sections=SCHEDULE, ignore=("OPTIM.MAX_EPOCH",))
    if not changed:
        return
    names = ", ".join(changed)
    if not cfg.TRAIN.RESUME_CHANGED_CONFIG:
        raise CheckpointError(
            f"{path} was trained with other optimizer/schedule settings ({names}); use the same values, "
            "a new OUT_DIR, or TRAIN.RESUME_CHANGED_CONFIG True to resume with the new ones"
        )
    logger.warning("resuming %s with changed settings (TRAIN.RESUME_CHANGED_CONFIG): %s", path, names)


def restore_bad_images(trainer, paths):
    """Mark the unreadable images a checkpoint lists as known (they are not decoded again)."""
    dataset = trainer.train_loader.dataset
    index = dataset.indices_of(paths)  # a search of the compact item list, no dict of every path
    known = [index[p] for p in paths if p in index]
    trainer.bad_indices.update(known)
    dataset.add_known_bad(known)
    if known:
        logger.info("%d unreadable training images known from the checkpoint", len(known))
