"""Exact resume under every condition: unreadable images, a kill before the final evaluation,
stats written once, a changed optimizer config (fault issue, section 3)."""

import os
import shutil

import pytest
import torch

from metric.checkpoint import list_checkpoints, read_checkpoint
from metric.config import load_cfg
from metric.utils.errors import CheckpointError
from metric.utils.logger import read_stats
from tests.helpers import logging_restored, tiny_opts

pytestmark = pytest.mark.slow


@pytest.fixture
def train(monkeypatch):
    """Train in this process (one process, no spawn); the log handlers it adds are removed after."""
    from metric.engine.trainer import train_model

    with logging_restored():
        yield lambda opts: train_model(load_cfg(None, opts))


@pytest.fixture
def data_with_bad_images(tiny_data, tmp_path):
    """The tiny data set with two of its training images unreadable (copied, then corrupted)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for name in ("1_3.jpg", "2_5.jpg"):
        (root / "img" / name).write_bytes(b"\xff\xd8\xff not a jpeg")
    return str(root)


def _weights(out_dir):
    return read_checkpoint(list_checkpoints(out_dir)[-1])["model_state"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    for key, value in wa.items():
        assert torch.equal(value, wb[key]), key


def _kill_after_first_checkpoint(out_dir):
    """What a kill right after the first checkpoint leaves (the later checkpoint removed; the
    stats records written after it are left in place, as a killed run leaves them)."""
    for path in list_checkpoints(out_dir)[1:]:
        os.remove(path)


def _opts(data, out, **extra):
    base = {"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 2, "LOG_PERIOD": 1}
    base.update(extra)
    return tiny_opts(data, out, **base)


def test_bad_images_resume_and_worker_count_do_not_change_weights(data_with_bad_images, tmp_path, train):
    """The image that replaces an unreadable one is a function of (seed, epoch, index) and the
    bad set: a resumed run and a run with a data-loader worker end with the same weights."""
    straight, resumed, worker = (str(tmp_path / n) for n in ("straight", "resumed", "worker"))
    train(_opts(data_with_bad_images, straight))
    train(_opts(data_with_bad_images, worker, **{"DATA_LOADER.NUM_WORKERS": 1}))
    _assert_same_weights(straight, worker)

    train(_opts(data_with_bad_images, resumed))
    _kill_after_first_checkpoint(resumed)
    first = read_checkpoint(list_checkpoints(resumed)[0])
    assert sorted(os.path.basename(p) for p in first["bad_images"]) == ["1_3.jpg", "2_5.jpg"]
    train(_opts(data_with_bad_images, resumed))
    _assert_same_weights(straight, resumed)
    epochs = read_stats(os.path.join(resumed, "stats.jsonl"), "train_epoch")
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["bad_images"] > 0 for e in epochs)


def test_stats_hold_each_record_once_after_resume(tiny_data, tmp_path, train):
    out = str(tmp_path / "run")
    train(_opts(tiny_data, out))
    before = read_stats(os.path.join(out, "stats.jsonl"))
    _kill_after_first_checkpoint(out)
    train(_opts(tiny_data, out))
    after = read_stats(os.path.join(out, "stats.jsonl"))
    keys = [(r["_type"], r.get("epoch"), r.get("iter")) for r in after]
    assert len(keys) == len(set(keys)) and len(after) == len(before)
    assert [r["_type"] for r in after] == [r["_type"] for r in before]


def test_kill_before_final_evaluation_reruns_it(tiny_data, tmp_path, train):
    out = str(tmp_path / "run")
    opts = _opts(tiny_data, out, **{"TEST.DATASET": os.path.basename(tiny_data), "TRAIN.EVAL_PERIOD": 0})
    train(opts)
    stats = os.path.join(out, "stats.jsonl")
    complete = read_stats(stats)
    # a kill after the last checkpoint, before the evaluation and the final record
    kept = [line for line in open(stats, encoding="utf-8") if '"test_epoch"' not in line and '"final"' not in line]
    with open(stats, "w", encoding="utf-8") as f:
        f.writelines(kept)
    train(opts)
    redone = read_stats(stats)
    tests, finals = read_stats(stats, "test_epoch"), read_stats(stats, "final")
    assert len(tests) == 1 and tests[0]["epoch"] == 2 and len(finals) == 1
    assert tests[0]["mAP@R"] == [r for r in complete if r["_type"] == "test_epoch"][0]["mAP@R"]
    assert len(redone) == len(complete)
    train(opts)  # now complete: nothing is added
    assert len(read_stats(stats)) == len(complete)


def test_resume_with_changed_optimizer_config_is_refused_unless_asked(tiny_data, tmp_path, train):
    out = str(tmp_path / "run")
    train(_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 1}))
    with pytest.raises(CheckpointError, match=r"OPTIM.BASE_LR.*TRAIN.RESUME_CHANGED_CONFIG"):
        train(_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 2, "OPTIM.BASE_LR": 0.01}))
    # raising MAX_EPOCH alone is allowed, and the opt-in resumes with the new values
    train(_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 2, "OPTIM.BASE_LR": 0.01, "TRAIN.RESUME_CHANGED_CONFIG": True}))
    assert len(list_checkpoints(out)) == 2
