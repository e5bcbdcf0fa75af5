"""List files, transforms and the bad-image policy."""

import os

import numpy as np
import pytest
import torch

from metric.datasets.dataset import ListDataset
from metric.datasets.listfile import read_list
from metric.datasets.transforms import TrainTransform, decode_image
from metric.engine.predictor import ImageViews, Preprocess
from metric.utils.errors import DataError


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_read_list_resolves_paths(tiny_data):
    items = read_list(os.path.join(tiny_data, "train.txt"), tiny_data, num_classes=4)
    assert len(items) == 32 and all(os.path.isabs(p) and os.path.isfile(p) for p, _ in items)
    assert sorted({lab for _, lab in items}) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "text, words",
    [
        ("img/0_0.jpg 0\nimg/0_1.jpg\n", [":2:", "expected 'relative/path.jpg label'"]),
        ("img/0_0.jpg zero\n", [":1:", "'zero' is not an integer"]),
        ("img/0_0.jpg 0\n\nimg/0_1.jpg 4\n", [":3:", "label 4 outside [0, 4)", "NUM_CLASSES"]),
        ("img/0_0.jpg -1\n", [":1:", "label -1"]),
        ("", ["holds no images"]),
    ],
)
def test_malformed_list_names_file_and_line(tiny_data, tmp_path, text, words):
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as err:
        read_list(path, tiny_data, num_classes=4)
    msg = str(err.value)
    assert "bad.txt" in msg and "\n" not in msg
    for w in words:
        assert w in msg


def test_missing_files_reported_with_count_and_examples(tiny_data, tmp_path):
    lines = [f"img/0_{i}.jpg 0" for i in range(3)] + [f"img/nope_{i}.jpg 1" for i in range(7)]
    path = _write(tmp_path / "list.txt", "\n".join(lines))
    with pytest.raises(DataError, match=r"7 of 10 images .* missing, e.g. .*nope_0.jpg"):
        read_list(path, tiny_data, num_classes=4)
    assert len(read_list(path, tiny_data, num_classes=4, check_files=False)) == 10


def test_decode_failures_return_none(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert decode_image(str(bad)) is None and decode_image(str(empty)) is None


def _corrupt_items(tiny_data, tmp_path):
    items = read_list(os.path.join(tiny_data, "train.txt"), tiny_data, num_classes=4)
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    return items[:8] + [(str(bad), 1)] + items[8:]


def test_bad_training_image_is_replaced_by_same_class(tiny_data, tmp_path):
    items = _corrupt_items(tiny_data, tmp_path)
    ds = ListDataset(items, TrainTransform(24), seed=0)
    x, label, failed, bad = ds[8]
    assert label == 1 and failed == 1 and x.shape == (3, 24, 24) and bad.tolist()[0] == 8
    assert ds[8][2] == 1  # counted every time it is drawn, never crashes
    assert ds[0][2] == 0


def test_class_without_readable_image_fails_clearly(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"junk")
    ds = ListDataset([(str(bad), 0)], TrainTransform(24))
    with pytest.raises(DataError, match="no readable image left in class 0"):
        ds[0]


def test_bad_eval_image_is_marked(tiny_data, tmp_path):
    items = _corrupt_items(tiny_data, tmp_path)
    ds = ImageViews([p for p, _ in items], Preprocess(36, [1.0, 0.5]))
    views, index, failed = ds[8]
    assert failed and index == 8 and views is None
    views, index, failed = ds[0]
    assert not failed and [tuple(v.shape) for v in views] == [(3, 30, 36), (3, 15, 18)]


def test_augmentation_depends_on_seed_epoch_index_only(tiny_data):
    items = read_list(os.path.join(tiny_data, "train.txt"), tiny_data, num_classes=4)
    a = ListDataset(items, TrainTransform(24), seed=3)
    b = ListDataset(items, TrainTransform(24), seed=3)
    b[5], b[2]  # other samples drawn first do not matter
    assert torch.equal(a[2][0], b[2][0])
    a.set_epoch(1)
    assert not torch.equal(a[2][0], b[2][0])


def test_test_preprocess_keeps_aspect_or_center_crops():
    im = np.zeros((40, 80, 3), np.uint8)
    im[:, 38:42] = 255  # a bright centre column survives the center crop
    (whole,) = Preprocess(20)(im)
    assert whole.shape == (3, 10, 20)
    (x,) = Preprocess(16, crop=True)(im)
    assert x.shape == (3, 16, 16) and x[0, :, 7:9].mean() > x[0, :, :3].mean()


def test_crop_fraction_resizes_the_shorter_side_up_before_the_centre_crop():
    """INFER.CROP_FRACTION 0.875 with TEST.IM_SIZE 224: the DML papers' resize 256 then centre
    crop 224; the crop equals the centre of the 256-side resize (1.0 would cut it from 224)."""
    from metric.config import load_cfg
    from metric.datasets.transforms import center_crop, resize_shorter
    from metric.utils.errors import ConfigError

    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    cfg = load_cfg(None, ["TEST.IM_SIZE", "224", "INFER.CENTER_CROP", "True", "INFER.CROP_FRACTION", "0.875"])
    (x,) = Preprocess.from_cfg(cfg)(im)
    resized = resize_shorter(im, 256)
    assert resized.shape[:2] == (256, 341)
    assert torch.equal(x, Preprocess(224)(center_crop(resized, 224))[0])
    assert not torch.equal(x, Preprocess(224, crop=True)(im)[0])
    with pytest.raises(ConfigError, match="INFER.CROP_FRACTION"):
        load_cfg(None, ["INFER.CROP_FRACTION", "0.875"])  # without INFER.CENTER_CROP
    with pytest.raises(ConfigError, match="INFER.CROP_FRACTION"):
        load_cfg(None, ["INFER.CENTER_CROP", "True", "INFER.CROP_FRACTION", "1.5"])


def test_the_store_settings_name_crop_fraction_and_cuda_autocast():
    """INFER.CROP_FRACTION and the CUDA autocast dtype of INFER.MIXED_PRECISION enter the settings
    digest and the store's meta, so a store extracted otherwise is never reused as if equal."""
    import types

    from metric.config import load_cfg
    from metric.engine.extract import extraction_meta, settings_digest
    from metric.engine.predictor import Predictor
    from tests.helpers import TINY_MODEL

    crop = load_cfg(None, TINY_MODEL + ["INFER.CENTER_CROP", "True"])
    tighter = load_cfg(None, TINY_MODEL + ["INFER.CENTER_CROP", "True", "INFER.CROP_FRACTION", "0.875"])
    assert settings_digest(crop, "w") != settings_digest(tighter, "w")
    assert settings_digest(crop, "w", None) != settings_digest(crop, "w", torch.bfloat16)
    assert settings_digest(crop, "w", torch.float16) != settings_digest(crop, "w", torch.bfloat16)
    real = Predictor.from_cfg(tighter, device="cpu", missing_weights="ok")
    assert real.amp_dtype is None  # autocast is CUDA only
    items = [("a", "/x/a.jpg")]
    plain = extraction_meta(tighter, items, {"index": 1, "total": 1}, real)
    assert plain["crop_fraction"] == 0.875 and "mixed_precision" not in plain
    on_cuda = types.SimpleNamespace(model=real.model, amp_dtype=torch.bfloat16)  # as on a GPU with bf16
    meta = extraction_meta(tighter, items, {"index": 1, "total": 1}, on_cuda)
    assert meta["mixed_precision"] == "bfloat16" and meta["model_digest"] != plain["model_digest"]
