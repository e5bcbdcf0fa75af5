"""Data loaders for training and evaluation, aware of the process group."""

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from metric.datasets.dataset import ListDataset, check_readable_classes
from metric.datasets.listfile import dataset_list_path, read_list
from metric.datasets.samplers import PKSampler
from metric.datasets.transforms import TrainTransform
from metric.utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _per_process_batch(total, world_size, key):
    if total % world_size:
        raise ConfigError(f"{key}={total} must be divisible by the number of processes ({world_size})")
    return total // world_size


def _loader(dataset, batch_size, sampler, cfg, drop_last, seed):
    workers = cfg.DATA_LOADER.NUM_WORKERS
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.DATA_LOADER.PIN_MEMORY and torch.cuda.is_available(),
        drop_last=drop_last,
        # A private generator: creating iterators never touches the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )


def train_items(cfg):
    path, folder = dataset_list_path(cfg.DATA_DIR, cfg.TRAIN.DATASET, cfg.TRAIN.SPLIT)
    items = read_list(path, folder, cfg.MODEL.HEADS.NUM_CLASSES, check_files=cfg.DATA_LOADER.CHECK_FILES)
    if cfg.DATA_LOADER.CHECK_FILES:  # a class with no readable image stops the run now, not mid-epoch
        check_readable_classes(items, path, max_pixels=cfg.DATA_LOADER.MAX_IMAGE_PIXELS)
    return items


def test_items(cfg):
    """The TEST list; it must hold at least two images of some label (else nothing to retrieve)."""
    path, folder = dataset_list_path(cfg.DATA_DIR, cfg.TEST.DATASET, cfg.TEST.SPLIT)
    items = read_list(path, folder, None, check_files=cfg.DATA_LOADER.CHECK_FILES)
    _, counts = np.unique(items.labels, return_counts=True)
    if counts.max() < 2:
        raise DataError(f"{path}: every label occurs once, so retrieval by label cannot be evaluated")
    return items


def build_train_loader(cfg, rank=0, world_size=1, items=None):
    """Shuffled, sharded over ranks (``sampler.set_epoch`` reshuffles), last partial batch dropped;
    with TRAIN.SAMPLER pk, batches of P classes x K images (:class:`PKSampler`)."""
    items = train_items(cfg) if items is None else items
    batch = _per_process_batch(cfg.TRAIN.BATCH_SIZE, world_size, "TRAIN.BATCH_SIZE")
    transform = TrainTransform(cfg.TRAIN.IM_SIZE, cfg.TRAIN.CROP_SCALE, cfg.TRAIN.FLIP, cfg.TRAIN.COLOR_JITTER)
    dataset = ListDataset(items, transform, seed=cfg.RNG_SEED, max_pixels=cfg.DATA_LOADER.MAX_IMAGE_PIXELS)
    if len(dataset) < cfg.TRAIN.BATCH_SIZE:
        raise ConfigError(
            f"TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} is larger than the training set ({len(dataset)} images)"
        )
    if cfg.TRAIN.SAMPLER == "pk":
        sampler = _pk_sampler(cfg, dataset, batch, rank, world_size)
    else:
        pairwise = sorted(set(cfg.MODEL.LOSSES.NAME) & {"triplet", "circle"})
        if pairwise:
            logger.warning(
                "MODEL.LOSSES.NAME has %s but TRAIN.SAMPLER is random: batches may hold few positive "
                "pairs; TRAIN.SAMPLER pk draws P classes x K images",
                ", ".join(pairwise),
            )
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.RNG_SEED)
    return _loader(dataset, batch, sampler, cfg, drop_last=True, seed=cfg.RNG_SEED)


def _pk_sampler(cfg, dataset, batch, rank, world_size):
    """P x K batches (TRAIN.SAMPLER pk): K = TRAIN.NUM_INSTANCES, P = per-process batch / K."""
    k = cfg.TRAIN.NUM_INSTANCES
    if batch % k or batch // k < 2:
        raise ConfigError(
            f"TRAIN.SAMPLER pk: TRAIN.BATCH_SIZE={cfg.TRAIN.BATCH_SIZE} gives {batch} images per process "
            f"({world_size} process(es)), which must be a multiple of TRAIN.NUM_INSTANCES={k} with at least "
            f"2 classes per batch; set TRAIN.BATCH_SIZE to a multiple of {k * world_size} that is at least "
            f"{2 * k * world_size}"
        )
    sampler = PKSampler(dataset.labels, batch, k, num_replicas=world_size, rank=rank, seed=cfg.RNG_SEED)
    if len(sampler) == 0:
        raise ConfigError(
            f"TRAIN.SAMPLER pk: the training set ({len(sampler.classes)} classes) cannot fill one batch of "
            f"{batch // k} classes x {k} images per process; lower TRAIN.BATCH_SIZE"
        )
    return sampler
