"""ONNX -> TensorFlow SavedModel (and TFLite) with onnx2tf, checked against onnxruntime.

TensorFlow and onnx2tf cannot live in the main environment (onnx2tf pins old numpy, onnx and
onnxruntime), so they run in ``.venv-tf`` (``bash tools/setup_tf_env.sh``). This file has two
halves that run in different interpreters:

* the *driver* (:func:`convert_onnx_to_tf`, main environment): checks the ONNX file and the
  output folder, prepares the check inputs and the onnxruntime reference outputs, starts the
  worker, compares the numbers, writes ``pymetric_export.json`` and moves the folder into place;
* the *worker* (``python -I this_file convert REQUEST.json``, inside ``.venv-tf``): runs onnx2tf
  offline, saves the SavedModel and TFLite files and runs them on the check inputs. It imports
  only the standard library, numpy, TensorFlow and onnx2tf, never ``metric`` (``-I`` also keeps
  this folder, whose ``onnx.py``/``tensorflow.py`` would shadow the real packages, off sys.path).

Offline: onnx2tf downloads a file of sample images for its own accuracy checks when the model has
a static batch and a 3-channel input. The worker replaces that download with our calibration
images (landmark-like photos rendered by :mod:`metric.datasets.demo`) and disables ``requests``.

Output folder layout (the SavedModel is at its root)::

    saved_model.pb, variables/, assets/, fingerprint.pb   serving_default(input) -> {embedding}
    model_float32.tflite, model_float16.tflite           with --tflite (fp16 also with --fp16)
    pymetric_export.json                                 source, options, versions, measured diffs
    convert.log                                          the worker's output
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

VENV_ENV = "PYMETRIC_TF_VENV"
STAMP_FILE = ".pymetric-tf-ready"
MARKER_FILE = "pymetric_export.json"
MARKER_FORMAT = "pymetric-tf-export"
FORMAT_VERSION = 1
FP16_REL_TOL = 1e-2  # sanity bound for fp16 TFLite (measured ~5e-4 on ResNet-18)
CALIBRATION_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf's name


def _export_error(message):
    from metric.utils.errors import ExportError  # not importable in the worker's environment

    return ExportError(message)


# =============================================================================================
# Driver (main environment)
# =============================================================================================


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tf_python():
    """The python of the TensorFlow environment, or :class:`ExportError` saying how to create it."""
    custom = os.environ.get(VENV_ENV)
    venv = os.path.abspath(custom or os.path.join(repo_root(), ".venv-tf"))
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, STAMP_FILE)
    if not (os.path.isfile(python) and os.path.isfile(stamp)):
        raise _export_error(
            f"TensorFlow environment {venv} is missing or incomplete; create it with: {setup_command(custom)}"
        )
    with open(os.path.join(repo_root(), "requirements-tf.txt"), "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    with open(stamp) as f:
        if f.read().strip() != want:
            raise _export_error(
                f"TensorFlow environment {venv} is out of date with requirements-tf.txt; "
                f"update it with: {setup_command(custom)}"
            )
    return python


def setup_command(venv=None):
    """The command that creates the TensorFlow environment, as the user can paste it here."""
    script = os.path.join(repo_root(), "tools", "setup_tf_env.sh")
    if os.path.abspath(os.getcwd()) == repo_root():
        script = os.path.join("tools", "setup_tf_env.sh")
    return f"bash {script}" + (f" {venv}" if venv else "")


def run_worker(script, command, request, work_dir, log_path, threads=None):
    """Run ``script command REQUEST`` with the TensorFlow environment's python; return the
    worker's result dict or raise :class:`ExportError` with the worker's one-line reason."""
    python = tf_python()
    req_path = os.path.join(work_dir, "request.json")
    res_path = os.path.join(work_dir, "result.json")
    with open(req_path, "w") as f:
        json.dump(dict(request, result=res_path, threads=threads), f)
    env = dict(os.environ)
    env.update(
        PATH=os.path.dirname(python) + os.pathsep + env.get("PATH", ""),  # onnx2tf runs `onnxsim`
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="-1",  # conversion and checks on the CPU, deterministic
        PYTHONHASHSEED="0",
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1")
    with open(log_path, "ab") as log:
        proc = subprocess.run(
            [python, "-I", "-u", script, command, req_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=work_dir,
        )
    result = None
    if os.path.isfile(res_path):
        with open(res_path) as f:
            result = json.load(f)
    if result is None or "error" in result:
        reason = result["error"] if result else f"worker exited with status {proc.returncode} and no result"
        raise _export_error(f"TensorFlow {command} failed: {reason}")
    return result


def check_output_dir(out_dir):
    """An output folder may be absent, empty, or one we wrote before (it has our marker)."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise _export_error(f"output {out_dir} exists and is not a folder; choose another path")
    if not os.listdir(out_dir):
        return
    marker = os.path.join(out_dir, MARKER_FILE)
    try:
        with open(marker) as f:
            ours = json.load(f).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise _export_error(
            f"output folder {out_dir} exists and was not written by tools/onnx2tf.py (no {MARKER_FILE}); "
            "remove it or choose another folder"
        )


def publish_dir(tmp, out_dir):
    """Move the finished ``tmp`` folder to ``out_dir``, replacing an earlier export of ours."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def calibration_images(count=20, size=128):
    """``count`` landmark-like RGB photos as float32 [count, size, size, 3] in [0, 1]."""
    from metric.export.onnx import sample_image

    return np.stack([sample_image(size, size, seed=100 + i) for i in range(count)]).astype(np.float32) / 255.0


def check_batches(sig, check_size=(96, 128), image=None):
    """The NCHW float32 batches the TensorFlow models are checked on: a real image through our
    preprocessing and random input (batch 2, or the model's fixed batch size), at the model's
    size, or ``check_size`` and a second size if height and width are dynamic."""
    import torch

    from metric.export.onnx import fixed_size_input, sample_image

    n, _, h, w = sig["shape"]
    dynamic = h is None or w is None
    sizes = [tuple(check_size), (check_size[1], max(32, check_size[0] - 32))] if dynamic else [(h, w)]
    im = sample_image() if image is None else image
    gen = torch.Generator().manual_seed(0)
    batches = []
    for bh, bw in sizes:
        rows = [fixed_size_input(im, (bh, bw))[None], torch.randn((n or 2) - 1, 3, bh, bw, generator=gen)]
        batches.append(torch.cat(rows).numpy())
    return batches


def convert_onnx_to_tf(
    onnx_path,
    out_dir,
    tflite=False,
    fp16=False,
    keep_nchw=False,
    check_size=(96, 128),
    image=None,
    tol=None,
    threads=None,
    failed_log=None,
):
    """Convert ``onnx_path`` to a SavedModel in ``out_dir`` (plus TFLite files on request), check
    every output against onnxruntime, and return the report also written to
    ``out_dir/pymetric_export.json``. ``fp16`` implies ``tflite``. Raises :class:`ExportError` if
    the ONNX file is missing or invalid, ``out_dir`` is not ours, or an fp32 model differs from
    onnxruntime by more than ``tol`` relative (default :data:`metric.export.onnx.REL_TOL`).
    On failure nothing is written but the worker's log, kept as ``failed_log`` (default
    ``OUTDIR.failed.log``) and named in the error."""
    from metric.export.onnx import REL_TOL, diff_stats, onnx_signature, run_onnxruntime
    from metric.utils import io
    from metric.utils.errors import MetricError

    tol = REL_TOL if tol is None else tol
    tflite = tflite or fp16
    if len(check_size) != 2 or min(check_size) < 32:
        raise _export_error(f"check size must be two integers H W >= 32, got {tuple(check_size)}")
    onnx_path, out_dir = os.path.abspath(onnx_path), os.path.abspath(out_dir.rstrip("/") or "/")
    sig = onnx_signature(onnx_path)
    check_output_dir(out_dir)
    io.check_output_path(out_dir, "TensorFlow export", folder=True)  # parent exists and is writable
    tf_python()  # fail early with the setup command
    parent = os.path.dirname(out_dir)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = os.path.join(tmp, "_work")
    os.makedirs(work)
    log_path = os.path.join(tmp, "convert.log")
    try:
        batches = check_batches(sig, check_size, image)
        refs = [run_onnxruntime(onnx_path, x, threads) for x in batches]
        inputs = []
        for i, x in enumerate(batches):
            inputs.append(os.path.join(work, f"check_{i}.npy"))
            np.save(inputs[-1], x)
        np.save(os.path.join(work, CALIBRATION_FILE), calibration_images())
        request = {
            "onnx": onnx_path,
            "out": tmp,
            "work": work,
            "input": sig["input"],
            "output": sig["output"],
            "tflite": tflite,
            "fp16": fp16,
            "keep_nchw": keep_nchw,
            "checks": inputs,
            "calibration": os.path.join(work, CALIBRATION_FILE),
        }
        start = time.time()
        result = run_worker(os.path.abspath(__file__), "convert", request, work, log_path, threads)
        checks = []
        for model_name, paths in result["outputs"].items():
            for x, ref, path in zip(batches, refs, paths):
                stats = diff_stats(np.load(path), ref)
                checks.append({"check": f"{model_name} vs onnxruntime", "shape": list(x.shape), **stats})
        report = {
            "format": MARKER_FORMAT,
            "version": FORMAT_VERSION,
            "source": {"onnx": onnx_path, "sha256": io.file_sha256(onnx_path)},
            "options": {"tflite": tflite, "fp16": fp16, "keep_nchw": keep_nchw},
            "signature": result["signature"],
            "files": result["files"],
            "versions": result["versions"],
            "timings_s": dict(result["timings"], total=round(time.time() - start, 1)),
            "frozen_variables": result["frozen_variables"],
            "checks": checks,
        }
        _check_tolerances(checks, tol)
        shutil.rmtree(work)
        with open(os.path.join(tmp, MARKER_FILE), "w") as f:
            json.dump(report, f, indent=1)
        publish_dir(tmp, out_dir)
        if failed_log is None and os.path.isfile(f"{out_dir}.failed.log"):
            os.remove(f"{out_dir}.failed.log")  # the log of an earlier failed attempt
    except BaseException as err:
        kept = keep_log(log_path, failed_log or f"{out_dir}.failed.log")
        shutil.rmtree(tmp, ignore_errors=True)
        if kept and isinstance(err, MetricError):
            raise _export_error(f"{err} (log: {kept})") from None
        raise
    return report


def keep_log(log_path, dest):
    """Copy ``log_path`` to ``dest`` if it exists; return ``dest`` or None."""
    if not os.path.isfile(log_path):
        return None
    shutil.copyfile(log_path, dest)
    return dest


def _check_tolerances(checks, tol):
    for c in checks:
        limit = FP16_REL_TOL if "float16" in c["check"] else tol
        if c["rel"] > limit:
            raise _export_error(
                f"{c['check']}: relative difference {c['rel']:.2e} (max abs {c['max_abs']:.2e}) on input "
                f"{c['shape']} is above {limit:g}"
            )


# =============================================================================================
# Worker (inside .venv-tf; standard library, numpy, TensorFlow and onnx2tf only)
# =============================================================================================


def _offline_onnx2tf(calibration_path):
    """Make onnx2tf use our calibration images instead of downloading its sample file."""
    import importlib

    import requests

    def no_network(*args, **kwargs):
        raise RuntimeError("network access is disabled during conversion")

    requests.get = requests.post = no_network
    images = np.load(calibration_path)
    for name in ("onnx2tf.onnx2tf", "onnx2tf.utils.common_functions"):
        importlib.import_module(name).download_test_image_data = lambda: images.copy()


def _serving_module(tf, keras_model, input_name, output_name):
    """A tf.Module whose ``serve`` function (also the serving signature) maps the input batch to
    ``{output_name: embedding}``. The Keras model is captured by the function, not tracked as an
    attribute: saving a tracked onnx2tf model serializes every layer's Python config (with the
    weights inlined), which takes minutes even for a ResNet-18; the traced graph is all we need.
    onnx2tf inlines most weights as constants, but some layers (grouped convolutions, e.g. in
    ResNeSt) hold variables that Keras does not track and whose names SavedModel rejects; those
    are frozen into constants too."""
    spec = tf.TensorSpec(keras_model.inputs[0].shape, tf.float32, name=input_name)

    @tf.function(input_signature=[spec])
    def serve(x):
        y = keras_model(x, training=False)
        if isinstance(y, (list, tuple)):
            y = y[0]
        return {output_name: tf.identity(y, name=output_name)}

    concrete = serve.get_concrete_function()
    if concrete.variables:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        frozen = convert_variables_to_constants_v2(concrete)

        @tf.function(input_signature=[spec])
        def serve(x):  # noqa: F811  (the frozen twin of the function above)
            y = frozen(x)
            y = y[output_name] if isinstance(y, dict) else y[0]  # freezing flattens the outputs
            return {output_name: tf.identity(y, name=output_name)}

    module = tf.Module()
    module.serve = serve
    module.frozen_variables = len(concrete.variables)  # reported; a plain int is not saved
    return module


def _signature_of(fn):
    args = fn.structured_input_signature[1]
    outs = fn.structured_outputs
    return {
        "inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in args.items()},
        "outputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in outs.items()},
    }


def _run_tflite(model_path, x):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older environments ship the interpreter inside TensorFlow
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interp = Interpreter(model_path=model_path)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape), strict=False)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], np.ascontiguousarray(x, np.float32))
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy()


def _worker_convert(req):
    timings = {}
    t = time.time()
    import tensorflow as tf

    if req.get("threads"):
        tf.config.threading.set_intra_op_parallelism_threads(req["threads"])
        tf.config.threading.set_inter_op_parallelism_threads(1)
    _offline_onnx2tf(req["calibration"])
    import onnx2tf

    work, out = req["work"], req["out"]
    local = os.path.join(work, "model.onnx")  # onnx2tf simplifies its input file in place
    shutil.copyfile(req["onnx"], local)
    timings["import"] = round(time.time() - t, 1)

    t = time.time()
    keras_model = onnx2tf.convert(
        input_onnx_file_path=local,
        output_folder_path=os.path.join(work, "onnx2tf"),
        keep_ncw_or_nchw_or_ncdhw_input_names=[req["input"]] if req["keep_nchw"] else None,
        disable_model_save=True,  # we save the SavedModel and TFLite files ourselves
        verbosity="warn",
    )
    timings["onnx2tf"] = round(time.time() - t, 1)
    name_in = "".join(c if c.isalnum() or c == "_" else "_" for c in req["input"])
    module = _serving_module(tf, keras_model, name_in, req["output"])

    t = time.time()
    tf.saved_model.save(module, out, signatures={"serving_default": module.serve})
    timings["saved_model"] = round(time.time() - t, 1)
    files = ["saved_model.pb", "variables/"]

    checks = [np.load(p) for p in req["checks"]]
    if not req["keep_nchw"]:
        checks = [x.transpose(0, 2, 3, 1) for x in checks]
    fn = tf.saved_model.load(out).signatures["serving_default"]
    outputs = {"saved_model": []}
    for i, x in enumerate(checks):
        y = fn(**{name_in: tf.constant(x)})[req["output"]].numpy()
        outputs["saved_model"].append(os.path.join(work, f"saved_model_{i}.npy"))
        np.save(outputs["saved_model"][-1], y)

    kinds = ([("float32", False)] if req["tflite"] else []) + ([("float16", True)] if req["fp16"] else [])
    for kind, half in kinds:
        t = time.time()
        converter = tf.lite.TFLiteConverter.from_saved_model(out)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if half:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        path = os.path.join(out, f"model_{kind}.tflite")
        with open(path, "wb") as f:
            f.write(converter.convert())
        timings[f"tflite_{kind}"] = round(time.time() - t, 1)
        files.append(os.path.basename(path))
        key = f"tflite_{kind}"
        outputs[key] = []
        for i, x in enumerate(checks):
            outputs[key].append(os.path.join(work, f"{key}_{i}.npy"))
            np.save(outputs[key][-1], _run_tflite(path, x))
    return {
        "signature": {"serving_default": _signature_of(fn)},
        "files": files,
        "outputs": outputs,
        "timings": timings,
        "frozen_variables": module.frozen_variables,
        "versions": {"tensorflow": tf.__version__, "onnx2tf": onnx2tf.__version__, "python": sys.version.split()[0]},
    }


def _one_line(err, limit=400):
    """``Type: message`` on one line; for TensorFlow's "in user code:" errors, with the inner error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    if lines and lines[0].endswith(":"):
        inner = [i for i, line in enumerate(lines) if i and re.match(r"^\w+(Error|Exception): ", line)]
        if inner:
            text += " " + " ".join(lines[inner[-1] : inner[-1] + 2])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def worker_main(argv, commands):
    """``COMMAND REQUEST.json``: run ``commands[COMMAND](request)``, write its result (or
    ``{'error': one line}``) to ``request['result']``; exit status 0 or 1."""
    command, req_path = argv
    with open(req_path) as f:
        req = json.load(f)
    try:
        result = commands[command](req)
        status = 0
    except Exception as err:  # reported to the driver as one line; the traceback goes to the log
        import traceback

        traceback.print_exc()
        result = {"error": _one_line(err)}
        status = 1
    with open(req["result"], "w") as f:
        json.dump(result, f)
    return status


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:], {"convert": _worker_convert}))
