"""Export the embedding model to ONNX and check the file against PyTorch with onnxruntime.

The exported graph is the model in eval mode: backbone -> pooling -> embedding (no classifier,
no L2 normalization). Input ``input``: float32 NCHW, RGB, scaled to [0, 1] and normalized with
the ImageNet mean/std (:func:`metric.datasets.transforms.to_tensor`); the batch axis is dynamic,
and with ``dynamic_hw=True`` so are height and width. Output ``embedding``: float32 [N, D].

Differences are reported as ``max_abs = max |out - ref|`` and ``rel = max_abs / max |ref|``.
"""

import contextlib
import inspect
import logging
import os
import warnings

import cv2
import numpy as np
import torch

from metric.datasets.transforms import decode_image, resize_shorter, to_tensor
from metric.engine.memory_estimates import check_export_memory
from metric.utils import io
from metric.utils.errors import ExportError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 17
OPSET_RANGE = (11, 20)  # what the TorchScript-based exporter writes reliably
REL_TOL = 1e-4  # fp32 agreement required between PyTorch, onnxruntime and TensorFlow


# ---------------------------------------------------------------------------------------------
# Test inputs: a landmark-like photo and our preprocessing
# ---------------------------------------------------------------------------------------------


def sample_image(height=240, width=320, seed=0):
    """A deterministic landmark-like photo, RGB uint8 [height, width, 3], JPEG-encoded and
    decoded again with :func:`decode_image` (the same path as a file on disk)."""
    from metric.datasets.demo import render_scene, render_view

    side = max(height, width)
    rng = np.random.default_rng([seed, 7])
    scene = render_scene(rng, 2 * side)
    bgr = render_view(rng, scene, side)[:height, :width]
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok, "cv2.imencode failed"
    return decode_image(buf)


def read_image(path):
    """RGB uint8 [H, W, 3] of an image file, or :class:`ExportError`."""
    if not os.path.isfile(path):
        raise ExportError(f"image not found: {path}")
    im = decode_image(path)
    if im is None:
        raise ExportError(f"cannot decode image {path} (not a JPEG/PNG/... file?)")
    return im


def extraction_input(im, max_side):
    """Our test-time extraction preprocessing for a whole image at one scale
    (:class:`metric.engine.predictor.Preprocess`): keep the aspect ratio, the longer side becomes
    ``max_side``, normalize. Float32 [3, h, w]. The Kaggle model (:mod:`metric.export.kaggle`)
    reproduces exactly this inside its graph."""
    from metric.engine.predictor import Preprocess

    return Preprocess(max_side)(im)[0]


def fixed_size_input(im, size):
    """``im`` for a fixed ``(H, W)`` input: shorter side to ``max(H, W)``, center crop ``H x W``,
    normalize (for a square size this is the predictor's ``Preprocess(S, crop=True)``)."""
    h, w = size
    im = resize_shorter(im, max(h, w))
    y, x = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2
    return to_tensor(im[y : y + h, x : x + w])


def diff_stats(out, ref):
    """``{'max_abs', 'rel', 'cos'}`` of ``out`` against ``ref`` (cos: smallest row cosine)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ExportError(f"exported model returns shape {out.shape}, expected {ref.shape}")
    max_abs = float(np.abs(out - ref).max()) if out.size else 0.0
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    o, r = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    cos = (o * r).sum(1) / np.maximum(np.linalg.norm(o, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    return {"max_abs": max_abs, "rel": rel, "cos": float(cos.min())}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def load_export_model(cfg):
    """The predictor's model of ``cfg`` with the weights ``cfg.TEST.WEIGHTS``, in eval mode on the
    CPU (:func:`metric.engine.predictor.build_inference_model`). Export insists on weights that fit
    the embedding model exactly (only the classifier, which is not exported, may differ)."""
    from metric.engine.predictor import build_inference_model

    if not cfg.TEST.WEIGHTS:
        raise ExportError("TEST.WEIGHTS is empty: give the trained weights to export, e.g. TEST.WEIGHTS model.pyth")
    return build_inference_model(cfg, missing_weights="error")


class EmbeddingModel(torch.nn.Module):
    """``model`` in eval mode as a pure function image batch -> embedding [N, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # a model still in train mode returns (logits, emb)
            raise ExportError("the model returned a tuple; export needs it in eval mode")
        return out


def _check_size(size):
    if len(size) != 2 or any(int(s) != s or s < 32 for s in size):
        raise ExportError(f"export size must be two integers H W >= 32, got {tuple(size)}")
    return int(size[0]), int(size[1])


def export_inputs(size, dynamic_hw=False):
    """``(batch, height, width)`` of the inputs that :func:`export_onnx` and :func:`verify_onnx`
    run through the model for an export of ``size`` (for :func:`check_export_memory`)."""
    h, w = size
    inputs = [(2, h, w)]
    if dynamic_hw:
        inputs += [(1, h + 32, max(32, w - 32)), (1, max(h, w), max(h, w))]  # the image: longer side max(h, w)
    return inputs


def export_onnx(model, path, size=(224, 224), opset=DEFAULT_OPSET, dynamic_hw=False, atomic=True):
    """Write ``model`` (eval mode, embedding only) to the ONNX file ``path`` and check it with
    ``onnx.checker``. The file is written under a temporary name and renamed into place
    (:func:`metric.utils.io.atomic_local_path`); with ``atomic=False`` ``path`` is written
    directly (it is then the caller's temporary)."""
    import onnx

    h, w = _check_size(size)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(f"--opset {opset} is not supported; use {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    was_training = model.training
    wrapped = EmbeddingModel(model).eval()
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, mature dynamic axes
    if atomic:
        path = io.check_output_path(path, "ONNX file")
    target = io.atomic_local_path(path, "ONNX file") if atomic else contextlib.nullcontext(path)
    try:
        with target as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(
                wrapped,
                (torch.zeros(2, 3, h, w),),
                tmp,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                **kwargs,
            )
            onnx.checker.check_model(tmp, full_check=True)
    finally:
        model.train(was_training)
    logger.info("wrote %s (opset %d, input %s)", path, opset, "N x 3 x H x W" if dynamic_hw else f"N x 3 x {h} x {w}")
    return path


# ---------------------------------------------------------------------------------------------
# Reading and running an ONNX file
# ---------------------------------------------------------------------------------------------


def onnx_signature(path):
    """Check an ONNX file of ours and describe it: ``{'input', 'output', 'shape', 'dim'}`` where
    ``shape`` is the input's [N, C, H, W] with ``None`` for dynamic axes and ``dim`` the
    embedding size. Raises :class:`ExportError` for a missing, unreadable or foreign file."""
    import onnx

    if not os.path.isfile(path):
        raise ExportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as err:  # onnx raises DecodeError, ValidationError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{path} is not a valid ONNX model: {first[:200]}") from None
    graph = proto.graph
    init = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(f"{path}: expected one input and one output, found {len(inputs)} and {len(graph.output)}")
    shape, out = dims(inputs[0]), dims(graph.output[0])
    if len(shape) != 4 or shape[1] != 3 or len(out) != 2 or out[1] is None:
        raise ExportError(f"{path}: expected input [N, 3, H, W] and output [N, D], found {shape} and {out}")
    return {"input": inputs[0].name, "output": graph.output[0].name, "shape": shape, "dim": out[1]}


def run_onnxruntime(path, x, threads=None):
    """Outputs of the ONNX model at ``path`` for the float32 batch ``x`` (CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


@torch.no_grad()
def run_torch(model, x):
    was_training = model.training
    try:
        return model.eval()(torch.as_tensor(x)).float().numpy()
    finally:
        model.train(was_training)


def verify_onnx(model, path, size, dynamic_hw=False, image=None, tol=REL_TOL):
    """Compare onnxruntime with PyTorch on random input and on a real image through our
    preprocessing. Returns a list of ``{'check', 'shape', 'max_abs', 'rel', 'cos'}``; raises
    :class:`ExportError` if any ``rel`` exceeds ``tol``."""
    h, w = _check_size(size)
    im = sample_image() if image is None else image
    gen = torch.Generator().manual_seed(0)
    batches = [("random", torch.randn(2, 3, h, w, generator=gen))]
    if dynamic_hw:
        batches.append(("random", torch.randn(1, 3, h + 32, max(32, w - 32), generator=gen)))
        batches.append(("image", extraction_input(im, max(h, w))[None]))
    else:
        batches.append(("image", fixed_size_input(im, (h, w))[None]))
    results = []
    for name, x in batches:
        stats = diff_stats(run_onnxruntime(path, x.numpy()), run_torch(model, x))
        results.append({"check": f"onnxruntime vs torch, {name}", "shape": list(x.shape), **stats})
    worst = max(results, key=lambda r: r["rel"])
    if worst["rel"] > tol:
        raise ExportError(
            f"{path}: onnxruntime differs from PyTorch by {worst['rel']:.2e} relative "
            f"(max abs {worst['max_abs']:.2e}) on {worst['check'].split(', ')[1]} input {worst['shape']}, above {tol:g}"
        )
    return results


def format_results(results):
    """One line per check, for the tools to print."""
    return [
        f"{r['check']:<40} {'x'.join(map(str, r['shape'])):<14} max abs {r['max_abs']:.3e}  "
        f"rel {r['rel']:.3e}  cos {r['cos']:.7f}"
        for r in results
    ]


def export_checked_onnx(cfg, output, size=None, opset=DEFAULT_OPSET, dynamic_hw=False, image=None):
    """The whole ``tools/torch2onnx.py``: load the model of ``cfg`` with ``TEST.WEIGHTS``, export
    it, check it (:func:`verify_onnx`) and only then move it to ``output``. ``size`` defaults to
    the evaluation crop ``TRAIN.IM_SIZE`` squared. Returns ``(signature, check results)``."""
    given = size is not None
    size = _check_size(size or (cfg.TRAIN.IM_SIZE, cfg.TRAIN.IM_SIZE))
    output = io.check_output_path(output, "ONNX file")
    check_export_memory(
        cfg,
        export_inputs(size, dynamic_hw),
        f"export size {size[0]} x {size[1]}" + ("" if given else " (TRAIN.IM_SIZE)"),
        "give a smaller size (--size H W)",
    )
    model = load_export_model(cfg)
    with io.atomic_local_path(output, "ONNX file") as tmp:
        export_onnx(model, tmp, size, opset, dynamic_hw, atomic=False)
        results = verify_onnx(model, tmp, size, dynamic_hw, image)
        signature = onnx_signature(tmp)
    return signature, results
