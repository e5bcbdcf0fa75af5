"""Atomic checkpoints, newest-complete selection, weight loading rules."""

import logging
import os

import pytest
import torch

import metric.checkpoint as cp
from metric import build_model, load_cfg, load_weights
from metric.utils.errors import CheckpointError
from tests.helpers import TINY_MODEL

TINY = TINY_MODEL


def _model(*extra):
    torch.manual_seed(0)
    return build_model(load_cfg(None, TINY + list(extra)))


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "model_epoch_0001.pyth")
    cp.save_checkpoint(path, {"epoch": 0, "model_state": {"w": torch.ones(2)}})
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"half": torch.zeros(1)}, f)
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cp.save_checkpoint(path, {"epoch": 1, "model_state": {"w": torch.zeros(2)}})
    monkeypatch.setattr(torch, "save", real_save)
    assert os.listdir(tmp_path / "checkpoints") == ["model_epoch_0001.pyth"]
    assert cp.read_checkpoint(path)["epoch"] == 0


def test_latest_checkpoint_skips_temporary_and_unreadable(tmp_path, caplog):
    out = str(tmp_path)

    def state(epoch):
        return {"epoch": epoch, "model_state": {"w": torch.zeros(2)}, "optimizer_state": {}}

    cp.save_checkpoint(cp.checkpoint_path(out, 0), state(0))
    cp.save_checkpoint(cp.checkpoint_path(out, 1), state(1))
    with open(os.path.join(cp.checkpoint_dir(out), ".model_epoch_0003.pyth.tmp123"), "wb") as f:
        f.write(b"partial")
    with open(cp.checkpoint_path(out, 2), "wb") as f:
        f.write(b"truncated by a full disk")
    with caplog.at_level(logging.WARNING):
        path, state = cp.latest_checkpoint(out)
    assert path.endswith("model_epoch_0002.pyth") and state["epoch"] == 1
    assert "skipping unreadable checkpoint" in caplog.text


def test_load_weights_roundtrip_and_module_prefix(tmp_path):
    src, dst = _model(), _model("RNG_SEED", "5")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = str(tmp_path / "w.pyth")
    torch.save({"epoch": 3, "model_state": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    load_weights(dst, path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_shape_mismatch_names_the_key(tmp_path):
    state = _model("MODEL.HEADS.REDUCTION_DIM", "16").state_dict()
    path = str(tmp_path / "w.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"head.embedding_layer.weight: file \(16, 32\) vs model \(8, 32\)"):
        load_weights(_model(), path)


def test_missing_and_unexpected_keys_are_logged_by_name(tmp_path, caplog):
    state = _model().state_dict()
    state.pop("head.classifier.weight")
    state["head.extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "w.pth")
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        missing, unexpected = load_weights(_model(), path)
    assert missing == ["head.classifier.weight"] and unexpected == ["head.extra.weight"]
    assert "head.classifier.weight" in caplog.text and "head.extra.weight" in caplog.text


def test_bare_backbone_state_dict(tmp_path):
    src = _model()
    path = str(tmp_path / "backbone.pth")
    torch.save(src.backbone.state_dict(), path)
    dst = _model("RNG_SEED", "9")
    missing, _ = load_weights(dst, path)
    assert all(k.startswith("head.") for k in missing)
    assert torch.equal(dst.backbone.stem.conv.weight, src.backbone.stem.conv.weight)


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pth")
    torch.save({"model_state": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_weights(_model(), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(_model(), str(tmp_path / "missing.pth"))
    other = str(tmp_path / "other.pth")
    torch.save({"foo.bar": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="none of its 1 keys"):
        load_weights(_model(), other)


def test_inference_weights_must_fit_the_config(tmp_path):
    from metric.checkpoint import load_inference_weights

    path = str(tmp_path / "neck.pth")
    torch.save(_model("MODEL.HEADS.BN_NECK", "True").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit the config: head.bn_neck.* is unexpected"):
        load_inference_weights(_model(), path)
    other_classes = str(tmp_path / "cls.pth")
    torch.save(_model("MODEL.HEADS.NUM_CLASSES", "9").state_dict(), other_classes)
    load_inference_weights(_model(), other_classes)  # the classifier is not used at inference


def test_collectives_run_on_the_backend_device(monkeypatch):
    from metric.utils import distributed as du

    monkeypatch.setattr(du.dist, "get_backend", lambda: "gloo")
    assert du._comm_device() == torch.device("cpu")
    monkeypatch.setattr(du.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert du._comm_device() == torch.device("cuda", 3)
    seen = []
    monkeypatch.setattr(du, "world_size", lambda: 2)
    monkeypatch.setattr(du, "_comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(du.dist, "all_reduce", lambda t: (seen.append(t.device), t.mul_(2)))
    x = torch.ones(2)
    assert torch.equal(du.all_reduce_sum(x), torch.full((2,), 2.0)) and torch.equal(x, torch.ones(2))
    assert seen == [torch.device("cpu")]
