"""ONNX export: the exported graph matches PyTorch (fixed and dynamic sizes, every pooling layer),
the tool's command line, and one-line errors for bad input."""

import os

import numpy as np
import onnx
import pytest
import torch

from metric.config import load_cfg
from metric.datasets import transforms
from metric.export import kaggle, parse_tool_args
from metric.export.onnx import (
    diff_stats,
    export_onnx,
    extraction_input,
    onnx_signature,
    run_onnxruntime,
    run_torch,
    sample_image,
    verify_onnx,
)
from metric.modeling import build_model
from metric.utils.errors import ExportError, OutputError
from tests.helpers import call_tool, run_py
from tests.helpers import tiny_model as tiny_model_opts

pytestmark = pytest.mark.export

# A narrow ResNet-18 (width 8) keeps these tests fast; tests/test_export_tf.py uses the full width.
TINY = tiny_model_opts(width=8, dim=16, num_classes=5) + [
    "MODEL.HEADS.CLS_LAYER",
    "arcface",
    "TRAIN.IM_SIZE",
    64,
    "TEST.IM_SIZE",
    64,
]


def tiny_model(pool="gempool", seed=0, **extra):
    opts = TINY + ["MODEL.HEADS.POOL_LAYER", pool] + [x for kv in extra.items() for x in kv]
    torch.manual_seed(seed)
    model = build_model(load_cfg(None, opts)).eval()
    with torch.no_grad():  # make GeM's p and BN statistics non-trivial, so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("pool_layer.p"):
                p.fill_(2.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model, opts


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model, opts = tiny_model()
    path = str(tmp_path_factory.mktemp("weights") / "model.pyth")
    torch.save({"epoch": 1, "model_state": model.state_dict()}, path)
    return path, opts + ["MODEL.HEADS.POOL_LAYER", "gempool"], model


def test_diff_stats_against_naive():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 5))
    out = ref + rng.normal(scale=1e-3, size=ref.shape)
    s = diff_stats(out, ref)
    assert s["max_abs"] == pytest.approx(np.max(np.abs(out - ref)))
    assert s["rel"] == pytest.approx(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(out, ref)]
    assert s["cos"] == pytest.approx(min(cos))
    with pytest.raises(ExportError):
        diff_stats(out[:2], ref)


def test_sample_image_is_a_deterministic_photo():
    a, b = sample_image(60, 90, seed=3), sample_image(60, 90, seed=3)
    assert a.shape == (60, 90, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.std() > 10  # not flat
    assert not np.array_equal(a, sample_image(60, 90, seed=4))


def test_extraction_input_keeps_aspect_and_normalizes():
    im = sample_image(100, 150)
    x = extraction_input(im, 60)
    assert tuple(x.shape) == (3, 40, 60)
    ref = transforms.to_tensor(transforms.resize_longer(im, 60))
    assert torch.equal(x, ref)
    # the Kaggle graph normalizes with its own copy of the constants
    assert np.allclose(kaggle.MEAN, transforms.MEAN) and np.allclose(kaggle.STD, transforms.STD)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.slow
def test_export_matches_torch(tmp_path, dynamic):
    model, _ = tiny_model()
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=dynamic)
    assert model.training is False
    onnx.checker.check_model(path)
    sig = onnx_signature(path)
    assert sig["input"] == "input" and sig["output"] == "embedding" and sig["dim"] == 16
    assert sig["shape"] == ([None, 3, None, None] if dynamic else [None, 3, 64, 64])
    results = verify_onnx(model, path, (64, 64), dynamic_hw=dynamic)
    assert {r["check"].split(", ")[1] for r in results} == {"random", "image"}
    assert all(r["rel"] < 1e-4 for r in results)
    # the batch axis is dynamic either way
    x = torch.randn(5, 3, 64, 64).numpy()
    assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4


@pytest.mark.parametrize("pool", ["avgpool", "maxpool", "gempool"])
@pytest.mark.slow
def test_dynamic_size_pooling(tmp_path, pool):
    """Global pooling must follow the input size, not the size used for tracing."""
    model, _ = tiny_model(pool)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=True)
    for h, w in [(32, 32), (64, 96), (117, 45)]:
        x = torch.randn(2, 3, h, w).numpy()
        assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4, (h, w)


@pytest.mark.slow
def test_export_keeps_train_mode_and_bn_neck(tmp_path):
    model, _ = tiny_model(**{"MODEL.HEADS.BN_NECK": True})
    model.train()
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, (64, 64))
    assert model.training  # restored
    verify_onnx(model, path, (64, 64))


@pytest.mark.slow
def test_verify_detects_a_different_model(tmp_path):
    model, _ = tiny_model(seed=0)
    other, _ = tiny_model(seed=1)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, (64, 64))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_onnx(other, path, (64, 64))


def test_bad_export_arguments(tmp_path):
    model, _ = tiny_model()
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, str(tmp_path / "m.onnx"), (64, 64), opset=99)
    with pytest.raises(ExportError, match="size"):
        export_onnx(model, str(tmp_path / "m.onnx"), (16, 64))
    with pytest.raises(OutputError, match="does not exist"):
        export_onnx(model, str(tmp_path / "no" / "m.onnx"), (64, 64))


def test_onnx_signature_errors(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        onnx_signature(str(tmp_path / "missing.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        onnx_signature(str(bad))
    two = tmp_path / "two.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [z])
    onnx.save(onnx.helper.make_model(graph), str(two))
    with pytest.raises(ExportError, match="one input and one output"):
        onnx_signature(str(two))


def test_flags_after_config_options():
    def flags(p):
        p.add_argument("--output")
        p.add_argument("--dynamic", action="store_true")
        p.add_argument("--size", type=int, nargs=2)

    args = parse_tool_args(
        "t",
        flags,
        [
            "--cfg",
            "c.yaml",
            "TEST.WEIGHTS",
            "w.pyth",
            "--output",
            "m.onnx",
            "--size",
            "32",
            "48",
            "MODEL.DEPTH",
            "18",
            "--dynamic",
        ],
    )
    assert args.cfg_file == "c.yaml" and args.output == "m.onnx" and args.dynamic and args.size == [32, 48]
    assert args.opts == ["TEST.WEIGHTS", "w.pyth", "MODEL.DEPTH", "18"]
    args = parse_tool_args("t", flags, ["--output", "m.onnx"])
    assert args.opts == [] and not args.dynamic
    with pytest.raises(SystemExit) as err:
        parse_tool_args("t", flags, ["TEST.WEIGHTS", "w"], required=("output",))
    assert err.value.code == 2


@pytest.mark.slow
def test_tool_writes_checked_onnx(tmp_path, weights, capsys):
    path, opts, model = weights
    out = str(tmp_path / "model.onnx")
    argv = ["TEST.WEIGHTS", path] + [str(o) for o in opts] + ["--output", out, "--dynamic"]
    status, printed, _ = call_tool("torch2onnx", argv, capsys)
    assert status == 0
    assert "onnxruntime vs torch, image" in printed and f"wrote {out}" in printed
    assert onnx_signature(out)["shape"] == [None, 3, None, None]
    x = extraction_input(sample_image(50, 70, seed=9), 64)[None].numpy()
    assert diff_stats(run_onnxruntime(out, x), run_torch(model, x))["rel"] < 1e-4
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]  # no temporary files left


@pytest.mark.parametrize(
    "change, message",
    [
        (["MODEL.HEADS.REDUCTION_DIM", "32"], "shape mismatch"),
        (["MODEL.DEPTH", "34"], "missing"),
        (["TEST.WEIGHTS", "/nonexistent/model.pyth"], "not found"),
        (["TEST.WEIGHTS", ""], "TEST.WEIGHTS is empty"),
    ],
)
def test_tool_rejects_weights_that_do_not_fit(tmp_path, weights, capsys, change, message):
    path, opts, _ = weights
    out = str(tmp_path / "model.onnx")
    argv = ["TEST.WEIGHTS", path] + [str(o) for o in opts] + change + ["--output", out]
    status, _, err = call_tool("torch2onnx", argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_tool_subprocess_exit_code(tmp_path, weights):
    """The real command line, as a user runs it: a mismatching config is one line and status 2."""
    path, opts, _ = weights
    argv = ["tools/torch2onnx.py", "TEST.WEIGHTS", path] + [str(o) for o in opts]
    argv += ["MODEL.HEADS.REDUCTION_DIM", "8", "--output", str(tmp_path / "m.onnx")]
    proc = run_py(argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "shape mismatch" in proc.stderr


@pytest.mark.slow
def test_resnest_exports_with_dynamic_size(tmp_path):
    """Split attention uses 4-D tensors only, so ResNeSt exports with dynamic height/width."""
    torch.manual_seed(0)
    cfg = load_cfg(
        None,
        [
            "MODEL.TYPE",
            "resnest50",
            "MODEL.HEADS.IN_FEAT",
            "0",
            "MODEL.HEADS.REDUCTION_DIM",
            "16",
            "MODEL.HEADS.NUM_CLASSES",
            "4",
            "MODEL.HEADS.POOL_LAYER",
            "gempool",
        ],
    )
    model = build_model(cfg).eval()
    path = str(tmp_path / "resnest.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=True)
    assert onnx_signature(path)["shape"] == [None, 3, None, None]
    for shape in ((2, 3, 64, 64), (1, 3, 96, 64)):
        x = torch.randn(*shape).numpy()
        assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("multi_atrous", [False, True])
def test_dolg_exports_with_dynamic_size(tmp_path, multi_atrous):
    """DOLG (stage-3 and stage-4 maps, multi-atrous, orthogonal fusion) with dynamic height/width."""
    model, _ = tiny_model(**{"MODEL.HEADS.NAME": "DOLGHead", "MODEL.DOLG.MULTI_ATROUS": multi_atrous})
    path = str(tmp_path / "dolg.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=True)
    assert onnx_signature(path)["shape"] == [None, 3, None, None] and onnx_signature(path)["dim"] == 16
    assert all(r["rel"] < 1e-4 for r in verify_onnx(model, path, (64, 64), dynamic_hw=True))
    for h, w in [(64, 64), (96, 160), (117, 45)]:
        x = torch.randn(2, 3, h, w).numpy()
        assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4, (h, w)


@pytest.mark.slow
def test_dolg_on_a_timm_backbone_exports(tmp_path):
    """DOLG's stage maps from a timm CNN (forward_intermediates) export with dynamic size too."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    cfg = load_cfg(
        None,
        [
            "MODEL.TYPE",
            "timm",
            "MODEL.TIMM.NAME",
            "resnet18",
            "MODEL.HEADS.IN_FEAT",
            "0",
            "MODEL.HEADS.REDUCTION_DIM",
            "16",
            "MODEL.HEADS.NUM_CLASSES",
            "4",
            "MODEL.HEADS.NAME",
            "DOLGHead",
            "MODEL.DOLG.MULTI_ATROUS",
            "True",
        ],
    )
    model = build_model(cfg).eval()
    path = str(tmp_path / "dolg_timm.onnx")
    export_onnx(model, path, (64, 64), dynamic_hw=True)
    for shape in ((2, 3, 64, 64), (1, 3, 96, 160)):
        x = torch.randn(*shape).numpy()
        assert diff_stats(run_onnxruntime(path, x), run_torch(model, x))["rel"] < 1e-4, shape
