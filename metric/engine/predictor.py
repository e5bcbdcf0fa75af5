"""The predictor: config + weights -> an eval-mode model on a device, with its preprocessing.

One predictor serves every place that runs a trained model on images: evaluation during
training and by ``tools/test_metric.py``, feature extraction, ONNX/TensorFlow export, the Kaggle
model and the notebook API. So the recall@k logged while training is measured with exactly the
pipeline that is deployed.

Preprocessing (:class:`Preprocess`, from ``TEST.IM_SIZE``, ``INFER.SCALES``,
``INFER.CENTER_CROP``): for each scale ``s`` the image keeps its aspect ratio and its longer side
becomes ``TEST.IM_SIZE * s`` (with ``INFER.CENTER_CROP``: the shorter side becomes that size and
the centred square of that side is cut out). Each view, and its horizontal flip with
``INFER.FLIP``, gives an L2-normalized descriptor; the views are combined by
``INFER.MULTISCALE_POOL`` (``mean``, or ``gem``: the signed power mean with
``p = INFER.MULTISCALE_P``) and L2-normalized again.
"""

import logging
import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from metric.checkpoint import best_checkpoint_path, load_inference_weights, unwrap
from metric.datasets.transforms import center_crop, crop_box, resize_longer, resize_shorter, to_tensor
from metric.modeling import build_model
from metric.modeling.layers.superglobal_pooling import apply_superglobal_pooling
from metric.utils import io
from metric.utils.errors import CheckpointError, ConfigError
from metric.utils.imagefile import DEFAULT_MAX_PIXELS, load_image

logger = logging.getLogger(__name__)


def autocast_dtype(mode, device, key="INFER.MIXED_PRECISION"):
    """The autocast dtype of a ``*.MIXED_PRECISION`` setting (``none`` | ``fp16`` | ``bf16``) on
    ``device``, or ``None`` (float32). Mixed precision is used on CUDA only."""
    if mode == "none":
        return None
    if torch.device(device).type != "cuda":
        logger.info("%s %s ignored: mixed precision is used on CUDA only", key, mode)
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


class Preprocess:
    """Test-time preprocessing of a decoded RGB uint8 image into one normalized view per scale."""

    def __init__(self, size, scales=(1.0,), crop=False, crop_fraction=1.0):
        self.size, self.scales, self.crop = int(size), [float(s) for s in scales], bool(crop)
        self.crop_fraction = float(crop_fraction)

    @classmethod
    def from_cfg(cls, cfg):
        return cls(cfg.TEST.IM_SIZE, cfg.INFER.SCALES, cfg.INFER.CENTER_CROP, cfg.INFER.CROP_FRACTION)

    def __call__(self, im, full_side=None):
        """The views of ``im``. ``full_side``: for a crop (a query cropped to its box,
        ``INFER.BOXES``), the longer side of the full image it was cut from; each view is then
        scaled by the factor the full image would get (the crop's longer side becomes
        ``floor(floor(TEST.IM_SIZE × max(crop side) / full_side) × s)``, cirtorch's rule for the
        revisited Oxford/Paris queries), not blown up to the full target size."""
        views = []
        # a crop's longer side at scale 1: floor(TEST.IM_SIZE × crop side / full side), computed in
        # cirtorch's order and floored as PIL's thumbnail floors it; each scale then floors again,
        # as resizing by a scale factor does (cirtorch's multi-scale extraction)
        base = None if full_side is None else math.floor(self.size * max(im.shape[:2]) / float(full_side))
        for s in self.scales:
            target = max(8, int(round(self.size * s)) if base is None else math.floor(base * s))
            if self.crop:
                shorter = max(target, int(round(target / self.crop_fraction)))
                views.append(to_tensor(center_crop(resize_shorter(im, shorter), target)))
            else:
                views.append(to_tensor(resize_longer(im, target)))
        return views


class ImageViews(Dataset):
    """``(views, index, failed)`` of image files: the :class:`Preprocess` views of image ``i``
    (``None`` and ``failed`` the reason, a non-empty string, when it cannot be used; ``""``
    otherwise). ``index`` is the position in ``paths``, so shards of one list can be run
    separately and put back together. ``max_pixels``: see :func:`~metric.utils.imagefile.load_image`.
    ``boxes``: ``None``, or one ``(x1, y1, x2, y2)`` (or ``None``) per path: the image, decoded
    without its EXIF orientation applied (the frame of the box, as PIL reads it), is cropped to
    it as PIL does (:func:`~metric.datasets.transforms.crop_box`) and scaled as its full image
    would be (:class:`Preprocess` ``full_side``)."""

    def __init__(self, paths, preprocess, max_pixels=DEFAULT_MAX_PIXELS, boxes=None):
        self.paths, self.preprocess, self.max_pixels = list(paths), preprocess, max_pixels
        self.boxes = None if boxes is None else list(boxes)
        if self.boxes is not None and len(self.boxes) != len(self.paths):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.paths)} images")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        box = None if self.boxes is None else self.boxes[i]
        # a box is in the pixels as stored (PIL's frame, as the reference loaders crop): no EXIF turn then
        im, note = load_image(self.paths[i], self.max_pixels, exif_orientation=box is None)
        if im is None:
            return None, i, note
        if note:
            logger.info("image %s: %s", self.paths[i], note)
        if box is None:
            return self.preprocess(im), i, ""
        full_side = max(im.shape[:2])
        try:
            crop = crop_box(im, box)
        except ValueError as err:
            return None, i, f"cannot be cropped ({err})"
        return self.preprocess(crop, full_side), i, ""


def _collate(batch):
    return batch


def combine_views(descriptors, pool="gem", p=3.0):
    """Combine L2-normalized view descriptors ``[V, N, D]`` into L2-normalized ``[N, D]``.

    ``pool``: ``gem`` (signed power mean), ``mean``, ``max`` (SuperGlobal Scale-GeM, p = inf) or
    ``sgem`` (Scale-GeM with finite ``p``, shifted by each image's smallest value; see
    :mod:`metric.modeling.layers.superglobal_pooling`)."""
    if pool == "mean" or len(descriptors) == 1:
        out = descriptors.mean(0)
    elif pool == "max":
        out = descriptors.amax(0)
    elif pool == "sgem":
        low = descriptors.amin(dim=(0, 2), keepdim=True)  # [1, N, 1]: the image's smallest value
        out = (descriptors - low).pow(p).mean(0).pow(1.0 / p) + low[0]
    else:
        m = (descriptors.sign() * descriptors.abs().pow(p)).mean(0)
        out = m.sign() * m.abs().pow(1.0 / p)
    return F.normalize(out, dim=1)


class Predictor:
    """A model in eval mode on ``device`` with its preprocessing and descriptor settings.

    Build it from a config with :meth:`from_cfg` (inference) or around a model being trained with
    :meth:`from_cfg` ``(cfg, model=...)``. :meth:`run` is the one loop that runs a model over
    images; :meth:`describe` runs it on decoded images in memory.
    """

    def __init__(
        self,
        model,
        device=None,
        preprocess=None,
        flip=False,
        pool="gem",
        p=3.0,
        amp_dtype=None,
        channels_last=False,
        max_pixels=DEFAULT_MAX_PIXELS,
    ):
        self.model = model
        self.max_pixels = max_pixels  # DATA_LOADER.MAX_IMAGE_PIXELS: larger images are not decoded
        self.failure_reasons = {}  # index -> why, of the images the last run() could not use
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.preprocess = preprocess or Preprocess(224)
        self.flip, self.pool, self.p = bool(flip), pool, float(p)
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    @classmethod
    def from_cfg(
        cls, cfg, weights=None, device=None, model=None, missing_weights="warn", amp_mode=None, channels_last=False
    ):
        """The predictor of ``cfg``.

        Without ``model``, the model of ``cfg`` is built with the torch RNG seeded by ``RNG_SEED``
        (so random weights equal a training run's initial weights; the caller's RNG state is left
        untouched), ``weights`` (default ``TEST.WEIGHTS``) are loaded with every key outside the
        training-only classifier required to fit, and it is moved to ``device`` (default: CUDA if
        available) in eval mode. With no weights, ``missing_weights`` says what happens:
        ``"error"`` raises :class:`ConfigError`, ``"warn"`` logs a warning, ``"ok"`` logs at info.
        """
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        if model is None:
            model = build_inference_model(cfg, weights, missing_weights).to(device).eval()
        mode = cfg.INFER.MIXED_PRECISION if amp_mode is None else amp_mode
        return cls(
            model,
            device,
            Preprocess.from_cfg(cfg),
            cfg.INFER.FLIP,
            cfg.INFER.MULTISCALE_POOL,
            cfg.INFER.MULTISCALE_P,
            autocast_dtype(mode, device),
            channels_last,
            cfg.DATA_LOADER.MAX_IMAGE_PIXELS,
        )

    @property
    def embedding_dim(self):
        return unwrap(self.model).embedding_dim

    def loader(self, paths, batch_size, num_workers=0, indices=None, boxes=None):
        """A loader of :class:`ImageViews` over ``paths`` (only ``indices`` of them, if given;
        cropped to ``boxes``, one per path, if given)."""
        dataset = ImageViews(paths, self.preprocess, self.max_pixels, boxes)
        return DataLoader(
            dataset,
            batch_size=max(1, batch_size),
            sampler=indices,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=False,
            generator=torch.Generator().manual_seed(0),
        )

    @torch.no_grad()
    def run(self, loader, progress=None):
        """Descriptors of every image of an :class:`ImageViews` loader.

        Returns ``(embeddings [n_ok, D] float32, ok_indices, failed_indices)``; why each failed
        image could not be used is in :attr:`failure_reasons` afterwards. Within a batch, views of
        equal shape are forwarded together. The model's train/eval mode is restored.
        """
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        out_rows, ok, failed = [], [], []
        self.failure_reasons = {}
        try:
            for batch in loader:
                good = [(views, i) for views, i, bad in batch if not bad]
                failed += [i for _, i, bad in batch if bad]
                self.failure_reasons.update((i, bad) for _, i, bad in batch if isinstance(bad, str) and bad)
                if good:
                    out_rows.append(self._describe_batch(model, [views for views, _ in good]))
                    ok += [i for _, i in good]
                if progress is not None:
                    progress.update(len(batch))
        finally:
            model.train(was_training)
        emb = torch.cat(out_rows).numpy() if out_rows else np.zeros((0, self.embedding_dim), np.float32)
        return emb, ok, failed

    def _forward(self, model, x):
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            return F.normalize(model(x).float(), dim=1)

    def _describe_batch(self, model, views_per_image):
        """L2-normalized combined descriptors [N, D] (CPU) of N images' view lists."""
        per_view = []
        for v in range(len(views_per_image[0])):
            desc = [None] * len(views_per_image)
            groups = defaultdict(list)
            for j, views in enumerate(views_per_image):
                groups[tuple(views[v].shape)].append(j)
            for members in groups.values():
                x = torch.stack([views_per_image[j][v] for j in members])
                e = self._forward(model, x)
                e_flip = self._forward(model, torch.flip(x, dims=[3])) if self.flip else None
                for row, j in enumerate(members):
                    desc[j] = (e[row], e_flip[row]) if self.flip else (e[row],)
            for k in range(len(desc[0])):
                per_view.append(torch.stack([d[k] for d in desc]))
        return combine_views(torch.stack(per_view), self.pool, self.p).cpu()

    def describe(self, images):
        """L2-normalized descriptors [N, D] of decoded RGB uint8 images, exactly as extraction
        computes them (used to check exported models against PyTorch)."""
        batch = [(self.preprocess(im), i, False) for i, im in enumerate(images)]
        emb, _, _ = self.run([batch])
        return emb


def resolve_weights(cfg, weights=None):
    """The weights file of ``weights`` (default ``TEST.WEIGHTS``): ``best`` is the best checkpoint
    of the training run in ``OUT_DIR`` (``OUT_DIR/checkpoints/best.pyth``, see
    ``TRAIN.BEST_METRIC``); anything else is returned as it is."""
    weights = cfg.TEST.WEIGHTS if weights is None else weights
    if weights != "best":
        return weights
    path = best_checkpoint_path(cfg.OUT_DIR)
    if not io.isfile(path):
        raise CheckpointError(
            f"TEST.WEIGHTS best: there is no best checkpoint {path} (it is written by training "
            "with TRAIN.BEST_METRIC set; set OUT_DIR to that run's folder)"
        )
    return path


def build_inference_model(cfg, weights=None, missing_weights="warn"):
    """The model of ``cfg`` (random weights seeded by ``RNG_SEED``, without touching the caller's
    RNG) with ``weights`` (default ``TEST.WEIGHTS``; ``best``: :func:`resolve_weights`) loaded to
    fit exactly except for the classifier, the EMA or raw weights of a checkpoint as
    ``TEST.WEIGHTS_KIND`` says; in eval mode on the CPU, with SuperGlobal's GeM+ / Regional-GeM
    when ``INFER.POOL_P`` / ``INFER.REGIONAL_GEM`` ask for them (:mod:`metric.modeling.layers.superglobal_pooling`).
    See :meth:`Predictor.from_cfg` for ``missing_weights``."""
    weights = resolve_weights(cfg, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.RNG_SEED)
        model = build_model(cfg)
    if weights:
        load_inference_weights(model, weights, kind=cfg.TEST.WEIGHTS_KIND)
    elif missing_weights == "error":
        raise ConfigError("TEST.WEIGHTS is empty: give the trained weights, e.g. TEST.WEIGHTS model.pyth")
    elif missing_weights == "warn":
        logger.warning("TEST.WEIGHTS is empty: using randomly initialized weights")
    else:
        logger.info("no weights given: using randomly initialized weights (seeded by RNG_SEED)")
    i = cfg.INFER  # INFER.POOL_P / INFER.REGIONAL_GEM (after the weights)
    apply_superglobal_pooling(model, i.POOL_P, i.REGIONAL_GEM, i.REGIONAL_GEM_P, i.REGIONAL_GEM_SIZE)
    return model.eval()
