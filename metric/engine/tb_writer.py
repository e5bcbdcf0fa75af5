"""TensorBoard event files of a training run (``OUT_DIR/tb``, ``LOG.TENSORBOARD``).

The trainer calls a :class:`TrainingBoard` at four places: once with the first training batch
(:meth:`~TrainingBoard.log_images`: a grid of de-normalized crops, each with its label, so a user
sees the augmentation), every ``LOG_PERIOD`` iterations (:meth:`~TrainingBoard.log_iter`: the
``train_iter`` stats record — loss and each part of a combined loss, images/s, data and iteration
time, the margin of a schedule, the AdaCos scale, peak GPU memory — and the learning rate of every
parameter group), after each epoch (:meth:`~TrainingBoard.log_epoch`) and after each evaluation
(:meth:`~TrainingBoard.log_eval`: recall@k, mAP@R). The step of every event is the number of
training iterations done, so curves of a resumed run continue those before it.

**Resume.** All processes of one run write to the same folder, so TensorBoard shows one run.
A run that starts after ``start_step`` iterations (a resume) opens its event file with
``purge_step = start_step + 1``: TensorBoard then hides every earlier event at that step or later
(those written after the checkpoint the run resumed from), and each step appears once.

**Faults.** Only rank 0 writes. ``stats.jsonl`` stays the record of a run; the event files are a
view of it. So a TensorBoard write that fails (full disk, read-only folder, ``tb`` not a folder)
never stops training: one warning line names the folder and the cause, and TensorBoard is off for
the rest of the run. The same holds when the ``tensorboard`` package is missing, or when
``OUT_DIR`` is not on the local file system (TensorBoard writes local files only). The event
file is written by TensorBoard's own thread, which keeps a failed write's exception for the next
call of ours to raise (and then to that one warning) but also lets it escape the thread, where
Python would print its traceback: :func:`quiet_writer_thread` keeps such OS errors of that thread
off the terminal (any other exception of any thread is reported as before).
"""

import logging
import math
import os
import re
import threading

import cv2
import numpy as np
import torch

from metric.datasets.transforms import MEAN, STD
from metric.utils import io

logger = logging.getLogger(__name__)

FOLDER = "tb"  # inside OUT_DIR

# train_iter record key -> TensorBoard tag (keys not listed are not logged).
ITER_TAGS = {
    "loss": "train/loss",
    "im_per_s": "train/im_per_s",
    "data_time": "train/data_time_s",
    "iter_time": "train/iter_time_s",
    "margin": "train/margin",
    "scale": "train/scale",
    "mem_mb": "train/gpu_mem_mb",
}
EPOCH_TAGS = {
    "loss": "epoch/loss",
    "im_per_s": "epoch/im_per_s",
    "time": "epoch/time_s",
    "bad_images": "epoch/bad_images",
}


def build_training_board(cfg, enabled, start_step):
    """The board of a run: writing to ``OUT_DIR/tb`` when ``LOG.TENSORBOARD`` and ``enabled``
    (rank 0), from step ``start_step`` on (the iterations already done); else a board that does
    nothing."""
    if not (enabled and cfg.LOG.TENSORBOARD):
        return TrainingBoard(None)
    return TrainingBoard(
        os.path.join(cfg.OUT_DIR, FOLDER), start_step=start_step, num_images=cfg.LOG.TENSORBOARD_IMAGES
    )


def adaptive_scale(head):
    """The scale of the head's margin layer when it changes during training (AdaCos keeps it in a
    buffer), else None."""
    scale = getattr(getattr(head, "classifier", None), "scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return float(scale)
    return None


class TrainingBoard:
    """Writes TensorBoard events to ``log_dir``; with ``log_dir=None`` every call does nothing.

    ``start_step``: iterations done before this run (events at later steps are purged);
    ``num_images``: training images shown once (0: none)."""

    def __init__(self, log_dir, start_step=0, num_images=16):
        self.log_dir, self.writer = log_dir, None
        self.num_images = num_images
        if log_dir is None:
            return
        if not io.is_local(log_dir):
            self._disable(f"{log_dir} is not on the local file system")
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._disable("the tensorboard package is not installed (pip install tensorboard)")
            return
        quiet_writer_thread()
        self._guard(lambda: setattr(self, "writer", SummaryWriter(log_dir, purge_step=start_step + 1)))

    @property
    def enabled(self):
        return self.writer is not None

    # -- what the trainer calls ---------------------------------------------------------------
    def log_images(self, step, images, labels):
        """A grid of the first ``num_images`` of a training batch (normalized ``[N, 3, H, W]``),
        each labelled with its class; only the first call writes."""
        if not self.enabled or self.num_images <= 0:
            return
        n = min(self.num_images, images.shape[0])
        grid = image_grid(images[:n], labels[:n].tolist())
        self._guard(lambda: self.writer.add_image("train/images", grid, step, dataformats="HWC"))
        self.num_images = 0

    def log_iter(self, step, record, param_groups=()):
        """A ``train_iter`` stats record (loss, ``loss_<name>`` parts, rates, margin, scale, memory)
        and the learning rate of each optimizer parameter group (tag ``lr/<group name>``)."""
        if not self.enabled:
            return
        scalars = {tag: record[key] for key, tag in ITER_TAGS.items() if key in record}
        scalars.update({f"train/{k}": v for k, v in record.items() if k.startswith("loss_")})
        scalars.update(group_lrs(param_groups))
        self._scalars(step, scalars)

    def log_epoch(self, step, summary):
        """A ``train_epoch`` summary (loss, images/s, time, unreadable images)."""
        if self.enabled:
            self._scalars(step, {tag: summary[key] for key, tag in EPOCH_TAGS.items() if key in summary})

    def log_eval(self, step, metrics):
        """Retrieval metrics of an evaluation (``recall@k``, ``mAP@R``, ...) as ``test/<name>``;
        then the events are flushed (an evaluation is a moment a user looks)."""
        if not self.enabled:
            return
        self._scalars(step, {f"test/{k}": v for k, v in metrics.items()})
        self._guard(lambda: self.writer.flush())

    def close(self):
        if self.enabled and self.writer is not None:
            self._guard(lambda: self.writer.close())
            self.writer = None

    # -- helpers -------------------------------------------------------------------------------
    def _scalars(self, step, scalars):
        def write():
            for tag, value in scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

        self._guard(write)

    def _guard(self, fn):
        """Run a write; an OS error (or one the writer's thread re-raises) turns the board off."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 (only OS errors are absorbed; see below)
            err = io.find_os_error(exc)
            if err is None:
                raise
            self._disable(f"cannot write {self.log_dir}: {io.describe_os_error(err)}")

    def _disable(self, why):
        logger.warning("TensorBoard off for the rest of this run: %s (stats.jsonl keeps every figure)", why)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 (the same fault again; already reported)
                pass


def _is_event_writer_thread(thread):
    """True for the thread of TensorBoard's event-file writer (``_AsyncWriterThread``)."""
    cls = type(thread)
    return cls.__name__ == "_AsyncWriterThread" and cls.__module__.startswith("tensorboard.")


def quiet_writer_thread():
    """Install (once; again if something replaced it) a ``threading.excepthook`` that drops the OS
    errors (full disk, read-only file system, ...) escaping TensorBoard's event-file writer thread.
    That thread stores the exception before it escapes, and the writer raises it at our next
    write, flush or close, where :meth:`TrainingBoard._guard` turns it into one warning line.
    Every other exception (another thread, or not an OS error) goes to the hook there was before."""
    current = threading.excepthook
    if getattr(current, "_pymetric_tb_quiet", False):
        return

    def hook(args):
        if (
            _is_event_writer_thread(args.thread)
            and args.exc_value is not None
            and io.find_os_error(args.exc_value) is not None
        ):
            return
        current(args)

    hook._pymetric_tb_quiet = True
    threading.excepthook = hook


def group_lrs(param_groups):
    """``{"lr/<name>": lr}`` of optimizer parameter groups (named by their ``name`` entry, else
    ``group<i>``; a repeated name gets the group's index appended)."""
    out = {}
    for i, group in enumerate(param_groups):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(group.get("name") or f"group{i}"))
        tag = f"lr/{name}"
        out[tag if tag not in out else f"{tag}_{i}"] = group["lr"]
    return out


def image_grid(images, labels, columns=8):
    """uint8 ``[H, W, 3]`` grid of normalized ``[N, 3, h, w]`` images (the training transform's
    normalization undone), each with its label written on a strip below it."""
    x = images.detach().float().cpu().numpy().transpose(0, 2, 3, 1) * STD + MEAN
    x = (x.clip(0, 1) * 255).round().astype(np.uint8)
    n, h, w = x.shape[:3]
    cols = min(columns, n)
    rows = -(-n // cols)
    strip, pad = 14, 2
    cell_h, cell_w = h + strip + pad, w + pad
    grid = np.zeros((rows * cell_h + pad, cols * cell_w + pad, 3), dtype=np.uint8)
    for i in range(n):
        y0, x0 = (i // cols) * cell_h + pad, (i % cols) * cell_w + pad
        grid[y0 : y0 + h, x0 : x0 + w] = x[i]
        cv2.putText(
            grid,
            str(labels[i]),
            (x0 + 1, y0 + h + strip - 3),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return grid
