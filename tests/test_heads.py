"""Heads built from config: every pooling x margin layer trains, vector backbones with identity
pooling, state-dict keys, and the builders that apply dynamic margins and the margin schedule."""

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from metric import build_model, load_cfg
from metric.modeling.builders import apply_dynamic_margins, apply_margin_schedule, build_head
from metric.modeling.heads.linear_head import LinearHead
from metric.modeling.layers.margin_policy import dynamic_margins
from metric.modeling.layers.margins import ArcFace
from metric.modeling.layers.pooling import IdentityPool
from metric.modeling.registry import MARGIN_LAYERS, POOL_LAYERS
from tests.helpers import REPO, TINY_MODEL


def _train_step(model, num_classes=5):
    model.train()
    labels = torch.tensor([0, num_classes - 1, 2])
    logits, emb = model(torch.randn(3, 3, 32, 32), labels)
    assert logits.shape == (3, num_classes) and torch.isfinite(logits).all()
    (F.cross_entropy(logits, labels) + emb.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("cls_layer", MARGIN_LAYERS.names())
@pytest.mark.parametrize("pool", ["avgmaxpool", "gempool"])
def test_every_margin_layer_trains_from_config(cls_layer, pool):
    cfg = load_cfg(
        None,
        TINY_MODEL
        + ["MODEL.HEADS.CLS_LAYER", cls_layer, "MODEL.HEADS.POOL_LAYER", pool, "MODEL.HEADS.SUBCENTERS", "2"],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    _train_step(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_all_pool_layers_are_registered():
    assert {"avgpool", "maxpool", "gempool", "avgmaxpool", "identity"} <= set(POOL_LAYERS.names())


@pytest.mark.parametrize("shape", [(4, 16), (4, 16, 1, 1)])
def test_identity_pooling_takes_vector_backbones(shape):
    head = LinearHead(16, 8, 3, IdentityPool(), ArcFace(8, 3), bn_neck=True)
    x = torch.randn(*shape)
    logits, emb = head.train()(x, torch.tensor([0, 1, 2, 0]))
    assert logits.shape == (4, 3)
    head.eval()
    assert torch.allclose(head(x), head.bn_neck(head.embedding_layer(x.reshape(4, 16))))


def test_identity_pooling_from_config_with_a_vector_backbone():
    """The original ViT config uses identity pooling on a backbone that outputs [N, C]."""
    from metric.modeling.model import MetricModel

    cfg = load_cfg(
        None,
        [
            "MODEL.HEADS.POOL_LAYER",
            "identity",
            "MODEL.HEADS.IN_FEAT",
            "12",
            "MODEL.HEADS.REDUCTION_DIM",
            "8",
            "MODEL.HEADS.NUM_CLASSES",
            "5",
            "MODEL.HEADS.CLS_LAYER",
            "cosface",
        ],
    )
    backbone = nn.Sequential(nn.Conv2d(3, 12, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _train_step(MetricModel(backbone, build_head(cfg, 12)))


def test_head_state_dict_keys_match_the_original_project():
    with open(os.path.join(REPO, "tests", "data", "pymetric_state_dict_keys.json"), encoding="utf-8") as f:
        compat = json.load(f)
    for name, opts in [
        (
            "head_gempool_arcface",
            [
                "MODEL.HEADS.POOL_LAYER",
                "gempool",
                "MODEL.HEADS.CLS_LAYER",
                "curricularface",
                "MODEL.HEADS.DYNAMIC_MARGIN",
                "True",
            ],
        ),
        ("head_avgpool_circle", ["MODEL.HEADS.POOL_LAYER", "avgpool", "MODEL.HEADS.CLS_LAYER", "circle"]),
    ]:
        want = {k: tuple(s) for k, s in compat[name]}
        cfg = load_cfg(None, opts + ["MODEL.HEADS.NUM_CLASSES", "81313"])
        head = build_head(cfg, 2048)
        apply_dynamic_margins(cfg, head, [0, 0, 1])  # per-class margins add no state-dict key
        model_keys = {"head." + k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert model_keys == want, name


def test_dynamic_margins_and_schedule_through_the_builders():
    cfg = load_cfg(
        None,
        [
            "MODEL.HEADS.NUM_CLASSES",
            "4",
            "MODEL.HEADS.REDUCTION_DIM",
            "8",
            "MODEL.HEADS.CLS_LAYER",
            "arcface",
            "MODEL.HEADS.MARGIN",
            "0.2",
            "MODEL.HEADS.DYNAMIC_MARGIN",
            "True",
            "MODEL.HEADS.DYNAMIC_MARGIN_A",
            "0.3",
            "MODEL.HEADS.DYNAMIC_MARGIN_B",
            "0.1",
            "MODEL.HEADS.DYNAMIC_MARGIN_LAMBDA",
            "0.5",
            "MODEL.HEADS.MARGIN_SCHEDULE",
            "[[0, 0.1], [2, 0.4]]",
            "MODEL.HEADS.MARGIN_SCHEDULE_MODE",
            "linear",
        ],
    )
    head = build_head(cfg, 16)
    labels = [0] * 9 + [1] * 4 + [2] + [3] * 4
    margins = apply_dynamic_margins(cfg, head, labels)
    assert torch.allclose(margins, dynamic_margins([9, 4, 1, 4], 0.3, 0.1, 0.5))
    assert float(margins[2]) == pytest.approx(0.4) and float(margins[0]) == pytest.approx(0.1)
    assert torch.equal(head.classifier.class_margin, margins)
    for epoch, want in [(0, 0.1), (1, 0.25), (2, 0.4), (5, 0.4)]:
        assert apply_margin_schedule(cfg, head, epoch) == pytest.approx(want)
        assert head.classifier.margin == pytest.approx(want)
        assert torch.allclose(head.classifier.class_margin, margins * want / 0.2)  # scaled by scheduled / MARGIN
    plain = load_cfg(None, ["MODEL.HEADS.CLS_LAYER", "arcface"])
    plain_head = build_head(plain, 16)
    assert apply_dynamic_margins(plain, plain_head, labels) is None
    assert apply_margin_schedule(plain, plain_head, 3) is None and plain_head.classifier.class_margin is None


def test_adacos_options_from_config():
    for mode, adaptive in [("adaptive", True), ("fixed", False)]:
        cfg = load_cfg(
            None, ["MODEL.HEADS.CLS_LAYER", "adacos", "MODEL.HEADS.ADACOS_MODE", mode, "MODEL.HEADS.NUM_CLASSES", "11"]
        )
        layer = build_head(cfg, 16).classifier
        assert layer.adaptive is adaptive
        assert float(layer.scale) == pytest.approx(2**0.5 * torch.log(torch.tensor(10.0)).item())


@pytest.mark.parametrize("cls_layer", MARGIN_LAYERS.names())
def test_margin_layers_on_an_all_same_label_batch(cls_layer):
    torch.manual_seed(1)
    layer = MARGIN_LAYERS.get(cls_layer)(6, 4, scale=10.0, margin=0.3, subcenters=2).train()
    x = torch.randn(5, 6, requires_grad=True)
    labels = torch.zeros(5, dtype=torch.long)
    out = layer(x, labels)
    F.cross_entropy(out, labels).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("cls_layer", MARGIN_LAYERS.names())
def test_margin_layers_under_autocast(cls_layer):
    """Mixed precision (CPU bf16 here): half-precision cosines meet float32 buffers and margins."""
    torch.manual_seed(2)
    layer = MARGIN_LAYERS.get(cls_layer)(6, 4, scale=10.0, margin=0.3, subcenters=2).train()
    if hasattr(layer, "set_class_margins"):
        layer.set_class_margins(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    labels = torch.tensor([0, 1, 2, 3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(5, 6), labels)
    F.cross_entropy(out.float(), labels).backward()
    assert torch.isfinite(out).all() and torch.isfinite(layer.weight.grad).all()
