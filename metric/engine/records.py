"""The trainer's stats records and log lines of training: ``train_iter`` every ``LOG_PERIOD``
iterations (and at an epoch's end) and ``train_epoch`` after each epoch, written through
:meth:`Trainer.record <metric.engine.trainer.Trainer.record>`, where the hooks add their fields
(the scheduled margin) and see them (TensorBoard)."""

import logging

import torch

from metric.checkpoint import unwrap
from metric.engine.tb_writer import adaptive_scale
from metric.utils.logger import format_seconds

logger = logging.getLogger(__name__)


def loss_parts(trainer, meter):
    return {f"loss_{n}": meter.mean(f"loss_{n}") for n in trainer.loss_fn.names}


def log_iter(trainer, epoch, it, lr, window):
    """The ``train_iter`` record of the iterations in ``window`` (a ScalarMeter), up to 0-based
    iteration ``it`` of 0-based ``epoch``."""
    n_iters, max_epoch = trainer.iters_per_epoch, trainer.cfg.OPTIM.MAX_EPOCH
    stats = {
        "epoch": epoch + 1,
        "iter": it + 1,
        "iters": n_iters,
        "loss": window.mean("loss"),
        "lr": lr,
        "im_per_s": window.rate("images", "iter_time"),
        "data_time": window.mean("data_time"),
        "iter_time": window.mean("iter_time"),
        "eta": format_seconds(trainer.clock.eta(n_iters * max_epoch - (epoch * n_iters + it + 1))),
        **loss_parts(trainer, window),
    }
    scale = adaptive_scale(unwrap(trainer.model).head)  # AdaCos: a scale that changes
    if scale is not None:
        stats["scale"] = scale
    if trainer.device.type == "cuda":
        stats["mem_mb"] = int(torch.cuda.max_memory_allocated(trainer.device) / 2**20)
    trainer.record("train_iter", stats)
    logger.info(
        "epoch %d/%d iter %d/%d  loss %.4f  lr %.5f  %.1f im/s  data %.3fs  eta %s",
        epoch + 1,
        max_epoch,
        it + 1,
        n_iters,
        stats["loss"],
        lr,
        stats["im_per_s"],
        stats["data_time"],
        stats["eta"],
    )


def log_epoch(trainer, epoch, totals, seconds, bad_images):
    """The ``train_epoch`` record of 0-based ``epoch`` (``totals``: its ScalarMeter), returned."""
    summary = {
        "epoch": epoch + 1,
        "loss": totals.mean("loss"),
        # The rate after the epoch's last step: the first one of the next epoch.
        "lr": trainer.lr_at((epoch + 1) * trainer.iters_per_epoch),
        "im_per_s": totals.sums["images"] / max(seconds, 1e-9),
        "time": seconds,
        "bad_images": bad_images,
        **loss_parts(trainer, totals),
    }
    trainer.record("train_epoch", summary)
    logger.info(
        "epoch %d done: loss %.4f  %.1f im/s  %.1fs%s",
        epoch + 1,
        summary["loss"],
        summary["im_per_s"],
        seconds,
        f"  ({bad_images} unreadable images replaced)" if bad_images else "",
    )
    return summary
