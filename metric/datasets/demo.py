"""Deterministic generator of a small landmark-like demo data set.

Each class is a procedurally drawn *scene*: a sky/ground background with gradients and
low-frequency texture, and several structures on it (buildings with windows, towers, domes,
arches, free polygons, discs, rings and patches filled with stripes, checkers or rings; no text).
Each image of a class is a different *view* of its scene: a perspective warp (position, scale,
rotation, tilt), lighting / contrast / colour changes, blur, sensor noise and sometimes a random
occluding patch. Views of one scene share their layout, so a trained network can match them;
the photometric changes make colour statistics alone unreliable, so an untrained one cannot.

Everything is drawn with numpy + cv2 from ``numpy.random.default_rng`` streams seeded by
``(seed, group, class)`` for a scene and ``(seed, group, class, image)`` for a view, so every
file depends only on its own coordinates: the output is byte-identical across runs and
independent of generation order. The folder is built under ``<out_dir>.tmp-<pid>``, ``meta.json``
is written last, and the folder is renamed into place, so ``out_dir`` is either complete or absent.

Layout of ``out_dir`` (list paths are relative to ``out_dir``; a line is ``path label``)::

    train/<class:04d>/<n:03d>.jpg     training images, labels 0..T-1 in train_list.txt
    heldout/<id>.jpg                  query, index, distractor and ignored images (id: 16 hex chars)
    train_list.txt
    query_list.txt                    queries of held-out classes 0..H-1, plus the ignored queries
    index_list.txt                    index images of classes 0..H-1 and distractors H..H+D-1
    test_list.txt                     query (without the ignored ones) + index, for evaluation
    retrieval_solution.csv            ground truth in the Google Landmark Retrieval format
    meta.json                         parameters, counts and format version (written last)
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from metric.utils.errors import DataError

logger = logging.getLogger(__name__)

FORMAT = "pymetric-demo-data"
FORMAT_VERSION = 1
JPEG_QUALITY = 90
NUM_IGNORED_QUERIES = 2  # queries of one extra class with no index image ("Ignored" rows)

# Independent random streams: a scene is seeded by (seed, group, class, 0, 0) and a view by
# (seed, group, class, 1, image), so changing the size of one group never changes another.
_GROUP_TRAIN, _GROUP_HELDOUT, _GROUP_DISTRACTOR, _GROUP_IGNORED = 0, 1, 2, 3

_LIST_FILES = {
    "train": "train_list.txt",
    "query": "query_list.txt",
    "index": "index_list.txt",
    "test": "test_list.txt",
}
_SOLUTION_FILE = "retrieval_solution.csv"
_META_FILE = "meta.json"


# ---------------------------------------------------------------------------------------------
# Scene drawing
# ---------------------------------------------------------------------------------------------


def _color(rng, sat=(0.25, 1.0), val=(0.25, 1.0)):
    """A random BGR colour as a float32 array, drawn in HSV."""
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _smooth_noise(rng, size, cells, channels=1):
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled with cubic interpolation."""
    grid = rng.normal(0.0, 1.0, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def _pattern(rng, size, color_a, color_b):
    """A full-canvas fill: solid, stripes, checkers, concentric rings or dots, in two colours."""
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = rng.uniform(0.03, 0.09) * size
    if kind == 0:
        t = np.zeros_like(u)
    elif kind == 1:
        t = (np.mod(u / period, 1.0) < rng.uniform(0.3, 0.7)).astype(np.float32)
    elif kind == 2:
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == 3:
        cx, cy = rng.uniform(0, size, 2)
        t = (np.mod(np.hypot(xx - cx, yy - cy) / period, 1.0) < 0.5).astype(np.float32)
    else:
        t = np.hypot(np.mod(u, period) - period / 2, np.mod(v, period) - period / 2) < period * 0.3
        t = t.astype(np.float32)
    t = cv2.GaussianBlur(t, (0, 0), 0.7)[..., None]
    return color_a * (1.0 - t) + color_b * t


def _paste(canvas, fill, mask):
    """Alpha-composite ``fill`` (canvas-sized image or a colour) onto ``canvas`` where ``mask`` is set."""
    alpha = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 0.6)[..., None]
    canvas *= 1.0 - alpha
    canvas += alpha * fill


def _poly_mask(size, points):
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255, cv2.LINE_AA)
    return mask


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def _add_building(rng, canvas, horizon):
    size = canvas.shape[0]
    w, h = rng.uniform(0.12, 0.35) * size, rng.uniform(0.18, 0.5) * size
    x0 = rng.uniform(-0.05, 0.95) * size - w / 2
    base = horizon + rng.uniform(0.0, 0.12) * size
    body = _rect(x0, base - h, x0 + w, base)
    wall, accent = _color(rng), _color(rng)
    fill = _pattern(rng, size, wall, accent) if rng.random() < 0.4 else wall
    _paste(canvas, fill, _poly_mask(size, body))
    # Windows: a grid of small rectangles in a contrasting colour.
    rows, cols = rng.integers(2, 6), rng.integers(2, 6)
    win = _color(rng, val=(0.05, 0.5)) if rng.random() < 0.6 else _color(rng, val=(0.7, 1.0))
    cw, ch = w / cols, h / rows
    fw, fh = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    for r in range(rows):
        for c in range(cols):
            cx, cy = x0 + (c + 0.5) * cw, base - h + (r + 0.5) * ch
            p0 = (int(round(cx - cw * fw / 2)), int(round(cy - ch * fh / 2)))
            p1 = (int(round(cx + cw * fw / 2)), int(round(cy + ch * fh / 2)))
            cv2.rectangle(canvas, p0, p1, win.tolist(), -1, cv2.LINE_AA)
    # Roof: flat, pointed (tower) or a dome.
    roof = rng.integers(3)
    roof_color = _color(rng)
    if roof == 1:
        peak = rng.uniform(0.3, 1.2) * w
        tri = np.array([[x0 - 0.05 * w, base - h], [x0 + 1.05 * w, base - h], [x0 + w / 2, base - h - peak]])
        _paste(canvas, roof_color, _poly_mask(size, tri))
    elif roof == 2:
        mask = np.zeros((size, size), np.uint8)
        center = (int(round(x0 + w / 2)), int(round(base - h)))
        axes = (int(round(w / 2)), int(round(rng.uniform(0.25, 0.6) * w)))
        cv2.ellipse(mask, center, axes, 0, 180, 360, 255, -1, cv2.LINE_AA)
        _paste(canvas, roof_color, mask)
    if rng.random() < 0.5:  # an arched door
        dw = w * rng.uniform(0.2, 0.4)
        dh = h * rng.uniform(0.25, 0.45)
        dx = x0 + w / 2 - dw / 2
        mask = _poly_mask(size, _rect(dx, base - dh + dw / 2, dx + dw, base))
        cv2.ellipse(
            mask,
            (int(round(dx + dw / 2)), int(round(base - dh + dw / 2))),
            (int(round(dw / 2)), int(round(dw / 2))),
            0,
            180,
            360,
            255,
            -1,
            cv2.LINE_AA,
        )
        _paste(canvas, _color(rng, val=(0.0, 0.35)), mask)


def _add_polygon(rng, canvas):
    size = canvas.shape[0]
    n = rng.integers(3, 8)
    center = rng.uniform(0.1, 0.9, 2) * size
    radius = rng.uniform(0.07, 0.22) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.6, 1.0, n)
    pts = center + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    fill = _pattern(rng, size, _color(rng), _color(rng))
    _paste(canvas, fill, _poly_mask(size, pts))


def _add_disc(rng, canvas):
    size = canvas.shape[0]
    center = tuple(int(round(c)) for c in rng.uniform(0.1, 0.9, 2) * size)
    radius = int(round(rng.uniform(0.05, 0.18) * size))
    mask = np.zeros((size, size), np.uint8)
    if rng.random() < 0.35:  # a ring
        cv2.circle(mask, center, radius, 255, max(2, radius // 3), cv2.LINE_AA)
        _paste(canvas, _color(rng), mask)
    else:
        cv2.circle(mask, center, radius, 255, -1, cv2.LINE_AA)
        _paste(canvas, _pattern(rng, size, _color(rng), _color(rng)), mask)


def _add_band(rng, canvas):
    """A long rotated band (a bridge, wall or road) filled with a pattern."""
    size = canvas.shape[0]
    center = rng.uniform(0.2, 0.8, 2) * size
    length, width = rng.uniform(0.5, 1.1) * size, rng.uniform(0.04, 0.12) * size
    a = rng.uniform(-0.5, 0.5) if rng.random() < 0.7 else rng.uniform(0, np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    n = np.array([-np.sin(a), np.cos(a)]) * width / 2
    pts = np.array([center - d - n, center + d - n, center + d + n, center - d + n])
    _paste(canvas, _pattern(rng, size, _color(rng), _color(rng)), _poly_mask(size, pts))


def render_scene(rng, size):
    """Draw one scene as a ``size`` x ``size`` float32 BGR image with values in [0, 255]."""
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    horizon = rng.uniform(0.45, 0.8) * size
    tilt = rng.uniform(-0.08, 0.08) * size
    sky_top, sky_low = _color(rng, (0.05, 0.6), (0.55, 1.0)), _color(rng, (0.05, 0.6), (0.55, 1.0))
    ground_a, ground_b = _color(rng, (0.1, 0.7), (0.2, 0.8)), _color(rng, (0.1, 0.7), (0.2, 0.8))
    sky = sky_top * (1 - y) + sky_low * y
    ground = ground_a * (1 - y) + ground_b * y
    xx = np.linspace(-0.5, 0.5, size, dtype=np.float32)[None, :]
    yy = np.arange(size, dtype=np.float32)[:, None]
    below = (yy > horizon + tilt * xx).astype(np.float32)[..., None]
    canvas = sky * (1 - below) + ground * below
    canvas += rng.uniform(8, 25) * _smooth_noise(rng, size, int(rng.integers(4, 10)), 3)
    canvas += below * rng.uniform(4, 14) * _smooth_noise(rng, size, int(rng.integers(16, 40)), 1)
    canvas = np.ascontiguousarray(canvas, dtype=np.float32)

    if rng.random() < 0.5:  # sun or moon
        mask = np.zeros((size, size), np.uint8)
        c = (int(rng.uniform(0.1, 0.9) * size), int(rng.uniform(0.05, 0.3) * size))
        cv2.circle(mask, c, int(rng.uniform(0.03, 0.07) * size), 255, -1, cv2.LINE_AA)
        _paste(canvas, _color(rng, sat=(0.0, 0.6), val=(0.8, 1.0)), mask)
    draws = [_add_polygon, _add_disc, _add_band]
    for _ in range(rng.integers(1, 3)):
        draws[rng.integers(len(draws))](rng, canvas)
    for _ in range(rng.integers(2, 5)):
        _add_building(rng, canvas, horizon + tilt * (rng.uniform(-0.5, 0.5)))
    for _ in range(rng.integers(1, 4)):
        draws[rng.integers(len(draws))](rng, canvas)
    # Light pre-blur so that the downscaling warp of a view does not alias.
    return cv2.GaussianBlur(np.clip(canvas, 0, 255), (0, 0), 0.5)


# ---------------------------------------------------------------------------------------------
# Views of a scene
# ---------------------------------------------------------------------------------------------


def render_view(rng, scene, out_size):
    """One ``out_size`` x ``out_size`` uint8 BGR view of ``scene`` (see the module docstring)."""
    size = scene.shape[0]
    # Source quadrilateral in the scene: random scale, position, rotation and perspective tilt.
    side = rng.uniform(0.5, 0.85) * size
    center = size / 2 + rng.uniform(-0.5, 0.5, 2) * (size - side) * 0.9
    angle = np.deg2rad(rng.uniform(-18, 18))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * side / 2
    yaw, pitch = rng.uniform(-0.18, 0.18), rng.uniform(-0.12, 0.12)
    square[:, 1] *= 1 + yaw * np.sign(square[:, 0])  # one vertical edge shorter: turned camera
    square[:, 0] *= 1 + pitch * np.sign(square[:, 1])
    src = square @ rot.T + center + rng.normal(0, 0.03 * side, (4, 2))
    dst = np.array([[0, 0], [out_size, 0], [out_size, out_size], [0, out_size]], np.float32)
    matrix = cv2.getPerspectiveTransform(src.astype(np.float32), dst)
    img = cv2.warpPerspective(
        scene, matrix, (out_size, out_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
    )

    # Occlusion: a patch in front of the scene (a sign, a person, a car...).
    if rng.random() < 0.5:
        area = rng.uniform(0.05, 0.2) * out_size * out_size
        aspect = rng.uniform(0.4, 2.5)
        w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
        cx, cy = rng.uniform(0, out_size, 2)
        mask = np.zeros((out_size, out_size), np.uint8)
        if rng.random() < 0.5:
            cv2.rectangle(mask, (int(cx - w / 2), int(cy - h / 2)), (int(cx + w / 2), int(cy + h / 2)), 255, -1)
        else:
            cv2.ellipse(
                mask, (int(cx), int(cy)), (int(w / 2), int(h / 2)), rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA
            )
        fill = _pattern(rng, out_size, _color(rng), _color(rng))
        fill += rng.normal(0, 8, fill.shape).astype(np.float32)
        _paste(img, fill, mask)

    # Lighting: colour cast, contrast, brightness, gamma and a shading gradient.
    img *= rng.uniform(0.8, 1.2, 3).astype(np.float32)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.6, 1.3) + mean + rng.uniform(-30, 30)
    a = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, out_size, dtype=np.float32)
    shade = 1 + rng.uniform(0, 0.5) * (np.cos(a) * ramp[None, :] + np.sin(a) * ramp[:, None])
    img *= shade[..., None]
    img = np.clip(img, 0, 255)
    img = 255.0 * (img / 255.0) ** rng.uniform(0.7, 1.4)

    # Optics and sensor: blur and noise.
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.3) * out_size / 96)
    img += rng.normal(0, rng.uniform(0, 5), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_jpeg(path, img):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for {path}")
    path.write_bytes(buf.tobytes())


# ---------------------------------------------------------------------------------------------
# Data set
# ---------------------------------------------------------------------------------------------


def _image_id(seed, group, cls, index):
    """Kaggle-style id: 16 lowercase hex characters derived from the image's coordinates."""
    key = f"pymetric-demo:{seed}:{group}:{cls}:{index}".encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _class_images(seed, group, cls, count, image_size):
    """Yield ``count`` views of one scene; each depends only on (seed, group, cls, index)."""
    scene = render_scene(np.random.default_rng([seed, group, cls, 0, 0]), image_size * 2)
    for n in range(count):
        yield n, render_view(np.random.default_rng([seed, group, cls, 1, n]), scene, image_size)


def _check_params(params):
    limits = {
        "num_train_classes": (1, 10000),
        "train_per_class": (1, 1000),
        "num_heldout_classes": (1, 100000),
        "queries_per_class": (1, 1000),
        "index_per_class": (1, 1000),
        "num_distractor_classes": (0, 100000),
        "image_size": (16, 1024),
        "seed": (0, 2**63 - 1),
    }
    for key, (lo, hi) in limits.items():
        value = params[key]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
            raise DataError(f"demo data parameter {key}={value!r} is invalid: expected an integer in [{lo}, {hi}]")


def _summary(out_dir, meta, created):
    return {
        "out_dir": str(out_dir),
        "created": created,
        "params": dict(meta["params"]),
        "counts": dict(meta["counts"]),
        "lists": {k: str(out_dir / v) for k, v in meta["files"]["lists"].items()},
        "solution": str(out_dir / meta["files"]["solution"]),
        "meta": str(out_dir / _META_FILE),
    }


def _read_meta(out_dir):
    """The meta.json of an existing folder, or a DataError that says why it is not a demo set."""
    path = out_dir / _META_FILE
    hint = "choose another folder or pass overwrite=True (--overwrite) to replace it"
    if not path.is_file():
        raise DataError(f"{out_dir} exists but is not a demo data set (no {_META_FILE}); {hint}")
    try:
        meta = json.loads(path.read_text())
        ok = meta.get("format") == FORMAT and isinstance(meta.get("params"), dict)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise DataError(f"{path} is not a valid demo data set description; {hint}")
    return meta


def _clean_stale_tmp(out_dir):
    """Remove ``<out_dir>.tmp-<pid>`` folders left by processes that no longer run (or by us)."""
    prefix = out_dir.name + ".tmp-"
    for path in out_dir.parent.glob(prefix + "*"):
        pid = path.name[len(prefix) :]
        if not pid.isdigit() or not path.is_dir():
            continue
        alive = int(pid) != os.getpid()
        if alive:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
        if not alive:
            logger.info("removing stale temporary folder %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _build(tmp, params):
    """Write every image, list and the solution into ``tmp``; return the meta dict (not written)."""
    seed, size = params["seed"], params["image_size"]
    (tmp / "train").mkdir(parents=True)
    (tmp / "heldout").mkdir()

    train_lines = []
    for cls in range(params["num_train_classes"]):
        folder = tmp / "train" / f"{cls:04d}"
        folder.mkdir()
        for n, img in _class_images(seed, _GROUP_TRAIN, cls, params["train_per_class"], size):
            _write_jpeg(folder / f"{n:03d}.jpg", img)
            train_lines.append(f"train/{cls:04d}/{n:03d}.jpg {cls}")
    logger.info("demo data: %d training images written", len(train_lines))

    num_heldout, num_queries = params["num_heldout_classes"], params["queries_per_class"]
    queries, index, ignored = [], [], []  # (id, label)
    groups = [(_GROUP_HELDOUT, c, c, num_queries + params["index_per_class"], num_queries) for c in range(num_heldout)]
    groups += [
        (_GROUP_DISTRACTOR, c, num_heldout + c, params["index_per_class"], 0)
        for c in range(params["num_distractor_classes"])
    ]
    ignored_label = num_heldout + params["num_distractor_classes"]
    groups.append((_GROUP_IGNORED, 0, ignored_label, NUM_IGNORED_QUERIES, NUM_IGNORED_QUERIES))
    for group, cls, label, count, count_queries in groups:
        for n, img in _class_images(seed, group, cls, count, size):
            image_id = _image_id(seed, group, cls, n)
            _write_jpeg(tmp / "heldout" / f"{image_id}.jpg", img)
            target = index if n >= count_queries else ignored if group == _GROUP_IGNORED else queries
            target.append((image_id, label))
    all_ids = [i for i, _ in queries + index + ignored]
    if len(set(all_ids)) != len(all_ids):  # 64-bit hashes: practically impossible
        raise RuntimeError("demo data: duplicate image id; change the seed")
    logger.info("demo data: %d queries, %d index images written", len(queries) + len(ignored), len(index))

    def lines(pairs):
        return [f"heldout/{i}.jpg {label}" for i, label in pairs]

    # Kaggle lists are in id order (so classes are interleaved); ties cannot happen.
    queries.sort()
    index.sort()
    query_all = sorted(queries + ignored)
    contents = {
        "train": train_lines,
        "query": lines(query_all),
        "index": lines(index),
        "test": lines(queries) + lines(index),
    }
    for key, name in _LIST_FILES.items():
        (tmp / name).write_text("".join(line + "\n" for line in contents[key]))

    by_label = {}
    for image_id, label in index:
        by_label.setdefault(label, []).append(image_id)
    rows = ["id,images,Usage"]
    scored = 0
    for image_id, label in query_all:
        if label == ignored_label:
            rows.append(f"{image_id},,Ignored")
        else:  # alternate in id order: deterministic and half each
            usage = "Public" if scored % 2 == 0 else "Private"
            scored += 1
            rows.append(f"{image_id},{' '.join(by_label[label])},{usage}")
    (tmp / _SOLUTION_FILE).write_text("\n".join(rows) + "\n")

    counts = {
        "train_classes": params["num_train_classes"],
        "train_images": len(train_lines),
        "heldout_classes": num_heldout,
        "distractor_classes": params["num_distractor_classes"],
        "query_images": len(queries),
        "ignored_queries": len(ignored),
        "index_images": len(index),
        "test_images": len(contents["test"]),
    }
    files = {"lists": dict(_LIST_FILES), "solution": _SOLUTION_FILE}
    return {"format": FORMAT, "version": FORMAT_VERSION, "params": params, "counts": counts, "files": files}


def make_demo_dataset(
    out_dir,
    *,
    num_train_classes=32,
    train_per_class=20,
    num_heldout_classes=16,
    queries_per_class=2,
    index_per_class=8,
    num_distractor_classes=4,
    image_size=96,
    seed=0,
    overwrite=False,
):
    """Generate the demo data set in ``out_dir`` if it is not there yet; return a summary dict.

    The defaults (32 training scenes x 20 views, 16 held-out scenes with 2 queries and 8 index
    images each, 4 distractor scenes, 96 px) give 640 training and 194 evaluation images
    (about 4 MB), generated in about 4 s on two cores: small enough for ``make demo`` to train
    a small ResNet on a CPU in about two minutes, with enough training scenes and views that
    retrieval on the held-out scenes clearly improves with training (see docs/DEMO_DATA.md). Training and
    held-out scenes come from different random
    streams, so they are disjoint.

    If ``out_dir`` exists with a ``meta.json`` holding the same parameters, nothing is written.
    If it exists otherwise, a :class:`DataError` is raised unless ``overwrite`` is true, in which
    case the old folder is replaced only after the new one is complete.

    Returns ``{"out_dir", "created", "params", "counts", "lists", "solution", "meta"}`` where
    ``lists`` maps train/query/index/test to the absolute list-file paths.
    """
    params = {
        "num_train_classes": num_train_classes,
        "train_per_class": train_per_class,
        "num_heldout_classes": num_heldout_classes,
        "queries_per_class": queries_per_class,
        "index_per_class": index_per_class,
        "num_distractor_classes": num_distractor_classes,
        "image_size": image_size,
        "seed": seed,
    }
    _check_params(params)
    params = {k: int(v) for k, v in params.items()}
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir} exists and is not a folder; choose another output path")
        if not overwrite:
            meta = _read_meta(out_dir)
            if meta.get("version") == FORMAT_VERSION and meta["params"] == params:
                logger.info("demo data already present in %s", out_dir)
                return _summary(out_dir, meta, created=False)
            raise DataError(
                f"{out_dir} holds demo data made with other parameters or format version; "
                "choose another folder or pass overwrite=True (--overwrite) to replace it"
            )

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = out_dir.parent / f".{out_dir.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise DataError(f"cannot write the demo data next to {out_dir}: {err.strerror or err}") from None
    _clean_stale_tmp(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    logger.info("generating demo data in %s", out_dir)
    try:
        meta = _build(tmp, params)
        # meta.json last: a folder with it is complete.
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out_dir.exists() and overwrite:
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                # Another process finished the same folder first: keep it if it is what we want.
                if not out_dir.is_dir():
                    raise
                other = _read_meta(out_dir)
                if other.get("version") != FORMAT_VERSION or other["params"] != params:
                    raise DataError(f"{out_dir} was created concurrently with other parameters") from None
                shutil.rmtree(tmp, ignore_errors=True)
                return _summary(out_dir, other, created=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("demo data ready in %s (%.1f s)", out_dir, time.perf_counter() - start)
    return _summary(out_dir, meta, created=True)
