"""Checks of a training run made once, in the launching process, before any process is spawned
and before anything is written to OUT_DIR.

Mistakes that every process would hit (too many processes for the machine, batch sizes that do
not divide over them, a run whose estimated memory does not fit, a missing data set folder, a malformed list
file, a missing or truncated
``TRAIN.WEIGHTS`` file) then give one error line within seconds, instead of the same line from
each of ``NUM_GPUS`` processes after they all started. Config values were validated when the
config was loaded (registry names included). Not done here: building the model and loading the
weights into it (too costly for the large backbones), so weights that do not fit the model are
found by the processes (each reports it, the launcher prints the first). Only for a batch of one
image per process is the model built, on the meta device (no memory, no weights), to find batch
norm layers that would see one value per channel.

Under torchrun the launcher is torchrun itself: every rank runs these checks, and their errors
are marked ``every_rank`` so that only local rank 0 of each node prints the line
(:func:`metric.utils.cli.run_tool`); torchrun then prints its own summary of the failed workers.
"""

import functools
import os

import torch

from metric.checkpoint import list_checkpoints
from metric.checkpoint.files import incomplete_reason
from metric.datasets.loader import build_train_loader, test_items, train_items
from metric.engine.memory_estimates import check_training_memory
from metric.utils import distributed as du
from metric.utils import io
from metric.utils.errors import CheckpointError, ConfigError, MetricError


def world_size(cfg):
    """How many processes the run will have: torchrun's WORLD_SIZE, else NUM_GPUS."""
    return int(os.environ["WORLD_SIZE"]) if du.under_torchrun() else max(1, cfg.NUM_GPUS)


def check_training(cfg):
    """Raise the first problem every process of a training run would hit (see the module doc).
    Returns the ``(train, test)`` items read (test None without TEST.DATASET), for a run in this
    process to reuse."""
    try:
        return _check(cfg)
    except MetricError as err:
        err.every_rank = True
        raise


def _check(cfg):
    du.check_processes(cfg)
    world = world_size(cfg)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    check_training_memory(cfg, device, world)  # each process checks again (with its own device)
    if cfg.TEST.DATASET and cfg.TEST.BATCH_SIZE % world:
        raise ConfigError(
            f"TEST.BATCH_SIZE={cfg.TEST.BATCH_SIZE} must be divisible by the number of processes ({world})"
        )
    _check_batch_statistics(cfg, world)
    # The list files (folder, syntax, labels; files when DATA_LOADER.CHECK_FILES) and what the
    # loader of one process makes of them (batch sizes over `world` processes, the pk sampler).
    train = train_items(cfg)
    build_train_loader(cfg, 0, world, train)
    test = test_items(cfg) if cfg.TEST.DATASET else None
    _check_weights(cfg)
    return train, test


def _check_batch_statistics(cfg, world):
    """Batch norm in training normalizes over the images of one process's batch: with one image
    per process, a layer that then sees one value per channel stops training at its first step
    ("Expected more than 1 value per channel when training"). That is the BN neck
    (``MODEL.HEADS.BN_NECK``, found from the config), and backbone layers on a 1 x 1 map (small
    ``TRAIN.IM_SIZE``) or on pooled features (ResNeSt's split attention), found by a forward pass
    of the model built on the meta device (no memory, no weights; under a second). The training
    loader drops the last partial batch, so every batch has the full per-process size."""
    if cfg.TRAIN.BATCH_SIZE % world or cfg.TRAIN.BATCH_SIZE // world >= 2:
        return  # (a batch size that does not divide over the processes is refused by the loader check)
    launcher = "torchrun --nproc-per-node" if du.under_torchrun() else "NUM_GPUS"
    given = f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} over {world} process(es) gives 1 image per process"
    fix = f"set TRAIN.BATCH_SIZE to {2 * world} or more or run fewer processes ({launcher})"
    if cfg.MODEL.HEADS.BN_NECK:
        raise ConfigError(
            f"{given}, but MODEL.HEADS.BN_NECK True (batch norm over a process's batch) needs at "
            f"least 2; {fix}, or set MODEL.HEADS.BN_NECK False"
        )
    found = _single_value_batch_norm(cfg)
    if found:
        name, shape = found
        raise ConfigError(
            f"{given}, but the model's batch norm layer {name} would normalize one value per channel "
            f"(input {shape} at TRAIN.IM_SIZE {cfg.TRAIN.IM_SIZE}), which stops training; {fix}"
        )


class _OneValue(Exception):
    pass


def _single_value_batch_norm(cfg):
    """``(layer name, input shape)`` of the first batch norm layer that sees one value per
    channel in a training forward pass of one ``TRAIN.IM_SIZE`` image, or ``None``. Best effort:
    a model that cannot run on the meta device (or would download pretrained weights) is not
    tried; the run itself then finds the problem."""
    if cfg.MODEL.TYPE == "timm" and cfg.MODEL.TIMM.PRETRAINED:
        return None
    from metric.modeling import build_model

    def check(name, module, inputs):
        x = inputs[0]
        if module.training and x.dim() >= 2 and x.numel() == x.shape[1]:
            raise _OneValue(name, list(x.shape))

    size = cfg.TRAIN.IM_SIZE
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(cfg).train()
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.register_forward_pre_hook(functools.partial(check, name))
            model(torch.empty(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    except _OneValue as found:
        return found.args
    except Exception:  # noqa: BLE001 (deliberately best effort: see the docstring)
        return None
    return None


def _check_weights(cfg):
    path = cfg.TRAIN.WEIGHTS
    if not path or (cfg.TRAIN.AUTO_RESUME and list_checkpoints(cfg.OUT_DIR)):
        return  # no initial weights, or a resumed run (which does not read them)
    if io.isdir(path):
        raise CheckpointError(f"TRAIN.WEIGHTS {path} is a folder: name the weights file in it")
    if not io.isfile(path):
        raise CheckpointError(f"weights file not found: {path} (TRAIN.WEIGHTS)")
    if io.is_local(path) and not os.access(path, os.R_OK):
        raise CheckpointError(f"TRAIN.WEIGHTS file {path} is not readable (permission denied)")
    reason = incomplete_reason(path)
    if reason:
        raise CheckpointError(f"TRAIN.WEIGHTS file {path} is not a complete weights file: {reason}")
