"""Shared test helpers (plain functions; the fixtures are in ``tests/conftest.py``): a tiny labelled
image set, the one definition of the tiny model's options, unit vectors, a free port, and running
the tools in ``tools/`` (in this process, or as a subprocess for the command-line contract).

Import them as ``from tests.helpers import ...``."""

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys

import cv2
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the tiny data set and the tiny model -------------------------------------------------------


def tiny_model(width=4, dim=8, num_classes=5):
    """The options (a flat ``KEY VALUE`` list of strings) of the tests' tiny model: a ResNet-18 whose
    stem and groups are ``width`` channels wide (the real one: 64), with a ``dim``-d embedding and
    ``num_classes`` classes; ``dim`` or ``num_classes`` None leaves that key at its default."""
    opts = [
        "MODEL.DEPTH",
        "18",
        "RESNET.WIDTH_PER_GROUP",
        str(width),
        "RESNET.STEM_WIDTH",
        str(width),
        "MODEL.HEADS.IN_FEAT",
        "0",
    ]
    if dim is not None:
        opts += ["MODEL.HEADS.REDUCTION_DIM", str(dim)]
    if num_classes is not None:
        opts += ["MODEL.HEADS.NUM_CLASSES", str(num_classes)]
    return opts


# The default tiny model (width 4, 8-d embedding, 5 classes): builds and runs in milliseconds.
TINY_MODEL = tiny_model()

# The extraction tests' model: width 8, 16-d GeM-pooled embedding, 4 classes, 40 px test images in
# batches of 8, no loader workers.
TINY_EXTRACT = tiny_model(width=8, dim=16, num_classes=4) + [
    "MODEL.HEADS.POOL_LAYER",
    "gempool",
    "TEST.IM_SIZE",
    "40",
    "TEST.BATCH_SIZE",
    "8",
    "DATA_LOADER.NUM_WORKERS",
    "0",
]


def write_tiny_dataset(root, num_classes=4, per_class=8, size=(40, 48), seed=0):
    """Images whose class is a base color plus a class-specific stripe; list files
    ``train.txt`` and ``test.txt`` (same images), paths relative to ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    lines = []
    for c in range(num_classes):
        color = rng.integers(0, 255, 3)
        for i in range(per_class):
            im = (rng.normal(0, 25, size + (3,)) + color).clip(0, 255).astype(np.uint8)
            im[:, (c * 7) % size[1] : (c * 7) % size[1] + 4] = 255
            rel = f"img/{c}_{i}.jpg"
            cv2.imwrite(os.path.join(root, rel), im)
            lines.append(f"{rel} {c}")
    for name in ("train.txt", "test.txt"):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


def tiny_opts(data_dir, out_dir, **extra):
    """Config overrides (a flat ``KEY VALUE`` list) that train :func:`tiny_model` ``(width=8, dim=16,
    num_classes=4)`` with an ArcFace layer on 32 px crops of ``write_tiny_dataset`` for 2 epochs;
    ``extra`` (``KEY=value``, dots as in the config) adds or overrides keys."""
    model = tiny_model(width=8, dim=16, num_classes=4)
    opts = {
        "MODEL.TYPE": "resnet",
        **dict(zip(model[::2], model[1::2])),
        "MODEL.HEADS.CLS_LAYER": "arcface",
        "DATA_DIR": os.path.dirname(data_dir),
        "TRAIN.DATASET": os.path.basename(data_dir),
        "TRAIN.SPLIT": "train.txt",
        "TRAIN.BATCH_SIZE": 8,
        "TRAIN.IM_SIZE": 32,
        "TEST.DATASET": os.path.basename(data_dir),
        "TEST.SPLIT": "test.txt",
        "TEST.BATCH_SIZE": 16,
        "TEST.IM_SIZE": 36,
        "OPTIM.BASE_LR": 0.05,
        "OPTIM.MAX_EPOCH": 2,
        "DATA_LOADER.NUM_WORKERS": 0,
        "LOG_PERIOD": 2,
        "OUT_DIR": out_dir,
    }
    opts.update(extra)
    flat = []
    for k, v in opts.items():
        flat += [k, str(v)]
    return flat


def run_py(args, timeout=600, env=None, check=False):
    """Run ``python ARGS`` from the repo root; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# --- vectors and ports ------------------------------------------------------------------------


def unit_vectors(rng, n, d):
    """``n`` random float32 rows of length ``d`` with unit L2 norm, drawn from ``rng`` (a numpy Generator)."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun / process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the tools in tools/ ------------------------------------------------------------------------


def load_tool(name):
    """The module of ``tools/NAME.py``, loaded by path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def remove_pymetric_handlers():
    """Remove (and close) the logging handlers pymetric's ``setup_logging`` added to the root logger."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "pymetric", False):
            root.removeHandler(h)
            h.close()


@contextlib.contextmanager
def logging_restored():
    """Run code that sets up pymetric's logging (training, tools) in this process: afterwards its
    handlers are removed and the root logger's level is put back."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        remove_pymetric_handlers()
        root.setLevel(level)


def tool_in_process(name, argv):
    """Run ``tools/NAME.py`` in this process as its command line does and return a
    ``subprocess.CompletedProcess`` (``returncode``, ``stdout``, ``stderr``) like :func:`run_py`'s,
    so that a test that reads a tool's output needs no subprocess (and no ``capsys``). pymetric's
    console logging follows ``sys.stdout`` / ``sys.stderr``, so its lines are in the output; its
    handlers are removed afterwards."""
    import io

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = _run_tool_here(name, argv)
    return subprocess.CompletedProcess([f"tools/{name}.py", *argv], status, out.getvalue(), err.getvalue())


def call_tool(name, argv, capsys):
    """Run ``tools/NAME.py`` in this process as its command line does (``run_tool(main, argv)``;
    an argparse exit gives its status); returns ``(status, stdout, stderr)`` read from ``capsys``.
    The logging handlers the tool installs are removed afterwards. The exit status and stderr of
    the real command line are checked once per tool with :func:`run_py`."""
    status = _run_tool_here(name, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _run_tool_here(name, argv):
    """The exit status of ``tools/NAME.py`` run in this process (``run_tool(main, argv)``; an
    argparse exit gives its status), its logging handlers removed afterwards."""
    from metric.utils.cli import run_tool

    with logging_restored():
        try:
            return run_tool(load_tool(name).main, argv)
        except SystemExit as exc:
            return exc.code
