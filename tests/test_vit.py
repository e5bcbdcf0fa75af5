"""MODEL.TYPE vit, CLIP's image encoder: layout and numbers against OpenCLIP, any input size,
weights (the original project's checkpoints, CLIP / OpenCLIP state dicts, safetensors,
TorchScript archives), mixed precision, gradient checkpointing, FLOPs, layer ids for layer-wise
learning-rate decay, one-line errors, ONNX export, and a tiny ViT trained, resumed, extracted and
scored end to end.

``open-clip-torch`` (a test-only dependency, ``pip install -e .[test]``) provides the reference
implementation; only its architecture is used, nothing is downloaded."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metric import build_model, load_cfg, load_weights
from metric.checkpoint.clip import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from metric.checkpoint.convert import detect_format
from metric.modeling.backbones.vit import VisionTransformer
from metric.modeling.builders import build_backbone
from metric.modeling.layers.resize import resize_2d
from metric.modeling.layers.transformer import LayerNorm
from metric.utils.errors import CheckpointError
from tests.helpers import REPO, call_tool, remove_pymetric_handlers, tiny_opts

# WIDTH 128 (2 heads), 2 blocks, 8 px patches, 64-d image embedding, trained at 32 px (4 x 4 grid).
TINY = [
    "MODEL.TYPE",
    "vit",
    "MODEL.WIDTH",
    "128",
    "MODEL.LAYERS",
    "2",
    "MODEL.PATCH_SIZE",
    "8",
    "MODEL.EMB_DIM",
    "64",
    "MODEL.HEADS.IN_FEAT",
    "0",
    "MODEL.HEADS.POOL_LAYER",
    "identity",
    "MODEL.HEADS.REDUCTION_DIM",
    "16",
    "MODEL.HEADS.NUM_CLASSES",
    "5",
    "TRAIN.IM_SIZE",
    "32",
    "TEST.IM_SIZE",
    "40",
]
TINY_CFG = os.path.join(REPO, "configs", "metric", "vit_tiny_cpu.yaml")
B32_CFG = os.path.join(REPO, "configs", "metric", "ViT_dds_8gpu.yaml")


def _cfg(*extra):
    return load_cfg(None, TINY + [str(e) for e in extra])


def _open_clip():
    return pytest.importorskip("open_clip", reason="open-clip-torch is a test dependency: pip install -e .[test]")


def _reference_vit(image_size=32, patch=8, width=128, layers=2, emb=64):
    from open_clip.transformer import QuickGELU
    from open_clip.transformer import VisionTransformer as OpenClipViT

    return OpenClipViT(
        image_size=image_size,
        patch_size=patch,
        width=width,
        layers=layers,
        heads=width // 64,
        mlp_ratio=4.0,
        output_dim=emb,
        act_layer=QuickGELU,
    )


def _randomize(state, seed=1):
    """Random values for every tensor (norm gains around 1), so no parameter is left at its init."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        r = torch.randn(v.shape, generator=gen)
        out[k] = 1.0 + 0.1 * r if ("ln_" in k and k.endswith("weight")) else r * (0.05 if v.dim() > 1 else 0.1)
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --- layout and numbers -------------------------------------------------------------------------


def test_state_dict_is_clips_layout():
    keys = list(VisionTransformer(32, 8, 128, 2, 64).state_dict())
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    ]
    want = ["class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias"]
    want += [f"transformer.resblocks.{i}.{k}" for i in range(2) for k in block] + ["ln_post.weight", "ln_post.bias"]
    assert sorted(keys) == sorted(want)


@pytest.mark.parametrize(
    "size", [(32, 8, 128, 2, 64), (224, 32, 768, 12, 512), (224, 14, 1024, 24, 768)], ids=["tiny", "B-32", "L-14"]
)
def test_keys_and_shapes_equal_open_clip(size):
    _open_clip()
    with torch.device("meta"):
        ours = VisionTransformer(*size).state_dict()
        ref = _reference_vit(*size).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_vit_dds_config_builds_clip_b32():
    cfg = load_cfg(B32_CFG)  # the original project's file, shipped unchanged
    assert (cfg.MODEL.TYPE, cfg.MODEL.WIDTH, cfg.MODEL.LAYERS, cfg.MODEL.PATCH_SIZE, cfg.MODEL.EMB_DIM) == (
        "vit",
        768,
        12,
        32,
        512,
    )
    assert cfg.MODEL.HEADS.CLS_LAYER == "curricularface"  # the original's "arcface"
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    assert backbone.heads == 12 and backbone.grid == (7, 7) and backbone.out_channels == 512
    assert sum(p.numel() for p in backbone.parameters()) == 87_849_216  # CLIP ViT-B/32's image encoder


def _equal_to_open_clip(size, batch, image):
    _open_clip()
    torch.manual_seed(0)
    ref = _reference_vit(*size).eval()
    ours = VisionTransformer(*size).eval()
    state = _randomize(ref.state_dict())
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return _rel(ours(x), ref(x))


def test_equals_open_clip_tiny():
    assert _equal_to_open_clip((32, 8, 128, 2, 64), 4, 32) < 1e-5


@pytest.mark.slow  # ViT-B/32 twice on one 224 px image: about 5-10 s on 2 CPU cores
def test_equals_open_clip_b32():
    assert _equal_to_open_clip((224, 32, 768, 12, 512), 1, 224) < 1e-5


# --- any input size ----------------------------------------------------------------------------


def test_positional_embedding_is_resampled_bicubic_over_the_grid():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 128, 2, 64)
    pe = vit.positional_embedding.detach()
    for grid in [(4, 4), (5, 5), (6, 3), (2, 2), (9, 7)]:
        got = vit.positional_embedding_for(*grid).detach()
        img = pe[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        want = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(-1, 128)
        assert torch.equal(got[0], pe[0])  # the class token's entry is kept
        assert got.shape == (1 + grid[0] * grid[1], 128) and (got[1:] - want).abs().max() < 1e-5, grid
    assert vit.positional_embedding_for(4, 4) is vit.positional_embedding


def test_non_square_and_other_sizes_equal_open_clip_at_that_grid():
    """A 48 x 40 input to a model made for 32 px equals OpenCLIP built for 48 x 40 with the
    positional embedding resampled by F.interpolate (bicubic, no antialiasing)."""
    _open_clip()
    torch.manual_seed(0)
    ours = VisionTransformer(32, 8, 128, 2, 64).eval()
    ours.load_state_dict(_randomize(ours.state_dict()))
    ref = _reference_vit(image_size=(48, 40)).eval()
    state = dict(ours.state_dict())
    state["positional_embedding"] = ours.positional_embedding_for(6, 5).detach()
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert _rel(ours(x), ref(x)) < 1e-5


def test_sides_not_a_multiple_of_the_patch_are_resized_up():
    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 128, 2, 64).eval()
    x = torch.randn(2, 3, 27, 37)
    with torch.no_grad():
        got = vit(x)
        want = vit(F.interpolate(x, size=(32, 40), mode="bilinear", align_corners=False))
        assert (got - want).abs().max() < 1e-5
        assert vit(torch.randn(1, 3, 3, 5)).shape == (1, 64)  # smaller than a patch: one patch


def test_resize_matrices_equal_interpolate():
    gen = torch.Generator().manual_seed(0)
    for mode in ("bilinear", "bicubic"):
        for h, w, out in [(7, 7, (7, 7)), (7, 7, (2, 3)), (7, 7, (16, 12)), (33, 40, (40, 40)), (1, 1, (3, 5))]:
            x = torch.randn(2, 3, h, w, generator=gen)
            want = F.interpolate(x, size=out, mode=mode, align_corners=False)
            assert (resize_2d(x, out, mode) - want).abs().max() < 1e-5, (mode, h, w, out)
        x = torch.randn(1, 3, 7, 7, generator=gen)
        assert torch.equal(resize_2d(x, (7, 7), mode), x)  # the same size is exactly the identity


def test_weights_made_at_another_size_are_resampled(tmp_path, caplog):
    torch.manual_seed(0)
    small = build_model(_cfg()).eval()  # TRAIN.IM_SIZE 32: 4 x 4 grid
    path = str(tmp_path / "vit32.pth")
    torch.save(small.state_dict(), path)
    big = build_model(_cfg("TRAIN.IM_SIZE", 48)).eval()  # 6 x 6 grid
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(big, path)
    assert missing == [] and unexpected == []
    assert "positional embedding of a 4x4 patch grid resampled (bicubic) to this model's 6x6" in caplog.text
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (big(x) - small(x)).abs().max() < 1e-5


# --- weights -------------------------------------------------------------------------------------

ORIGINAL_YAML = """\
MODEL:
  TYPE: vit
  NUM_CLASSES: 10
  WIDTH: 128
  LAYERS: 2
  EMB_DIM: 64
  PATCH_SIZE: 8
  HEADS:
    NAME: "LinearHead"
    NUM_CLASSES: 10
    IN_FEAT: 64
    REDUCTION_DIM: 16
    POOL_LAYER: "identity"
    CLS_LAYER: "arcface"
TRAIN:
  IM_SIZE: 32
TEST:
  IM_SIZE: 32
"""


def test_original_project_vit_checkpoint_loads_with_no_key_missing(tmp_path, caplog):
    """A checkpoint as the original project wrote it for its vit: CLIP's visual keys under
    backbone. (taken here from OpenCLIP, not from our model), its head (curricularface's t)."""
    _open_clip()
    cfg_path = tmp_path / "vit_original.yaml"
    cfg_path.write_text(ORIGINAL_YAML)
    gen = torch.Generator().manual_seed(3)
    state = {"backbone." + k: v for k, v in _randomize(_reference_vit().state_dict()).items()}
    state.update(
        {
            "head.embedding_layer.weight": torch.randn(16, 64, generator=gen),
            "head.classifier.weight": torch.randn(10, 16, generator=gen),
            "head.classifier.t": torch.full((1,), 0.3),
        }
    )
    ckpt = {
        "epoch": 4,
        "model_state": state,
        "optimizer_state": {"state": {}, "param_groups": []},
        "cfg": ORIGINAL_YAML,
    }
    path = str(tmp_path / "model_epoch_0005.pyth")
    torch.save(ckpt, path)
    assert detect_format(ckpt, state) == "pymetric_original"
    model = build_model(load_cfg(str(cfg_path)))
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(model, path, fit=True)
    assert missing == [] and unexpected == []
    assert "original pymetric project (MODEL.TYPE vit" in caplog.text and "differs" not in caplog.text
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _tiny_clip(image_size=32, layers=2, width=128):
    oc = _open_clip()
    vision = oc.model.CLIPVisionCfg(layers=layers, width=width, patch_size=8, image_size=image_size)
    text = oc.model.CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1)
    torch.manual_seed(5)
    clip = oc.model.CLIP(64, vision, text, quick_gelu=True).eval()
    clip.visual.load_state_dict(_randomize(clip.visual.state_dict(), seed=6))
    return clip


def _clip_input(pixels):
    """The same [0, 1] RGB batch normalized CLIP's way and ours (ImageNet)."""

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    return norm(CLIP_MEAN, CLIP_STD), norm(IMAGENET_MEAN, IMAGENET_STD)


def test_imagenet_constants_are_the_input_normalization():
    from metric.datasets.transforms import MEAN, STD

    assert np.allclose(MEAN, IMAGENET_MEAN) and np.allclose(STD, IMAGENET_STD)


@pytest.mark.parametrize("ext", [".pt", ".bin", ".safetensors"])
def test_whole_clip_state_dict_gives_clips_image_features(tmp_path, caplog, ext):
    clip = _tiny_clip()
    state = clip.state_dict()
    path = str(tmp_path / f"open_clip_model{ext}")
    if ext == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    model = build_model(_cfg()).eval()
    with caplog.at_level(logging.INFO):
        missing, unexpected = load_weights(model, path)
    assert unexpected == [] and all(k.startswith("head.") for k in missing)
    assert "text tower" in caplog.text and "token_embedding, transformer" in caplog.text
    assert "normalization folded" in caplog.text
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x_clip, x_ours = _clip_input(pixels)
    with torch.no_grad():
        assert _rel(model.backbone(x_ours), clip.encode_image(x_clip)) < 1e-5


def test_clip_image_encoder_alone_at_another_size(tmp_path, caplog):
    """The visual tower's own state dict, loaded into a model made for 48 px: the positional
    embedding is resampled as OpenCLIP's resize_pos_embed does (without antialiasing)."""
    oc = _open_clip()
    clip = _tiny_clip()
    path = str(tmp_path / "visual.pth")
    torch.save(clip.visual.state_dict(), path)
    model = build_model(_cfg("TRAIN.IM_SIZE", 48, "TEST.IM_SIZE", 48)).eval()
    with caplog.at_level(logging.INFO):
        load_weights(model, path)
    assert "CLIP image encoder weights (2 blocks)" in caplog.text and "4x4 patch grid resampled" in caplog.text
    big = _tiny_clip(image_size=48)
    state = {"visual." + k: v for k, v in clip.visual.state_dict().items()}
    oc.model.resize_pos_embed(state, big, antialias=False)
    big.visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items()})
    x_clip, x_ours = _clip_input(torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert _rel(model.backbone(x_ours), big.encode_image(x_clip)) < 1e-5


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_clip_weights_of_another_vit_size_name_the_key_and_both_shapes(tmp_path):
    model = build_model(_cfg())
    wide = str(tmp_path / "wide.pt")
    torch.save(_tiny_clip(width=192).state_dict(), wide)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, wide)
    text = _one_line(err)
    assert "another ViT size (the file is WIDTH 192 LAYERS 2 PATCH_SIZE 8 EMB_DIM 64)" in text
    assert "shape mismatch for visual.class_embedding: file (192,) vs model (128,)" in text
    deep = str(tmp_path / "deep.pt")
    torch.save(_tiny_clip(layers=3).state_dict(), deep)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, deep)
    text = _one_line(err)
    assert "visual.transformer.resblocks.2." in text and "file has 3 blocks, MODEL.LAYERS is 2" in text


def test_our_vit_checkpoint_of_another_width_names_the_key(tmp_path):
    path = str(tmp_path / "w192.pth")
    torch.save(build_model(_cfg("MODEL.WIDTH", 192)).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(_cfg()), path)
    assert "shape mismatch for backbone." in _one_line(err) and "192" in str(err.value)


def test_clip_weights_into_a_resnet_are_refused(tmp_path):
    path = str(tmp_path / "clip.pt")
    torch.save(_tiny_clip().state_dict(), path)
    resnet = build_model(
        load_cfg(
            None,
            ["MODEL.DEPTH", "18", "RESNET.WIDTH_PER_GROUP", "4", "RESNET.STEM_WIDTH", "4", "MODEL.HEADS.IN_FEAT", "0"],
        )
    )
    with pytest.raises(CheckpointError, match="clip state dict loads into MODEL.TYPE vit, not MODEL.TYPE resnet"):
        load_weights(resnet, path)


def _torchscript_archive(path):
    traced = torch.jit.trace(VisionTransformer(32, 8, 64, 1, 32).eval(), torch.randn(1, 3, 32, 32))
    traced.save(path)


def test_torchscript_archive_is_refused_with_how_to_convert(tmp_path):
    path = str(tmp_path / "ViT-B-32.pt")
    _torchscript_archive(path)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(_cfg()), path)
    text = _one_line(err)
    assert "TorchScript archive" in text and "torch.jit.load" in text and "state_dict()" in text


def test_torchscript_archive_exits_2_with_one_line(tmp_path, capsys):
    path = str(tmp_path / "ViT-B-32.pt")
    _torchscript_archive(path)
    status, _, err = call_tool(
        "torch2onnx", TINY + ["TEST.WEIGHTS", path, "--output", str(tmp_path / "m.onnx")], capsys
    )
    assert status == 2 and err.count("\n") == 1 and "TorchScript archive" in err


def test_safetensors_without_the_package_is_one_line(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = str(tmp_path / "model.safetensors")
    save_file({"conv1.weight": torch.zeros(4, 3, 8, 8)}, path)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(_cfg()), path)
    assert "pip install safetensors" in _one_line(err)


# --- training helpers ----------------------------------------------------------------------------


def test_layer_ids_for_layer_wise_lr_decay():
    model = build_model(_cfg())
    vit = model.backbone
    ids = {name: vit.layer_id(name) for name, _ in model.named_parameters() if name.startswith("backbone.")}
    assert vit.num_layer_ids == 4 and set(ids.values()) == {0, 1, 2, 3}
    assert ids["backbone.conv1.weight"] == ids["backbone.positional_embedding"] == ids["backbone.ln_pre.bias"] == 0
    assert ids["backbone.transformer.resblocks.0.attn.in_proj_weight"] == 1
    assert ids["backbone.transformer.resblocks.1.mlp.c_proj.bias"] == 2
    assert ids["backbone.proj"] == ids["backbone.ln_post.weight"] == 3
    assert vit.layer_id("module.backbone.transformer.resblocks.1.ln_1.weight") == 2
    assert vit.no_weight_decay() <= {n for n, _ in vit.named_parameters()}
    with pytest.raises(KeyError):
        vit.layer_id("head.embedding_layer.weight")


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model(_cfg())
    ckpt = build_model(_cfg("MODEL.VIT.GRAD_CHECKPOINT", True))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    calls = []
    for model in (plain, ckpt):
        hook = model.backbone.transformer.resblocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        torch.manual_seed(1)
        logits, emb = model.train()(x, labels)
        (F.cross_entropy(logits, labels) + emb.pow(2).mean()).backward()
        hook.remove()
        calls.append("|")
    assert calls == [1, "|", 1, 1, "|"]  # the checkpointed block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_layer_norm_runs_in_float32_under_mixed_precision():
    torch.manual_seed(0)
    ln = LayerNorm(128)
    x = torch.randn(4, 17, 128).mul(3).add(5).to(torch.bfloat16)
    want = F.layer_norm(x.float(), (128,), ln.weight, ln.bias, ln.eps).to(torch.bfloat16)
    assert torch.equal(ln(x), want) and ln(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ln(x), want)
    half = LayerNorm(128).half()  # fp16 weights too (a model converted to half)
    assert half(x.half()).dtype == torch.float16
    model = build_model(_cfg()).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 2 and all(type(m) is LayerNorm for m in norms)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert F.cosine_similarity(low.float(), ref).min() > 0.99


def test_flops_count_every_matrix_product():
    from metric.modeling.complexity import model_complexity

    model = build_model(_cfg())
    w, t, layers = 128, 17, 2
    macs = 16 * w * 3 * 8 * 8  # patch convolution: 16 patches
    macs += layers * (t * w * 3 * w + 2 * t * t * w + t * w * w + 2 * t * w * 4 * w)  # qkv, attention, out, MLP
    macs += w * 64 + 64 * 16  # proj, embedding layer
    assert model_complexity(model, 32)["macs"] == macs


def test_model_info_tool_prints_vit(capsys):
    status, out, _ = call_tool("model_info", ["--cfg", TINY_CFG, "--json"], capsys)
    assert status == 0
    info = json.loads(out)
    assert info["type"] == "vit" and info["im_size"] == 32 and info["backbone_params"] == 432_128


def test_channels_last_is_logged_as_irrelevant(caplog):
    with caplog.at_level(logging.INFO):
        build_model(_cfg("TRAIN.CHANNELS_LAST", True))
    assert "TRAIN.CHANNELS_LAST has no effect on MODEL.TYPE vit" in caplog.text


# --- one-line errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["MODEL.WIDTH", "100"], "MODEL.WIDTH=100 is not allowed: expected a multiple of 64"),
        (["TRAIN.IM_SIZE", "36"], "TRAIN.IM_SIZE=36 is not allowed: expected a multiple of MODEL.PATCH_SIZE=8"),
        (["TEST.IM_SIZE", "44"], "TEST.IM_SIZE=44 is not allowed: expected a multiple of MODEL.PATCH_SIZE=8"),
        (["MODEL.HEADS.POOL_LAYER", "avgpool"], "expected identity for MODEL.TYPE vit"),
        (["MODEL.TYPE", "vit_b32"], "MODEL.TYPE='vit_b32' is not allowed"),
        (["MODEL.HEADS.IN_FEAT", "512"], "MODEL.HEADS.IN_FEAT=512 but the vit backbone outputs 64"),
    ],
)
def test_bad_vit_config_exits_2_with_one_line(capsys, extra, words):
    status, _, err = call_tool("model_info", TINY + extra, capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


# --- export ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic"])
def test_onnx_export_matches_torch(tmp_path, dynamic):
    from metric.export.onnx import diff_stats, export_onnx, run_onnxruntime, run_torch, verify_onnx

    torch.manual_seed(0)
    model = build_model(_cfg()).eval()
    path = str(tmp_path / "vit.onnx")
    export_onnx(model, path, (32, 32), dynamic_hw=dynamic)
    assert all(r["rel"] < 1e-5 for r in verify_onnx(model, path, (32, 32), dynamic_hw=dynamic))
    if dynamic:  # other grids, non-square, sides that are not multiples of the patch
        for shape in [(2, 3, 40, 40), (1, 3, 27, 37), (1, 3, 8, 64), (1, 3, 96, 48)]:
            x = torch.randn(*shape).numpy()
            assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-5, shape


def test_kaggle_model_is_refused_for_vit(tmp_path):
    from metric.export.kaggle import make_kaggle_model
    from metric.utils.errors import ExportError

    with pytest.raises(ExportError, match="cannot be made for MODEL.TYPE vit"):
        make_kaggle_model(_cfg("TEST.WEIGHTS", "w.pth"), str(tmp_path / "submission.zip"))


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_vit_trains_resumes_extracts_and_is_scored(tiny_data, tmp_path, monkeypatch):
    """configs/metric/vit_tiny_cpu.yaml on the tiny data: 2 epochs straight; the same run killed
    after its first checkpoint and resumed ends with the same weights; the final checkpoint
    extracted at two scales (non-square views, sides resized up to whole patches) and scored
    gives the figures logged while training."""

    def opts(out):
        return tiny_opts(tiny_data, out, **{"MODEL.TYPE": "vit", "TEST.IM_SIZE": 40, "INFER.SCALES": "[0.75, 1.0]"})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_py's subprocesses: a tiny model gains nothing from more, and a busy
    try:  # machine makes every op wait for the slowest thread
        _train_resume_extract_score(tiny_data, tmp_path, monkeypatch, opts)
    finally:
        torch.set_num_threads(threads)
        remove_pymetric_handlers()


def _train_resume_extract_score(tiny_data, tmp_path, monkeypatch, opts):
    import metric.checkpoint as cp
    from metric.checkpoint import list_checkpoints, read_checkpoint
    from metric.engine.trainer import train_model
    from metric.utils.cli import run_tool
    from metric.utils.logger import read_stats
    from tests.helpers import load_tool

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_model(load_cfg(TINY_CFG, opts(straight)))

    real = cp.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real(path, state)
        raise Killed(path)

    monkeypatch.setattr(cp, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_model(load_cfg(TINY_CFG, opts(resumed)))
    monkeypatch.setattr(cp, "save_checkpoint", real)
    assert len(list_checkpoints(resumed)) == 1
    train_model(load_cfg(TINY_CFG, opts(resumed)))
    a, b = (read_checkpoint(list_checkpoints(d)[-1]) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key

    during = read_stats(os.path.join(straight, "stats.jsonl"), "test_epoch")[-1]
    weights = list_checkpoints(straight)[-1]
    list_path = os.path.join(tiny_data, "test.txt")
    store, scores = str(tmp_path / "store"), str(tmp_path / "scores.json")
    argv = (
        ["--no-progress", "--cfg", TINY_CFG]
        + opts(straight)
        + ["TEST.WEIGHTS", weights, "INFER.INPUT", list_path, "INFER.OUTPUT", store]
    )
    assert run_tool(load_tool("extract_features").main, argv) == 0
    assert run_tool(load_tool("evaluate").main, ["--query", store, "--query-labels", list_path, "--json", scores]) == 0
    extracted = json.load(open(scores, encoding="utf-8"))
    for key in ("recall@1", "mAP@R"):
        assert 0.0 <= extracted[key] <= 1.0 and extracted[key] == pytest.approx(during[key], abs=1e-6), key
