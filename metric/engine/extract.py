"""Feature extraction: images -> a feature store (multi-scale, flip, sharded).

Input (``INFER.INPUT``) is a list file — one image path per line, relative to the
list's folder, optionally followed by a label that is ignored — or a folder searched
recursively for images. An image's id is its file name without extension (the Kaggle
convention) or, with ``INFER.ID_MODE relpath``, its path relative to the input.

Preprocessing keeps the aspect ratio: the longer side becomes ``TEST.IM_SIZE * scale``
for each of ``INFER.SCALES`` (no center crop unless ``INFER.CENTER_CROP``). Each view
(scale, and its horizontal flip with ``INFER.FLIP``) gives an L2-normalized descriptor;
views are combined by ``INFER.MULTISCALE_POOL`` — ``mean``, or ``gem``, the signed power
mean ``sgn(m)|m|^(1/p)`` of ``m = mean(sgn(v)|v|^p)`` with ``p = INFER.MULTISCALE_P`` —
and L2-normalized again.

Sharding: ``INFER.TOTAL_NUM N INFER.CUT_NUM k`` extracts the k-th of N contiguous slices
into ``INFER.OUTPUT`` (a shard store, merged by ``tools/merge_features.py``). Under
torchrun each rank extracts slice ``rank + 1`` of ``world_size`` into
``INFER.OUTPUT.shards/`` and rank 0 merges them into ``INFER.OUTPUT``. An existing complete
store made with the same model, input and settings is kept (the run is skipped).

Images that cannot be decoded are reported, listed in the store's ``failed_images`` and
left out.
"""

import hashlib
import logging
import os
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import metric.checkpoint as cp
from metric.utils import distributed as du
from metric.utils.errors import ConfigError, DataError
from metric.datasets.listfile import read_list
from metric.datasets.transforms import center_crop, decode_image, resize_longer, resize_shorter, to_tensor
from metric.modeling import build_model
from metric.retrieval.store import check_output, is_complete_store, load_features, merge_stores, save_features

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# --- input --------------------------------------------------------------------

def list_images(src, id_mode="stem"):
    """``[(id, absolute path)]`` of a list file or an image folder, in a stable order."""
    if os.path.isdir(src):
        root = os.path.abspath(src)
        rels = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not rels:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
    elif os.path.isfile(src):
        root = os.path.dirname(os.path.abspath(src))
        # Missing images are not an error here: like unreadable ones they are reported and left out.
        rels = [os.path.relpath(path, root) for path, _ in read_list(src, root, with_labels=False, check_files=False)]
    else:
        raise DataError(f"INFER.INPUT {src!r} is neither a list file nor a folder")
    items = []
    for rel in rels:
        image_id = os.path.splitext(os.path.basename(rel))[0] if id_mode == "stem" else os.path.splitext(rel)[0]
        items.append((image_id.replace(os.sep, "/"), os.path.join(root, rel)))
    _check_ids(items, src, id_mode)
    return items


def _check_ids(items, src, id_mode):
    seen = {}
    for image_id, path in items:
        if not image_id or any(c.isspace() for c in image_id):
            raise DataError(f"{src}: image {path} gives the id {image_id!r}, which is empty or has white space")
        if image_id in seen:
            hint = " (set INFER.ID_MODE relpath)" if id_mode == "stem" else ""
            raise DataError(f"{src}: images {seen[image_id]} and {path} have the same id {image_id!r}{hint}")
        seen[image_id] = path


def shard_path(out_dir, cut, total):
    """Where shard ``cut`` of ``total`` goes when a run shards by itself (torchrun, infer.sh)."""
    return os.path.join(f"{out_dir.rstrip(os.sep)}.shards", f"shard_{cut:04d}_of_{total:04d}")


def shard_bounds(count, total, cut):
    """``[start, stop)`` of the ``cut``-th (1-based) of ``total`` contiguous slices."""
    per = -(-count // total)
    return min(count, (cut - 1) * per), min(count, cut * per)


# --- preprocessing --------------------------------------------------------------

class MultiScaleDataset(Dataset):
    """``(views, index, failed)``: one normalized tensor per scale, longer side ``size * scale``."""

    def __init__(self, paths, size, scales, center_crop=False):
        self.paths, self.size, self.scales, self.center_crop = paths, size, list(scales), center_crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        im = decode_image(self.paths[i])
        if im is None:
            return None, i, True
        return image_views(im, self.size, self.scales, self.center_crop), i, False


def image_views(im, size, scales=(1.0,), crop=False):
    """The normalized input tensors of an RGB uint8 image, one per scale: longer side
    ``size * scale`` (aspect ratio kept), or with ``crop`` a centered square of that side."""
    views = []
    for s in scales:
        target = max(8, int(round(size * s)))
        if crop:
            views.append(to_tensor(center_crop(resize_shorter(im, target), target)))
        else:
            views.append(to_tensor(resize_longer(im, target)))
    return views


def describe_images(model, images, size, scales=(1.0,), flip=False, pool="gem", p=3.0, crop=False):
    """L2-normalized descriptors [N, D] of decoded RGB images, exactly as the extraction tool
    computes them (used to check exported models against it)."""
    batch = [(image_views(im, size, scales, crop), i, False) for i, im in enumerate(images)]
    emb, _, _ = extract_descriptors(model, [batch], torch.device("cpu"), flip, pool, p)
    return emb


def _collate(batch):
    return batch


def combine_views(descriptors, pool="gem", p=3.0):
    """Combine L2-normalized view descriptors ``[V, N, D]`` into L2-normalized ``[N, D]``."""
    if pool == "mean" or len(descriptors) == 1:
        out = descriptors.mean(0)
    else:
        m = (descriptors.sign() * descriptors.abs().pow(p)).mean(0)
        out = m.sign() * m.abs().pow(1.0 / p)
    return F.normalize(out, dim=1)


# --- extraction -----------------------------------------------------------------

@torch.no_grad()
def extract_descriptors(model, loader, device, flip=False, pool="gem", p=3.0, amp_dtype=None, progress=None):
    """Run ``model`` over a :class:`MultiScaleDataset` loader.

    Returns ``(embeddings [n_ok, D] float32, ok_indices, failed_indices)``. Within a batch,
    views of equal shape are forwarded together (images of one aspect ratio batch fully).
    """
    model.eval()
    out_rows, ok, failed = [], [], []
    for batch in loader:
        good = [(views, i) for views, i, bad in batch if not bad]
        failed += [i for _, i, bad in batch if bad]
        if good:
            n_views = len(good[0][0])
            per_view = []
            for v in range(n_views):
                desc = [None] * len(good)
                groups = defaultdict(list)
                for j, (views, _) in enumerate(good):
                    groups[tuple(views[v].shape)].append(j)
                for members in groups.values():
                    x = torch.stack([good[j][0][v] for j in members]).to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        e = F.normalize(model(x).float(), dim=1)
                        if flip:
                            e_flip = F.normalize(model(torch.flip(x, dims=[3])).float(), dim=1)
                    for row, j in enumerate(members):
                        desc[j] = (e[row], e_flip[row]) if flip else (e[row],)
                for k in range(len(desc[0])):
                    per_view.append(torch.stack([d[k] for d in desc]))
            out_rows.append(combine_views(torch.stack(per_view), pool, p).cpu())
            ok += [i for _, i in good]
        if progress is not None:
            progress.update(len(batch))
    dim = out_rows[0].shape[1] if out_rows else 0
    emb = torch.cat(out_rows).numpy() if out_rows else np.zeros((0, dim), np.float32)
    return emb, ok, failed


def settings_digest(cfg, weights_digest):
    """Digest of what determines the descriptors: model weights and extraction settings."""
    h = hashlib.sha256()
    for part in (weights_digest, cfg.MODEL.dump(), cfg.TEST.IM_SIZE, list(cfg.INFER.SCALES), cfg.INFER.FLIP,
                 cfg.INFER.MULTISCALE_POOL, cfg.INFER.MULTISCALE_P, cfg.INFER.CENTER_CROP):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _input_digest(items):
    h = hashlib.sha256()
    for image_id, path in items:
        h.update(f"{image_id}\t{path}\n".encode())
    return h.hexdigest()[:16]


def _amp(cfg, device):
    mode = cfg.INFER.MIXED_PRECISION
    if mode == "none" or device.type != "cuda":
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _model_for(cfg, device):
    torch.manual_seed(cfg.RNG_SEED)
    model = build_model(cfg)
    if cfg.TEST.WEIGHTS:
        cp.load_inference_weights(model, cfg.TEST.WEIGHTS)
    else:
        logger.warning("TEST.WEIGHTS is empty: extracting with randomly initialized weights")
    return model.to(device).eval()


def _existing_matches(path, meta):
    if not is_complete_store(path):
        return False
    old = load_features(path).meta
    return all(old.get(k) == v for k, v in meta.items() if k != "failed_images")


def extract_shard(cfg, items, out_dir, shard, model, device, progress=True):
    """Extract ``items`` (one shard) into the store ``out_dir``; returns its path."""
    digest = settings_digest(cfg, cp.weights_digest(model))
    meta = {
        "model_digest": digest,
        "weights": cfg.TEST.WEIGHTS,
        "scales": [float(s) for s in cfg.INFER.SCALES],
        "flip": bool(cfg.INFER.FLIP),
        "multiscale_pool": cfg.INFER.MULTISCALE_POOL,
        "im_size": cfg.TEST.IM_SIZE,
        "input_digest": _input_digest(items),
        "shard": shard,
    }
    if _existing_matches(out_dir, meta):
        logger.info("%s is already complete for this model, input and settings: skipped", out_dir)
        return out_dir
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    check_output(out_dir)  # fail before the work, not after it
    dataset = MultiScaleDataset([p for _, p in items], cfg.TEST.IM_SIZE, cfg.INFER.SCALES, cfg.INFER.CENTER_CROP)
    batch = max(1, cfg.TEST.BATCH_SIZE // du.world_size())
    loader = DataLoader(dataset, batch_size=batch, num_workers=cfg.DATA_LOADER.NUM_WORKERS, collate_fn=_collate,
                        pin_memory=False, generator=torch.Generator().manual_seed(0))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="img", desc=f"extract {shard['index']}/{shard['total']}", dynamic_ncols=True)
    t0 = time.time()
    try:
        emb, ok, failed = extract_descriptors(model, loader, device, cfg.INFER.FLIP, cfg.INFER.MULTISCALE_POOL,
                                              cfg.INFER.MULTISCALE_P, _amp(cfg, device), bar)
    finally:
        if bar is not None:
            bar.close()
    for i in failed:
        logger.warning("cannot decode image %s: left out of %s", items[i][1], out_dir)
    meta["failed_images"] = [items[i][1] for i in failed]
    if not ok:
        dim = cp.unwrap(model).embedding_dim
        emb = np.zeros((0, dim), np.float32)
    save_features(out_dir, emb, [items[i][0] for i in ok], meta=meta, normalize=len(ok) > 0)
    logger.info("extracted %d images (%d unreadable) into %s in %.1fs", len(ok), len(failed), out_dir,
                time.time() - t0)
    return out_dir


def extract_features(cfg, progress=True):
    """What ``tools/extract_features.py`` runs; returns the path of the store written."""
    if not cfg.INFER.INPUT or not cfg.INFER.OUTPUT:
        raise ConfigError("set INFER.INPUT (a list file or an image folder) and INFER.OUTPUT (the store folder)")
    info = du.init_process(cfg)
    done = False
    try:
        items = list_images(cfg.INFER.INPUT, cfg.INFER.ID_MODE)
        model = _model_for(cfg, info.device)
        if info.distributed:
            if cfg.INFER.TOTAL_NUM > 1:
                raise ConfigError("INFER.TOTAL_NUM > 1 together with torchrun: use one or the other for sharding")
            total, cut = info.world_size, info.rank + 1
            out_dir = shard_path(cfg.INFER.OUTPUT, cut, total)
        else:
            total, cut, out_dir = cfg.INFER.TOTAL_NUM, cfg.INFER.CUT_NUM, cfg.INFER.OUTPUT
        start, stop = shard_bounds(len(items), total, cut)
        logger.info("extracting images %d..%d of %d (shard %d of %d) on %s", start, stop, len(items), cut, total,
                    info.device)
        extract_shard(cfg, items[start:stop], out_dir, {"index": cut, "total": total}, model, info.device,
                      progress=progress and info.is_master)
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
