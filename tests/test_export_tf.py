"""TensorFlow export: a ResNet-18 (random weights, 64 px) goes torch -> ONNX -> SavedModel and
TFLite, and into a Kaggle submission; every artifact is re-loaded in the TensorFlow environment by
an independent script here and compared with PyTorch. Also the tools' one-line errors.

The TensorFlow environment (.venv-tf, ~2.6 GB) is created by the `tf_env` fixture through
tools/setup_tf_env.sh if it is missing (about 1-3 minutes; a no-op when it is up to date).
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metric.config import load_cfg
from metric.export.kaggle import ZIP_COMMENT, check_output_zip
from metric.export.onnx import export_onnx, extraction_input, fixed_size_input, run_torch, sample_image
from metric.export.tensorflow import MARKER_FILE, check_output_dir, convert_onnx_to_tf, tf_python
from metric.modeling import build_model
from tests.helpers import tool_in_process

pytestmark = [pytest.mark.slow, pytest.mark.export]  # every test here runs the exporter end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = [
    "MODEL.DEPTH",
    "18",
    "MODEL.HEADS.IN_FEAT",
    "0",
    "MODEL.HEADS.POOL_LAYER",
    "gempool",
    "MODEL.HEADS.REDUCTION_DIM",
    "64",
    "MODEL.HEADS.NUM_CLASSES",
    "10",
    "MODEL.HEADS.CLS_LAYER",
    "arcface",
    "TRAIN.IM_SIZE",
    "64",
    "TEST.IM_SIZE",
    "64",
]


def rel(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def run(argv, **kw):
    return subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=REPO, **kw)


def one_line_error(proc, text):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error: ") and text in err, err


@pytest.fixture(scope="module")
def tf_env():
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "setup_tf_env.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"tools/setup_tf_env.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return tf_python()


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """ResNet-18 + GeM + 64-d embedding, random weights, saved as a checkpoint."""
    root = tmp_path_factory.mktemp("resnet18")
    torch.manual_seed(0)
    model = build_model(load_cfg(None, OPTS)).eval()
    with torch.no_grad():
        model.head.pool_layer.p.fill_(2.7)
    weights = str(root / "model.pyth")
    torch.save({"epoch": 1, "model_state": model.state_dict()}, weights)
    return model, weights, root


def tf_script(python, tmp_path, body, **args):
    """Run ``body`` in the TensorFlow environment with ``args`` (JSON); it fills ``out`` (a dict of
    arrays) which comes back."""
    script = tmp_path / "check_tf.py"
    script.write_text(
        "import json, sys, numpy as np\n"
        "import tensorflow as tf\n"
        "args = json.load(open(sys.argv[1]))\nout = {}\n"
        + textwrap.dedent(body)
        + "\nnp.savez(args['result'], **out)\n"
    )
    args["result"] = str(tmp_path / "tf_result.npz")
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    argv = [python, "-I", str(script), str(tmp_path / "args.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(args["result"]))


@pytest.mark.tf
def test_savedmodel_and_tflite(tf_env, resnet18, tmp_path):
    model, _, _ = resnet18
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(model, onnx_path, (64, 64))
    out = str(tmp_path / "tf")
    proc = run(["tools/onnx2tf.py", onnx_path, out, "--fp16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved_model vs onnxruntime" in proc.stdout and "tflite_float16 vs onnxruntime" in proc.stdout
    for name in ("saved_model.pb", "variables", "model_float32.tflite", "model_float16.tflite", MARKER_FILE):
        assert os.path.exists(os.path.join(out, name)), name
    report = json.load(open(os.path.join(out, MARKER_FILE)))
    inputs = report["signature"]["serving_default"]["inputs"]
    assert inputs == {"input": {"dtype": "float32", "shape": [None, 64, 64, 3]}}
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["saved_model vs onnxruntime"]["rel"] < 1e-4
    assert checks["tflite_float32 vs onnxruntime"]["rel"] < 1e-4
    assert checks["tflite_float16 vs onnxruntime"]["rel"] < 1e-2
    assert report["versions"]["onnx2tf"] == "1.29.24"

    # Independently of the converter's own checks: load the files and compare with PyTorch.
    x = torch.cat([fixed_size_input(sample_image(90, 70, seed=5), (64, 64))[None], torch.randn(2, 3, 64, 64)])
    np.save(tmp_path / "x.npy", x.numpy().transpose(0, 2, 3, 1))
    got = tf_script(
        tf_env,
        tmp_path,
        """
        x = np.load(args["x"])
        fn = tf.saved_model.load(args["dir"]).signatures["serving_default"]
        out["saved_model"] = fn(input=tf.constant(x))["embedding"].numpy()
        from ai_edge_litert.interpreter import Interpreter
        for kind in ("float32", "float16"):
            it = Interpreter(model_path=f"{args['dir']}/model_{kind}.tflite")
            inp = it.get_input_details()[0]
            it.resize_tensor_input(inp["index"], list(x.shape))
            it.allocate_tensors()
            it.set_tensor(inp["index"], x)
            it.invoke()
            out[kind] = it.get_tensor(it.get_output_details()[0]["index"])
    """,
        x=str(tmp_path / "x.npy"),
        dir=out,
    )
    ref = run_torch(model, x)
    assert rel(got["saved_model"], ref) < 1e-4
    assert rel(got["float32"], ref) < 1e-4
    assert rel(got["float16"], ref) < 1e-2
    check_output_dir(out)  # a folder this tool wrote may be written again


@pytest.mark.tf
def test_dynamic_size_nchw(tf_env, resnet18, tmp_path):
    model, _, _ = resnet18
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(model, onnx_path, (64, 64), dynamic_hw=True)
    out = str(tmp_path / "tf")
    report = convert_onnx_to_tf(onnx_path, out, keep_nchw=True, check_size=(64, 96))
    assert report["signature"]["serving_default"]["inputs"]["input"]["shape"] == [None, 3, None, None]
    assert {tuple(c["shape"]) for c in report["checks"]} == {(2, 3, 64, 96), (2, 3, 96, 32)}
    x = torch.randn(1, 3, 77, 51)
    np.save(tmp_path / "x.npy", x.numpy())
    got = tf_script(
        tf_env,
        tmp_path,
        """
        fn = tf.saved_model.load(args["dir"]).signatures["serving_default"]
        out["y"] = fn(input=tf.constant(np.load(args["x"])))["embedding"].numpy()
    """,
        x=str(tmp_path / "x.npy"),
        dir=out,
    )
    assert rel(got["y"], run_torch(model, x)) < 1e-4


@pytest.mark.tf
def test_grouped_convolutions(tf_env, tmp_path):
    """onnx2tf keeps grouped convolutions (ResNeXt, ResNeSt) as variables that Keras does not track
    and SavedModel cannot name; they are frozen into constants."""
    torch.manual_seed(0)
    opts = [
        "MODEL.DEPTH",
        "50",
        "RESNET.NUM_GROUPS",
        "2",
        "RESNET.WIDTH_PER_GROUP",
        "4",
        "RESNET.STEM_WIDTH",
        "8",
        "MODEL.HEADS.IN_FEAT",
        "0",
        "MODEL.HEADS.REDUCTION_DIM",
        "16",
    ]
    model = build_model(load_cfg(None, opts)).eval()
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(model, onnx_path, (64, 64))
    report = convert_onnx_to_tf(onnx_path, str(tmp_path / "tf"))
    assert report["frozen_variables"] > 0
    assert all(c["rel"] < 1e-4 for c in report["checks"])


@pytest.mark.tf
def test_failed_check_writes_nothing(tf_env, tmp_path):
    """A conversion whose check fails (tolerance 0 here) leaves an earlier export of ours intact
    and keeps only the log, named in the one-line error."""
    from metric.utils.errors import ExportError

    torch.manual_seed(0)
    narrow = ["RESNET.WIDTH_PER_GROUP", "8", "RESNET.STEM_WIDTH", "8"]
    model = build_model(load_cfg(None, OPTS + narrow)).eval()
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(model, onnx_path, (64, 64))
    out = tmp_path / "tf"
    out.mkdir()
    (out / MARKER_FILE).write_text(json.dumps({"format": "pymetric-tf-export"}))
    with pytest.raises(ExportError, match=r"saved_model vs onnxruntime: relative difference .* above 0 \(log: ") as err:
        convert_onnx_to_tf(onnx_path, str(out), tol=0.0)
    assert "\n" not in str(err.value)
    assert os.listdir(out) == [MARKER_FILE]
    assert os.path.getsize(str(out) + ".failed.log") > 0
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "tf", "tf.failed.log"]


@pytest.mark.tf
def test_kaggle_submission(tf_env, resnet18, tmp_path):
    model, weights, _ = resnet18
    out = str(tmp_path / "submission.zip")
    proc = run(["tools/make_kaggle_model.py", "TEST.WEIGHTS", weights] + OPTS + ["--output", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kaggle model vs torch extraction" in proc.stdout
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        assert z.comment == ZIP_COMMENT
        z.extractall(tmp_path / "unzipped")
    assert "saved_model.pb" in names and "variables/variables.index" in names  # SavedModel at the root
    assert not any(n.startswith("/") or n.startswith("..") for n in names)
    check_output_zip(out)  # ours: may be overwritten

    # The host's view: load the unzipped SavedModel, one uint8 image at a time, any size.
    images = [
        sample_image(151, 203, seed=11),
        sample_image(40, 29, seed=12),
        sample_image(64, 48, seed=13),
        sample_image(200, 33, seed=14),
    ]
    for i, im in enumerate(images):
        np.save(tmp_path / f"im{i}.npy", im)
    got = tf_script(
        tf_env,
        tmp_path,
        """
        loaded = tf.saved_model.load(args["dir"])
        fn = loaded.signatures["serving_default"]
        spec = fn.structured_input_signature[1]["input_image"]
        assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, 3], spec
        for i, path in enumerate(args["images"]):
            out[f"d{i}"] = fn(input_image=tf.constant(np.load(path)))["global_descriptor"].numpy()
    """,
        dir=str(tmp_path / "unzipped"),
        images=[str(tmp_path / f"im{i}.npy") for i in range(len(images))],
    )
    for i, im in enumerate(images):
        d = got[f"d{i}"]
        assert d.shape == (64,) and d.dtype == np.float32
        assert abs(np.linalg.norm(d) - 1) < 1e-5
        with torch.no_grad():
            ref = F.normalize(model(extraction_input(im, 64)[None]), dim=1)[0].numpy()
        assert float(d @ ref) >= 0.9999, (im.shape, float(d @ ref))


@pytest.mark.tf
def test_kaggle_preprocessing_matches_opencv(tf_env, tmp_path):
    """The in-graph resize against metric.datasets.transforms.resize_longer, pixel by pixel (the
    descriptor check alone is too forgiving: with random weights, bilinear instead of area
    shrinking still gives cosine 0.99993)."""
    from metric.datasets.transforms import resize_longer

    shapes = [(151, 203), (128, 96), (200, 33), (3, 500), (40, 29), (1, 1), (64, 48)]
    images = [
        sample_image(h, w, seed=20 + i) if min(h, w) >= 8 else np.full((h, w, 3), 90 + i, np.uint8)
        for i, (h, w) in enumerate(shapes)
    ]
    for i, im in enumerate(images):
        np.save(tmp_path / f"im{i}.npy", im)
    got = tf_script(
        tf_env,
        tmp_path,
        """
        import importlib.util
        spec = importlib.util.spec_from_file_location("kaggle_worker", args["kaggle"])
        k = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(k)
        for i, path in enumerate(args["images"]):
            out[f"r{i}"] = k.resize_longer_tf(tf, tf.constant(np.load(path)), 64).numpy()
    """,
        kaggle=os.path.join(REPO, "metric", "export", "kaggle.py"),
        images=[str(tmp_path / f"im{i}.npy") for i in range(len(images))],
    )
    for i, im in enumerate(images):
        ref = resize_longer(im, 64).astype(np.float32)
        out = got[f"r{i}"]
        assert out.shape == ref.shape, (im.shape, out.shape, ref.shape)
        diff = np.abs(out - ref)
        assert diff.max() <= 1, (im.shape, diff.max())
        shrink = max(im.shape[:2]) > 64
        # area shrinking matches OpenCV but for rare rounding ties; OpenCV's bilinear works in
        # fixed point, so about 1 pixel value in 8 differs by one level
        assert (diff > 0).mean() < (0.01 if shrink else 0.2), (im.shape, (diff > 0).mean())


@pytest.mark.tf
def test_kaggle_tool_errors(tf_env, resnet18, tmp_path):
    _, weights, _ = resnet18
    foreign = tmp_path / "submission.zip"
    foreign.write_text("not ours")
    proc = run(["tools/make_kaggle_model.py", "TEST.WEIGHTS", weights] + OPTS + ["--output", str(foreign)])
    one_line_error(proc, "not a submission written by")
    assert foreign.read_text() == "not ours"
    proc = tool_in_process(
        "make_kaggle_model",
        ["TEST.WEIGHTS", weights] + OPTS + ["MODEL.HEADS.REDUCTION_DIM", "32", "--output", str(tmp_path / "s.zip")],
    )
    one_line_error(proc, "shape mismatch")
    assert not os.path.exists(tmp_path / "s.zip")


# --- errors that are found before TensorFlow is started (no .venv-tf needed) --------------------


def test_onnx2tf_tool_errors(tmp_path):
    proc = run(["tools/onnx2tf.py", str(tmp_path / "missing.onnx"), str(tmp_path / "out")])
    one_line_error(proc, "ONNX file not found")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(os.urandom(300))
    proc = tool_in_process("onnx2tf", [corrupt, tmp_path / "out"])  # the command line's status: above
    one_line_error(proc, "not a valid ONNX model")
    assert not os.path.exists(tmp_path / "out")


def test_onnx2tf_refuses_foreign_folder_and_missing_env(resnet18, tmp_path, monkeypatch):
    model, _, _ = resnet18
    onnx_path = str(tmp_path / "model.onnx")
    export_onnx(model, onnx_path, (64, 64))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    proc = tool_in_process("onnx2tf", [onnx_path, foreign])
    one_line_error(proc, "was not written by tools/onnx2tf.py")
    assert os.listdir(foreign) == ["holiday.jpg"]
    monkeypatch.setenv("PYMETRIC_TF_VENV", str(tmp_path / "no-venv"))
    monkeypatch.chdir(REPO)  # the message names the setup script relative to the current folder
    proc = tool_in_process("onnx2tf", [onnx_path, tmp_path / "out"])
    one_line_error(proc, f"create it with: bash tools/setup_tf_env.sh {tmp_path / 'no-venv'}")


@pytest.mark.tf
def test_dolg_kaggle_submission(tf_env, tmp_path):
    """DOLG (stage-3 and stage-4 maps, multi-atrous module, orthogonal fusion) converts to
    TensorFlow with dynamic sizes: the Kaggle model matches PyTorch extraction on any image size."""
    opts = OPTS + [
        "RESNET.WIDTH_PER_GROUP",
        "16",
        "RESNET.STEM_WIDTH",
        "16",
        "MODEL.HEADS.NAME",
        "DOLGHead",
        "MODEL.DOLG.MULTI_ATROUS",
        "True",
    ]
    torch.manual_seed(0)
    model = build_model(load_cfg(None, opts)).eval()
    with torch.no_grad():
        model.head.pool_layer.p.fill_(2.7)
        model.head.local_branch.bn.running_mean.uniform_(-0.1, 0.1)
        model.head.local_branch.bn.running_var.uniform_(0.5, 1.5)
    weights = str(tmp_path / "dolg.pyth")
    torch.save({"epoch": 1, "model_state": model.state_dict()}, weights)
    out = str(tmp_path / "submission.zip")
    proc = run(["tools/make_kaggle_model.py", "TEST.WEIGHTS", weights] + opts + ["--output", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kaggle model vs torch extraction" in proc.stdout
    with zipfile.ZipFile(out) as z:
        z.extractall(tmp_path / "unzipped")
    images = [sample_image(151, 203, seed=21), sample_image(64, 48, seed=22)]
    for i, im in enumerate(images):
        np.save(tmp_path / f"im{i}.npy", im)
    got = tf_script(
        tf_env,
        tmp_path,
        """
        fn = tf.saved_model.load(args["dir"]).signatures["serving_default"]
        for i, path in enumerate(args["images"]):
            out[f"d{i}"] = fn(input_image=tf.constant(np.load(path)))["global_descriptor"].numpy()
    """,
        dir=str(tmp_path / "unzipped"),
        images=[str(tmp_path / f"im{i}.npy") for i in range(len(images))],
    )
    for i, im in enumerate(images):
        with torch.no_grad():
            ref = F.normalize(model(extraction_input(im, 64)[None]), dim=1)[0].numpy()
        assert float(got[f"d{i}"] @ ref) >= 0.9999, (im.shape, float(got[f"d{i}"] @ ref))
