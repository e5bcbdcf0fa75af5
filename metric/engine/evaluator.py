"""Retrieval evaluation of a model on a labelled list (the TEST split).

Used by the trainer after epochs and by ``tools/test_metric.py``. Every test image is described
by the :class:`~metric.engine.predictor.Predictor` — the same preprocessing, views and
combination as feature extraction, so the figures equal those of ``tools/extract_features.py`` +
``tools/evaluate.py`` on the same list — and each one queries all the others; the metrics are
recall@1/5/10, mAP@R and mAP@100 (Google Landmark Retrieval's definition) by label. Never
classifier accuracy. Under DDP every rank describes the images ``rank::world`` and rank 0 scores
them all.
"""

import logging
import time

import numpy as np

from metric.datasets.loader import test_items
from metric.engine.predictor import Predictor
from metric.retrieval.metrics import labelled_metrics
from metric.utils import distributed as du

logger = logging.getLogger(__name__)

# The evaluation also records mAP@100 as Google Landmark Retrieval defines it (labels as the solution).
GLR_K = 100


def describe_items(predictor, paths, batch_size, num_workers=0, rank=0, world_size=1):
    """Descriptors of ``paths`` split over ranks (``rank::world_size``), put back in list order on
    every rank: ``(embeddings [n, D] float32, failed [n] bool)``; rows of failed images are zero."""
    loader = predictor.loader(paths, batch_size, num_workers, indices=list(range(rank, len(paths), world_size)))
    parts = du.all_gather_objects(predictor.run(loader))
    emb = np.zeros((len(paths), predictor.embedding_dim), np.float32)
    failed = np.zeros(len(paths), bool)
    for part_emb, ok, bad in parts:
        emb[ok] = part_emb
        failed[bad] = True
    return emb, failed


def evaluate_retrieval(predictor, items, batch_size, num_workers=0, rank=0, world_size=1):
    """Metrics dict of ``items`` ``[(path, label)]`` on rank 0 (``None`` on other ranks).
    Unreadable images are left out and counted."""
    t0 = time.time()
    emb, failed = describe_items(predictor, [p for p, _ in items], batch_size, num_workers, rank, world_size)
    if rank != 0:
        return None
    labels = np.array([label for _, label in items])
    keep = ~failed
    metrics = labelled_metrics(emb[keep], labels[keep], ap_at=GLR_K)
    metrics.update(num_images=int(keep.sum()), bad_images=int(failed.sum()), time=time.time() - t0)
    return metrics


def format_metrics(metrics):
    bad = metrics.get("bad_images", 0)
    return (
        f"recall@1 {metrics['recall@1']:.4f}  recall@5 {metrics['recall@5']:.4f}  mAP@R {metrics['mAP@R']:.4f}  "
        + (f"mAP@100 {metrics['mAP@100']:.4f}  " if "mAP@100" in metrics else "")
        + f"({metrics['num_images']} images{f', {bad} unreadable, left out' if bad else ''})"
    )


def evaluate_model(cfg, weights=None):
    """Evaluate the predictor of ``cfg`` (random weights seeded by ``RNG_SEED`` equal a training
    run's initial weights; ``weights`` or ``TEST.WEIGHTS`` if given) on the TEST split in this
    process."""
    weights = weights or cfg.TEST.WEIGHTS
    predictor = Predictor.from_cfg(cfg, weights=weights, missing_weights="ok")
    metrics = evaluate_retrieval(predictor, test_items(cfg), cfg.TEST.BATCH_SIZE, cfg.DATA_LOADER.NUM_WORKERS)
    logger.info("eval%s: %s", f" of {weights}" if weights else " (random weights)", format_metrics(metrics))
    du.barrier()
    return metrics
