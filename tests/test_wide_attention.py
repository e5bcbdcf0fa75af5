"""Wide ResNets (MODEL.TYPE resnet50x1 .. resnet152x2) and the attention blocks
(MODEL.HEADS.ATTENTION spatial | soa): torchvision keys and numbers, SimCLR checkpoints, each
attention block against a naive loop, the upgrade of original files, the two seed configs (build
unchanged; a tiny variant trains, resumes exactly, extracts and is scored), one-line errors."""

import filecmp
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from metric import build_model, load_cfg, load_weights
from metric.checkpoint import list_checkpoints, read_checkpoint
from metric.modeling.backbones.resnet_wide import WIDE_RESNETS, WideResNet
from metric.modeling.layers.attention import SecondOrderAttention, SpatialAttention2d
from metric.utils.errors import CheckpointError, ConfigError
from tests.helpers import REPO, call_tool, run_py, tiny_opts

torchvision = pytest.importorskip("torchvision")

SEED = "/work/shared/seed/configs/metric"
WIDE_CFG = os.path.join(REPO, "configs", "metric", "resnet152x1_8gpu.yaml")
ATT_CFG = os.path.join(REPO, "configs", "metric", "resnst50x1_att_8gpu.yaml")
# A wide ResNet of base width 4 instead of 64 (stem 4 k, last map 128 k channels), 5 classes.
TINY_WIDE = [
    "RESNET.STEM_WIDTH",
    "4",
    "RESNET.WIDTH_PER_GROUP",
    "4",
    "MODEL.HEADS.IN_FEAT",
    "0",
    "MODEL.HEADS.REDUCTION_DIM",
    "8",
    "MODEL.HEADS.NUM_CLASSES",
    "5",
]


def _tiny(kind, *extra):
    return load_cfg(None, ["MODEL.TYPE", kind] + TINY_WIDE + list(extra))


# --- wide ResNets ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [50, pytest.param(152, marks=pytest.mark.slow)])
def test_x1_is_torchvision_resnet_keys_shapes_and_numbers(depth):
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()
    ours = WideResNet(depth=depth, width_mult=1).eval()
    ref = {k: v.shape for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    tv.fc, tv.avgpool = torch.nn.Identity(), torch.nn.Identity()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        fmap = ours(x)
        assert fmap.shape == (2, 2048, 2, 2)
        assert torch.allclose(fmap.flatten(1), tv(x), atol=1e-5)
    assert ours.out_channels == 2048 and ours.stage_channels == (1024, 2048)


@pytest.mark.parametrize("name", sorted(WIDE_RESNETS))
def test_every_width_scales_stem_and_stages(name):
    depth, k = WIDE_RESNETS[name]
    net = build_model(_tiny(name)).backbone
    shapes = {n: tuple(v.shape) for n, v in net.state_dict().items()}
    assert shapes["conv1.weight"] == (4 * k, 3, 7, 7)
    assert shapes["layer1.0.conv1.weight"] == (4 * k, 4 * k, 1, 1)
    assert shapes["layer1.0.downsample.0.weight"] == (16 * k, 4 * k, 1, 1)
    assert shapes["layer4.0.conv2.weight"] == (32 * k, 32 * k, 3, 3)
    assert shapes["layer4.2.bn3.weight"] == (128 * k,) and net.out_channels == 128 * k
    blocks = max(int(n.split(".")[1]) for n in shapes if n.startswith("layer3.")) + 1
    assert blocks == {50: 6, 152: 36}[depth]
    assert not any(n.startswith("fc.") for n in shapes)
    # torchvision strides: on the 3x3 of the first block of stages 2-4
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 128 * k, 2, 2)


def test_simclr_checkpoint_loads_with_module_and_fc_dropped(tmp_path, caplog):
    model = build_model(_tiny("resnet50x2"))
    ref = build_model(_tiny("resnet50x2", "RNG_SEED", "7"))
    torch.manual_seed(3)
    for p in ref.backbone.parameters():
        p.data.normal_()
    state = {"module." + k: v for k, v in ref.backbone.state_dict().items()}
    state.update({"module.fc.weight": torch.zeros(10, 256), "module.fc.bias": torch.zeros(10)})
    path = str(tmp_path / "r50_2x_sk0.pth")
    torch.save({"state_dict": state}, path)  # the SimCLR converter's format
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(model, path)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    assert "'module.' prefix" in caplog.text and "fc.bias, fc.weight" in caplog.text
    for k, v in ref.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_torchvision_weights_of_another_width_name_the_key_and_shapes(tmp_path):
    tv = torchvision.models.resnet50()
    path = str(tmp_path / "resnet50.pth")
    torch.save(tv.state_dict(), path)
    model = build_model(
        load_cfg(None, ["MODEL.TYPE", "resnet50x2", "MODEL.HEADS.IN_FEAT", "0", "MODEL.HEADS.NUM_CLASSES", "3"])
    )
    with pytest.raises(CheckpointError, match=r"conv1.weight: file \(64, 3, 7, 7\) vs model \(128, 3, 7, 7\)"):
        load_weights(model, path)


# --- attention blocks against naive loops --------------------------------------------------------


def _randomize(module):
    """Random weights and BN statistics (float64), eval mode."""
    torch.manual_seed(0)
    module.double().eval()
    for name, t in module.state_dict().items():
        if name.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif t.is_floating_point():
            t.normal_(0, 0.5)
    return module


def _conv(conv, v):
    """A 1x1 conv on one position's vector, written out."""
    w, b = conv.weight[:, :, 0, 0], conv.bias
    return [sum(w[o, i] * v[i] for i in range(len(v))) + b[o] for o in range(w.shape[0])]


def _bn(bn, v):
    return [
        (v[c] - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + bn.eps) * bn.weight[c] + bn.bias[c]
        for c in range(len(v))
    ]


def test_spatial_attention_equals_naive_loop():
    att = _randomize(SpatialAttention2d(6, mid_channels=5))
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = att(x)
    assert out.shape == (2, 5, 3, 4) and att.out_channels == 5
    for n in range(2):
        for i in range(3):
            for j in range(4):
                y = _bn(att.bn, _conv(att.conv1, x[n, :, i, j]))
                score = sum(att.conv2.weight[0, c, 0, 0] * max(y[c], 0.0) for c in range(5)) + att.conv2.bias[0]
                a = torch.log1p(torch.exp(score))  # softplus
                norm = torch.sqrt(sum(v * v for v in y))
                for c in range(5):
                    assert torch.isclose(out[n, c, i, j], a * y[c] / norm, rtol=1e-9, atol=1e-12)


def test_second_order_attention_equals_naive_loop():
    att = _randomize(SecondOrderAttention(6))
    x = torch.randn(2, 6, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = att(x)
    assert out.shape == x.shape and att.out_channels == 6
    positions = [(i, j) for i in range(2) for j in range(3)]
    for n in range(2):
        f = [[max(v, 0.0) for v in _bn(att.f[1], _conv(att.f[0], x[n, :, i, j]))] for i, j in positions]
        g = [[max(v, 0.0) for v in _bn(att.g[1], _conv(att.g[0], x[n, :, i, j]))] for i, j in positions]
        h = [_conv(att.h, x[n, :, i, j]) for i, j in positions]
        for p, (i, j) in enumerate(positions):
            logits = [sum(f[p][c] * g[q][c] for c in range(3)) / 3**0.5 for q in range(len(positions))]
            e = [torch.exp(v) for v in logits]
            weights = [v / sum(e) for v in e]
            z = [sum(weights[q] * h[q][c] for q in range(len(positions))) for c in range(3)]
            ref = [x[n, c, i, j] + v for c, v in enumerate(_conv(att.v, z))]
            for c in range(6):
                assert torch.isclose(out[n, c, i, j], ref[c], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("attention, width", [("spatial", 512), ("soa", 128), ("none", 128)])
def test_head_pools_the_attention_output_and_every_parameter_learns(attention, width):
    cfg = _tiny("resnet50x1", "MODEL.HEADS.ATTENTION", attention)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.head.embedding_layer.in_features == width
    assert (model.head.attention is None) == (attention == "none")
    logits, emb = model(torch.randn(2, 3, 64, 64), torch.tensor([0, 4]))
    (F.cross_entropy(logits, torch.tensor([0, 4])) + emb.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = model.backbone(x)
        if attention != "none":
            fmap = model.head.attention(fmap)
        assert torch.allclose(model(x), model.head.embedding_layer(fmap.mean((2, 3))), atol=1e-6)
    keys = [k for k in model.state_dict() if k.startswith("head.attention.")]
    expected = {"spatial": {"conv1", "bn", "conv2"}, "soa": {"f", "g", "h", "v"}, "none": set()}[attention]
    assert {k.split(".")[2] for k in keys} == expected


# --- the original files: upgrade and the two seed configs ---------------------------------------


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize(
    "body, attention",
    [
        ("MODEL:\n  TYPE: resnet50x1\n  HEADS:\n    IN_FEAT: 512\n", "spatial"),
        ("MODEL:\n  TYPE: resnet50x2\n  HEADS:\n    IN_FEAT: 512\n", "spatial"),
        ("MODEL:\n  TYPE: resnet\n  DEPTH: 101\n  HEADS:\n    IN_FEAT: 512\n", "spatial"),
        ("MODEL:\n  TYPE: resnest50\n  HEADS:\n    IN_FEAT: 512\n", "spatial"),
        ("MODEL:\n  TYPE: resnet\n  DEPTH: 18\n  HEADS:\n    IN_FEAT: 512\n", "none"),  # ResNet-18: 512 channels
        ("MODEL:\n  TYPE: resnet50x1\n  HEADS:\n    IN_FEAT: 2048\n", "none"),
    ],
)
def test_original_file_with_in_feat_512_gets_spatial_attention(tmp_path, caplog, body, attention):
    with caplog.at_level(logging.INFO, logger="metric.config.merge"):
        cfg = load_cfg(_write(tmp_path / "orig.yaml", body))
    assert cfg.MODEL.HEADS.ATTENTION == attention
    assert ("MODEL.HEADS.ATTENTION spatial" in caplog.text) == (attention == "spatial")


def test_our_files_keep_the_attention_key_explicit(tmp_path):
    cfg = load_cfg(
        _write(tmp_path / "ours.yaml", "VERSION: 2\nMODEL:\n  TYPE: resnet50x1\n  HEADS:\n    IN_FEAT: 512\n")
    )
    assert cfg.MODEL.HEADS.ATTENTION == "none"
    with pytest.raises(
        ConfigError, match="IN_FEAT=512 but the resnet50x1 backbone outputs 128 channels.*MODEL.HEADS.ATTENTION spatial"
    ):
        build_model(_tiny("resnet50x1", "MODEL.HEADS.IN_FEAT", "512"))


def test_seed_configs_are_shipped_unchanged_and_merge():
    for name in ("resnet152x1_8gpu.yaml", "resnst50x1_att_8gpu.yaml"):
        if os.path.isdir(SEED):
            assert filecmp.cmp(os.path.join(SEED, name), os.path.join(REPO, "configs", "metric", name), shallow=False)
    wide, att = load_cfg(WIDE_CFG), load_cfg(ATT_CFG)
    assert (wide.MODEL.TYPE, wide.MODEL.HEADS.ATTENTION, wide.MODEL.HEADS.CLS_LAYER) == (
        "resnet152x1",
        "none",
        "curricularface",
    )
    assert (att.MODEL.TYPE, att.MODEL.HEADS.ATTENTION, att.MODEL.HEADS.IN_FEAT) == ("resnet50x1", "spatial", 512)


@pytest.mark.slow
@pytest.mark.parametrize("path, params", [(WIDE_CFG, 108.48e6), (ATT_CFG, 74.11e6)])
def test_model_info_prints_params_and_flops_of_the_seed_configs(path, params, capsys):
    status, out, err = call_tool("model_info", ["--cfg", path, "--json"], capsys)
    assert status == 0, err
    info = json.loads(out.strip().splitlines()[-1])  # after the log lines of the upgrade
    assert info["params"] == pytest.approx(params, rel=1e-3) and info["flops"] > 1e9


# --- bad input: one line, exit 2 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, words",
    [
        (["MODEL.TYPE", "resnet50x3"], ["MODEL.TYPE", "resnet50x3", "resnet50x4", "resnet152x2"]),
        (["MODEL.TYPE", "resnet101x1"], ["MODEL.TYPE", "resnet101x1", "resnet50x1"]),
        (["MODEL.TYPE", "resnet50x1", "MODEL.DEPTH", "101"], ["MODEL.DEPTH", "101", "50 (or left out)"]),
        (["MODEL.TYPE", "resnet50x2", "RESNET.NUM_GROUPS", "32"], ["RESNET.NUM_GROUPS", "1 for MODEL.TYPE resnet50x2"]),
        (["MODEL.TYPE", "resnet50x1", "RESNET.TRANS_FUN", "basic_transform"], ["RESNET.TRANS_FUN", "bottleneck"]),
        (["MODEL.HEADS.ATTENTION", "nonlocal"], ["MODEL.HEADS.ATTENTION", "nonlocal", "soa", "spatial"]),
        (["MODEL.HEADS.ATTENTION", "spatial", "MODEL.HEADS.POOL_LAYER", "identity"], ["ATTENTION", "feature map"]),
        (["MODEL.HEADS.ATTENTION", "soa", "MODEL.HEADS.NAME", "DOLGHead"], ["ATTENTION soa", "DOLGHead", "LinearHead"]),
        (
            ["MODEL.HEADS.ATTENTION", "spatial", "MODEL.HEADS.IN_FEAT", "2048"],
            ["IN_FEAT=2048", "ATTENTION spatial turns them into 512", "IN_FEAT 512"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(opts, words, capsys):
    base = ["MODEL.TYPE", "resnet50x1"] + TINY_WIDE + ["TRAIN.IM_SIZE", "32"]
    status, _, err = call_tool("model_info", base + opts, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


# --- end to end: a tiny variant of each seed config trains, resumes exactly, extracts, is scored ----


def _seed_tiny(path, data, out, kind):
    """The seed config with a base width of 4, 32 px crops and the tiny data's 4 classes, at the
    config's own learning rate (8 iterations leave the BN statistics far from the weights' at a
    higher one, and the eval-mode maps of a net this deep then blow up)."""
    return ["--cfg", path] + tiny_opts(
        data,
        out,
        **{
            "OPTIM.BASE_LR": load_cfg(path).OPTIM.BASE_LR,
            "MODEL.TYPE": kind,
            "MODEL.DEPTH": WIDE_RESNETS[kind][0],
            "RESNET.STEM_WIDTH": 4,
            "RESNET.WIDTH_PER_GROUP": 4,
            "MODEL.HEADS.IN_FEAT": 512 if "att" in path else 0,
            "MODEL.HEADS.CLS_LAYER": "curricularface",
            "NUM_GPUS": 1,
            "TRAIN.WEIGHTS": "",
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("path, kind", [(WIDE_CFG, "resnet152x1"), (ATT_CFG, "resnet50x1")], ids=["wide", "att"])
def test_tiny_seed_variant_trains_resumes_extracts_and_is_scored(tiny_data, tmp_path, capsys, path, kind):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    status, _, err = call_tool("train_metric", _seed_tiny(path, tiny_data, straight, kind), capsys)
    assert status == 0, err
    status, _, err = call_tool(
        "train_metric", _seed_tiny(path, tiny_data, resumed, kind) + ["OPTIM.MAX_EPOCH", "1"], capsys
    )
    assert status == 0, err
    status, _, err = call_tool("train_metric", _seed_tiny(path, tiny_data, resumed, kind), capsys)
    assert status == 0, err
    with open(os.path.join(resumed, "log.txt"), encoding="utf-8") as f:
        assert "resumed from" in f.read()
    a = read_checkpoint(list_checkpoints(straight)[-1])["model_state"]
    b = read_checkpoint(list_checkpoints(resumed)[-1])["model_state"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if "att" in path:
        assert any(k.startswith("head.attention.conv1") for k in a)
    feats, scores = str(tmp_path / "feats"), str(tmp_path / "scores.json")
    listing = os.path.join(tiny_data, "test.txt")
    status, _, err = call_tool(
        "extract_features",
        ["--no-progress"]
        + _seed_tiny(path, tiny_data, straight, kind)
        + ["TEST.WEIGHTS", list_checkpoints(straight)[-1], "INFER.INPUT", listing, "INFER.OUTPUT", feats],
        capsys,
    )
    assert status == 0, err
    status, _, err = call_tool("evaluate", ["--query", feats, "--query-labels", listing, "--json", scores], capsys)
    assert status == 0, err
    with open(scores, encoding="utf-8") as f:
        metrics = json.load(f)
    assert 0.0 <= metrics["mAP@R"] <= 1.0 and 0.0 <= metrics["recall@1"] <= 1.0


@pytest.mark.slow
def test_bad_type_subprocess_exit_code():
    proc = run_py(["tools/model_info.py", "MODEL.TYPE", "resnet50x3"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "resnet50x3" in proc.stderr


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.parametrize("attention", ["spatial", "soa"])
def test_attention_models_export_to_onnx_with_dynamic_size(tmp_path, attention):
    pytest.importorskip("onnxruntime")
    from metric.export.onnx import diff_stats, export_onnx, run_onnxruntime, run_torch

    torch.manual_seed(0)
    model = build_model(_tiny("resnet50x1", "MODEL.HEADS.ATTENTION", attention)).eval()
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=True)
    for h, w in [(64, 64), (96, 48), (75, 131)]:
        x = torch.randn(2, 3, h, w).numpy()
        assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4, (h, w)
