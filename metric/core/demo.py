"""The demo: generate data, evaluate the untrained model, train, evaluate again.

``make demo`` runs ``tools/demo.py``, which calls :func:`run_demo`.
"""

import logging
import os

from metric.core.checkpoint import list_checkpoints
from metric.core.config import load_cfg
from metric.core.evaluator import evaluate_model
from metric.core.trainer import train_model
from metric.datasets.demo import make_demo_dataset
from metric.datasets.listfile import resolve_data_dir

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "metric", "demo_cpu.yaml")
METRICS = ("recall@1", "recall@5", "mAP@R")


def run_demo(cfg_file=DEMO_CONFIG, opts=(), data_params=None):
    """Returns ``{"untrained": metrics, "trained": metrics, "out_dir": ..., "checkpoint": ...}``."""
    cfg = load_cfg(cfg_file, list(opts))
    data_dir = os.path.join(resolve_data_dir(cfg.DATA_DIR), cfg.TRAIN.DATASET)
    make_demo_dataset(data_dir, **(data_params or {}))
    logger.info("evaluating the untrained model on the held-out classes")
    before = evaluate_model(cfg)
    train_model(cfg)
    checkpoint = list_checkpoints(cfg.OUT_DIR)[-1]
    logger.info("evaluating the trained model %s", checkpoint)
    after = evaluate_model(cfg, weights=checkpoint)
    return {"untrained": before, "trained": after, "out_dir": cfg.OUT_DIR, "checkpoint": checkpoint}


def format_table(result):
    rows = [f"{'held-out retrieval':<20}" + "".join(f"{m:>11}" for m in METRICS)]
    for name in ("untrained", "trained"):
        rows.append(f"{name + ' model':<20}" + "".join(f"{result[name][m]:>11.4f}" for m in METRICS))
    return "\n".join(rows)
