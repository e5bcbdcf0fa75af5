"""The Google Landmark Retrieval 2020 submission: a zipped TensorFlow SavedModel that maps one
image to its global descriptor, with our preprocessing inside the graph.

Serving signature (what the competition's host called on every index and query image)::

    serving_default(input_image: uint8 [H, W, 3], RGB, any size) -> {'global_descriptor': float32 [D]}

Inside the graph, exactly our extraction preprocessing (:func:`metric.export.onnx.extraction_input`):
resize keeping the aspect ratio so that the longer side is ``TEST.IM_SIZE`` (area interpolation
when shrinking, bilinear when enlarging, rounded to uint8 levels as OpenCV does), scale to [0, 1],
normalize with the ImageNet mean/std; then the converted model and L2 normalization (the host
ranks index images by Euclidean distance, which is then the cosine ranking we evaluate with).

Steps (:func:`make_kaggle_model`): PyTorch -> ONNX with dynamic height/width (checked against
PyTorch) -> SavedModel with onnx2tf (checked against onnxruntime) -> wrapper SavedModel built by the
worker below in ``.venv-tf`` -> its descriptors for real images compared with our PyTorch
extraction (cosine >= 0.9999) -> zip with the SavedModel at the root.
"""

import os
import shutil
import sys
import time
import zipfile

import numpy as np

ZIP_COMMENT = b"pymetric kaggle glr2020 submission v1"
MIN_COSINE = 0.9999
MEAN = (0.485, 0.456, 0.406)  # the same as metric.datasets.transforms.MEAN/STD (checked by a test)
STD = (0.229, 0.224, 0.225)


def _export_error(message):
    from metric.utils.errors import ExportError  # not importable in the worker's environment

    return ExportError(message)


# =============================================================================================
# Driver (main environment)
# =============================================================================================


def check_output_zip(path):
    """The output may be absent or a submission zip we wrote before."""
    if not os.path.exists(path):
        return
    ours = False
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            ours = z.comment == ZIP_COMMENT
    if not ours:
        raise _export_error(
            f"output {path} exists and is not a submission written by tools/make_kaggle_model.py; "
            "remove it or choose another name"
        )


def check_images(max_side, image=None):
    """Real images the submission is checked on: one larger than ``max_side`` (shrunk) and one
    smaller (enlarged), both non-square, plus ``image`` if given."""
    from metric.export.onnx import sample_image

    big = sample_image(max_side * 3 // 2 + 7, max_side * 2 + 3, seed=1)
    small = sample_image(max(8, max_side // 2 + 5), max(8, max_side * 4 // 5), seed=2)
    return [big, small] + ([image] if image is not None else [])


def torch_descriptors(model, images, max_side):
    """Our PyTorch extraction (:meth:`metric.engine.predictor.Predictor.describe`, one scale, no
    flip): the reference the submission model must reproduce."""
    from metric.engine.predictor import Predictor, Preprocess

    return list(Predictor(model, "cpu", Preprocess(max_side)).describe(images))


def write_submission_zip(saved_model_dir, path):
    """Zip ``saved_model_dir`` with its content at the zip's root; atomic
    (:func:`metric.utils.io.atomic_local_path`; a write fault is one OutputError line)."""
    from metric.utils import io  # driver only: the worker cannot import metric

    with io.atomic_local_path(path, "submission zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            z.comment = ZIP_COMMENT
            for folder, dirs, files in os.walk(saved_model_dir):
                dirs.sort()
                rel = os.path.relpath(folder, saved_model_dir)
                if rel != ".":
                    z.write(folder, rel + "/")
                for name in sorted(files):
                    z.write(os.path.join(folder, name), os.path.normpath(os.path.join(rel, name)))
        with zipfile.ZipFile(tmp) as z:
            names = set(z.namelist())
        missing = {"saved_model.pb", "variables/variables.index"} - names
        if missing:
            raise RuntimeError(f"submission zip lacks {sorted(missing)} at its root")  # a bug, not a user error


def make_kaggle_model(cfg, output, image=None, opset=None, threads=None, min_cos=MIN_COSINE):
    """Build the submission zip ``output`` for the model of ``cfg`` (weights ``TEST.WEIGHTS``,
    longer image side ``TEST.IM_SIZE``). Returns a report with every check's numbers; raises
    :class:`ExportError` if a check fails or the inputs are unusable."""
    from metric.engine.memory_estimates import check_export_memory
    from metric.export.onnx import DEFAULT_OPSET, diff_stats, export_inputs, export_onnx, load_export_model, verify_onnx
    from metric.export.tensorflow import convert_onnx_to_tf, keep_log, run_worker, tf_python
    from metric.utils import io
    from metric.utils.errors import ExportError, MetricError

    output = io.check_output_path(output, "submission zip")  # folder exists and is writable
    check_output_zip(output)
    if cfg.MODEL.TYPE == "vit":  # see docs/EXPORT.md: onnx2tf cannot convert the ViT graph
        raise ExportError(
            "the Kaggle (TensorFlow) model cannot be made for MODEL.TYPE vit: onnx2tf 1.29 does not "
            "convert its graph; export ONNX instead (tools/torch2onnx.py, checked with onnxruntime)"
        )
    max_side = cfg.TEST.IM_SIZE
    check_export_memory(
        cfg,
        export_inputs((max_side, max_side), dynamic_hw=True),
        f"TEST.IM_SIZE={max_side}",
        "lower TEST.IM_SIZE (the longer image side of the submission model)",
    )
    tf_python()
    if list(cfg.INFER.SCALES) != [1.0] or cfg.INFER.FLIP or cfg.INFER.CENTER_CROP:
        raise ExportError(
            "the Kaggle model computes one scale of the whole image in its graph: set INFER.SCALES [1.0], "
            "INFER.FLIP False and INFER.CENTER_CROP False (multi-scale descriptors are not exported)"
        )
    model = load_export_model(cfg)
    tmp = f"{output}.tmp-{os.getpid()}.d"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    report = {"max_side": max_side, "dim": model.embedding_dim, "checks": []}
    start = time.time()
    try:
        onnx_path = os.path.join(tmp, "model.onnx")
        export_onnx(model, onnx_path, (max_side, max_side), opset or DEFAULT_OPSET, dynamic_hw=True)
        report["checks"] += verify_onnx(model, onnx_path, (max_side, max_side), dynamic_hw=True, image=image)
        converted = os.path.join(tmp, "converted")
        failed_log = f"{output}.failed.log"
        tf_report = convert_onnx_to_tf(
            onnx_path,
            converted,
            check_size=(max(32, max_side * 3 // 4), max_side),
            image=image,
            threads=threads,
            failed_log=failed_log,
        )
        report["checks"] += tf_report["checks"]

        images = check_images(max_side, image)
        paths = []
        for i, im in enumerate(images):
            paths.append(os.path.join(tmp, f"image_{i}.npy"))
            np.save(paths[-1], im)
        request = {
            "converted": converted,
            "out": os.path.join(tmp, "submission"),
            "images": paths,
            "input": tf_report["signature"]["serving_default"]["inputs"],
            "output": next(iter(tf_report["signature"]["serving_default"]["outputs"])),
            "max_side": max_side,
            "mean": MEAN,
            "std": STD,
        }
        log = os.path.join(tmp, "wrap.log")
        try:
            result = run_worker(os.path.abspath(__file__), "wrap", request, tmp, log, threads)
        except MetricError as err:
            raise _export_error(f"{err} (log: {keep_log(log, failed_log)})") from None
        report["signature"] = result["signature"]
        _check_signature(result["signature"]["serving_default"], model.embedding_dim)
        refs = torch_descriptors(model, images, max_side)
        for im, ref, path in zip(images, refs, result["descriptors"]):
            stats = diff_stats(np.load(path)[None], ref[None])
            report["checks"].append({"check": "kaggle model vs torch extraction", "shape": list(im.shape), **stats})
        worst = min(report["checks"][-len(images) :], key=lambda c: c["cos"])
        if worst["cos"] < min_cos:
            raise _export_error(
                f"the Kaggle model's descriptor of a {worst['shape'][0]}x{worst['shape'][1]} image has cosine "
                f"{worst['cos']:.6f} with our PyTorch extraction, below {min_cos}"
            )
        write_submission_zip(request["out"], output)
        report.update(
            output=output,
            zip_bytes=os.path.getsize(output),
            versions=tf_report["versions"],
            timings_s={"total": round(time.time() - start, 1), "wrap": result["timings"]},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _check_signature(sig, dim):
    inputs, outputs = sig["inputs"], sig["outputs"]
    want_in = {"input_image": {"dtype": "uint8", "shape": [None, None, 3]}}
    want_out = {"global_descriptor": {"dtype": "float32", "shape": [dim]}}
    if inputs != want_in or outputs != want_out:
        raise RuntimeError(f"unexpected serving signature {sig}")  # a bug in the wrapper


# =============================================================================================
# Worker (inside .venv-tf; standard library, numpy and TensorFlow only)
# =============================================================================================


def resize_longer_tf(tf, image, max_side):
    """TensorFlow twin of :func:`metric.datasets.transforms.resize_longer` for uint8 [H, W, 3]:
    same output size (float64 arithmetic, round half to even as Python's ``round``), area
    interpolation when shrinking and bilinear (half-pixel centers) when enlarging like OpenCV's
    INTER_AREA / INTER_LINEAR, rounded half up to uint8 levels as OpenCV does. Shrinking matches
    OpenCV to the pixel but for rare ties; OpenCV's bilinear works in fixed point, so when
    enlarging about one value in eight differs by one level. Returns float32 [h, w, 3] in [0, 255]."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    longer = tf.maximum(h, w)
    scale = tf.constant(float(max_side), tf.float64) / longer
    size = tf.stack(
        [
            tf.maximum(1, tf.cast(tf.round(h * scale), tf.int32)),
            tf.maximum(1, tf.cast(tf.round(w * scale), tf.int32)),
        ]
    )

    def to_levels(x):  # OpenCV rounds its uint8 results half up (exact averages in the 2x, 4x... cases)
        return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)

    def shrink():
        return to_levels(tf.image.resize(image, size, method="area"))

    def enlarge():
        return to_levels(tf.image.resize(image, size, method="bilinear"))

    def keep():
        return tf.cast(image, tf.float32)

    return tf.cond(longer > max_side, shrink, lambda: tf.cond(longer < max_side, enlarge, keep))


def _kaggle_module(tf, inner, req):
    mean = tf.constant(req["mean"], tf.float32)
    std = tf.constant(req["std"], tf.float32)
    out_key = req["output"]
    max_side = req["max_side"]

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="input_image")])
    def extract(input_image):
        x = resize_longer_tf(tf, input_image, max_side)
        x = (x / 255.0 - mean) / std
        emb = inner.serve(x[tf.newaxis])[out_key][0]
        return {"global_descriptor": tf.identity(tf.math.l2_normalize(emb), name="global_descriptor")}

    module = tf.Module()
    module.inner = inner
    module.extract = extract
    return module


def _worker_wrap(req):
    t = time.time()
    import tensorflow as tf

    if req.get("threads"):
        tf.config.threading.set_intra_op_parallelism_threads(req["threads"])
        tf.config.threading.set_inter_op_parallelism_threads(1)
    (shape,) = [v["shape"] for v in req["input"].values()]
    if shape[-1] != 3:
        raise ValueError(f"the converted model must take NHWC input, its signature is {req['input']}")
    inner = tf.saved_model.load(req["converted"])
    module = _kaggle_module(tf, inner, req)
    tf.saved_model.save(module, req["out"], signatures={"serving_default": module.extract})
    save_s = time.time() - t

    fn = tf.saved_model.load(req["out"]).signatures["serving_default"]  # what the host loads
    descriptors = []
    for i, path in enumerate(req["images"]):
        d = fn(input_image=tf.constant(np.load(path)))["global_descriptor"].numpy()
        descriptors.append(os.path.join(os.path.dirname(path), f"descriptor_{i}.npy"))
        np.save(descriptors[-1], d)
    tfw = _tf_worker_module()
    return {
        "signature": {"serving_default": tfw._signature_of(fn)},
        "descriptors": descriptors,
        "timings": {"build_and_save": round(save_s, 1), "total": round(time.time() - t, 1)},
    }


def _tf_worker_module():
    """metric/export/tensorflow.py loaded by path (the worker cannot import the ``metric`` package)."""
    import importlib.util

    name = "_pymetric_tf_worker"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorflow.py")
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


if __name__ == "__main__":
    sys.exit(_tf_worker_module().worker_main(sys.argv[1:], {"wrap": _worker_wrap}))
