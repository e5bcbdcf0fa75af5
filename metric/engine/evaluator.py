"""Retrieval evaluation of a model on a labelled list (the TEST split).

Used by the trainer after epochs and by ``tools/test_metric.py``: every test image
is embedded (L2-normalized), and each one queries all the others; the metrics
are recall@1/5/10 and mAP@R by label. Never classifier accuracy.
"""

import logging
import time

import torch

import metric.checkpoint as cp
from metric.utils import distributed as du
from metric.utils.rng import seed_everything
from metric.datasets.loader import build_test_loader
from metric.modeling import build_model
from metric.engine.embed import embed_loader, gather_interleaved

logger = logging.getLogger(__name__)


def evaluate_retrieval(model, loader, device, amp_dtype=None, channels_last=False, is_master=True):
    """Metrics dict on rank 0 (``None`` on other ranks). Unreadable images are left out and counted."""
    from metric.retrieval.metrics import labelled_metrics

    t0 = time.time()
    emb, labels, failed = embed_loader(cp.unwrap(model), loader, device, amp_dtype, channels_last)
    total = len(loader.dataset)
    emb, labels, failed = (gather_interleaved(a, total) for a in (emb, labels, failed))
    if not is_master:
        return None
    keep = ~failed
    metrics = labelled_metrics(emb[keep], labels[keep])
    metrics.update(num_images=int(keep.sum()), bad_images=int(failed.sum()), time=time.time() - t0)
    return metrics


def format_metrics(metrics):
    bad = metrics.get("bad_images", 0)
    return (
        f"recall@1 {metrics['recall@1']:.4f}  recall@5 {metrics['recall@5']:.4f}  mAP@R {metrics['mAP@R']:.4f}  "
        f"({metrics['num_images']} images{f', {bad} unreadable, left out' if bad else ''})"
    )


def evaluate_model(cfg, weights=None):
    """Build the model of ``cfg`` (seeded with RNG_SEED, so untrained weights equal a training
    run's initial weights), load ``weights`` or ``TEST.WEIGHTS`` if given, and evaluate it on the
    TEST split in this process."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    seed_everything(cfg.RNG_SEED)
    model = build_model(cfg)
    weights = weights or cfg.TEST.WEIGHTS
    if weights:
        cp.load_inference_weights(model, weights)
    model.to(device)
    loader = build_test_loader(cfg, 0, 1)
    metrics = evaluate_retrieval(model, loader, device)
    logger.info("eval%s: %s", f" of {weights}" if weights else " (random weights)", format_metrics(metrics))
    du.barrier()
    return metrics
