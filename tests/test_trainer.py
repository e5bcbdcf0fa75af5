"""End-to-end training on CPU: outputs, resume, DDP, bad images, non-finite loss."""

import os
import shutil
import socket

import pytest
import torch

from metric.checkpoint import list_checkpoints, read_checkpoint
from metric.utils.cli import run_tool
from metric.utils.logger import read_stats
from tests.helpers import logging_restored, run_py, tiny_opts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_state(out_dir):
    return read_checkpoint(list_checkpoints(out_dir)[-1])


@pytest.mark.slow
def test_training_writes_config_stats_checkpoints(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, out)], check=True)
    assert "epoch 2/2" in proc.stdout and "recall@1" in proc.stdout
    assert os.path.isfile(os.path.join(out, "config.yaml")) and os.path.isfile(os.path.join(out, "log.txt"))
    stats = os.path.join(out, "stats.jsonl")
    iters, epochs, tests = (read_stats(stats, k) for k in ("train_iter", "train_epoch", "test_epoch"))
    assert len(epochs) == 2 and len(tests) == 2 and iters
    assert {"loss", "lr", "im_per_s", "data_time", "eta"} <= set(iters[0])
    assert {"recall@1", "recall@5", "recall@10", "mAP@R"} <= set(tests[-1])
    assert 0.0 <= tests[-1]["mAP@R"] <= 1.0 and tests[-1]["num_images"] == 32
    state = _final_state(out)
    assert state["epoch"] == 1 and "OPTIM:" in state["cfg"] and len(state["rng_states"]) == 1
    assert {"model_state", "optimizer_state", "scaler_state"} <= set(state)
    assert "scheduler_state" not in state  # the schedule is a function of the iteration: nothing to save
    # A second run with AUTO_RESUME finds the work done and changes nothing.
    again = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, out)], check=True)
    assert "training already complete" in again.stdout


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tiny_data, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    extra = {"MODEL.HEADS.DROPOUT": 0.2, "TEST.DATASET": ""}  # dropout: RNG state must be restored
    run_py(["tools/train_metric.py", *tiny_opts(tiny_data, straight, **extra)], check=True)
    killer = (
        "import os, runpy, sys\n"
        "import metric.checkpoint as cp\n"
        "real = cp.save_checkpoint\n"
        "def save_then_die(path, state):\n"
        "    real(path, state)\n"
        "    os._exit(17)\n"
        "cp.save_checkpoint = save_then_die\n"
        "sys.argv = ['train_metric.py'] + sys.argv[1:]\n"
        "runpy.run_path('tools/train_metric.py', run_name='__main__')\n"
    )
    killed = run_py(["-c", killer, *tiny_opts(tiny_data, resumed, **extra)])
    assert killed.returncode == 17 and len(list_checkpoints(resumed)) == 1
    proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, resumed, **extra)], check=True)
    assert "resumed from" in proc.stdout
    a, b = _final_state(straight), _final_state(resumed)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    ma = a["optimizer_state"]["state"]
    mb = b["optimizer_state"]["state"]
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)


@pytest.mark.parametrize("launcher", ["torchrun", "spawn"])
@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(tiny_data, tmp_path, launcher):
    out = str(tmp_path / launcher)
    port = _free_port()
    opts = tiny_opts(tiny_data, out, **{"TRAIN.BATCH_SIZE": 8, "TEST.BATCH_SIZE": 8})
    if launcher == "torchrun":
        args = [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "tools/train_metric.py",
            *opts,
        ]
    else:
        args = ["tools/train_metric.py", *opts, "NUM_GPUS", "2", "HOST", "127.0.0.1", "PORT", str(port)]
    run_py(args, check=True)
    final = read_stats(os.path.join(out, "stats.jsonl"), "final")[-1]
    assert len(final["weights_digests"]) == 2
    assert final["weights_digests"][0] == final["weights_digests"][1]
    tests = read_stats(os.path.join(out, "stats.jsonl"), "test_epoch")
    assert tests[-1]["num_images"] == 32  # both ranks' halves of the test set were gathered
    assert len(read_stats(os.path.join(out, "stats.jsonl"), "train_epoch")) == 2  # rank 0 writes alone


@pytest.mark.slow
def test_corrupt_jpeg_is_counted_not_fatal(tiny_data, tmp_path):
    data = str(tmp_path / "with_bad")
    shutil.copytree(tiny_data, data)
    with open(os.path.join(data, "img", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not an image")
    for name in ("train.txt", "test.txt"):
        with open(os.path.join(data, name), "a") as f:
            f.write("img/broken.jpg 2\n")
    out = str(tmp_path / "run")
    opts = tiny_opts(data, out, **{"OPTIM.MAX_EPOCH": 3, "TRAIN.BATCH_SIZE": 11})
    proc = run_py(["tools/train_metric.py", *opts], check=True)
    stats = os.path.join(out, "stats.jsonl")
    epochs = read_stats(stats, "train_epoch")
    # 33 images, 3 batches of 11 per epoch: the bad image is drawn every epoch and replaced.
    assert [e["bad_images"] for e in epochs] == [1, 1, 1]
    assert read_stats(stats, "test_epoch")[-1]["bad_images"] == 1
    assert "cannot decode image" in proc.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_and_iteration(tiny_data, tmp_path, monkeypatch, capsys):
    from metric.modeling.losses.classification import CrossEntropy

    calls = {"n": 0}
    real = CrossEntropy.forward

    def poisoned(self, logits, emb, labels):
        calls["n"] += 1
        loss = real(self, logits, emb, labels)
        return loss * float("nan") if calls["n"] == 6 else loss  # epoch 2, iteration 2

    monkeypatch.setattr(CrossEntropy, "forward", poisoned)
    import runpy

    main = runpy.run_path("tools/train_metric.py")["main"]
    out = str(tmp_path / "run")
    assert run_tool(main, tiny_opts(tiny_data, out, **{"TEST.DATASET": ""})) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: loss became nan at epoch 2, iteration 2")
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["model_epoch_0001.pyth"]


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_model(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    run_py(
        ["tools/train_metric.py", *tiny_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 1, "TEST.DATASET": ""})], check=True
    )
    proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, out, **{"MODEL.HEADS.NUM_CLASSES": 5})])
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "trained with another MODEL.HEADS.NUM_CLASSES" in line and "new OUT_DIR" in line


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"TRAIN.DATASET": "no_such_set"}, ["data set folder not found", "no_such_set"]),
        ({"MODEL.HEADS.NUM_CLASSES": 3}, ["train.txt:", "label 3 outside [0, 3)"]),
        ({"TRAIN.BATCH_SIZE": 64}, ["TRAIN.BATCH_SIZE=64", "larger than the training set"]),
        ({"TRAIN.WEIGHTS": "/no/such/weights.pyth"}, ["weights file not found"]),
    ],
)
@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(tiny_data, tmp_path, extra, words):
    proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, str(tmp_path / "run"), **extra)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0]


# --- resume: choosing the checkpoint, reading it once -------------------------------------------


def _count_torch_loads(monkeypatch):
    calls = []
    real = torch.load

    def counting(f, *args, **kwargs):
        calls.append(getattr(f, "name", f))  # a path, or a file object opened on it
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_latest_checkpoint_reads_only_the_chosen_one(tmp_path, monkeypatch, caplog):
    import zipfile

    import metric.checkpoint as cp

    out = str(tmp_path)
    for epoch in range(4):
        cp.save_checkpoint(cp.checkpoint_path(out, epoch), _ckpt(epoch))
    _truncate(cp.checkpoint_path(out, 3))  # cut short by a kill or a full disk
    calls = _count_torch_loads(monkeypatch)
    with caplog.at_level("WARNING"):
        path, state = cp.latest_checkpoint(out)
    assert path == cp.checkpoint_path(out, 2) and state["epoch"] == 2
    assert torch.equal(state["model_state"]["w"], torch.full((64,), 2.0))
    assert calls == [path]  # the truncated one was rejected without torch.load; older ones never opened
    assert "skipping unreadable checkpoint" in caplog.text and "model_epoch_0004.pyth" in caplog.text

    # A whole zip that torch cannot read passes the cheap check; the read fails, the next older one is used.
    with zipfile.ZipFile(cp.checkpoint_path(out, 2), "w") as zf:
        zf.writestr("archive/data.pkl", b"not a pickle")
    calls.clear()
    path, state = cp.latest_checkpoint(out)
    assert state["epoch"] == 1 and calls == [cp.checkpoint_path(out, 2), cp.checkpoint_path(out, 1)]

    # The legacy (pre-zip) torch.save format cannot be checked cheaply; it is read.
    torch.save(_ckpt(4), cp.checkpoint_path(out, 4), _use_new_zipfile_serialization=False)
    assert cp.latest_checkpoint(out)[1]["epoch"] == 4
    for epoch in range(5):
        os.remove(cp.checkpoint_path(out, epoch))
    assert cp.latest_checkpoint(out) == (None, None)


def _ckpt(epoch):
    return {"epoch": epoch, "model_state": {"w": torch.full((64,), float(epoch))}, "optimizer_state": {}}


@pytest.fixture
def in_process_training():
    """Trainer built in this process; its log handlers are removed afterwards."""
    from metric.config import load_cfg
    from metric.engine.trainer import Trainer
    from metric.utils.distributed import DistInfo

    with logging_restored():
        yield lambda opts: Trainer(load_cfg(None, opts), DistInfo())


@pytest.mark.slow
def test_stats_records_and_resume_reading_one_file(tiny_data, tmp_path, monkeypatch, in_process_training):
    import metric.checkpoint as cp

    out = str(tmp_path / "run")
    opts = tiny_opts(tiny_data, out, **{"TEST.DATASET": "", "LOG_PERIOD": 1, "OPTIM.WARMUP_EPOCHS": 1})
    trainer = in_process_training(opts)
    trainer.fit()
    ipe = trainer.iters_per_epoch
    stats = os.path.join(out, "stats.jsonl")
    iters, epochs = read_stats(stats, "train_iter"), read_stats(stats, "train_epoch")
    assert len(iters) == 2 * ipe and len(epochs) == 2
    fields = [{k for k in r if k != "kind" and not k.startswith("_")} for r in (iters[0], epochs[0])]
    assert fields[0] == {
        "epoch",
        "iter",
        "iters",
        "loss",
        "lr",
        "im_per_s",
        "data_time",
        "iter_time",
        "eta",
        "loss_cross_entropy",
    }
    assert fields[1] == {"epoch", "loss", "lr", "im_per_s", "time", "bad_images", "loss_cross_entropy"}
    assert [(r["epoch"], r["iter"]) for r in iters] == [(e, i) for e in (1, 2) for i in range(1, ipe + 1)]
    assert [r["lr"] for r in iters] == pytest.approx([trainer.lr_at(i) for i in range(2 * ipe)], rel=1e-12)
    assert [r["lr"] for r in epochs] == pytest.approx([trainer.lr_at(ipe), trainer.lr_at(2 * ipe)], rel=1e-12)
    for e, summary in enumerate(epochs):
        window = iters[e * ipe : (e + 1) * ipe]
        assert summary["loss"] == pytest.approx(sum(r["loss"] for r in window) / ipe)
        assert summary["loss_cross_entropy"] == pytest.approx(sum(r["loss_cross_entropy"] for r in window) / ipe)
        assert summary["bad_images"] == 0 and summary["im_per_s"] > 0 and summary["time"] > 0

    _truncate(cp.checkpoint_path(out, 1))
    calls = _count_torch_loads(monkeypatch)
    resumed = in_process_training(opts + ["OPTIM.MAX_EPOCH", "3"])
    assert calls == [cp.checkpoint_path(out, 0)]  # the newest complete one, read once
    assert resumed.start_epoch == 1
    assert all(g["lr"] == resumed.lr_at(ipe) for g in resumed.optimizer.param_groups)
