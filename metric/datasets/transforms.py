"""Image decoding and transforms with OpenCV and numpy.

Images are decoded to RGB ``uint8`` [H, W, 3]; :func:`to_tensor` normalizes with
the ImageNet mean/std and returns float32 CHW. Random transforms take an explicit
``numpy.random.Generator`` so that a sample's augmentation depends only on
(seed, epoch, index), not on worker count or order.
"""

import logging
import math

import cv2
import numpy as np
import torch

from metric.utils.imagefile import DEFAULT_MAX_PIXELS, load_image

logger = logging.getLogger(__name__)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

cv2.setNumThreads(1)


def decode_image(path, max_pixels=DEFAULT_MAX_PIXELS):
    """RGB uint8 [H, W, 3], or ``None`` if the file cannot be read (missing, no permission),
    holds more than ``max_pixels`` pixels by its header (0: no limit) or cannot be decoded.
    :func:`metric.utils.imagefile.load_image` also says why; here what the image library says
    about a file it could decode is logged (info) with the file's name."""
    im, note = load_image(path, max_pixels)
    if im is not None and note:
        logger.info("image %s: %s", path if isinstance(path, str) else "(in memory)", note)
    return im


def random_resized_crop(im, size, rng, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop of area ``scale`` and aspect ``ratio`` of the image, resized to ``size``²."""
    h, w = im.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return cv2.resize(im[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_LINEAR)
    return center_crop(resize_shorter(im, size), size)


def color_jitter(im, strength, rng):
    """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s]."""
    if strength <= 0:
        return im
    x = im.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = x * b
    mean = float((x @ luma).mean())
    x = (x - mean) * c + mean
    gray = (x @ luma)[..., None]
    x = (x - gray) * s + gray
    return np.clip(x, 0, 255).astype(np.uint8)


def _resize_side(im, size, side):
    """Scale ``im`` (aspect ratio kept) so that ``side(h, w)`` becomes ``size``."""
    h, w = im.shape[:2]
    if side(h, w) == size:
        return im
    scale = size / side(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(im, (nw, nh), interpolation=interp)


def resize_shorter(im, size):
    """Keep the aspect ratio; the shorter side becomes ``size``."""
    return _resize_side(im, size, min)


def resize_longer(im, size):
    """Keep the aspect ratio; the longer side becomes ``size``."""
    return _resize_side(im, size, max)


def center_crop(im, size):
    h, w = im.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return im[y : y + size, x : x + size]


def pil_box(box):
    """The integer pixel box ``(x0, y0, x1, y1)`` that PIL's ``Image.crop`` cuts for the float
    ``box`` (each coordinate rounded by Python's ``round``, halves to even; the right and lower
    edges excluded): how revisitop and cirtorch crop the revisited Oxford/Paris queries to their
    ``bbx``."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return x0, y0, x1, y1


def box_has_area(box):
    """Whether the pixel box PIL cuts for ``box`` (:func:`pil_box`) has at least one pixel."""
    x0, y0, x1, y1 = pil_box(box)
    return x1 > x0 and y1 > y0


def crop_box(im, box):
    """The region ``box`` = ``(x1, y1, x2, y2)`` (floats, pixels) of ``im`` [H, W, C], exactly as
    PIL's ``Image.crop`` cuts it (:func:`pil_box`; parts outside the image are black, as in PIL).
    A ``ValueError`` for a box without area."""
    x0, y0, x1, y1 = pil_box(box)
    if not box_has_area(box):
        raise ValueError(f"box {tuple(box)} has no area (pixels {x0}..{x1} x {y0}..{y1})")
    h, w = im.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return im[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0) + im.shape[2:], im.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = im[sy0:sy1, sx0:sx1]
    return out


def to_tensor(im):
    """RGB uint8 [H, W, 3] -> normalized float32 tensor [3, H, W]."""
    x = (im.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class TrainTransform:
    """Random resized crop, horizontal flip, color jitter, normalization."""

    def __init__(self, size, crop_scale=(0.25, 1.0), flip=True, jitter=0.4):
        self.size, self.crop_scale, self.flip, self.jitter = size, tuple(crop_scale), flip, jitter

    def __call__(self, im, rng):
        im = random_resized_crop(im, self.size, rng, self.crop_scale)
        if self.flip and rng.random() < 0.5:
            im = im[:, ::-1]
        return to_tensor(color_jitter(im, self.jitter, rng))
