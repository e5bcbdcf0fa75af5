"""The demo: generate data, evaluate the untrained model, train, evaluate again.

``make demo`` runs ``tools/demo.py``, which calls :func:`run_demo`. For the untrained and the
trained model it reports retrieval among the held-out images by label (recall@k, mAP@R), then
runs the retrieval pipeline on the held-out query and index lists — feature extraction into
stores, exact search (top 100), Google Landmark Retrieval mAP@100 against the demo's
``retrieval_solution.csv`` — and writes an HTML gallery of the trained model's results (with the
run's figures in its header and each query's AP) and ``curves.png``, the training curves of
``stats.jsonl`` (:mod:`metric.utils.stats_plot`).
"""

import logging
import os

from metric.checkpoint import list_checkpoints
from metric.config import load_cfg
from metric.datasets.demo import make_demo_dataset
from metric.datasets.listfile import resolve_data_dir
from metric.engine.evaluator import evaluate_model
from metric.engine.extract import extract_features
from metric.engine.trainer import train_model
from metric.retrieval.gallery import build_gallery
from metric.retrieval.metrics import evaluate_glr
from metric.retrieval.pipeline import search_stores
from metric.utils.stats_plot import plot_runs

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "metric", "demo_cpu.yaml")
COLUMNS = (("recall@1", "recall@1"), ("mAP@R", "mAP@R"), ("GLR mAP@100", "mAP@100"))


def _with(cfg, **keys):
    c = cfg.clone()
    c.defrost()
    for dotted, value in keys.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.freeze()
    return c


def retrieval_pipeline(cfg, data_dir, work_dir, weights=""):
    """Extract query/index stores, search top 100, score GLR mAP@100; returns (scores, results csv)."""
    stores = {}
    for split in ("query", "index"):
        stores[split] = os.path.join(work_dir, f"{split}_features")
        c = _with(
            cfg,
            TEST__WEIGHTS=weights,
            INFER__INPUT=os.path.join(data_dir, f"{split}_list.txt"),
            INFER__OUTPUT=stores[split],
        )
        extract_features(c, progress=False)
    results = os.path.join(work_dir, "results.csv")
    search_stores(stores["query"], stores["index"], results, topk=100, scores_path=os.path.join(work_dir, "scores.csv"))
    glr = evaluate_glr(results, os.path.join(data_dir, "retrieval_solution.csv"))
    return glr, results


def run_demo(cfg_file=DEMO_CONFIG, opts=(), data_params=None, retrieval=True):
    """Returns ``{"untrained": metrics, "trained": metrics, "out_dir", "checkpoint", "gallery", "curves"}``."""
    cfg = load_cfg(cfg_file, list(opts))
    data_dir = os.path.join(resolve_data_dir(cfg.DATA_DIR), cfg.TRAIN.DATASET)
    make_demo_dataset(data_dir, **(data_params or {}))
    result = {"out_dir": cfg.OUT_DIR, "gallery": None}
    logger.info("evaluating the untrained model on the held-out classes")
    result["untrained"] = evaluate_model(cfg)
    if retrieval:
        glr, _ = retrieval_pipeline(cfg, data_dir, os.path.join(cfg.OUT_DIR, "retrieval_untrained"))
        result["untrained"]["mAP@100"] = glr["mAP@100"]["All"]
    train_model(cfg)
    checkpoint = list_checkpoints(cfg.OUT_DIR)[-1]
    result["checkpoint"] = checkpoint
    result["curves"] = plot_runs([cfg.OUT_DIR], os.path.join(cfg.OUT_DIR, "curves.png"), title="demo training")
    logger.info("evaluating the trained model %s", checkpoint)
    result["trained"] = evaluate_model(cfg, weights=checkpoint)
    if retrieval:
        work = os.path.join(cfg.OUT_DIR, "retrieval_trained")
        glr, results = retrieval_pipeline(cfg, data_dir, work, weights=checkpoint)
        result["trained"]["mAP@100"] = glr["mAP@100"]["All"]
        heldout = os.path.join(data_dir, "heldout")
        figures = {
            "checkpoint": os.path.basename(checkpoint),
            **{
                f"held-out {title} (untrained -> trained)": f"{result['untrained'][key]:.4f} -> "
                f"{result['trained'][key]:.4f}"
                for title, key in COLUMNS
            },
        }
        result["gallery"] = build_gallery(
            results,
            heldout,
            heldout,
            os.path.join(cfg.OUT_DIR, "gallery.html"),
            gt_path=os.path.join(data_dir, "retrieval_solution.csv"),
            scores_path=os.path.join(work, "scores.csv"),
            topk=8,
            max_queries=34,
            figures=figures,
        )
    return result


def format_table(result):
    cols = [(title, key) for title, key in COLUMNS if key in result["trained"]]
    rows = [f"{'held-out retrieval':<20}" + "".join(f"{title:>13}" for title, _ in cols)]
    for name in ("untrained", "trained"):
        rows.append(f"{name + ' model':<20}" + "".join(f"{result[name][key]:>13.4f}" for _, key in cols))
    return "\n".join(rows)
