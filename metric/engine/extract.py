"""Feature extraction: images -> a feature store (multi-scale, flip, sharded).

Input (``INFER.INPUT``) is a list file — one image path per line, relative to the
list's folder, optionally followed by a label that is ignored — or a folder searched
recursively for images. An image's id is its file name without extension (the Kaggle
convention) or, with ``INFER.ID_MODE relpath``, its path relative to the input.

The model, its preprocessing and the combination of views are the
:class:`~metric.engine.predictor.Predictor`'s (the same as evaluation during training):
the longer side becomes ``TEST.IM_SIZE * scale`` for each of ``INFER.SCALES`` (aspect ratio
kept; ``INFER.CENTER_CROP`` crops a centred square), plus horizontal flips with
``INFER.FLIP``; views are combined by ``INFER.MULTISCALE_POOL`` and L2-normalized.

Sharding: ``INFER.TOTAL_NUM N INFER.CUT_NUM k`` extracts the k-th of N contiguous slices
into ``INFER.OUTPUT`` (a shard store, merged by ``tools/merge_features.py``). Under
torchrun each rank extracts slice ``rank + 1`` of ``world_size`` into
``INFER.OUTPUT.shards/`` and rank 0 merges them into ``INFER.OUTPUT``. An existing complete
store made with the same model, input and settings is kept (the run is skipped).

Images that cannot be decoded are reported, listed in the store's ``failed_images`` and
left out.

Query crops (``INFER.BOXES``): ``list`` reads ``path x1 y1 x2 y2`` lines from the list file,
a ``gnd_*.pkl`` path takes each image's box from the ``bbx`` of its query; each image is cut as
PIL's ``Image.crop`` cuts it and scaled as its full image would be (see
:class:`~metric.engine.predictor.Preprocess`). The boxes enter the store's input digest.
"""

import hashlib
import logging
import os
import time

import metric.checkpoint as cp
from metric.config import get_cfg
from metric.datasets.listfile import read_box_list, read_list
from metric.datasets.transforms import box_has_area, decode_image
from metric.engine.memory_estimates import check_extraction_memory
from metric.engine.predictor import Predictor, resolve_weights
from metric.retrieval.groundtruth import read_revisited_gnd
from metric.retrieval.store import (
    check_dtype,
    check_output,
    is_complete_store,
    load_features,
    merge_stores,
    save_features,
    store_lock,
)
from metric.retrieval.topk_merge import shard_rows
from metric.utils import distributed as du
from metric.utils.errors import ConfigError, DataError
from metric.utils.imagefile import DEFAULT_MAX_PIXELS
from metric.utils.io import abspath, mkdirs

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# --- input --------------------------------------------------------------------


def list_images(src, id_mode="stem", boxes=""):
    """``[(id, absolute path)]`` of a list file or an image folder, in a stable order.

    ``boxes`` (``INFER.BOXES``): with ``""`` the result is the list above; otherwise it is
    ``(items, boxes)`` with one ``(x1, y1, x2, y2)`` per item: from the list file's box columns
    (``"list"``) or from the ``bbx`` of the queries of a revisitop ``gnd_*.pkl`` (its path)."""
    if boxes == "list":
        if not os.path.isfile(src):
            raise ConfigError(
                f"INFER.BOXES list needs INFER.INPUT to be a list file of 'path x1 y1 x2 y2' lines: {src}"
            )
        root = os.path.dirname(os.path.abspath(src))
        pairs = read_box_list(src, root)
        items = _with_ids(root, [os.path.relpath(path, root) for path, _ in pairs], src, id_mode)
        return items, [box for _, box in pairs]
    if boxes:
        items = list_images(src, id_mode)
        return items, gnd_boxes(boxes, [image_id for image_id, _ in items])
    if os.path.isdir(src):
        root = os.path.abspath(src)
        rels = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            rels += [
                os.path.relpath(os.path.join(dirpath, f), root)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not rels:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
    elif os.path.isfile(src):
        root = os.path.dirname(os.path.abspath(src))
        # Missing images are not an error here: like unreadable ones they are reported and left out.
        rels = [os.path.relpath(path, root) for path, _ in read_list(src, root, with_labels=False, check_files=False)]
    else:
        raise DataError(f"INFER.INPUT {src!r} is neither a list file nor a folder")
    return _with_ids(root, rels, src, id_mode)


def _with_ids(root, rels, src, id_mode):
    """``[(id, absolute path)]`` of the paths ``rels`` relative to ``root``."""
    items = []
    for rel in rels:
        image_id = os.path.splitext(os.path.basename(rel))[0] if id_mode == "stem" else os.path.splitext(rel)[0]
        items.append((image_id.replace(os.sep, "/"), os.path.join(root, rel)))
    _check_ids(items, src, id_mode)
    return items


def gnd_boxes(gnd_path, ids):
    """The ``bbx`` of each of ``ids`` in the revisitop ground truth ``gnd_path`` (matched to its
    ``qimlist``); an id that is not a query, or a query without a box, is a :class:`DataError`."""
    gt = read_revisited_gnd(gnd_path)
    box_of = dict(zip(gt["qimlist"], (entry.get("bbx") for entry in gt["gnd"])))
    boxes = []
    for image_id in ids:
        if image_id not in box_of:
            raise DataError(
                f"INFER.BOXES {gnd_path}: image {image_id!r} is not one of its {len(box_of)} queries (qimlist); "
                "extract only the query images with this gnd file"
            )
        box = box_of[image_id]
        try:
            box = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not box_has_area(box):
            raise DataError(f"INFER.BOXES {gnd_path}: query {image_id!r} has no usable bbx ({box_of[image_id]!r})")
        boxes.append(box)
    return boxes


def _check_ids(items, src, id_mode):
    seen = {}
    for image_id, path in items:
        if not image_id or any(c.isspace() for c in image_id):
            raise DataError(f"{src}: image {path} gives the id {image_id!r}, which is empty or has white space")
        if image_id in seen:
            first = seen[image_id]
            if os.path.normpath(first) == os.path.normpath(path):
                lines = _lines_naming(src, path)
                where = f"lines {lines[0]} and {lines[1]} both name" if len(lines) > 1 else "names twice"
                raise DataError(f"{src}: {where} the image {path}; remove the repeated line")
            if id_mode == "stem" and os.path.splitext(first)[0] != os.path.splitext(path)[0]:
                hint = " (set INFER.ID_MODE relpath)"
            else:
                hint = " (an id leaves out the file extension: rename or remove one of them)"
            raise DataError(f"{src}: images {first} and {path} have the same id {image_id!r}{hint}")
        seen[image_id] = path


def _lines_naming(list_path, path):
    """Numbers of the lines of the list file ``list_path`` that name the image ``path``."""
    if not os.path.isfile(list_path):
        return []
    root, target, found = os.path.dirname(os.path.abspath(list_path)), os.path.normpath(path), []
    with open(list_path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if parts and os.path.normpath(os.path.join(root, parts[0])) == target:
                found.append(lineno)
    return found


def shard_path(out_dir, cut, total):
    """Where shard ``cut`` of ``total`` goes when a run shards by itself (torchrun, infer.sh)."""
    return os.path.join(f"{out_dir.rstrip(os.sep)}.shards", f"shard_{cut:04d}_of_{total:04d}")


def shard_bounds(count, total, cut):
    """``[start, stop)`` of the ``cut``-th (1-based) of ``total`` contiguous slices: the slice
    sharded search gives rank ``cut - 1`` (:func:`metric.retrieval.topk_merge.shard_rows`)."""
    return shard_rows(count, total, cut - 1)


# --- extraction -----------------------------------------------------------------


def settings_digest(cfg, weights_digest, amp_dtype=None):
    """Digest of what determines the descriptors: model weights and extraction settings (and the
    CUDA autocast dtype ``amp_dtype`` of ``INFER.MIXED_PRECISION``, when one is used)."""
    h = hashlib.sha256()
    parts = (
        weights_digest,
        cfg.MODEL.dump(),
        cfg.TEST.IM_SIZE,
        list(cfg.INFER.SCALES),
        cfg.INFER.FLIP,
        cfg.INFER.MULTISCALE_POOL,
        cfg.INFER.MULTISCALE_P,
        cfg.INFER.CENTER_CROP,
    ) + ((cfg.INFER.CROP_FRACTION,) if cfg.INFER.CROP_FRACTION != 1.0 else ())
    parts += (str(amp_dtype),) if amp_dtype is not None else ()
    for part in parts + _superglobal_settings(cfg):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _superglobal_settings(cfg):
    """``(INFER.POOL_P, Regional-GeM p, size)`` when SuperGlobal pooling is on, else ``()`` (so
    digests of stores extracted without it do not change)."""
    i = cfg.INFER
    if i.POOL_P <= 0 and not i.REGIONAL_GEM:
        return ()
    return (
        float(i.POOL_P),
        float(i.REGIONAL_GEM_P) if i.REGIONAL_GEM else 0.0,
        int(i.REGIONAL_GEM_SIZE) if i.REGIONAL_GEM else 0,
    )


def superglobal_meta(cfg):
    """SuperGlobal pooling as a store's meta (and a benchmark row) records it:
    ``{pool_p, regional_gem_p, regional_gem_size}``, or ``None`` when it is off."""
    values = _superglobal_settings(cfg)
    return dict(zip(("pool_p", "regional_gem_p", "regional_gem_size"), values)) if values else None


def _input_digest(items, boxes=None):
    h = hashlib.sha256()
    for image_id, path in items:
        h.update(f"{image_id}\t{path}\n".encode())
    if boxes is not None:  # crops change the descriptors (stores without boxes keep their digest)
        for box in boxes:
            h.update(f"box {tuple(float(v) for v in box)!r}\n".encode())
    return h.hexdigest()[:16]


def readable_now(paths, max_pixels=DEFAULT_MAX_PIXELS):
    """The images of ``paths`` (a store's ``failed_images``) that decode now: replaced since."""
    return [p for p in paths if decode_image(p, max_pixels) is not None]


def _existing_matches(path, meta, dtype="float32", max_pixels=DEFAULT_MAX_PIXELS):
    """Whether the store at ``path`` is complete and was made from the same model, input and
    settings (and stored as ``dtype``), with no image it lists as unreadable readable now (else
    it is extracted again)."""
    if not is_complete_store(path):
        return False
    old = load_features(path).meta
    if not all(old.get(k) == v for k, v in meta.items() if k != "failed_images"):
        return False
    if old.get("dtype", "float32") != dtype:
        return False
    readable = readable_now(old.get("failed_images") or [], max_pixels)
    if readable:
        logger.info(
            "%s lists %d unreadable images that are readable now (e.g. %s): extracting it again",
            path,
            len(readable),
            readable[0],
        )
        return False
    return True


def extraction_meta(cfg, items, shard, predictor, boxes=None):
    """What :func:`extract_shard` records in the store's ``meta.json`` (before ``failed_images``):
    the settings digest, the extraction settings and the input digest; a store whose meta holds
    the same values was extracted from the same input with the same model and settings."""
    digest = settings_digest(cfg, cp.weights_digest(predictor.model), predictor.amp_dtype)
    meta = {
        "model_digest": digest,
        "weights": resolve_weights(cfg),  # "best" as the file it names
        "scales": [float(s) for s in cfg.INFER.SCALES],
        "flip": bool(cfg.INFER.FLIP),
        "multiscale_pool": cfg.INFER.MULTISCALE_POOL,
        **({"superglobal": sg} if (sg := superglobal_meta(cfg)) else {}),
        "im_size": cfg.TEST.IM_SIZE,
        "input_digest": _input_digest(items, boxes),
        "shard": shard,
    }
    if predictor.amp_dtype is not None:  # CUDA autocast (INFER.MIXED_PRECISION): other descriptors
        meta["mixed_precision"] = str(predictor.amp_dtype).replace("torch.", "")
    if cfg.INFER.CENTER_CROP:  # only when set, so stores written before these keys still match
        meta["center_crop"] = True
        if cfg.INFER.CROP_FRACTION != 1.0:
            meta["crop_fraction"] = float(cfg.INFER.CROP_FRACTION)
    if cfg.INFER.MULTISCALE_P != get_cfg().INFER.MULTISCALE_P:  # likewise: only when not the default
        meta["multiscale_p"] = float(cfg.INFER.MULTISCALE_P)
    if boxes is not None:
        meta["boxes"] = cfg.INFER.BOXES or "given"
    return meta


def extract_shard(cfg, items, out_dir, shard, predictor, progress=True, dtype="float32", boxes=None):
    """Extract ``items`` (one shard) into the store ``out_dir`` with ``predictor``; returns its path.
    ``dtype`` is the precision of the store ("float32" or "float16"); ``boxes``: ``None`` or one
    ``(x1, y1, x2, y2)`` per item, the crop of each image (see :func:`list_images`)."""
    meta = extraction_meta(cfg, items, shard, predictor, boxes)
    if _existing_matches(out_dir, meta, dtype, cfg.DATA_LOADER.MAX_IMAGE_PIXELS):
        logger.info("%s is already complete for this model, input and settings: skipped", out_dir)
        return out_dir
    mkdirs(os.path.dirname(abspath(out_dir)), "feature store")  # through the path manager
    check_output(out_dir)  # fail before the work, not after it
    loader = predictor.loader(
        [p for _, p in items],
        max(1, cfg.TEST.BATCH_SIZE // du.world_size()),
        cfg.DATA_LOADER.NUM_WORKERS,
        boxes=boxes,
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", desc=f"extract {shard['index']}/{shard['total']}", dynamic_ncols=True)
    t0 = time.time()
    try:
        emb, ok, failed = predictor.run(loader, bar)
    finally:
        if bar is not None:
            bar.close()
    for i in failed:
        why = predictor.failure_reasons.get(i)
        logger.warning("cannot decode image %s%s: left out of %s", items[i][1], f" (it {why})" if why else "", out_dir)
    meta["failed_images"] = [items[i][1] for i in failed]
    save_features(out_dir, emb, [items[i][0] for i in ok], meta=meta, normalize=len(ok) > 0, dtype=dtype)
    logger.info("extracted %d images (%d unreadable) into %s in %.1fs", len(ok), len(failed), out_dir, time.time() - t0)
    return out_dir


def extract_features(cfg, progress=True, dtype="float32"):
    """What ``tools/extract_features.py`` runs; returns the path of the store written.

    ``INFER.OUTPUT`` is locked for the whole run (``<INFER.OUTPUT>.lock``, see
    :func:`metric.retrieval.store.store_lock`) by the process that writes it: the only one, or
    rank 0 under torchrun (before it joins the process group); a second run on the same store
    stops with one line naming the first one's pid."""
    if not cfg.INFER.INPUT or not cfg.INFER.OUTPUT:
        raise ConfigError("set INFER.INPUT (a list file or an image folder) and INFER.OUTPUT (the store folder)")
    dtype = check_dtype(dtype)
    if int(os.environ.get("RANK", "0")) != 0:
        return _extract(cfg, progress, dtype)
    mkdirs(os.path.dirname(abspath(cfg.INFER.OUTPUT).rstrip("/")), "feature store")
    with store_lock(cfg.INFER.OUTPUT, fix="choose another INFER.OUTPUT"):
        return _extract(cfg, progress, dtype)


def _extract(cfg, progress, dtype="float32"):
    info = du.init_process(cfg)
    logger.info("%d CPU thread(s) per process (NUM_THREADS)", du.set_num_threads(cfg.NUM_THREADS))
    done = False
    try:
        if cfg.INFER.BOXES:
            items, boxes = list_images(cfg.INFER.INPUT, cfg.INFER.ID_MODE, cfg.INFER.BOXES)
        else:
            items, boxes = list_images(cfg.INFER.INPUT, cfg.INFER.ID_MODE), None
        check_extraction_memory(cfg, info.device, info.world_size)  # an estimate: refuse what cannot fit
        predictor = Predictor.from_cfg(cfg, device=info.device, missing_weights="warn")
        if info.distributed:
            if cfg.INFER.TOTAL_NUM > 1:
                raise ConfigError("INFER.TOTAL_NUM > 1 together with torchrun: use one or the other for sharding")
            total, cut = info.world_size, info.rank + 1
            out_dir = shard_path(cfg.INFER.OUTPUT, cut, total)
        else:
            total, cut, out_dir = cfg.INFER.TOTAL_NUM, cfg.INFER.CUT_NUM, cfg.INFER.OUTPUT
        start, stop = shard_bounds(len(items), total, cut)
        logger.info(
            "extracting images %d..%d of %d (shard %d of %d) on %s", start, stop, len(items), cut, total, info.device
        )
        extract_shard(
            cfg,
            items[start:stop],
            out_dir,
            {"index": cut, "total": total},
            predictor,
            progress=progress and info.is_master,
            dtype=dtype,
            boxes=None if boxes is None else boxes[start:stop],
        )
        du.barrier()
        if info.distributed:
            if info.is_master:
                merge_stores([shard_path(cfg.INFER.OUTPUT, k, total) for k in range(1, total + 1)], cfg.INFER.OUTPUT)
                logger.info("merged %d shards into %s", total, cfg.INFER.OUTPUT)
            du.barrier()
        done = True
        return cfg.INFER.OUTPUT
    finally:
        du.cleanup(wait=done)
