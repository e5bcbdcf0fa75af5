"""The trainer as a loop plus hooks (metric.engine.hooks) and the Checkpointer that assembles and
restores the training state (metric.checkpoint.checkpointer): a custom hook is called at every
point in order, and its state goes into each checkpoint and comes back on resume."""

import contextlib
import os

import pytest
import torch

import metric.checkpoint as cp
from metric.checkpoint.checkpointer import Checkpointer
from metric.config import load_cfg
from metric.engine.hooks import HOOKS, HookBase
from metric.utils.distributed import DistInfo
from metric.utils.errors import TrainingError
from tests.helpers import REPO, logging_restored, tiny_opts


class Recorder(HookBase):
    """Notes every call; its checkpoint entries count the optimizer steps it saw."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.calls, self.loaded, self.steps = [], [], 0

    def before_train(self):
        self.calls.append(("before_train",))

    def before_epoch(self, epoch):
        self.calls.append(("before_epoch", epoch))

    def before_step(self, iteration, batches):
        self.calls.append(("before_step", iteration, len(batches)))

    @contextlib.contextmanager
    def around_optimizer_step(self):
        self.calls.append(("optimizer_step",))
        yield
        self.calls.append(("optimizer_step_done",))

    def after_step(self, iteration):
        self.steps += 1
        self.calls.append(("after_step", iteration))

    def after_epoch(self, epoch):
        self.calls.append(("after_epoch", epoch))

    def after_eval(self, epoch, metrics):
        self.calls.append(("after_eval", epoch, sorted(metrics)[:1]))

    def before_record(self, kind, record):
        record["recorder_steps"] = self.steps  # a hook adds a field to the stats records
        self.calls.append(("before_record", kind))

    def after_record(self, kind, record):
        self.calls.append(("after_record", kind))

    def after_train(self):
        self.calls.append(("after_train",))

    def state_dict(self):
        return {"recorder_steps": self.steps, "recorder_weights": torch.full((3,), float(self.steps))}

    def load_state_dict(self, checkpoint, path):
        self.loaded.append((checkpoint.get("recorder_steps"), os.path.basename(path)))
        self.steps = checkpoint.get("recorder_steps", 0)


@pytest.fixture
def trainer_with(monkeypatch):
    """``trainer_with(opts, hooks)``: a Trainer in this process with the hook classes ``hooks``."""
    from metric.engine.trainer import Trainer

    threads = torch.get_num_threads()
    with logging_restored():
        yield lambda opts, hooks=HOOKS: Trainer(
            load_cfg(None, list(opts) + ["NUM_THREADS", "1"]), DistInfo(), hooks=hooks
        )
    torch.set_num_threads(threads)


def _epoch_calls(epoch, ipe, log_period):
    calls = [("before_epoch", epoch)]
    for it in range(ipe):
        calls += [
            ("before_step", epoch * ipe + it, 1),
            ("optimizer_step",),
            ("optimizer_step_done",),
            ("after_step", epoch * ipe + it),
        ]
        if (it + 1) % log_period == 0 or it + 1 == ipe:
            calls += [("before_record", "train_iter"), ("after_record", "train_iter")]
    calls += [("before_record", "train_epoch"), ("after_record", "train_epoch")]
    # The Evaluation hook comes before the Recorder in the list: its after_epoch evaluates, which
    # calls after_eval and makes the test_epoch record, before the Recorder's after_epoch.
    calls += [
        ("after_eval", epoch, ["bad_images"]),
        ("before_record", "test_epoch"),
        ("after_record", "test_epoch"),
        ("after_epoch", epoch),
    ]
    return calls


@pytest.mark.slow
def test_a_hook_is_called_in_order_and_its_state_resumes(tiny_data, tmp_path, trainer_with):
    hooks = HOOKS + (Recorder,)
    extra = {"TRAIN.EVAL_PERIOD": 1, "TRAIN.CHECKPOINT_PERIOD": 1, "LOG_PERIOD": 2}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    t = trainer_with(tiny_opts(tiny_data, straight, **extra), hooks)
    recorder, ipe = t.hooks[-1], t.iters_per_epoch
    assert isinstance(recorder, Recorder) and recorder.loaded == []  # a fresh run restores nothing
    t.fit()
    expected = [("before_train",)] + _epoch_calls(0, ipe, 2) + _epoch_calls(1, ipe, 2)
    expected += [("before_record", "final"), ("after_record", "final"), ("after_train",)]
    assert recorder.calls == expected

    # The hook's entries are top-level checkpoint entries, written with every checkpoint.
    first, last = (cp.read_checkpoint(cp.checkpoint_path(straight, e)) for e in (0, 1))
    assert first["recorder_steps"] == ipe and last["recorder_steps"] == 2 * ipe
    assert torch.equal(first["recorder_weights"], torch.full((3,), float(ipe)))
    from metric.utils.logger import read_stats

    assert [r["recorder_steps"] for r in read_stats(os.path.join(straight, "stats.jsonl"), "train_epoch")] == [
        ipe,
        2 * ipe,
    ]

    # A kill after the first checkpoint: the hook gets that checkpoint back and the run ends as
    # the uninterrupted one (weights and the hook's state).
    import shutil

    shutil.copytree(straight, resumed)
    os.remove(cp.checkpoint_path(resumed, 1))
    again = trainer_with(tiny_opts(tiny_data, resumed, **extra), hooks)
    assert again.start_epoch == 1 and again.hooks[-1].loaded == [(ipe, "model_epoch_0001.pyth")]
    again.fit()
    assert again.hooks[-1].calls[0] == ("before_train",) and again.hooks[-1].calls[1] == ("before_epoch", 1)
    b = cp.read_checkpoint(cp.checkpoint_path(resumed, 1))
    assert b["recorder_steps"] == 2 * ipe
    for key, value in last["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key


@pytest.mark.slow
def test_a_checkpoint_without_the_hooks_entries_resumes(tiny_data, tmp_path, trainer_with):
    """A checkpoint written without a hook (an older run, a feature turned on later) resumes:
    the hook is given the checkpoint and finds its entries missing."""
    out = str(tmp_path / "run")
    opts = tiny_opts(tiny_data, out, **{"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 1})
    trainer_with(opts).fit()
    assert "recorder_steps" not in cp.read_checkpoint(cp.checkpoint_path(out, 0))
    opts = tiny_opts(tiny_data, out, **{"TEST.DATASET": "", "OPTIM.MAX_EPOCH": 2})
    t = trainer_with(opts, HOOKS + (Recorder,))
    assert t.start_epoch == 1 and t.hooks[-1].loaded == [(None, "model_epoch_0001.pyth")]


def test_default_hooks_follow_the_config(tiny_data, tmp_path, trainer_with):
    names = lambda t: [type(h).__name__ for h in t.hooks]  # noqa: E731
    plain = trainer_with(tiny_opts(tiny_data, str(tmp_path / "plain"), **{"TEST.DATASET": ""}))
    assert names(plain) == ["PeriodicCheckpoint", "TensorBoard"]
    assert plain.ema is None and plain.tb is plain.hooks[-1].board
    every = trainer_with(
        tiny_opts(
            tiny_data,
            str(tmp_path / "every"),
            **{
                "MODEL.HEADS.MARGIN_SCHEDULE": "[[0, 0.1], [1, 0.2]]",
                "TRAIN.FREEZE_BACKBONE_EPOCHS": 1,
                "TRAIN.EMA.ENABLED": True,
                "TRAIN.BEST_METRIC": "mAP@R",
            },
        )
    )
    assert names(every) == [
        "MarginSchedule",
        "FreezeBackbone",
        "EmaHook",
        "PeriodicCheckpoint",
        "Evaluation",
        "BestCheckpointHook",
        "TensorBoard",
    ]
    assert every.ema is every.hooks[2].ema and every.ema is not None
    assert [cls.__name__ for cls in HOOKS][2] == "PartialFCSampling"  # built for a Partial FC head only


# --- the Checkpointer alone ------------------------------------------------------------------------


class Counter:
    """A hook as the Checkpointer sees it: any object with state_dict / load_state_dict."""

    def __init__(self, value=0.0):
        self.value, self.seen = value, None

    def state_dict(self):
        return {"counter": torch.tensor([self.value])}

    def load_state_dict(self, checkpoint, path):
        self.seen = path
        self.value = float(checkpoint["counter"][0])


def _parts(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, torch.amp.GradScaler("cuda", enabled=False)


def test_checkpointer_round_trip_restores_model_optimizer_rng_and_hooks(tmp_path):
    model, optimizer, scaler = _parts(0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    saver = Checkpointer(model, optimizer, scaler)
    saver.hooks = [Counter(7.0)]
    state = saver.state(3, cfg="CFG", bad_images=[])
    assert list(state) == [
        "epoch",
        "model_state",
        "optimizer_state",
        "scaler_state",
        "rng_states",
        "cfg",
        "bad_images",
        "counter",
    ]
    path = cp.save_checkpoint(str(tmp_path / "c.pyth"), state)
    after = torch.rand(5)  # the RNG stream after the checkpoint

    other, other_opt, other_scaler = _parts(1)
    loader = Checkpointer(other, other_opt, other_scaler)
    loader.hooks = [Counter()]
    read = cp.read_checkpoint(path)
    loader.restore(read, path)
    loader.restore_hooks(read, path)
    assert torch.equal(torch.rand(5), after)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    assert torch.equal(
        other_opt.state_dict()["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    assert loader.hooks[0].value == 7.0 and loader.hooks[0].seen == path


def test_checkpointer_refuses_non_finite_hook_weights_and_taken_entries():
    model, optimizer, scaler = _parts(0)
    saver = Checkpointer(model, optimizer, scaler)
    saver.hooks = [Counter(float("nan"))]
    with pytest.raises(TrainingError, match=r"non-finite weights after epoch 2 \(counter\)"):
        saver.state(1)

    class Taken(Counter):
        def state_dict(self):
            return {"epoch": 5}

    saver.hooks = [Taken()]
    with pytest.raises(ValueError, match="'epoch'"):
        saver.state(1)


def test_engine_modules_stay_small():
    """A new training feature is a hook module, not more trainer: no engine module over 400 lines."""
    engine = os.path.join(REPO, "metric", "engine")
    sizes = {}
    for folder, _, files in os.walk(engine):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    sizes[os.path.relpath(path, engine)] = sum(1 for _ in f)
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
