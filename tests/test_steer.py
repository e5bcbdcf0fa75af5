"""Steering training: EMA of the weights, gradient accumulation, torch.compile, NUM_THREADS, the
best checkpoint, and their config checks (issue 13, section 2)."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import metric.checkpoint as cp
from metric.config import load_cfg
from metric.engine.ema import ModelEma, ema_decay
from metric.utils import distributed as du
from metric.utils.errors import CheckpointError
from metric.utils.logger import read_stats
from tests.helpers import call_tool, logging_restored, run_py, tiny_opts


@pytest.fixture
def trainer(monkeypatch):
    """Build a Trainer in this process (one process, one CPU thread: fast on a busy machine); the
    log handlers it adds and torch's thread count are put back after."""
    from metric.engine.trainer import Trainer

    threads = torch.get_num_threads()
    with logging_restored():
        yield lambda opts: Trainer(load_cfg(None, list(opts) + ["NUM_THREADS", "1"]), du.DistInfo())
    torch.set_num_threads(threads)


# --- EMA ----------------------------------------------------------------------------------------


def _naive_decay(n, decay, gamma, power):
    """timm ModelEmaV3.get_decay(step=n) with use_warmup, update_after_step 0, min_decay 0, by hand."""
    s = n - 1
    return 0.0 if s <= 0 else min(decay, 1 - (1 + s / gamma) ** -power)


def test_ema_decay_follows_timm():
    for n in (1, 2, 3, 10, 1000, 10**6):
        assert ema_decay(n, 0.9998, True, 1.0, 0.75) == pytest.approx(_naive_decay(n, 0.9998, 1.0, 0.75), abs=1e-15)
    assert ema_decay(1, 0.9, warmup=False) == 0.0 and ema_decay(2, 0.9, warmup=False) == 0.9
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    ref = timm_ema.ModelEmaV3(nn.Linear(2, 2), decay=0.9998, use_warmup=True, warmup_gamma=2.0, warmup_power=2 / 3)
    for n in (1, 2, 5, 77, 12345):
        assert ema_decay(n, 0.9998, True, 2.0, 2 / 3) == pytest.approx(ref.get_decay(n), abs=1e-15)


def test_ema_equals_a_naive_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    ema = ModelEma(model, decay=0.95, warmup=True, gamma=1.0, power=0.5)
    ref = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for n in range(1, 31):
        model.train()
        loss = model(torch.randn(8, 5)).pow(2).mean()  # BN statistics move too
        opt.zero_grad()
        loss.backward()
        opt.step()
        d = ema.update(model)
        assert d == _naive_decay(n, 0.95, 1.0, 0.5)
        for k, v in model.state_dict().items():
            ref[k] = v.clone() if not v.is_floating_point() else d * ref[k] + (1 - d) * v.double()
    got = ema.module.state_dict()
    assert ema.updates == 30
    for k, v in ref.items():
        assert got[k].dtype == (torch.float32 if v.is_floating_point() else torch.int64), k
        assert torch.allclose(got[k].to(v.dtype), v, rtol=1e-6, atol=1e-7), k
    assert not torch.allclose(got["0.weight"], model.state_dict()["0.weight"])  # it does average
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_weights_of_a_checkpoint_are_picked_by_kind(tmp_path):
    raw = {"w": torch.zeros(3)}
    ema = {"w": torch.ones(3)}
    with_ema = {"epoch": 0, "model_state": raw, "optimizer_state": {}, "ema_state": ema, "ema_updates": 4}
    assert cp.select_weights(with_ema, "auto")["model_state"] is ema
    assert cp.select_weights(with_ema, "ema")["model_state"] is ema
    assert cp.select_weights(with_ema, "raw")["model_state"] is raw
    plain = {"epoch": 0, "model_state": raw, "optimizer_state": {}}
    assert cp.select_weights(plain, "auto")["model_state"] is raw
    with pytest.raises(CheckpointError, match="no EMA weights"):
        cp.select_weights(plain, "ema", source="x.pyth")


# --- NUM_THREADS -----------------------------------------------------------------------------------


def test_num_threads_default_is_cores_per_local_process(monkeypatch):
    assert du.auto_num_threads(cores=16, processes=4) == 4
    assert du.auto_num_threads(cores=16, processes=3) == 5
    assert du.auto_num_threads(cores=2, processes=4) == 1
    monkeypatch.setattr(du, "cpu_cores", lambda: 12)
    monkeypatch.setattr(du, "_TORCH_DEFAULT_THREADS", 6)  # torch's default: physical cores, below the CPUs
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert du.auto_num_threads() == 6
    monkeypatch.setattr(du, "_TORCH_DEFAULT_THREADS", 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert du.auto_num_threads() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert du.auto_num_threads() == 12
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # set by the user (or torchrun): it is kept
    assert du.auto_num_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert du.auto_num_threads() == 12
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "12")
        assert du.set_num_threads(0) == 1 and torch.get_num_threads() == 1
        assert du.set_num_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("TRAIN.ACCUM_STEPS", "0", ["TRAIN.ACCUM_STEPS=0", ">= 1"]),
        ("TRAIN.EMA.DECAY", "1.0", ["TRAIN.EMA.DECAY=1.0", "> 0 and < 1"]),
        ("TRAIN.EMA.DECAY", "0.0", ["TRAIN.EMA.DECAY=0.0", "> 0 and < 1"]),
        ("TRAIN.BEST_METRIC", "map", ["TRAIN.BEST_METRIC='map'", "mAP@R"]),
        ("NUM_THREADS", "-1", ["NUM_THREADS=-1", ">= 0"]),
        ("TEST.WEIGHTS_KIND", "both", ["TEST.WEIGHTS_KIND='both'", "auto | ema | raw"]),
    ],
)
def test_bad_steering_values_exit_2_with_one_line(tiny_data, tmp_path, capsys, key, value, words):
    status, _, err = call_tool("train_metric", tiny_opts(tiny_data, str(tmp_path / "run"), **{key: value}), capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]


# --- gradient accumulation -----------------------------------------------------------------------------

# A tiny ViT (LayerNorm only: no batch statistics) trained with plain SGD.
_VIT = {
    "MODEL.TYPE": "vit",
    "MODEL.WIDTH": 64,
    "MODEL.LAYERS": 1,
    "MODEL.PATCH_SIZE": 8,
    "MODEL.EMB_DIM": 16,
    "MODEL.HEADS.IN_FEAT": 16,
    "MODEL.HEADS.POOL_LAYER": "identity",
    "MODEL.HEADS.REDUCTION_DIM": 8,
    "TEST.IM_SIZE": 40,
    "TEST.DATASET": "",
    "OPTIM.MAX_EPOCH": 1,
    "OPTIM.NESTEROV": False,
    "TRAIN.FLIP": False,
    "LOG_PERIOD": 1,
}


@pytest.mark.slow
def test_accumulated_micro_batches_equal_one_big_batch(tiny_data, tmp_path, trainer):
    runs = {}
    for k, batch in ((1, 16), (2, 8), (4, 4)):
        t = trainer(
            tiny_opts(tiny_data, str(tmp_path / f"k{k}"), **_VIT, **{"TRAIN.BATCH_SIZE": batch, "TRAIN.ACCUM_STEPS": k})
        )
        assert t.iters_per_epoch == 2  # optimizer steps: 32 images / 16 per step
        t.fit()
        runs[k] = cp.unwrap(t.model).state_dict()
        iters = read_stats(os.path.join(t.cfg.OUT_DIR, "stats.jsonl"), "train_iter")
        assert [r["iter"] for r in iters] == [1, 2] and all(r["iters"] == 2 for r in iters)
        assert [r["lr"] for r in iters] == pytest.approx([t.lr_at(0), t.lr_at(1)])
    start = trainer(tiny_opts(tiny_data, str(tmp_path / "start"), **_VIT))
    moved = 0.0
    for key, ref in runs[1].items():
        for k in (2, 4):
            # 1e-6, absolute and relative: the classifier's weights reach ~13, where float32 steps by 1e-6.
            assert torch.allclose(runs[k][key], ref, rtol=1e-6, atol=1e-6), (k, key, (runs[k][key] - ref).abs().max())
        moved = max(moved, float((ref - cp.unwrap(start.model).state_dict()[key]).abs().max()))
    assert moved > 1e-3  # the runs trained


# --- EMA and accumulation in training: exact resume, DDP ---------------------------------------------------


@pytest.mark.slow
def test_ema_with_accumulation_resumes_bit_exact(tiny_data, tmp_path, trainer):
    extra = {
        "TEST.DATASET": "",
        "TRAIN.EMA.ENABLED": True,
        "TRAIN.EMA.DECAY": 0.9,
        "TRAIN.ACCUM_STEPS": 3,
        "TRAIN.BATCH_SIZE": 4,
        "MODEL.HEADS.DROPOUT": 0.2,
    }
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    t = trainer(tiny_opts(tiny_data, straight, **extra))
    assert t.iters_per_epoch == 3  # 8 micro-batches: groups of 3, 3, 2
    t.fit()
    a = cp.read_checkpoint(cp.list_checkpoints(straight)[-1])
    assert a["ema_updates"] == 6
    assert any(not torch.equal(a["ema_state"][k], a["model_state"][k]) for k in a["model_state"])
    final = read_stats(os.path.join(straight, "stats.jsonl"), "final")[-1]
    assert final["ema_digests"] == [cp.weights_digest(t.ema.module)]

    shutil.copytree(straight, resumed)
    os.remove(cp.checkpoint_path(resumed, 1))  # as if killed after the first checkpoint
    again = trainer(tiny_opts(tiny_data, resumed, **extra))
    assert again.start_epoch == 1 and again.ema.updates == 3
    again.fit()
    b = cp.read_checkpoint(cp.list_checkpoints(resumed)[-1])
    assert a["ema_updates"] == b["ema_updates"]
    for part in ("model_state", "ema_state"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


@pytest.mark.slow
def test_two_processes_keep_identical_ema(tiny_data, tmp_path):
    out = str(tmp_path / "ddp")
    opts = tiny_opts(
        tiny_data,
        out,
        **{
            "TEST.DATASET": "",
            "OPTIM.MAX_EPOCH": 1,
            "TRAIN.EMA.ENABLED": True,
            "TRAIN.EMA.DECAY": 0.5,
            "TRAIN.ACCUM_STEPS": 2,
        },
    )
    run_py(["tools/train_metric.py", *opts, "NUM_GPUS", "2", "HOST", "127.0.0.1", "PORT", str(_port())], check=True)
    final = read_stats(os.path.join(out, "stats.jsonl"), "final")[-1]
    assert len(final["ema_digests"]) == 2 and final["ema_digests"][0] == final["ema_digests"][1]
    assert final["weights_digests"][0] == final["weights_digests"][1]
    assert final["ema_digests"][0] != final["weights_digests"][0]
    log = open(os.path.join(out, "log.txt")).read()
    assert "1 CPU thread(s) each (NUM_THREADS)" in log  # OMP_NUM_THREADS=1 of run_py


def _port():
    from tests.helpers import free_port

    return free_port()


# --- torch.compile --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", ["compile", "first call"])
def test_compile_falls_back_with_one_warning(tiny_data, tmp_path, trainer, monkeypatch, caplog, where):
    def broken_compile(module, **kwargs):
        if where == "compile":
            raise RuntimeError("Dynamo is not supported here\nmore detail")

        def fails(*args, **kw):
            raise RuntimeError("backend compiler failed: no C++ compiler")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = str(tmp_path / "run")
    t = trainer(tiny_opts(tiny_data, out, **{"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 1, "TRAIN.COMPILE": True}))
    with caplog.at_level(logging.WARNING):
        t.fit()
    warnings = [r.getMessage() for r in caplog.records if "TRAIN.COMPILE" in r.getMessage()]
    assert len(warnings) == 1 and "training runs eagerly" in warnings[0] and "\n" not in warnings[0]
    state = cp.read_checkpoint(cp.list_checkpoints(out)[-1])["model_state"]
    assert set(state) == set(cp.unwrap(t.model).state_dict())


def test_compile_fallback_never_swallows_our_errors_or_memory(monkeypatch):
    """A dead peer (our DistributedError) or an out-of-memory error in the first compiled call
    stops the run; it is not taken for a platform that cannot compile (eager re-run)."""
    from metric.engine.compile import CompiledForward
    from metric.utils.errors import DistributedError

    calls = []
    module = torch.nn.Linear(2, 2)
    for err in (DistributedError("process 1 stopped answering"), torch.OutOfMemoryError("out of memory")):

        def compiled(*args, err=err):
            calls.append("compiled")
            raise err

        monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled)
        fwd = CompiledForward(module)
        with pytest.raises(type(err)):
            fwd(torch.zeros(1, 2))
        assert not fwd.failed
    assert calls == ["compiled", "compiled"]


@pytest.mark.slow
def test_compiled_training_checkpoints_have_plain_keys(tiny_data, tmp_path, trainer, monkeypatch):
    real = torch.compile
    calls = []

    def eager_backend(module, **kwargs):  # dynamo without inductor's C++ build: seconds, not minutes
        calls.append(module)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend)
    out = str(tmp_path / "run")
    t = trainer(tiny_opts(tiny_data, out, **{"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 1, "TRAIN.COMPILE": True}))
    t.fit()
    assert len(calls) == 1 and not t._compiled.failed
    state = cp.read_checkpoint(cp.list_checkpoints(out)[-1])["model_state"]
    assert set(state) == set(cp.unwrap(t.model).state_dict()) and not any("_orig_mod" in k for k in state)
    compiled = real(nn.Linear(2, 2), backend="eager")
    assert cp.unwrap(compiled) is compiled._orig_mod
    assert set(cp.model_state_of(compiled.state_dict())) == {"weight", "bias"}


# --- best checkpoint ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_best_checkpoint_is_kept_and_used_by_the_tools(tiny_data, tmp_path, trainer, capsys):
    out = str(tmp_path / "run")
    extra = {
        "OPTIM.MAX_EPOCH": 2,
        "TRAIN.BEST_METRIC": "mAP@R",
        "TRAIN.EMA.ENABLED": True,
        "TRAIN.EMA.DECAY": 0.5,
        "TEST.BATCH_SIZE": 32,
    }
    trainer(tiny_opts(tiny_data, out, **extra)).fit()
    tests = read_stats(os.path.join(out, "stats.jsonl"), "test_epoch")
    best = max(tests, key=lambda r: r["mAP@R"])
    best_path = cp.best_checkpoint_path(out)
    state = cp.read_checkpoint(best_path)
    assert state["best"] == {"metric": "mAP@R", "value": best["mAP@R"], "epoch": best["epoch"]}
    assert state["epoch"] + 1 == best["epoch"] and "ema_state" in state
    assert cp.latest_checkpoint(out)[0] == cp.checkpoint_path(out, 1)  # auto-resume never takes best.pyth
    assert best_path not in cp.list_checkpoints(out)

    # The tool evaluates the best checkpoint's EMA weights: the figures logged while training.
    status, stdout, err = call_tool(
        "test_metric", tiny_opts(tiny_data, out, **extra, **{"TEST.WEIGHTS": "best"}), capsys
    )
    assert status == 0, err
    assert f"mAP@R {best['mAP@R']:.4f}" in stdout
    # Extraction takes it too; TEST.WEIGHTS_KIND raw gives the trained weights' descriptors instead.
    from metric.retrieval.store import load_features

    feats = {}
    for kind in ("auto", "ema", "raw"):
        store = str(tmp_path / f"feats_{kind}")
        opts = tiny_opts(
            tiny_data,
            out,
            **extra,
            **{
                "TEST.WEIGHTS": "best",
                "TEST.WEIGHTS_KIND": kind,
                "INFER.INPUT": os.path.join(tiny_data, "test.txt"),
                "INFER.OUTPUT": store,
            },
        )
        status, _, err = call_tool("extract_features", opts + ["--no-progress"], capsys)
        assert status == 0, err
        feats[kind] = np.asarray(load_features(store).embeddings)
    assert np.array_equal(feats["auto"], feats["ema"]) and not np.allclose(feats["auto"], feats["raw"])

    status, _, err = call_tool(
        "test_metric", tiny_opts(tiny_data, str(tmp_path / "none"), **{"TEST.WEIGHTS": "best"}), capsys
    )
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "TEST.WEIGHTS best" in lines[0] and "best.pyth" in lines[0]


def test_a_fresh_run_forgets_the_best_checkpoint_of_an_earlier_one(tmp_path):
    """TEST.WEIGHTS best must never name another run's file: a run from epoch 1 removes it."""
    from metric.engine.best import BestCheckpoint

    best = BestCheckpoint("mAP@R", str(tmp_path))
    os.makedirs(os.path.dirname(best.path), exist_ok=True)
    with open(best.path, "wb") as f:
        f.write(b"an earlier run's best checkpoint")
    best.forget_earlier_run()
    assert not os.path.exists(best.path)
    best.forget_earlier_run()  # nothing there: nothing to do
