"""DOLG (MODEL.HEADS.NAME DOLGHead): checkpoints of the authors' code load with no key missing or
unexpected and give the embedding of a naive re-implementation written here from the paper's
description; every backbone with two stages; ImageNet weights; extraction; one-line errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metric import build_model, load_cfg, load_weights
from metric.checkpoint import list_checkpoints, load_inference_weights
from metric.checkpoint.convert import detect_format
from metric.datasets.transforms import decode_image, resize_longer, to_tensor
from metric.engine.predictor import combine_views
from metric.modeling.heads.dolg_head import DOLGHead
from metric.modeling.layers.dolg import orthogonal_fusion
from metric.modeling.layers.margins import CurricularFace
from metric.retrieval.store import load_features
from metric.utils.errors import CheckpointError, ConfigError
from tests.helpers import REPO, TINY_MODEL, call_tool, run_py, tiny_opts

COMPAT = os.path.join(REPO, "tests", "data", "dolg_state_dict_keys.json")
TINY_CFG = os.path.join(REPO, "tests", "data", "dolg_tiny.yaml")
DOLG = ["MODEL.HEADS.NAME", "DOLGHead", "MODEL.HEADS.CLS_LAYER", "curricularface"]
TINY_DOLG = TINY_MODEL + DOLG
# The authors' R-50 model (compat file): S3 1024, S4 2048, 512-d, 100 classes, torchvision strides.
R50_DOLG = [
    "MODEL.DEPTH",
    "50",
    "RESNET.STRIDE_1X1",
    "False",
    "MODEL.HEADS.REDUCTION_DIM",
    "512",
    "MODEL.HEADS.NUM_CLASSES",
    "100",
    "MODEL.DOLG.S3_DIM",
    "1024",
    "MODEL.DOLG.S4_DIM",
    "2048",
] + DOLG


def _rel(out, ref):
    out, ref = torch.as_tensor(out, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    return ((out - ref).abs().max() / ref.abs().max()).item()


# --- the authors' checkpoint and a naive re-implementation -----------------------------------


def _authors_keys(multi_atrous):
    with open(COMPAT, encoding="utf-8") as f:
        data = json.load(f)
    return [(k, tuple(s)) for k, s in data["dolg_r50"] + (data["dolg_r50_with_ma_extra"] if multi_atrous else [])]


def _value(key, shape, gen):
    """Deterministic, plausible weights: BN variances positive, He-scaled convolutions."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(100, dtype=torch.long)
    if key == "pool_g.p":
        return torch.full(shape, 2.7)
    if key == "desc_cls.t":
        return torch.full(shape, 0.3)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if key.endswith(("running_mean", "bias")):
        return torch.randn(shape, generator=gen) * 0.1
    if len(shape) == 1:  # BN gamma
        return torch.rand(shape, generator=gen) + 0.5
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def authors_state(multi_atrous, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: _value(k, s, gen) for k, s in _authors_keys(multi_atrous)}


def _bn(sd, prefix, x, eps=1e-5):
    return F.batch_norm(
        x,
        sd[prefix + ".running_mean"],
        sd[prefix + ".running_var"],
        sd[prefix + ".weight"],
        sd[prefix + ".bias"],
        False,
        0.0,
        eps,
    )


def naive_resnet(sd, x, stride_1x1=False):
    """pycls ResNet (bottleneck) from ``globalmodel.*`` tensors: the stage-3 and stage-4 maps."""
    g = "globalmodel."
    x = F.max_pool2d(
        F.relu(_bn(sd, g + "stem.bn", F.conv2d(x, sd[g + "stem.conv.weight"], stride=2, padding=3))), 3, 2, 1
    )
    maps = []
    for s in range(1, 5):
        b = 1
        while f"{g}s{s}.b{b}.f.a.weight" in sd:
            p = f"{g}s{s}.b{b}."
            stride = 2 if s > 1 and b == 1 else 1
            s1, s3 = (stride, 1) if stride_1x1 else (1, stride)
            h = F.relu(_bn(sd, p + "f.a_bn", F.conv2d(x, sd[p + "f.a.weight"], stride=s1)))
            h = F.relu(_bn(sd, p + "f.b_bn", F.conv2d(h, sd[p + "f.b.weight"], stride=s3, padding=1)))
            h = _bn(sd, p + "f.c_bn", F.conv2d(h, sd[p + "f.c.weight"]))
            short = (
                _bn(sd, p + "bn", F.conv2d(x, sd[p + "proj.weight"], stride=stride)) if p + "proj.weight" in sd else x
            )
            x = F.relu(short + h)
            b += 1
        maps.append(x)
    return maps[2], maps[3]


def naive_head(sd, f3, f4):
    """The DOLG head as the issue describes it, from the authors' key names."""
    # global branch: GeM (p) -> linear S4 -> S3
    p = sd["pool_g.p"]
    fg = F.linear(f4.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p), sd["fc_t.weight"], sd["fc_t.bias"])
    # local branch: [multi-atrous] -> 1x1 conv -> BN -> normalized map * softplus(conv(relu(.)))
    x = f3
    if "localmodel.aspp.conv_after.0.weight" in sd:
        a = "localmodel.aspp."
        h, w = x.shape[2:]
        pooled = F.relu(
            F.conv2d(x.mean(dim=(2, 3), keepdim=True), sd[a + "im_pool.1.weight"], sd[a + "im_pool.1.bias"])
        )
        parts = [
            F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False),
            F.conv2d(x, sd[a + "aspp.0.weight"], sd[a + "aspp.0.bias"]),
        ]
        for i, d in enumerate((6, 12, 18), start=1):
            parts.append(F.conv2d(x, sd[a + f"aspp.{i}.weight"], sd[a + f"aspp.{i}.bias"], padding=d, dilation=d))
        x = F.relu(F.conv2d(torch.cat(parts, 1), sd[a + "conv_after.0.weight"], sd[a + "conv_after.0.bias"]))
    x = _bn(sd, "localmodel.bn", F.conv2d(x, sd["localmodel.conv1.weight"], sd["localmodel.conv1.bias"]))
    att = F.softplus(F.conv2d(F.relu(x), sd["localmodel.conv2.weight"], sd["localmodel.conv2.bias"]))
    fl = x / x.norm(dim=1, keepdim=True) * att
    # orthogonal fusion, one position at a time, then the average
    n, c, h, w = fl.shape
    fo = torch.zeros(n, c, dtype=fl.dtype)
    for i in range(n):
        g = fg[i]
        for yy in range(h):
            for xx in range(w):
                v = fl[i, :, yy, xx]
                fo[i] += v - (v @ g) / (g @ g) * g
    fo /= h * w
    return F.linear(torch.cat([fg, fo], 1), sd["fc.weight"], sd["fc.bias"])


def _save_authors_checkpoint(path, state):
    cfg = "MODEL:\n  TYPE: resnet\n  DEPTH: 50\n  S3_DIM: 1024\n  S4_DIM: 2048\n"
    torch.save({"epoch": 10, "model_state": state, "optimizer_state": {}, "cfg": cfg}, path)


@pytest.mark.parametrize("multi_atrous", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_authors_checkpoint_loads_exactly_and_gives_the_naive_embedding(tmp_path, multi_atrous):
    state = authors_state(multi_atrous)
    path = str(tmp_path / "dolg.pyth")
    _save_authors_checkpoint(path, state)
    model = build_model(load_cfg(None, R50_DOLG + ["MODEL.DOLG.MULTI_ATROUS", str(multi_atrous)]))
    assert detect_format({"model_state": state}, state) == "dolg"
    missing, unexpected = load_weights(model, path)
    assert missing == [] and unexpected == []
    assert isinstance(model.head.classifier, CurricularFace)
    assert torch.equal(model.head.classifier.t, state["desc_cls.t"])
    assert load_inference_weights(
        build_model(load_cfg(None, R50_DOLG + ["MODEL.DOLG.MULTI_ATROUS", str(multi_atrous)])), path
    ) == ([], [])
    torch.manual_seed(1)
    x = torch.rand(2, 3, 224, 160) * 4 - 2  # stage-3 map 14 x 10: the dilated convolutions see the map
    with torch.no_grad():
        ours = model.eval()(x)
        ref = naive_head(
            {k: v.double() if v.is_floating_point() else v for k, v in state.items()},
            *naive_resnet({k: v.double() for k, v in state.items()}, x.double()),
        )
    rel = _rel(ours, ref)
    print(f"DOLG multi_atrous={multi_atrous}: max relative difference to the naive re-implementation {rel:.2e}")
    assert ours.shape == (2, 512) and rel < 1e-5


def _authors_names(head_state):
    """Our DOLGHead keys -> the authors' names (the inverse of the checkpoint conversion)."""
    renames = [
        ("pool_layer.", "pool_g."),
        ("global_fc.", "fc_t."),
        ("embedding_layer.", "fc."),
        ("classifier.", "desc_cls."),
        ("local_branch.multi_atrous.convs.", "localmodel.aspp.aspp."),
        ("local_branch.multi_atrous.image_pool.", "localmodel.aspp.im_pool."),
        ("local_branch.multi_atrous.fuse.", "localmodel.aspp.conv_after."),
        ("local_branch.", "localmodel."),
    ]
    out = {}
    for k, v in head_state.items():
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a) :]
                break
        out[k] = v.double() if v.is_floating_point() else v
    return out


def test_head_matches_naive_on_a_large_map():
    """A 40 x 44 stage-3 map, so that every dilation (up to 18) reaches other positions."""
    torch.manual_seed(0)
    head = DOLGHead(16, 24, 8, 5, CurricularFace(8, 5), multi_atrous=True, gem_p=2.5).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        f3, f4 = torch.rand(2, 16, 40, 44), torch.rand(2, 24, 20, 22)
        ours = head((f3, f4))
        ref = naive_head(_authors_names(head.state_dict()), f3.double(), f4.double())
    assert _rel(ours, ref) < 1e-5


def test_orthogonal_fusion_is_orthogonal_to_the_global_descriptor():
    torch.manual_seed(0)
    fl, fg = torch.randn(3, 6, 5, 4, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    fo = orthogonal_fusion(fl, fg)
    assert torch.allclose((fo * fg).sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # the projection of the mean local feature is the mean of the projections (it is linear)
    m = fl.mean(dim=(2, 3))
    assert torch.allclose(fo, m - (m * fg).sum(1, keepdim=True) / (fg * fg).sum(1, keepdim=True) * fg)


# --- backbones, training, ImageNet weights -----------------------------------------------------

BACKBONES = {
    "resnet18": TINY_MODEL,
    "resnest50": [
        "MODEL.TYPE",
        "resnest50",
        "MODEL.HEADS.IN_FEAT",
        "0",
        "MODEL.HEADS.REDUCTION_DIM",
        "8",
        "MODEL.HEADS.NUM_CLASSES",
        "5",
    ],
}
for _timm in ("resnet18", "convnext_atto", "efficientnet_b0"):  # EfficientNet: f4 after its conv_head
    BACKBONES[f"timm_{_timm}"] = [
        "MODEL.TYPE",
        "timm",
        "MODEL.TIMM.NAME",
        _timm,
        "MODEL.HEADS.IN_FEAT",
        "0",
        "MODEL.HEADS.REDUCTION_DIM",
        "8",
        "MODEL.HEADS.NUM_CLASSES",
        "5",
    ]


@pytest.mark.parametrize(
    "name, multi_atrous",
    [
        ("resnet18", False),
        ("resnet18", True),
        ("resnest50", False),
        ("timm_resnet18", False),
        ("timm_resnet18", True),
        ("timm_convnext_atto", False),
        ("timm_efficientnet_b0", False),
    ],
)
def test_every_two_stage_backbone_trains(name, multi_atrous):
    if name.startswith("timm"):
        pytest.importorskip("timm")
    cfg = load_cfg(None, BACKBONES[name] + DOLG + ["MODEL.DOLG.MULTI_ATROUS", str(multi_atrous)])
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(2, 3, 64, 96)
    f3, f4 = model.backbone.forward_stages(x)
    assert (f3.shape[1], f4.shape[1]) == model.backbone.stage_channels == model.head.stage_channels
    assert f3.shape[2:] == (4, 6) and f4.shape[2:] == (2, 3)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.backbone.forward_stages(x)[1], model.backbone(x))  # the last map is unchanged
    model.train()
    logits, emb = model(x, torch.tensor([0, 4]))
    assert logits.shape == (2, 5) and emb.shape == (2, 8)
    (F.cross_entropy(logits, torch.tensor([0, 4])) + emb.pow(2).mean()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_imagenet_weights_load_into_the_backbone(tmp_path, caplog):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    path = str(tmp_path / "resnet18.pth")
    torch.save(tv.state_dict(), path)
    model = build_model(
        load_cfg(
            None,
            [
                "MODEL.DEPTH",
                "18",
                "RESNET.STRIDE_1X1",
                "False",
                "MODEL.HEADS.IN_FEAT",
                "0",
                "MODEL.HEADS.NUM_CLASSES",
                "5",
            ]
            + DOLG,
        )
    )
    missing, unexpected = load_weights(model, path)
    assert unexpected == [] and missing and all(k.startswith("head.") for k in missing)
    assert torch.equal(model.backbone.stem.conv.weight, tv.conv1.weight)
    assert torch.equal(model.backbone.s4.b2.f.b.weight, tv.layer4[1].conv2.weight)
    tv.eval(), model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        assert torch.allclose(model.backbone.forward_stages(x)[1], ref, atol=1e-5)


def test_dolg_checkpoint_errors(tmp_path):
    """A tiny checkpoint in the authors' format (our tiny model's keys renamed back)."""
    torch.manual_seed(0)
    tiny = build_model(load_cfg(None, TINY_DOLG + ["MODEL.DOLG.MULTI_ATROUS", "True"]))
    state = {
        ("globalmodel." + k[len("backbone.") :]) if k.startswith("backbone.") else k: v
        for k, v in tiny.state_dict().items()
        if k.startswith("backbone.")
    }
    state.update(_authors_names({k[len("head.") :]: v for k, v in tiny.state_dict().items() if k.startswith("head.")}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    path = str(tmp_path / "dolg_ma.pyth")
    _save_authors_checkpoint(path, state)
    assert load_weights(build_model(load_cfg(None, TINY_DOLG + ["MODEL.DOLG.MULTI_ATROUS", "True"])), path) == ([], [])
    with pytest.raises(CheckpointError, match="with the multi-atrous.*MODEL.DOLG.MULTI_ATROUS True"):
        load_weights(build_model(load_cfg(None, TINY_DOLG)), path)
    resnest = build_model(load_cfg(None, ["MODEL.TYPE", "resnest50", "MODEL.HEADS.NUM_CLASSES", "5"] + DOLG))
    with pytest.raises(CheckpointError, match="dolg state dict loads into MODEL.TYPE resnet"):
        load_weights(resnest, path)
    # into a LinearHead model only the backbone fits: inference refuses it, naming a key
    linear = build_model(load_cfg(None, TINY_MODEL))
    with pytest.raises(CheckpointError, match="head.*(missing from|unexpected in) the weights"):
        load_inference_weights(linear, path)


# --- config -----------------------------------------------------------------------------------


def test_authors_config_names_are_read(tmp_path):
    path = tmp_path / "dolg.yaml"
    path.write_text("MODEL:\n  TYPE: resnet\n  DEPTH: 50\n  S3_DIM: 1024\n  S4_DIM: 2048\n  WITH_MA: True\n")
    cfg = load_cfg(str(path))
    assert (cfg.MODEL.DOLG.S3_DIM, cfg.MODEL.DOLG.S4_DIM, cfg.MODEL.DOLG.MULTI_ATROUS) == (1024, 2048, True)


def test_dims_from_the_backbone_or_refused():
    model = build_model(load_cfg(None, TINY_DOLG))
    assert model.head.stage_channels == (16, 32)
    with pytest.raises(ConfigError, match=r"MODEL.DOLG.S3_DIM=1024 but the resnet-18 backbone's stage-3 map has 16"):
        build_model(load_cfg(None, TINY_DOLG + ["MODEL.DOLG.S3_DIM", "1024"]))
    with pytest.raises(ConfigError, match=r"MODEL.DOLG.S4_DIM=2048 .* stage-4 map has 32 channels"):
        build_model(load_cfg(None, TINY_DOLG + ["MODEL.DOLG.S4_DIM", "2048"]))
    with pytest.raises(ConfigError, match="MODEL.DOLG.S3_DIM"):
        load_cfg(None, TINY_DOLG + ["MODEL.DOLG.S3_DIM", "-1"])


@pytest.mark.parametrize(
    "opts, words",
    [
        (["MODEL.DOLG.S3_DIM", "1000"], ["MODEL.DOLG.S3_DIM=1000", "stage-3 map has 16 channels"]),
        (["MODEL.DOLG.S4_DIM", "7"], ["MODEL.DOLG.S4_DIM=7", "stage-4 map has 32 channels"]),
        (
            ["MODEL.TYPE", "timm", "MODEL.TIMM.NAME", "vit_tiny_patch16_224"],
            ["DOLGHead needs", "stage-3 and stage-4", "timm vit_tiny_patch16_224"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(opts, words, capsys):
    if "timm" in opts:
        pytest.importorskip("timm")
    status, _, err = call_tool("model_info", TINY_DOLG + ["TRAIN.IM_SIZE", "64"] + opts, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0]


@pytest.mark.slow
def test_bad_input_subprocess_exit_code():
    proc = run_py(["tools/model_info.py", *TINY_DOLG, "MODEL.DOLG.S3_DIM", "1000"])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "MODEL.DOLG.S3_DIM" in proc.stderr


# --- end to end: the tiny config trains, and extraction (multi-scale, flip) uses the model ----------


@pytest.mark.slow
def test_tiny_config_trains_and_extracts_multiscale(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data,
        out,
        **{
            "MODEL.HEADS.NAME": "DOLGHead",
            "MODEL.HEADS.CLS_LAYER": "curricularface",
            "MODEL.DOLG.MULTI_ATROUS": "True",
        },
    )
    status, _, err = call_tool("train_metric", ["--cfg", TINY_CFG] + opts, capsys)
    assert status == 0, err
    weights = list_checkpoints(out)[-1]
    feats = str(tmp_path / "feats")
    scales = ["INFER.SCALES", "[0.75, 1.0, 1.5]", "INFER.FLIP", "True"]
    status, _, err = call_tool(
        "extract_features",
        ["--no-progress", "--cfg", TINY_CFG]
        + opts
        + scales
        + ["TEST.WEIGHTS", weights, "INFER.INPUT", os.path.join(tiny_data, "test.txt"), "INFER.OUTPUT", feats],
        capsys,
    )
    assert status == 0, err
    store = load_features(feats)
    cfg = load_cfg(TINY_CFG, opts + scales)
    model = build_model(cfg)
    load_inference_weights(model, weights)
    model.eval()
    im = decode_image(os.path.join(tiny_data, "img", "1_3.jpg"))
    views = []
    with torch.no_grad():
        for s in (0.75, 1.0, 1.5):
            x = to_tensor(resize_longer(im, max(8, int(round(cfg.TEST.IM_SIZE * s)))))[None]
            views += [F.normalize(model(x), dim=1), F.normalize(model(torch.flip(x, dims=[3])), dim=1)]
    ref = combine_views(torch.stack(views), cfg.INFER.MULTISCALE_POOL, cfg.INFER.MULTISCALE_P)[0]
    assert np.allclose(store.embeddings[store.ids.index("1_3")], ref.numpy(), atol=1e-5)
