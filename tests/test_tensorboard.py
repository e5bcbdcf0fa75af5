"""TensorBoard event files of training (metric.engine.tb_writer): tags, resume without duplicated
steps, LOG.TENSORBOARD False, and write faults that turn TensorBoard off instead of the run."""

import errno
import logging
import os

import numpy as np
import pytest
import torch

from metric.checkpoint import list_checkpoints
from metric.config import load_cfg
from metric.datasets.transforms import MEAN, STD
from metric.engine.tb_writer import TrainingBoard, adaptive_scale, group_lrs, image_grid
from metric.utils.logger import read_stats
from tests.helpers import logging_restored, tiny_opts

# the warnings "No path found after ..." of the accumulator at the end of each file are noise
logging.getLogger("tensorboard").setLevel(logging.ERROR)


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture
def train():
    """Train in this process; the log handlers it adds are removed after."""
    from metric.engine.trainer import train_model

    with logging_restored():
        yield lambda opts: train_model(load_cfg(None, opts))


@pytest.mark.slow
def test_training_writes_readable_events_and_resume_does_not_duplicate_steps(tiny_data, tmp_path, train):
    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data,
        out,
        **{"LOG_PERIOD": 1, "TRAIN.CHECKPOINT_PERIOD": 1, "MODEL.HEADS.CLS_LAYER": "adacos", "OPTIM.HEAD_LR_MULT": 10},
    )
    train(opts)
    acc = _events(os.path.join(out, "tb"))
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_cross_entropy",
        "train/im_per_s",
        "train/data_time_s",
        "train/scale",
        "test/recall@1",
        "test/mAP@R",
        "epoch/loss",
    } <= scalars
    lr_tags = sorted(t for t in scalars if t.startswith("lr/"))
    assert len(lr_tags) >= 2  # every parameter group (here the head has its own learning rate)
    assert acc.Tags()["images"] == ["train/images"]
    iters = read_stats(os.path.join(out, "stats.jsonl"), "train_iter")
    steps = [(r["epoch"] - 1) * r["iters"] + r["iter"] for r in iters]
    assert [e.step for e in acc.Scalars("train/loss")] == steps == list(range(1, 9))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in iters])
    assert [e.step for e in acc.Scalars("test/mAP@R")] == [4, 8]

    # A kill after the first checkpoint: the rerun resumes from it and writes steps 5..8 again;
    # the events of the first run at those steps are purged, so each step is shown once.
    for path in list_checkpoints(out)[1:]:
        os.remove(path)
    train(opts)
    assert len(os.listdir(os.path.join(out, "tb"))) == 2  # one run, appended to
    acc = _events(os.path.join(out, "tb"))
    for tag in ("train/loss", "lr/" + lr_tags[0].split("/", 1)[1], "test/mAP@R", "epoch/loss"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("test/mAP@R")] == [4, 8]


@pytest.mark.slow
def test_tensorboard_off_or_unwritable_does_not_stop_training(tiny_data, tmp_path, train, caplog):
    out = str(tmp_path / "off")
    opts = {"OPTIM.MAX_EPOCH": 1, "TEST.DATASET": ""}
    train(tiny_opts(tiny_data, out, **{"LOG.TENSORBOARD": False, **opts}))
    assert not os.path.exists(os.path.join(out, "tb")) and read_stats(os.path.join(out, "stats.jsonl"), "train_iter")
    # OUT_DIR/tb cannot be written (a file is in its way): one warning, and the run completes
    out = tmp_path / "blocked"
    out.mkdir()
    (out / "tb").write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        train(tiny_opts(tiny_data, str(out), **opts))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("TensorBoard off for the rest of this run: cannot write")
    assert read_stats(str(out / "stats.jsonl"), "final") and list_checkpoints(str(out))


def test_board_writes_the_iteration_record_and_group_rates(tmp_path):
    board = TrainingBoard(str(tmp_path / "tb"), start_step=0, num_images=3)
    record = {
        "epoch": 1,
        "iter": 2,
        "loss": 1.5,
        "loss_triplet": 0.5,
        "loss_cross_entropy": 1.0,
        "lr": 0.1,
        "im_per_s": 100.0,
        "data_time": 0.01,
        "eta": "00:00:01",
        "margin": 0.3,
        "mem_mb": 12,
    }
    groups = [{"lr": 0.1, "name": "depth 2"}, {"lr": 0.2, "name": "depth 2"}, {"lr": 0.5}]
    board.log_iter(2, record, groups)
    board.log_images(2, torch.zeros(5, 3, 8, 8), torch.arange(5))
    board.log_images(3, torch.zeros(5, 3, 8, 8), torch.arange(5))  # once only
    board.log_eval(2, {"recall@1": 0.5, "mAP@R": float("nan")})  # a non-finite value is left out
    board.close()
    acc = _events(str(tmp_path / "tb"))
    assert set(acc.Tags()["scalars"]) == {
        "train/loss",
        "train/loss_triplet",
        "train/loss_cross_entropy",
        "train/im_per_s",
        "train/data_time_s",
        "train/margin",
        "train/gpu_mem_mb",
        "lr/depth_2",
        "lr/depth_2_1",
        "lr/group2",
        "test/recall@1",
    }
    assert acc.Scalars("lr/depth_2_1")[0].value == pytest.approx(0.2)
    assert [e.step for e in acc.Images("train/images")] == [2]


def test_image_grid_undoes_the_normalization():
    pixels = np.array([[10, 200, 90], [255, 0, 128]], dtype=np.float32) / 255
    x = torch.from_numpy(((pixels - MEAN) / STD).astype(np.float32))[:, :, None, None].expand(2, 3, 4, 4)
    grid = image_grid(x, [7, 8], columns=2)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert tuple(grid[2, 2]) == (10, 200, 90) and tuple(grid[2, 2 + 4 + 2]) == (255, 0, 128)
    assert grid[4 + 2 :].max() > 128  # the label strip below the images holds (anti-aliased) white text


def test_adaptive_scale_only_for_a_changing_scale():
    class Head(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.classifier = torch.nn.Module()
            self.classifier.scale = scale

    assert adaptive_scale(Head(torch.tensor([12.5]))) == 12.5
    assert adaptive_scale(Head(30.0)) is None and adaptive_scale(torch.nn.Linear(1, 1)) is None
    assert group_lrs([{"lr": 1.0, "name": "a/b c"}]) == {"lr/a_b_c": 1.0}


def test_write_faults_turn_tensorboard_off_with_one_warning(tmp_path, caplog, monkeypatch):
    (tmp_path / "tb").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        board = TrainingBoard(str(tmp_path / "tb"))
        board.log_iter(1, {"loss": 1.0})
        board.close()
    assert not board.enabled
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"cannot write {tmp_path / 'tb'}" in warnings[0] and "stats.jsonl" in warnings[0]

    caplog.clear()
    board = TrainingBoard(str(tmp_path / "tb2"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(board.writer, "add_scalar", full)
    with caplog.at_level(logging.WARNING):
        board.log_iter(1, {"loss": 1.0})
        board.log_iter(2, {"loss": 1.0})  # off: nothing more is tried or said
        board.log_eval(2, {"mAP@R": 0.5})
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no space left on device" in warnings[0]
    assert not board.enabled

    def bug(*args, **kwargs):
        raise TypeError("a bug is not a write fault")

    board = TrainingBoard(str(tmp_path / "tb3"))
    monkeypatch.setattr(board.writer, "add_scalar", bug)
    with pytest.raises(TypeError):
        board.log_iter(1, {"loss": 1.0})
    board.close()
