"""Weights detected by content: original-project checkpoints, torchvision ResNets, released
ResNeSt and pycls ImageNet state dicts, class-count changes, clear errors."""

import json
import logging
import os

import pytest
import torch
import torchvision

from metric import build_model, load_cfg, load_weights
from metric.checkpoint.convert import detect_format, torchvision_to_pycls
from metric.utils.errors import CheckpointError
from tests.helpers import REPO, TINY_MODEL

COMPAT = os.path.join(REPO, "tests", "data", "pymetric_state_dict_keys.json")


def _compat(name):
    with open(COMPAT, encoding="utf-8") as f:
        return [(k, tuple(s)) for k, s in json.load(f)[name]]


def _random_like(key, shape, gen):
    """A plausible tensor: BN variances positive, counters int64, conv weights He-scaled."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(100, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith(("running_mean", "bias")):
        return torch.randn(shape, generator=gen) * 0.1
    if key.endswith("pool_layer.p"):
        return torch.full(shape, 2.5)
    if key.endswith("classifier.t"):
        return torch.full(shape, 0.3)
    if len(shape) == 1:  # BN gamma
        return torch.rand(shape, generator=gen) + 0.5
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def _bn_randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


# --- the original project's checkpoints -------------------------------------------------------

ORIGINAL_YAML = """\
MODEL:
  TYPE: resnet
  DEPTH: 50
  NUM_CLASSES: 10
  HEADS:
    NAME: LinearHead
    NUM_CLASSES: 10
    IN_FEAT: 2048
    REDUCTION_DIM: 512
    POOL_LAYER: gempool
    CLS_LAYER: arcface
    MARGIN: 0.15
    SCALE: 30
RESNET:
  TRANS_FUN: bottleneck_transform
  STRIDE_1X1: False
OPTIM:
  BASE_LR: 0.1
"""


def _original_checkpoint(backbone_keys, head_keys, num_classes, yaml_text):
    """A checkpoint as the original project wrote it: exactly the compat keys (classifier rows
    cut to ``num_classes``), random values, no ``version``."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for k, s in [("backbone." + k, s) for k, s in _compat(backbone_keys)] + _compat(head_keys):
        if k == "head.classifier.weight":
            s = (num_classes,) + s[1:]
        state[k] = _random_like(k, s, gen)
    return {"epoch": 9, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}, "cfg": yaml_text}


def _pycls_to_torchvision(state):
    with torch.device("meta"):
        tv_keys = torchvision.models.resnet50().state_dict()
    pycls_to_tv = torchvision_to_pycls({k: k for k in tv_keys})  # values: the torchvision names
    return {pycls_to_tv[k[len("backbone.") :]]: v for k, v in state.items() if k.startswith("backbone.")}


def test_original_resnet50_gem_curricularface_checkpoint(tmp_path, caplog):
    cfg_path = tmp_path / "R-50-original.yaml"
    cfg_path.write_text(ORIGINAL_YAML)  # no VERSION: an original-project config
    ckpt = _original_checkpoint("backbone_pycls_resnet50", "head_gempool_arcface", 10, ORIGINAL_YAML)
    path = str(tmp_path / "model_epoch_0010.pyth")
    torch.save(ckpt, path)
    assert detect_format(ckpt, ckpt["model_state"]) == "pymetric_original"

    cfg = load_cfg(str(cfg_path))
    assert cfg.MODEL.HEADS.CLS_LAYER == "curricularface"
    model = build_model(cfg)
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(model, path)
    assert missing == [] and unexpected == []
    assert "original pymetric project" in caplog.text
    assert "differs" not in caplog.text
    assert model.head.classifier.t.item() == pytest.approx(0.3)

    # Reference: the same weights in torchvision's ResNet-50 (the pycls layout with the stride
    # on the 3x3 is that network), then GeM with the stored p and the embedding matrix.
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(_pycls_to_torchvision(ckpt["model_state"]), assign=True)
    trunk = torch.nn.Sequential(*list(tv.children())[:-2]).eval()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        emb = model(x)
        fmap = trunk(x)
        p = ckpt["model_state"]["head.pool_layer.p"]
        gem = fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
        ref = gem @ ckpt["model_state"]["head.embedding_layer.weight"].T
    torch.testing.assert_close(model.backbone(x), fmap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-4)


def test_original_checkpoint_into_a_different_head_is_logged(tmp_path, caplog):
    ckpt = _original_checkpoint("backbone_pycls_resnet50", "head_gempool_arcface", 10, ORIGINAL_YAML)
    path = str(tmp_path / "orig.pyth")
    torch.save(ckpt, path)
    model = build_model(
        load_cfg(
            None,
            [
                "RESNET.STRIDE_1X1",
                "False",
                "MODEL.HEADS.POOL_LAYER",
                "gempool",
                "MODEL.HEADS.CLS_LAYER",
                "arcface",
                "MODEL.HEADS.NUM_CLASSES",
                "10",
            ],
        )
    )
    with caplog.at_level(logging.INFO):
        _, unexpected = load_weights(model, path)
    assert unexpected == ["head.classifier.t"]  # our arcface has no t
    assert "CLS_LAYER curricularface (checkpoint) vs arcface (model)" in caplog.text


def test_original_resnest50_avgpool_circle_keys_load_exactly(tmp_path):
    text = (
        ORIGINAL_YAML.replace("TYPE: resnet", "TYPE: resnest50")
        .replace("gempool", "avgpool")
        .replace("CLS_LAYER: arcface", "CLS_LAYER: circle")
    )
    (tmp_path / "c.yaml").write_text(text)
    path = str(tmp_path / "orig.pyth")
    torch.save(_original_checkpoint("backbone_resnest50", "head_avgpool_circle", 10, text), path)
    model = build_model(load_cfg(str(tmp_path / "c.yaml")))
    assert load_weights(model, path) == ([], [])


# --- torchvision ResNets --------------------------------------------------------------------


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_maps_to_identical_feature_maps(tmp_path, depth, caplog):
    torch.manual_seed(depth)
    tv = _bn_randomize(getattr(torchvision.models, f"resnet{depth}")(), seed=depth).eval()
    path = str(tmp_path / f"resnet{depth}-0123abcd.pth")
    torch.save(tv.state_dict(), path)
    model = build_model(
        load_cfg(None, ["MODEL.DEPTH", str(depth), "RESNET.STRIDE_1X1", "False", "MODEL.HEADS.IN_FEAT", "0"])
    ).eval()
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(model, path)
    assert all(k.startswith("head.") for k in missing) and unexpected == []
    assert "fc.weight" in caplog.text and "torchvision resnet" in caplog.text
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), trunk(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [101, 152])
def test_torchvision_deep_resnet_keys_map_onto_compat_layout(depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")()
    mapped = {k: tuple(v.shape) for k, v in torchvision_to_pycls(tv.state_dict()).items()}
    assert mapped == dict(_compat(f"backbone_pycls_resnet{depth}"))


def test_torchvision_into_stride_1x1_model_warns(tmp_path, caplog):
    with torch.device("meta"):
        keys = torchvision.models.resnet50().state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in keys.items()}
    assert detect_format(state, state) == "torchvision_resnet"
    path = str(tmp_path / "resnet50.pth")
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        load_weights(build_model(load_cfg(None, ["RESNET.STRIDE_1X1", "True"])), path)
    assert "RESNET.STRIDE_1X1 False" in caplog.text


def test_torchvision_into_resnest_is_a_clear_error(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    path = str(tmp_path / "resnet18.pth")
    torch.save(state, path)
    with torch.device("meta"):
        model = build_model(load_cfg(None, ["MODEL.TYPE", "resnest50"]))
    with pytest.raises(CheckpointError, match="torchvision resnet state dict loads into MODEL.TYPE resnet"):
        load_weights(model, path)


# --- released ResNeSt and pycls ImageNet weights --------------------------------------------


def test_resnest_imagenet_state_dict_ignores_fc(tmp_path, caplog):
    cfg = load_cfg(None, ["MODEL.TYPE", "resnest50", "MODEL.HEADS.NUM_CLASSES", "3"])
    torch.manual_seed(0)
    src = build_model(cfg).backbone
    state = {**src.state_dict(), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = str(tmp_path / "resnest50-528c19ca.pth")
    torch.save(state, path)
    torch.manual_seed(1)
    dst = build_model(cfg)
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(dst, path)
    assert unexpected == [] and all(k.startswith("head.") for k in missing)
    assert "ImageNet classifier ignored: fc.bias, fc.weight" in caplog.text
    for k, v in src.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k


def test_pycls_resnet_checkpoint(tmp_path):
    model = build_model(load_cfg(None, TINY_MODEL))
    state = {**model.backbone.state_dict(), "head.fc.weight": torch.zeros(1000, 32), "head.fc.bias": torch.zeros(1000)}
    path = str(tmp_path / "R-18.pyth")
    torch.save({"epoch": 99, "model_state": state, "cfg": "MODEL:\n  TYPE: resnet\n"}, path)
    dst = build_model(load_cfg(None, TINY_MODEL + ["RNG_SEED", "3"]))
    missing, unexpected = load_weights(dst, path)
    assert unexpected == [] and all(k.startswith("head.") for k in missing)
    assert torch.equal(dst.backbone.s1.b1.f.a.weight, model.backbone.s1.b1.f.a.weight)


# --- class-count changes and other mismatches -----------------------------------------------


def test_other_class_count_fine_tunes_everything_else_is_loaded(tmp_path, caplog):
    torch.manual_seed(0)
    src = build_model(load_cfg(None, TINY_MODEL + ["MODEL.HEADS.CLS_LAYER", "curricularface"]))
    path = str(tmp_path / "ours.pyth")
    torch.save({"epoch": 0, "model_state": src.state_dict(), "version": 1}, path)
    torch.manual_seed(1)
    dst = build_model(
        load_cfg(None, TINY_MODEL + ["MODEL.HEADS.CLS_LAYER", "curricularface", "MODEL.HEADS.NUM_CLASSES", "7"])
    )
    before = dst.head.classifier.weight.detach().clone()
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(dst, path)
    assert missing == ["head.classifier.weight"] and unexpected == []
    assert "trained on 5 classes, this model has 7" in caplog.text
    assert torch.equal(dst.head.classifier.weight, before)
    for k, v in src.state_dict().items():
        if k != "head.classifier.weight":
            assert torch.equal(dst.state_dict()[k], v), k


def test_any_other_mismatch_names_the_key(tmp_path):
    path = str(tmp_path / "w.pyth")
    torch.save(build_model(load_cfg(None, TINY_MODEL + ["RESNET.STEM_WIDTH", "8"])).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch for backbone.stem.conv.weight: file \(8, 3, 7, 7\)"):
        load_weights(build_model(load_cfg(None, TINY_MODEL)), path)


def test_weights_path_that_is_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_weights(build_model(load_cfg(None, TINY_MODEL)), str(tmp_path))


def test_config_inside_an_original_checkpoint_is_read_safely(tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = f"!!python/object/apply:os.system ['touch {marker}']"
    ckpt = _original_checkpoint("backbone_pycls_resnet50", "head_avgpool_circle", 5, evil)
    path = str(tmp_path / "orig.pyth")
    torch.save(ckpt, path)
    model = build_model(load_cfg(None, ["MODEL.HEADS.CLS_LAYER", "circle", "MODEL.HEADS.NUM_CLASSES", "5"]))
    with caplog.at_level(logging.INFO):
        assert load_weights(model, path) == ([], [])
    assert not marker.exists() and "config not readable" in caplog.text


# --- the notebook API ---------------------------------------------------------------------


def test_notebook_api(tmp_path):
    import metric

    assert {"get_cfg", "load_cfg", "build_model", "load_weights"} <= set(metric.__all__)
    fresh = metric.get_cfg()
    assert not fresh.is_frozen() and fresh.MODEL.TYPE == "resnet"
    (tmp_path / "nb.yaml").write_text(ORIGINAL_YAML)
    cfg = metric.load_cfg(str(tmp_path / "nb.yaml"), opts=TINY_MODEL[:6] + ["MODEL.HEADS.IN_FEAT", 0])
    assert cfg.is_frozen() and cfg.MODEL.HEADS.CLS_LAYER == "curricularface"
    src = metric.build_model(cfg)
    path = str(tmp_path / "ours.pyth")
    torch.save({"epoch": 0, "model_state": src.state_dict(), "version": 1}, path)
    model = metric.build_model(cfg)
    assert metric.load_weights(model, path) == ([], [])
    model.eval()
    seen = []
    model.head.embedding_layer.register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        emb, fmap = model(x), model.backbone(x)
    assert emb.shape == (3, 512) and torch.equal(emb, seen[0])  # no BN neck: the embedding layer's output
    assert not torch.allclose(emb.norm(dim=1), torch.ones(3))  # not L2-normalized
    assert fmap.shape == (3, model.backbone.out_channels, 2, 2)  # last feature map, 1/32 of 48 x 40
