"""model_complexity (torch.utils.flop_counter) vs a naive count; it leaves the model and the
RNG untouched; tools/model_info.py prints it and lists the registries."""

import json

import pytest
import torch
import torch.nn as nn

from metric import build_model, load_cfg
from metric.modeling.complexity import format_complexity, model_complexity
from tests.helpers import TINY_MODEL, call_tool

TINY = TINY_MODEL + [
    "MODEL.HEADS.BN_NECK",
    "True",
    "MODEL.HEADS.DROPOUT",
    "0.2",
    "MODEL.HEADS.POOL_LAYER",
    "gempool",
    "TRAIN.IM_SIZE",
    "40",
]


def _naive_counts(model, im_size):
    """Multiply-adds and output elements of every conv / linear layer, from their shapes."""
    macs, acts = [0], [0]

    def hook(m, _inputs, out):
        acts[0] += out.numel()
        if isinstance(m, nn.Conv2d):
            macs[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, im_size, im_size))
    for h in hooks:
        h.remove()
    return macs[0], acts[0]


@pytest.mark.parametrize(
    "opts", [TINY, ["MODEL.TYPE", "resnest50", "MODEL.HEADS.NUM_CLASSES", "3"]], ids=["tiny-resnet", "resnest50"]
)
def test_counts_agree_with_naive_reference(opts):
    model = build_model(load_cfg(None, opts))
    c = model_complexity(model, 40)
    macs, acts = _naive_counts(model, 40)
    assert c["flops"] == 2 * macs and c["macs"] == macs and c["activations"] == acts
    assert c["params"] == sum(p.numel() for p in model.parameters())
    assert c["backbone_params"] == sum(p.numel() for p in model.backbone.parameters())


def test_leaves_mode_bn_statistics_and_rng_untouched():
    torch.manual_seed(0)
    model = build_model(load_cfg(None, TINY)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model_complexity(model, 40)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.backbone.stem.bn._forward_hooks  # hooks removed


def test_resnet50_at_224_matches_published_figure():
    """torchvision's ResNet-50 is the reference network of the '4.1 GFLOPs' (multiply-adds) figure."""
    import torchvision

    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        c = model_complexity(torchvision.models.resnet50(), 224)
    assert round(c["macs"] / 1e9, 1) == 4.1 and c["params"] == 25_557_032
    assert format_complexity(c).startswith("FLOPs 8.18 G (4.09 G multiply-adds), params 25.56 M, activations 11.11 M")


def test_tool_prints_complexity_lists_names_and_reports_errors(capsys):
    status, out, _ = call_tool("model_info", ["--list"], capsys)
    assert status == 0
    assert "resnest269" in out and "timm" in out and "gempool" in out
    status, out, _ = call_tool("model_info", ["--json", *TINY], capsys)
    assert status == 0
    info = json.loads(out)
    assert info["im_size"] == 40 and info["flops"] > 0 and info["activations"] > 0
    status, out, _ = call_tool("model_info", TINY, capsys)
    assert status == 0 and "resnet-18 at 40 px:" in out
    status, _, err = call_tool("model_info", ["MODEL.TYPE", "resnest", "MODEL.DEPTH", "18"], capsys)
    assert status == 2 and "MODEL.DEPTH=18" in err
