"""Every shipped config builds; forward/backward reaches every parameter; key layouts."""

import glob
import json
import os

import pytest
import torch

from metric import build_model, load_cfg
from metric.modeling.backbones.resnet import ResNet
from metric.modeling.heads.linear_head import margin_layer_from_config
from metric.modeling.layers.margins import ArcFace
from tests.helpers import REPO, tiny_model

# Training configs (configs/sweeps/ holds sweep configs: tests/test_config.py and test_sweep.py load them).
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if os.path.relpath(p, REPO).split(os.sep)[1] != "sweeps"
)
COMPAT = os.path.join(REPO, "tests", "data", "pymetric_state_dict_keys.json")


def _forward_backward(model, num_classes, size=64):
    model.train()
    x = torch.randn(2, 3, size, size)
    labels = torch.tensor([0, num_classes - 1])
    logits, emb = model(x, labels)
    assert logits.shape == (2, num_classes)
    (torch.nn.functional.cross_entropy(logits, labels) + emb.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_config_builds_and_trains(path):
    """The configured backbone and head, with at most 8 classes for the backward pass (the number
    of classifier rows does not change which parameters get a gradient; a shipped 96k-class head
    would add several hundred MB of weights, gradients and normalized copies); the classifier
    with the configured number of classes is then put in and run forward."""
    cfg = load_cfg(path)
    num_classes = cfg.MODEL.HEADS.NUM_CLASSES
    few = min(num_classes, 8)
    torch.manual_seed(0)
    model = build_model(load_cfg(path, ["MODEL.HEADS.NUM_CLASSES", str(few)]))
    _forward_backward(model, few)
    model.eval()
    with torch.no_grad():
        emb = model(torch.randn(1, 3, 64, 64))
    assert emb.shape == (1, cfg.MODEL.HEADS.REDUCTION_DIM) and torch.isfinite(emb).all()
    # the configured number of classes: the classifier built from the config, forward only
    model.head.classifier = margin_layer_from_config(cfg)
    model.train()
    with torch.no_grad():
        logits, _ = model(torch.randn(2, 3, 64, 64), torch.tensor([0, num_classes - 1]))
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("pool", ["avgpool", "maxpool", "gempool"])
@pytest.mark.parametrize("cls_layer", ["linear", "cosface", "arcface", "circle"])
def test_tiny_head_variants(pool, cls_layer):
    cfg = load_cfg(
        None,
        tiny_model(width=4, dim=8, num_classes=3)
        + [
            "MODEL.HEADS.POOL_LAYER",
            pool,
            "MODEL.HEADS.CLS_LAYER",
            cls_layer,
            "MODEL.HEADS.BN_NECK",
            "True",
            "MODEL.HEADS.DROPOUT",
            "0.1",
        ],
    )
    torch.manual_seed(0)
    _forward_backward(build_model(cfg), 3, size=32)


def test_resnext_and_depths_build():
    for depth in (18, 34, 50):
        net = ResNet(depth=depth, width_per_group=4, stem_width=8).eval()
        assert net(torch.randn(1, 3, 32, 32)).shape[1] == net.out_channels
    rx = ResNet(depth=50, num_groups=32, width_per_group=4)
    assert rx.s1.b1.f.b.groups == 32 and rx.out_channels == 2048


def test_eval_model_needs_no_labels_and_returns_unnormalized_embedding():
    cfg = load_cfg(None, tiny_model(width=4, dim=None, num_classes=3) + ["MODEL.HEADS.CLS_LAYER", "arcface"])
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    emb = model(x)
    assert emb.shape == (2, 512)
    assert torch.allclose(emb, model.head.embedding_layer(model.head.pool_layer(model.backbone(x))))
    assert isinstance(model.head.classifier, ArcFace)


def test_in_feat_mismatch_is_a_config_error():
    from metric.utils.errors import ConfigError

    cfg = load_cfg(None, ["MODEL.DEPTH", "18", "MODEL.HEADS.IN_FEAT", "2048"])
    with pytest.raises(ConfigError, match="MODEL.HEADS.IN_FEAT=2048.*512"):
        build_model(cfg)


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_pycls_resnet_keys_match_original_project(depth):
    with open(COMPAT, encoding="utf-8") as f:
        ref = {k: tuple(s) for k, s in json.load(f)[f"backbone_pycls_resnet{depth}"]}
    cfg = load_cfg(None, ["MODEL.DEPTH", str(depth), "RESNET.TRANS_FUN", "bottleneck_transform"])
    from metric.modeling.builders import build_backbone

    ours = {k: tuple(v.shape) for k, v in build_backbone(cfg).state_dict().items()}
    assert ours == ref
