"""One command per standard benchmark: the files as distributed in, the paper's row out.

:func:`run_benchmark` (``tools/benchmark.py``) runs, for a benchmark of
:mod:`metric.datasets.benchmarks`:

1. **conversion** (:func:`metric.datasets.benchmarks.convert`): the query / index (gallery,
   distractor) images and the ground truth, checked against the distributed counts. A landmark
   conversion is cached in ``<features>/<name>/conversion.json`` (:mod:`metric.datasets.benchmarks.prepare`,
   which also writes the ``--make-lists`` files), keyed by the size and time of
   the annotation files and image folders, so a rerun does not stat a million distractors again.
2. **extraction** into feature stores under ``--features`` (default ``OUT_DIR/benchmarks``) with
   :func:`metric.engine.extract.extract_shard` (the :class:`~metric.engine.predictor.Predictor`
   of the config: ``TEST.IM_SIZE``, ``INFER.SCALES``, ``INFER.FLIP``, ``INFER.CENTER_CROP``, ...).
   A store that is already complete for the same model, settings and images is used as it is
   (a rerun only scores); a store there extracted with **other** settings or weights is refused
   in one line naming what differs (never silently replaced: it may hold hours of extraction).
   ROxf/RPar queries are cropped to their ``bbx`` (``INFER.BOXES`` semantics). The revisitop1m
   distractors go to ``<features>/revisitop1m/index``, one store for both data sets.
3. **search and scoring**: revisited Oxford/Paris mAP and mP@1/5/10 (E/M/H) on the full
   ranking (with distractors: :mod:`metric.retrieval.distractors`, bounded memory); GLDv2
   mAP@100 Public/Private and mP@k on the top 100 (:mod:`metric.retrieval.metrics_glr`); the
   DML recall@k and MAP@R (:mod:`metric.retrieval.metrics_labelled`).

It returns a result dict (what ``--json`` writes) whose ``row`` is the printed line; the line
states the extraction settings, so two rows are never silently incomparable.
"""

import logging
import os

import numpy as np
import torch

from metric.config import get_cfg
from metric.datasets import benchmarks as bm
from metric.datasets.benchmarks.landmarks import LandmarkSplits
from metric.datasets.benchmarks.prepare import R1M_STORE, convert_cached
from metric.engine.extract import extract_shard, extraction_meta, readable_now, superglobal_meta
from metric.engine.memory_estimates import check_extraction_memory
from metric.engine.predictor import Predictor
from metric.retrieval.distractors import iter_row_blocks, revisited_map_with_distractors
from metric.retrieval.groundtruth import read_glr_solution, read_revisited_gnd
from metric.retrieval.metrics_glr import glr_map_at_k
from metric.retrieval.metrics_labelled import labelled_metrics
from metric.retrieval.metrics_revisited import rank_index, revisited_map
from metric.retrieval.search import search
from metric.retrieval.store import check_dtype, is_complete_store, load_features
from metric.utils import distributed as du
from metric.utils import io
from metric.utils.errors import ConfigError, DataError, FeatureStoreError

logger = logging.getLogger(__name__)

SHARD = {"index": 1, "total": 1}


# --- extraction ------------------------------------------------------------------------------------


def settings_of(cfg, dtype):
    """The extraction settings a row states."""
    return {
        "scales": [float(s) for s in cfg.INFER.SCALES],
        "im_size": int(cfg.TEST.IM_SIZE),
        "center_crop": bool(cfg.INFER.CENTER_CROP),
        "crop_fraction": float(cfg.INFER.CROP_FRACTION),
        "flip": bool(cfg.INFER.FLIP),
        "multiscale_pool": cfg.INFER.MULTISCALE_POOL,
        "multiscale_p": float(cfg.INFER.MULTISCALE_P),
        "dtype": dtype,
        "weights": cfg.TEST.WEIGHTS or "(random init)",
        # INFER.MIXED_PRECISION applies on CUDA only (the device run_benchmark picks when there is one)
        "mixed_precision": cfg.INFER.MIXED_PRECISION if torch.cuda.is_available() else "none",
        "superglobal": superglobal_meta(cfg),  # None: off
    }


def describe_settings(settings, cropped):
    scales = ",".join(f"{s:g}" for s in settings["scales"])
    pool = settings["multiscale_pool"]
    if pool in ("gem", "sgem"):
        pool += f" p={settings['multiscale_p']:g}"
    side = "longer side"
    if settings["center_crop"]:
        fraction = settings.get("crop_fraction", 1.0)
        side = "shorter side + centre crop" if fraction == 1.0 else f"shorter side / {fraction:g} + centre crop"
    parts = [
        f"scales [{scales}]" + (f" ({pool})" if len(settings["scales"]) > 1 or settings["flip"] else ""),
        f"{side} {settings['im_size']}",
        "flip" if settings["flip"] else "no flip",
        settings["dtype"],
    ]
    if settings.get("mixed_precision", "none") != "none":
        parts.append(f"{settings['mixed_precision']} autocast")
    sg = settings.get("superglobal")
    if sg and sg["pool_p"] > 0:
        parts.append(f"SuperGlobal GeM+ p={sg['pool_p']:g}")
    if sg and sg["regional_gem_size"]:
        parts.append(f"regional GeM p={sg['regional_gem_p']:g} size {sg['regional_gem_size']}")
    if cropped:
        parts.append("queries cropped to bbx")
    return ", ".join(parts)


_WHAT_DIFFERS = {
    "model_digest": "model weights or MODEL config",
    "weights": "TEST.WEIGHTS",
    "scales": "INFER.SCALES",
    "flip": "INFER.FLIP",
    "multiscale_pool": "INFER.MULTISCALE_POOL",
    "multiscale_p": "INFER.MULTISCALE_P",
    "im_size": "TEST.IM_SIZE",
    "center_crop": "INFER.CENTER_CROP",
    "crop_fraction": "INFER.CROP_FRACTION",
    "input_digest": "the images (or their boxes)",
    "boxes": "query boxes",
    "superglobal": "SuperGlobal pooling (INFER.POOL_P, INFER.REGIONAL_GEM*)",
    "mixed_precision": "INFER.MIXED_PRECISION (CUDA autocast)",
}


# Settings a store's meta names only when they are not the default (metric.engine.extract.extraction_meta):
# an absent key is compared as its default, so a change in either direction is named.
def _absent_defaults():
    return {
        "center_crop": False,
        "crop_fraction": 1.0,
        "multiscale_p": float(get_cfg().INFER.MULTISCALE_P),
        "superglobal": None,
        "boxes": None,
        "mixed_precision": None,
    }


# Settings the model digest also covers: when one of them differs, it says what differs.
_IN_DIGEST = {
    "scales", "flip", "multiscale_pool", "multiscale_p", "im_size", "superglobal", "center_crop", "crop_fraction",
    "mixed_precision",
}  # fmt: skip


def ensure_store(cfg, predictor_of, items, out_dir, dtype, progress, what, boxes=None):
    """The store ``out_dir`` of ``items`` ``[(id, absolute path)]``: used as it is when complete
    for these settings, extracted when absent, refused when extracted with other settings."""
    predictor = predictor_of()
    meta = extraction_meta(cfg, items, SHARD, predictor, boxes)
    if io.isdir(out_dir) and is_complete_store(out_dir):
        old = load_features(out_dir, mmap=True).meta
        absent = _absent_defaults()
        keys = [k for k in meta if k != "shard"] + [k for k in absent if k not in meta]
        diffs = [k for k in keys if old.get(k, absent.get(k)) != meta.get(k, absent.get(k))]
        if "weights" in diffs and "model_digest" not in diffs:  # the same weights, from another path
            diffs.remove("weights")
        if old.get("dtype", "float32") != dtype:
            diffs.append("dtype")
        if "model_digest" in diffs and set(diffs) & _IN_DIGEST:
            diffs.remove("model_digest")  # the digest covers those settings: they say what differs
        asked = {**absent, **meta, "dtype": dtype}
        if diffs:
            named = ", ".join(
                f"{_WHAT_DIFFERS.get(k, k)} ({old.get(k, absent.get(k))!r} there, {asked.get(k)!r} asked)"
                if k not in ("model_digest", "input_digest")
                else _WHAT_DIFFERS[k]
                for k in diffs
            )
            raise FeatureStoreError(
                f"the {what} store {out_dir} was extracted with other settings than asked: {named}; "
                "choose another --features folder (or delete that store to extract it again)"
            )
        readable = readable_now(old.get("failed_images") or [], cfg.DATA_LOADER.MAX_IMAGE_PIXELS)
        if not readable:
            logger.info("%s store %s is complete for this model and settings: only scoring", what, out_dir)
            return out_dir
        logger.info("%s store %s: %d images it left out read now: extracting it again", what, out_dir, len(readable))
    else:
        logger.info("extracting the %s store %s (%d images)", what, out_dir, len(items))
    return extract_shard(cfg, items, out_dir, SHARD, predictor, progress=progress, dtype=dtype, boxes=boxes)


def _abs_items(root, pairs):
    return [(image_id, os.path.join(root, rel)) for image_id, rel in pairs]


def _scored_store(path, ids, what):
    """The store at ``path`` with its rows in the order of ``ids``; an image it left out (it could
    not be decoded) is an error: every query and index image is scored."""
    store = load_features(path, mmap=True)
    failed = store.meta.get("failed_images") or []
    if failed:
        raise DataError(
            f"{len(failed)} {what} images could not be decoded (first: {failed[0]}); the benchmark scores every "
            "one of them: replace the files (download them again)"
        )
    if store.ids != list(ids):
        raise FeatureStoreError(f"{path} does not hold the {what} images in the benchmark's order; delete it")
    return store


# --- scoring -------------------------------------------------------------------------------------------


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def score_revisited(splits, query, index, distractors=None, progress=False):
    gt = read_revisited_gnd(splits.ground_truth)
    if gt["imlist"] != [i for i, _ in splits.index] or gt["qimlist"] != [i for i, _ in splits.query]:
        raise DataError(f"{splits.ground_truth} changed since the conversion; run again")
    q = np.array(query.embeddings, dtype=np.float32)  # copies: the stores are read-only memory maps
    x = np.array(index.embeddings, dtype=np.float32)
    if distractors is None:
        return revisited_map(rank_index(q, x), gt["gnd"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(distractors), unit="row", desc="distractors", dynamic_ncols=True)
    try:
        return revisited_map_with_distractors(q, x, iter_row_blocks(distractors.embeddings), gt["gnd"], progress=bar)
    finally:
        if bar is not None:
            bar.close()


def revisited_row(metrics):
    m, h = metrics["M"], metrics["H"]
    maps = "/".join(_pct(metrics[p]["mAP"]) for p in ("E", "M", "H"))
    mp = lambda r: "/".join(_pct(r[f"mP@{k}"]) for k in (1, 5, 10))  # noqa: E731
    return f"mAP E/M/H {maps} | mP@1/5/10 M {mp(m)} H {mp(h)}"


def score_glr(splits, query, index, k=100):
    solution = read_glr_solution(splits.ground_truth)
    _, rows = search(query.embeddings, index.embeddings, k)
    ids = index.ids
    predictions = {qid: [ids[j] for j in row] for qid, row in zip(query.ids, rows.tolist())}
    return glr_map_at_k(predictions, solution, k=k)


def glr_row(metrics):
    m = metrics["mAP@100"]
    mp = " ".join(f"{k} {_pct(v)}" for k, v in metrics["mP@k"].items())
    return f"mAP@100 Public/Private {_pct(m['Public'])}/{_pct(m['Private'])} | {mp}"


def score_labelled(splits, query, gallery):
    q_labels = [label for _, label in splits.query]
    if gallery is None:
        out = labelled_metrics(np.asarray(query.embeddings), q_labels, ks=splits.ks)
    else:
        g_labels = [label for _, label in splits.gallery]
        out = labelled_metrics(
            np.asarray(query.embeddings), q_labels, np.asarray(gallery.embeddings), g_labels, ks=splits.ks
        )
    return out


def labelled_row(metrics, ks):
    recalls = "/".join(_pct(metrics[f"recall@{k}"]) for k in ks)
    return f"R@{'/'.join(map(str, ks))} {recalls} | MAP@R {_pct(metrics['mAP@R'])}"


# --- the whole run ----------------------------------------------------------------------------------


def _dml_items(pairs):
    """``[(id, relpath)]`` of ``[(relpath, label)]``: the id is the path without extension (the
    DML sets repeat file names in different folders)."""
    return [(os.path.splitext(rel)[0].replace(os.sep, "/").replace(" ", "_"), rel) for rel, _ in pairs]


def run_benchmark(
    cfg, name, data_root, distractors=None, features=None, allow_subset=False, dtype="float32", progress=True
):
    """Convert, extract (or reuse the stores), search and score benchmark ``name``; returns the
    result dict (``row``: the printed line; ``metrics``; ``settings``; ``complete``; ``notes``)."""
    dtype = check_dtype(dtype)
    base, r1m = bm.resolve(name)
    features = features or os.path.join(cfg.OUT_DIR, "benchmarks")
    io.mkdirs(features, "benchmark feature folder")
    splits = convert_cached(name, data_root, distractors, allow_subset, os.path.join(features, name))
    cache = {}

    def predictor_of():
        if "p" not in cache:
            du.set_num_threads(cfg.NUM_THREADS)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            check_extraction_memory(cfg, device)  # an estimate: refuse what cannot fit
            cache["p"] = Predictor.from_cfg(cfg, device=device, missing_weights="warn")
        return cache["p"]

    stores = {}
    settings = settings_of(cfg, dtype)
    result = {"benchmark": name, "settings": settings, "stores": stores}
    if isinstance(splits, LandmarkSplits):
        folder = os.path.join(features, base)
        boxes = splits.query_boxes
        if boxes is not None and cfg.INFER.CENTER_CROP:
            raise ConfigError(
                f"INFER.CENTER_CROP True with {name}, whose queries are cropped to their bbx (a box crop keeps its "
                "aspect ratio and is scaled as its full image); set INFER.CENTER_CROP False (and "
                "INFER.CROP_FRACTION 1.0), as the revisited protocol does"
            )
        stores["query"] = ensure_store(
            cfg, predictor_of, _abs_items(splits.data_root, splits.query), os.path.join(folder, "query"),
            dtype, progress, "query", boxes,
        )  # fmt: skip
        stores["index"] = ensure_store(
            cfg, predictor_of, _abs_items(splits.data_root, splits.index), os.path.join(folder, "index"),
            dtype, progress, "index",
        )  # fmt: skip
        query = _scored_store(stores["query"], [i for i, _ in splits.query], "query")
        index = _scored_store(stores["index"], [i for i, _ in splits.index], "index")
        if splits.kind == "revisited":
            dstore = None
            if r1m:
                stores["distractors"] = ensure_store(
                    cfg, predictor_of, _abs_items(splits.distractor_root, splits.distractors),
                    os.path.join(features, R1M_STORE, "index"), dtype, progress, "distractor",
                )  # fmt: skip
                dstore = load_features(stores["distractors"], mmap=True)
                unreadable = len(dstore.meta.get("failed_images") or [])
                result["distractors"] = {
                    "listed": len(splits.distractors),
                    "used": len(dstore),
                    "unreadable": unreadable,
                }
            metrics = score_revisited(splits, query, index, dstore, progress)
            row = revisited_row(metrics)
            if dstore is not None:
                d = result["distractors"]
                row += f" | distractors {d['used']:,}" + (
                    f" ({d['unreadable']} unreadable, left out)" if d["unreadable"] else ""
                )
        else:
            metrics = score_glr(splits, query, index)
            row = glr_row(metrics)
        cropped = boxes is not None
        label = {"roxford5k": "ROxf", "rparis6k": "RPar", "gldv2-retrieval": "GLDv2-retrieval"}[base]
        label += "+R1M" if r1m else ""
    else:
        folder = os.path.join(features, name)
        q_items = _abs_items(splits.root, _dml_items(splits.query))
        stores["query"] = ensure_store(
            cfg, predictor_of, q_items, os.path.join(folder, "query"), dtype, progress, "query"
        )
        query = _scored_store(stores["query"], [i for i, _ in q_items], "query")
        gallery = None
        if splits.gallery is not None:
            g_items = _abs_items(splits.root, _dml_items(splits.gallery))
            stores["gallery"] = ensure_store(
                cfg, predictor_of, g_items, os.path.join(folder, "gallery"), dtype, progress, "gallery"
            )
            gallery = _scored_store(stores["gallery"], [i for i, _ in g_items], "gallery")
        metrics = score_labelled(splits, query, gallery)
        row = labelled_row(metrics, splits.ks)
        cropped, label = False, name
    complete = bool(getattr(splits, "complete", True))
    notes = list(getattr(splits, "notes", []) or [])
    result.update(metrics=metrics, complete=complete, notes=notes)
    mark = (
        ""
        if complete
        else "  [SUBSET: not comparable with published numbers" + (f"; {'; '.join(notes)}]" if notes else "]")
    )
    result["row"] = f"{label}: {row}  [{describe_settings(settings, cropped)}]{mark}"
    return result
