"""Memory estimates from the config alone, checked before anything big is allocated.

:func:`check_training_memory` (called by the trainer before it reads data or builds the model)
and :func:`check_extraction_memory` (called by feature extraction before it builds the model)
compare a rough estimate of what a run will need with what the machine has, and raise a one-line
:class:`~metric.utils.errors.ConfigError` naming the keys, the estimate and the memory when it
cannot fit. Nothing is allocated to find out. The estimates are deliberately on the low side
(a run refused here would certainly fail; one accepted may still run out of memory):

- **classifier** (margin layer): ``NUM_CLASSES [x SUBCENTERS] x REDUCTION_DIM x 4 bytes`` for the
  weights; training adds the gradient and the optimizer slots (sgd with momentum: 1, adam/adamw:
  2), so ``x (2 + slots)``. The model is built on the CPU first, so the weights must also fit
  there when training on a GPU.
- **logits** while training: ``per-process batch x classifier rows x 4 bytes x 3`` (the cosines,
  the margin-adjusted logits and their gradient).
- With ``MODEL.HEADS.PARTIAL_FC.ENABLED`` a training process holds ``ceil(NUM_CLASSES / W)`` classes
  (W processes in all) and computes logits of the whole batch (all processes' samples) for
  ``SAMPLE_RATE`` of them.
- **training activations**: ``per-process batch x TRAIN.IM_SIZE^2 x bytes per pixel`` of the
  backbone, from :data:`TRAIN_BYTES_PER_PIXEL` (the tensors autograd keeps for the backward pass,
  measured for the built-in backbones at width 64; ResNet widths and the xK of ``resnet50x2``-style
  types scale it; other backbones (timm, vit) use the smallest entry); halved with mixed precision
  on CUDA.
- **inference** (evaluation and extraction): ``per-process TEST batch x largest view^2 x``
  :data:`INFER_BYTES_PER_PIXEL` (an input and an output of the largest layer, 16 float channels
  per input pixel), the largest view being ``TEST.IM_SIZE x max(INFER.SCALES)`` on its longer
  side (bounded by the square).
- **export** (ONNX, Kaggle; :func:`check_export_memory`): the inference estimate for the largest
  input the export traces and checks on the CPU (two images of the export size).
- **loader workers**: each of ``DATA_LOADER.NUM_WORKERS`` processes (per training process on this
  machine) holds :data:`WORKER_BASE_BYTES` plus two prefetched batches of float32 input tensors.
  More than :data:`WORKERS_PER_CORE` workers per CPU core in all is refused outright.

Memory is the machine's total (psutil, else ``/proc/meminfo`` MemTotal, else ``os.sysconf``),
lowered to the cgroup limit of a container; on CUDA, the GPU's total memory.
"""

import logging
import math
import os
import re

from metric.utils.errors import ConfigError
from metric.utils.machine import cpu_cores, format_bytes, gpu_memory, machine_memory  # noqa: F401 (also this module's API)

logger = logging.getLogger(__name__)

# Bytes kept for the backward pass per input pixel and image (float32), by (MODEL.TYPE, depth),
# measured (unique storages saved by autograd) and rounded down.
TRAIN_BYTES_PER_PIXEL = {
    ("resnet", 18): 430,
    ("resnet", 34): 630,
    ("resnet", 50): 1600,
    ("resnet", 101): 2400,
    ("resnet", 152): 3400,
    ("resnest", 50): 2400,
    ("resnest", 101): 3800,
    ("resnest", 200): 7000,
    ("resnest", 269): 8600,
}
# Inference: an input and an output of the largest layer (16 float32 channels per input pixel).
INFER_BYTES_PER_PIXEL = 2 * 16 * 4
WORKER_BASE_BYTES = 100 * 10**6
WORKERS_PER_CORE = 4
MIN_WORKER_LIMIT = 8
_PREFETCH = 2  # DataLoader's default prefetch_factor


def local_processes(world_size):
    """Processes of this run on this machine (torchrun and the self-spawned launch set
    LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


# ---------------------------------------------------------------------------------- estimates


def optimizer_slots(cfg):
    """Tensors the optimizer keeps per parameter: sgd 1 with momentum (else 0), adam(w) 2."""
    name = cfg.OPTIM.OPTIMIZER
    if name == "sgd":
        return 1 if cfg.OPTIM.MOMENTUM > 0 else 0
    return 2


def classifier_rows(cfg, world_size=1):
    """Rows of the classifier a process holds: all, or its Partial FC shard of ``world_size``."""
    h = cfg.MODEL.HEADS
    classes = math.ceil(h.NUM_CLASSES / world_size) if h.PARTIAL_FC.ENABLED else h.NUM_CLASSES
    return classes * (h.SUBCENTERS if h.CLS_LAYER == "subcenter_arcface" else 1)


def classifier_bytes(cfg, training, world_size=1):
    """The margin layer's weights; training adds the gradient and the optimizer slots."""
    weights = classifier_rows(cfg, world_size) * cfg.MODEL.HEADS.REDUCTION_DIM * 4
    return weights * (2 + optimizer_slots(cfg)) if training else weights


def _width_scale(cfg):
    if cfg.MODEL.TYPE == "resnet":
        return cfg.RESNET.NUM_GROUPS * cfg.RESNET.WIDTH_PER_GROUP / 64
    return 1.0


def train_bytes_per_pixel(cfg):
    t, depth, scale = cfg.MODEL.TYPE, cfg.MODEL.DEPTH, _width_scale(cfg)
    named = re.fullmatch(r"(resnest|resnet)(\d+)(?:x(\d+))?", t)  # resnest50, resnet50x2 (2x wide), ...
    if named:
        t, depth, scale = named[1], int(named[2]), int(named[3] or 1)
    per_px = TRAIN_BYTES_PER_PIXEL.get((t, depth), min(TRAIN_BYTES_PER_PIXEL.values()))
    return per_px * scale


def training_activation_bytes(cfg, batch, device_type):
    b = batch * cfg.TRAIN.IM_SIZE**2 * train_bytes_per_pixel(cfg)
    return b / 2 if device_type == "cuda" and cfg.TRAIN.MIXED_PRECISION != "none" else b


def logits_bytes(cfg, batch, world_size=1):
    """Training logits of a process; Partial FC: the whole batch's, for its sampled classes."""
    pfc = cfg.MODEL.HEADS.PARTIAL_FC
    if pfc.ENABLED:
        batch = batch * world_size
        return int(batch * math.ceil(classifier_rows(cfg, world_size) * pfc.SAMPLE_RATE) * 4 * 3)
    return batch * classifier_rows(cfg) * 4 * 3


def largest_view(cfg):
    return max(8, int(round(cfg.TEST.IM_SIZE * max(cfg.INFER.SCALES))))


def inference_bytes(cfg, batch, device_type):
    b = batch * largest_view(cfg) ** 2 * (INFER_BYTES_PER_PIXEL * _width_scale(cfg) + 12)
    return b / 2 if device_type == "cuda" and cfg.INFER.MIXED_PRECISION != "none" else b


def views_bytes(cfg, batch):
    """float32 views of one test batch (every scale), as the loader hands them over."""
    return batch * sum(3 * 4 * max(8, int(round(cfg.TEST.IM_SIZE * s))) ** 2 for s in cfg.INFER.SCALES)


def worker_bytes(batch_tensor_bytes):
    return WORKER_BASE_BYTES + _PREFETCH * batch_tensor_bytes


# ---------------------------------------------------------------------------------- checks


class _Budget:
    """What one memory (the CPU's or a GPU's) must hold: named parts, each with its message."""

    def __init__(self, memory, where):
        self.memory, self.where, self.parts = memory, where, []

    def add(self, nbytes, label, what, hint):
        self.parts.append((nbytes, label, what, hint))

    def check(self):
        if not self.memory:
            return
        for nbytes, _, what, hint in self.parts:
            if nbytes > self.memory:
                raise ConfigError(f"{what} needs about {format_bytes(nbytes)}, more than {self.where}; {hint}")
        total = sum(p[0] for p in self.parts)
        parts = ", ".join(f"{label} {format_bytes(n)}" for n, label, _, _ in self.parts)
        if total > self.memory:
            hint = max(self.parts, key=lambda p: p[0])[3]
            raise ConfigError(
                f"the run needs about {format_bytes(total)} in all ({parts}), more than {self.where}; {hint}"
            )
        logger.info("memory estimate: about %s (%s) of %s", format_bytes(total), parts, self.where)


def _budgets(device, procs, cpu_bytes, gpu_bytes):
    """``(cpu budget, device budget, processes sharing the device)``; the same budget on CPU."""
    memory = machine_memory() if cpu_bytes is None else cpu_bytes
    cpu = _Budget(memory, f"this machine's {format_bytes(memory or 0)} of memory (CPU)")
    if getattr(device, "type", str(device)) != "cuda":
        return cpu, cpu, procs
    memory = gpu_memory(device) if gpu_bytes is None else gpu_bytes
    return cpu, _Budget(memory, f"the {format_bytes(memory)} of GPU memory of {device}"), 1


def _times(n):
    return f" x {n} processes" if n > 1 else ""


def _classifier_text(cfg, training):
    h = cfg.MODEL.HEADS
    sub = f" x SUBCENTERS={h.SUBCENTERS}" if h.CLS_LAYER == "subcenter_arcface" and h.SUBCENTERS > 1 else ""
    if not training:
        state = "the classifier weights"
    elif optimizer_slots(cfg):
        state = f"the classifier, its gradient and its {cfg.OPTIM.OPTIMIZER} state"
    else:
        state = "the classifier and its gradient"
    return f"MODEL.HEADS.NUM_CLASSES={h.NUM_CLASSES}{sub} x REDUCTION_DIM={h.REDUCTION_DIM} ({state})"


def _add_classifier(cfg, cpu, dev, procs, on_device, training, world_size=1):
    hint = "lower MODEL.HEADS.NUM_CLASSES or MODEL.HEADS.REDUCTION_DIM"
    if cfg.MODEL.HEADS.PARTIAL_FC.ENABLED and training:
        hint += ", or use more processes (MODEL.HEADS.PARTIAL_FC)"
    else:
        world_size = 1
    if dev is not cpu:  # the model is built on the CPU first, by every process of this machine
        cpu.add(
            classifier_bytes(cfg, False, world_size) * procs,
            "classifier",
            _classifier_text(cfg, False) + _times(procs),
            hint,
        )
    dev.add(
        classifier_bytes(cfg, training, world_size) * on_device,
        "classifier",
        _classifier_text(cfg, training) + _times(on_device),
        hint,
    )


def _add_workers(cfg, procs, batch_tensor_bytes, cpu, cores=None):
    workers = cfg.DATA_LOADER.NUM_WORKERS
    if not workers:
        return
    cores = cpu_cores() if cores is None else cores
    limit = max(MIN_WORKER_LIMIT, WORKERS_PER_CORE * cores)
    if workers * procs > limit:
        raise ConfigError(
            f"DATA_LOADER.NUM_WORKERS={workers}{_times(procs)} starts {workers * procs} loader processes on this "
            f"machine's {cores} CPU core(s); use at most {max(1, limit // procs)} "
            f"({WORKERS_PER_CORE} per core in all, at least {MIN_WORKER_LIMIT})"
        )
    each = worker_bytes(batch_tensor_bytes)
    cpu.add(
        workers * procs * each,
        "loader workers",
        f"DATA_LOADER.NUM_WORKERS={workers} ({workers * procs} loader processes of about {format_bytes(each)} each)",
        "lower DATA_LOADER.NUM_WORKERS or the batch size",
    )


def _inference_text(cfg, batch):
    return (
        f"TEST.BATCH_SIZE={cfg.TEST.BATCH_SIZE} ({batch} per process) at the largest view TEST.IM_SIZE="
        f"{cfg.TEST.IM_SIZE} x INFER.SCALES max {max(cfg.INFER.SCALES)} = {largest_view(cfg)} px"
    )


_INFERENCE_HINT = "lower TEST.BATCH_SIZE, TEST.IM_SIZE or the largest of INFER.SCALES"


def check_training_memory(cfg, device, world_size=1, cpu_bytes=None, gpu_bytes=None, cores=None):
    """Refuse (ConfigError) a training run whose estimated memory does not fit; see the module doc.
    ``cpu_bytes`` / ``gpu_bytes`` / ``cores`` replace what this machine has (for tests)."""
    procs = local_processes(world_size)
    cpu, dev, on_device = _budgets(device, procs, cpu_bytes, gpu_bytes)
    device_type = "cuda" if dev is not cpu else "cpu"
    batch = max(1, cfg.TRAIN.BATCH_SIZE // max(1, world_size))
    _add_classifier(cfg, cpu, dev, procs, on_device, training=True, world_size=world_size)
    dev.add(
        logits_bytes(cfg, batch, world_size) * on_device,
        "logits",
        f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} ({batch} per process) x MODEL.HEADS.NUM_CLASSES="
        f"{cfg.MODEL.HEADS.NUM_CLASSES} logits{_times(on_device)}",
        "lower TRAIN.BATCH_SIZE or MODEL.HEADS.NUM_CLASSES",
    )
    train_act = training_activation_bytes(cfg, batch, device_type)
    test_batch = max(1, cfg.TEST.BATCH_SIZE // max(1, world_size))
    eval_act = inference_bytes(cfg, test_batch, device_type) if cfg.TEST.DATASET else 0
    if eval_act > train_act:  # evaluation runs between epochs: the larger of the two counts
        dev.add(
            eval_act * on_device,
            "evaluation activations",
            _inference_text(cfg, test_batch) + _times(on_device),
            _INFERENCE_HINT,
        )
    else:
        dev.add(
            train_act * on_device,
            "activations",
            f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} ({batch} per process) at TRAIN.IM_SIZE={cfg.TRAIN.IM_SIZE} "
            f"(input and activations of {cfg.MODEL.TYPE}, about {train_bytes_per_pixel(cfg):.0f} bytes per "
            f"pixel){_times(on_device)}",
            "lower TRAIN.BATCH_SIZE or TRAIN.IM_SIZE",
        )
    _add_workers(cfg, procs, batch * 3 * 4 * cfg.TRAIN.IM_SIZE**2, cpu, cores)
    cpu.check()
    if dev is not cpu:
        dev.check()


def check_extraction_memory(cfg, device, world_size=1, cpu_bytes=None, gpu_bytes=None, cores=None):
    """Refuse (ConfigError) feature extraction whose estimated memory does not fit (the model's
    classifier weights, the largest view of a TEST batch, the views in host memory, the loader
    workers). Arguments as :func:`check_training_memory`."""
    procs = local_processes(world_size)
    cpu, dev, on_device = _budgets(device, procs, cpu_bytes, gpu_bytes)
    device_type = "cuda" if dev is not cpu else "cpu"
    batch = max(1, cfg.TEST.BATCH_SIZE // max(1, world_size))
    _add_classifier(cfg, cpu, dev, procs, on_device, training=False)
    dev.add(
        inference_bytes(cfg, batch, device_type) * on_device,
        "activations",
        _inference_text(cfg, batch) + _times(on_device),
        _INFERENCE_HINT,
    )
    views = views_bytes(cfg, batch)
    cpu.add(
        views * procs,
        "test views",
        f"the views of a TEST batch ({batch} images x INFER.SCALES {list(cfg.INFER.SCALES)} at TEST.IM_SIZE="
        f"{cfg.TEST.IM_SIZE}){_times(procs)}",
        _INFERENCE_HINT,
    )
    _add_workers(cfg, procs, views, cpu, cores)
    cpu.check()
    if dev is not cpu:
        dev.check()


def check_export_memory(cfg, images, what, hint, cpu_bytes=None):
    """Refuse (ConfigError) an export whose trace and numerical checks cannot fit in this machine's
    memory (the model is exported and checked on the CPU): the classifier weights and a forward
    pass over ``images``, a list of ``(batch, height, width)`` inputs (the largest counts),
    :data:`INFER_BYTES_PER_PIXEL` per input pixel as for extraction. ``what`` names the sizes in
    the message (``export size 100000 x 100000``), ``hint`` says what to do. Nothing is allocated."""
    memory = machine_memory() if cpu_bytes is None else cpu_bytes
    cpu = _Budget(memory, f"this machine's {format_bytes(memory or 0)} of memory (CPU)")
    _add_classifier(cfg, cpu, cpu, 1, 1, training=False)
    batch, h, w = max(images, key=lambda i: i[0] * i[1] * i[2])
    per_px = INFER_BYTES_PER_PIXEL * _width_scale(cfg) + 12
    cpu.add(
        batch * h * w * per_px,
        "activations",
        f"{what} ({batch} image{'s' if batch > 1 else ''} of {h} x {w} px at about {per_px:.0f} bytes per pixel "
        "for the export and its checks)",
        hint,
    )
    cpu.check()
