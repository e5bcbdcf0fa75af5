"""ResNeSt: key layout of the original checkpoints, published parameter counts, both config
spellings, BN keys, and numerical agreement with an independent implementation (timm)."""

import json
import os

import pytest
import torch

from metric import load_cfg
from metric.modeling.backbones.resnest import ResNeSt
from metric.modeling.builders import build_backbone
from metric.utils.errors import ConfigError
from tests.helpers import REPO

COMPAT = os.path.join(REPO, "tests", "data", "pymetric_state_dict_keys.json")


def _meta_backbone(*opts):
    """Build on the meta device: shapes and counts without allocating or initializing weights."""
    with torch.device("meta"):
        return build_backbone(load_cfg(None, list(opts)))


@pytest.mark.parametrize("depth", [50, 101, 200, 269])
def test_keys_and_shapes_match_original_project(depth):
    with open(COMPAT, encoding="utf-8") as f:
        ref = [(k, tuple(s)) for k, s in json.load(f)[f"backbone_resnest{depth}"]]
    net = _meta_backbone("MODEL.TYPE", f"resnest{depth}")
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == ref
    assert not any(k.startswith("fc.") for k, _ in ref) and net.out_channels == 2048


@pytest.mark.parametrize("depth,count", [(50, 25_434_240), (269, 108_880_480)])
def test_published_parameter_counts_without_classifier(depth, count):
    net = _meta_backbone("MODEL.TYPE", "resnest", "MODEL.DEPTH", str(depth))
    assert sum(p.numel() for p in net.parameters()) == count


def test_both_spellings_and_depth_validation():
    assert _meta_backbone("MODEL.TYPE", "resnest", "MODEL.DEPTH", "101").depth == 101
    assert _meta_backbone("MODEL.TYPE", "resnest200").depth == 200
    assert _meta_backbone("MODEL.TYPE", "resnest269", "MODEL.DEPTH", "269").depth == 269
    with pytest.raises(ConfigError, match=r"MODEL.DEPTH=152 is not allowed: expected one of 50 \| 101 \| 200 \| 269"):
        load_cfg(None, ["MODEL.TYPE", "resnest", "MODEL.DEPTH", "152"])
    with pytest.raises(ConfigError, match="MODEL.DEPTH=101 is not allowed: expected 269 .* resnest269"):
        load_cfg(None, ["MODEL.TYPE", "resnest269", "MODEL.DEPTH", "101"])
    with pytest.raises(ConfigError, match="MODEL.DEPTH=200 .* for MODEL.TYPE resnet"):
        load_cfg(None, ["MODEL.TYPE", "resnet", "MODEL.DEPTH", "200"])


def test_shipped_original_config_is_byte_identical_and_valid():
    ours = os.path.join(REPO, "configs", "metric", "resnst269_8gpu.yaml")
    cfg = load_cfg(ours)
    assert (cfg.MODEL.TYPE, cfg.MODEL.DEPTH, cfg.MODEL.HEADS.CLS_LAYER) == ("resnest", 269, "curricularface")
    seed = os.path.join(os.path.dirname(REPO), "shared", "seed", "configs", "metric", "resnst269_8gpu.yaml")
    if os.path.isfile(seed):
        with open(ours, "rb") as a, open(seed, "rb") as b:
            assert a.read() == b.read()


def test_bn_keys_apply():
    net = _meta_backbone("MODEL.TYPE", "resnest50", "BN.EPS", "1e-3", "BN.MOM", "0.01")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    net = ResNeSt(50, zero_init_final_gamma=True)
    assert torch.count_nonzero(net.layer3[2].bn3.weight) == 0
    assert torch.all(net.layer3[2].bn1.weight == 1) and torch.all(net.layer3[2].conv2.bn1.weight == 1)


def test_forward_equals_timm_resnest50d():
    """timm's resnest50d is the published ResNeSt-50 with the same key names: equal weights
    (random, with non-trivial BN statistics) must give equal feature maps."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnest50d", pretrained=False, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    ours = ResNeSt(50).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 3, 72, 64)
    with torch.no_grad():
        a, b = ours(x), ref.forward_features(x)
    assert a.shape == (2, 2048, 3, 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
