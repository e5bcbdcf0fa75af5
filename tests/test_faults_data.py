"""Faults of data and of outputs (reliability issue, round 2): TensorBoard's writer thread on a full
disk, stats records of a run killed before its first checkpoint, decompression bombs, libjpeg /
libpng chatter on stderr, GLDv2 conversion on a full disk, a repeated line in an extraction
list, and a per-process batch of one image with batch norm."""

import errno
import logging
import os
import shutil
import textwrap
import threading

import cv2
import numpy as np
import pytest
import simplejson

from metric.config import load_cfg
from metric.utils.errors import ConfigError, DataError, OutputError
from metric.utils.logger import StatsWriter, read_stats
from tests.helpers import REPO, logging_restored, run_py, tiny_opts

# the warnings "No path found after ..." of TensorBoard's event accumulator are noise
logging.getLogger("tensorboard").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- images


def _jpeg(shape=(40, 48), seed=0):
    im = np.random.default_rng(seed).integers(0, 255, shape + (3,)).astype(np.uint8)
    return cv2.imencode(".jpg", im)[1].tobytes()


def _bomb(width=20000, height=20000):
    """A JPEG of a few hundred bytes whose frame header claims ``width x height`` pixels."""
    data = bytearray(_jpeg((8, 8)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def _corrupt_jpeg():
    """A JPEG that decodes, while libjpeg prints "Corrupt JPEG data: ..." to stderr."""
    data = bytearray(_jpeg((64, 64)))
    sos = data.find(b"\xff\xda")
    for k in range(sos + 30, len(data) - 10, 97):
        data[k] ^= 0x55
    return bytes(data)


def _bad_png():
    """A PNG whose compressed data is broken: libpng prints "libpng error: ..." and it does not decode."""
    im = np.random.default_rng(1).integers(0, 255, (40, 48, 3)).astype(np.uint8)
    data = bytearray(cv2.imencode(".png", im)[1].tobytes())
    data[data.find(b"IDAT") + 10] ^= 0xFF
    return bytes(data)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize(
    "ext,params",
    [
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".png", []),
        (".bmp", []),
        (".tiff", []),
        (".gif", []),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    ],
)
def test_header_size_of_every_checked_format(tmp_path, ext, params):
    from metric.utils.imagefile import file_header_size, header_size

    im = np.random.default_rng(0).integers(0, 255, (37, 53, 3)).astype(np.uint8)
    try:
        ok, buf = cv2.imencode(ext, im, params)
    except cv2.error:
        pytest.skip(f"this OpenCV cannot write {ext}")
    assert header_size(buf) == (53, 37) == header_size(buf.tobytes())
    assert file_header_size(_write(tmp_path / f"a{ext}", buf.tobytes())) == (53, 37)


def test_header_size_of_extended_webp_and_of_malformed_headers(tmp_path):
    from metric.utils.imagefile import file_header_size, header_size

    im = np.random.default_rng(0).integers(0, 255, (37, 53, 4)).astype(np.uint8)
    assert header_size(cv2.imencode(".webp", im)[1]) == (53, 37)  # with alpha: the extended (VP8X) header
    for junk in (
        b"\xff\xd8\xff\xe0\x00",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"\x89PNG\r\n\x1a\n",
        b"BM",
        b"II*\x00\xff",
        b"not an image",
        b"",
    ):
        assert header_size(junk) is None
    assert file_header_size(str(tmp_path / "missing.jpg")) is None


def test_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    from metric.datasets.transforms import decode_image
    from metric.utils import imagefile

    bomb = _write(tmp_path / "bomb.jpg", _bomb())
    decoded = []
    real = cv2.imdecode
    monkeypatch.setattr(imagefile.cv2, "imdecode", lambda data, flags: decoded.append(data.size) or real(data, flags))
    im, why = imagefile.load_image(bomb)
    assert im is None and why.startswith("is 20000 x 20000 pixels") and "DATA_LOADER.MAX_IMAGE_PIXELS" in why
    assert decode_image(bomb) is None and decoded == []
    small = _write(tmp_path / "small.jpg", _jpeg())
    assert decode_image(small, max_pixels=48 * 40).shape == (40, 48, 3)
    assert decode_image(small, max_pixels=48 * 40 - 1) is None


def test_bomb_in_training_is_replaced_and_counted_like_an_unreadable_image(tmp_path, caplog):
    from metric.datasets.dataset import ListDataset, check_readable_classes
    from metric.datasets.transforms import TrainTransform

    big = _write(tmp_path / "big.jpg", _jpeg((60, 50)))  # 3000 pixels
    items = [(big, 0), (_write(tmp_path / "a.jpg", _jpeg(seed=1)), 0), (_write(tmp_path / "b.jpg", _jpeg(seed=2)), 1)]
    ds = ListDataset(items, TrainTransform(16), seed=0, max_pixels=2500)
    with caplog.at_level(logging.WARNING):
        x, label, failed, bad = ds[0]
    assert label == 0 and failed == 1 and bad.tolist()[0] == 0 and tuple(x.shape) == (3, 16, 16)
    assert any("big.jpg" in r.getMessage() and "50 x 60 pixels" in r.getMessage() for r in caplog.records)
    assert ListDataset(items, TrainTransform(16), seed=0, max_pixels=3000)[0][2] == 0
    with pytest.raises(DataError, match="class 1 .* no readable image"):
        check_readable_classes(
            items[:2] + [(_write(tmp_path / "c.jpg", _jpeg((60, 50))), 1)], "list.txt", max_pixels=2500
        )


def test_max_image_pixels_config_key():
    from metric.utils.imagefile import DEFAULT_MAX_PIXELS

    cfg = load_cfg(None, [])
    assert cfg.DATA_LOADER.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS == 89_478_485
    assert load_cfg(None, ["DATA_LOADER.MAX_IMAGE_PIXELS", "0"]).DATA_LOADER.MAX_IMAGE_PIXELS == 0
    with pytest.raises(ConfigError, match="DATA_LOADER.MAX_IMAGE_PIXELS"):
        load_cfg(None, ["DATA_LOADER.MAX_IMAGE_PIXELS", "-1"])
    with open(os.path.join(REPO, "docs", "CONFIG.md"), encoding="utf-8") as f:
        assert "DATA_LOADER.MAX_IMAGE_PIXELS" in f.read()


def _chatter_files(folder):
    os.makedirs(folder, exist_ok=True)
    return {
        "corrupt": _write(os.path.join(folder, "corrupt.jpg"), _corrupt_jpeg()),
        "badpng": _write(os.path.join(folder, "badpng.png"), _bad_png()),
        "good": _write(os.path.join(folder, "good.jpg"), _jpeg()),
    }


LIBRARY_LINES = ("Corrupt JPEG data", "Premature end of JPEG", "libpng error", "libpng warning")


def _bare_library_lines(text):
    """Lines of ``text`` that a C library wrote itself (ours start with ``[time logger]``)."""
    return [line for line in text.splitlines() if any(line.startswith(w) for w in LIBRARY_LINES)]


def test_library_chatter_goes_to_our_log_with_the_image_name(tmp_path):
    """libjpeg and libpng write to file descriptor 2 themselves: decoding through our reader (the
    training data set and the extraction data set) must leave no such line on the real stderr;
    the message is in our log, with the image's name."""
    files = _chatter_files(str(tmp_path / "img"))
    script = textwrap.dedent(f"""
        from metric.utils.logger import setup_logging
        from metric.datasets.dataset import ListDataset
        from metric.datasets.transforms import TrainTransform, decode_image
        from metric.engine.predictor import ImageViews, Preprocess
        setup_logging()
        files = {files!r}
        ds = ListDataset([(files["corrupt"], 0), (files["badpng"], 0), (files["good"], 0)], TrainTransform(16))
        print("failed", ds[0][2], ds[1][2], flush=True)
        views = ImageViews([files["corrupt"], files["badpng"]], Preprocess(32))
        print("views", views[0][2] == "", isinstance(views[1][2], str) and "libpng error" in views[1][2], flush=True)
        print("decoded", decode_image(files["corrupt"]) is not None, decode_image(files["badpng"]) is None, flush=True)
    """)
    proc = run_py(["-c", script], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _bare_library_lines(proc.stderr) == [] and _bare_library_lines(proc.stdout) == [], proc.stderr
    assert "failed 0 1" in proc.stdout and "views True True" in proc.stdout and "decoded True True" in proc.stdout
    # the corrupt JPEG (used): an info line with its name; the broken PNG (unusable): a warning with its name
    assert any("corrupt.jpg" in line and "Corrupt JPEG data" in line for line in proc.stdout.splitlines())
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    assert warnings and all("badpng.png" in line and "libpng error" in line for line in warnings), proc.stderr


def test_native_stderr_capture_restores_fd_2(capfd):
    from metric.utils import native_stderr

    with native_stderr.captured() as said:
        os.write(2, b"from C: something\n")
    os.write(2, b"after\n")
    assert said.text == "from C: something"
    assert capfd.readouterr().err == "after\n"


@pytest.mark.slow
def test_extraction_lists_bombs_and_broken_files_and_stderr_has_only_our_lines(tmp_path):
    import torch

    from metric.modeling import build_model
    from metric.retrieval.store import load_features

    data = str(tmp_path / "images")
    files = _chatter_files(data)
    _write(os.path.join(data, "bomb.jpg"), _bomb(300, 200))
    opts = [
        "MODEL.DEPTH",
        "18",
        "RESNET.WIDTH_PER_GROUP",
        "8",
        "RESNET.STEM_WIDTH",
        "8",
        "MODEL.HEADS.IN_FEAT",
        "0",
        "MODEL.HEADS.REDUCTION_DIM",
        "16",
        "MODEL.HEADS.NUM_CLASSES",
        "4",
        "TEST.IM_SIZE",
        "32",
        "TEST.BATCH_SIZE",
        "4",
        "DATA_LOADER.NUM_WORKERS",
        "0",
    ]
    torch.manual_seed(0)
    weights = str(tmp_path / "w.pth")
    torch.save(build_model(load_cfg(None, opts)).state_dict(), weights)
    out = str(tmp_path / "store")
    proc = run_py(
        [
            "tools/extract_features.py",
            "--no-progress",
            *opts,
            "TEST.WEIGHTS",
            weights,
            "INFER.INPUT",
            data,
            "INFER.OUTPUT",
            out,
            "DATA_LOADER.MAX_IMAGE_PIXELS",
            "50000",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    store = load_features(out)
    assert sorted(store.ids) == ["corrupt", "good"]
    assert sorted(os.path.basename(p) for p in store.meta["failed_images"]) == ["badpng.png", "bomb.jpg"]
    assert _bare_library_lines(proc.stderr) == [] and _bare_library_lines(proc.stdout) == [], proc.stderr
    assert any("bomb.jpg" in line and "300 x 200 pixels" in line for line in proc.stderr.splitlines())
    assert files["corrupt"] in proc.stdout and "Corrupt JPEG data" in proc.stdout


# ----------------------------------------------------------------------------- TensorBoard's thread


def _full_disk_in_tensorboard_thread(monkeypatch):
    """TensorBoard's event-file writer thread hits a full disk (the main thread still writes)."""
    from tensorboard.summary.writer import record_writer

    real = record_writer.RecordWriter.write

    def write(self, data):
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)


def _join_event_writer_threads():
    for thread in threading.enumerate():
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(10)


def test_tensorboard_thread_fault_is_one_warning_and_no_thread_traceback(tmp_path, caplog, monkeypatch):
    from metric.engine.tb_writer import TrainingBoard

    _full_disk_in_tensorboard_thread(monkeypatch)
    escaped = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    with caplog.at_level(logging.WARNING):
        board = TrainingBoard(str(tmp_path / "tb"))
        board.log_iter(1, {"loss": 1.0})
        board.log_iter(2, {"loss": 1.0})
        board.close()
        _join_event_writer_threads()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no space left on device" in warnings[0] and not board.enabled
    assert escaped == []  # nothing for Python to print as "Exception in thread ..."

    # any other exception of a thread is still reported
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
    assert len(escaped) == 1 and isinstance(escaped[0], ZeroDivisionError)


DRIVER = """
import errno, os, runpy, sys, threading
from tensorboard.summary.writer import record_writer

real_write, real_fsync = record_writer.RecordWriter.write, os.fsync

def write(self, data):  # the disk is full for TensorBoard's writer thread ...
    if threading.current_thread() is not threading.main_thread():
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, data)

def fsync(fd):  # ... and for the checkpoint
    if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".model_epoch"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_fsync(fd)

record_writer.RecordWriter.write, os.fsync = write, fsync
sys.argv = ["tools/train_metric.py", *sys.argv[1:]]
runpy.run_path("tools/train_metric.py", run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_during_training_is_one_error_line_and_one_warning(tiny_data, tmp_path):
    driver = _write(tmp_path / "driver.py", DRIVER.encode())
    out = str(tmp_path / "run")
    opts = tiny_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 1, "TEST.DATASET": ""})
    proc = run_py([driver, *opts], timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 2 and not any("Traceback" in line for line in lines), proc.stderr
    assert "TensorBoard off for the rest of this run" in lines[0] and "no space left on device" in lines[0]
    assert lines[1].startswith("error: cannot write checkpoint") and lines[1].endswith("no space left on device")


# ----------------------------------------------------------------------------- stats.jsonl


def _records(path):
    return [simplejson.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_stats_of_a_run_killed_before_its_first_checkpoint_are_written_once(tmp_path):
    out = str(tmp_path)
    first = StatsWriter(out)  # the killed run: epoch 1 records, no checkpoint, a half-written line
    first.write("train_iter", epoch=1, iter=2, iters=4, loss=1.0)
    first.write("train_iter", epoch=1, iter=4, iters=4, loss=0.9)
    with open(os.path.join(out, StatsWriter.FILE), "a", encoding="utf-8") as f:
        f.write('{"_type": "train_epoch", "epo')
    rerun = StatsWriter(out)  # starts from scratch: nothing the killed run wrote for epoch 1 stays
    rerun.write("train_iter", epoch=1, iter=2, iters=4, loss=1.1)
    rerun.write("train_iter", epoch=1, iter=4, iters=4, loss=0.8)
    rerun.write("train_epoch", epoch=1, loss=0.95)
    assert [(r["_type"], r.get("iter"), r["loss"]) for r in _records(rerun.path)] == [
        ("train_iter", 2, 1.1),
        ("train_iter", 4, 0.8),
        ("train_epoch", None, 0.95),
    ]

    # a run resumed after the checkpoint of epoch 1 (the trainer cut the file back to it) keeps
    # what came before that checkpoint
    rerun.write("test_epoch", epoch=1, recall=0.5)
    for kind in ("train_iter", "train_epoch", "test_epoch"):
        rerun.write(kind, epoch=2, loss=1.0)
    rerun.write("final", epoch=2)
    resumed = StatsWriter(out)
    assert resumed.truncate(1) == 4
    resumed.write("train_iter", epoch=2, iter=1, iters=4, loss=0.5)
    kinds = [(r["_type"], r["epoch"]) for r in _records(resumed.path)]
    assert kinds == [("train_iter", 1), ("train_iter", 1), ("train_epoch", 1), ("test_epoch", 1), ("train_iter", 2)]


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_first_checkpoint_has_each_record_once(tiny_data, tmp_path):
    from metric.checkpoint import list_checkpoints
    from metric.engine.trainer import train_model

    out = str(tmp_path / "run")
    opts = tiny_opts(
        tiny_data,
        out,
        **{
            "OPTIM.MAX_EPOCH": 2,
            "TRAIN.CHECKPOINT_PERIOD": 2,
            "LOG_PERIOD": 1,
            "TEST.DATASET": "",
            "LOG.TENSORBOARD": False,
        },
    )
    with logging_restored():
        train_model(load_cfg(None, opts))
    stats = os.path.join(out, "stats.jsonl")
    complete = read_stats(stats)
    # a kill in epoch 2, before the first checkpoint (at the end of epoch 2): no checkpoint at all
    for path in list_checkpoints(out):
        os.remove(path)
    kept = [line for line in open(stats, encoding="utf-8") if '"final"' not in line]
    with open(stats, "w", encoding="utf-8") as f:
        f.writelines(kept[:-1])
        f.write(kept[-1][:20])
    with logging_restored():
        train_model(load_cfg(None, opts))
    redone = read_stats(stats)
    keys = [(r["_type"], r.get("epoch"), r.get("iter")) for r in redone]
    assert len(keys) == len(set(keys)) and len(redone) == len(complete)
    assert [r["_type"] for r in redone] == [r["_type"] for r in complete]


# ----------------------------------------------------------------------------- GLDv2 on a full disk


@pytest.mark.parametrize("existing", [False, True])
def test_gldv2_conversion_on_a_full_disk_leaves_nothing_it_created(tmp_path, monkeypatch, existing):
    from metric.datasets.gldv2 import convert_gldv2
    from tests.test_faults_write import inject

    csv = tmp_path / "train.csv"
    csv.write_text("id,url,landmark_id\nabc1,u,7\nabd2,u,7\nabe3,u,9\nabf4,u,9\n")
    root = tmp_path / "data"
    out = root / "gld" / "lists"
    if existing:  # a data set folder with images and an older label map: all of it stays
        (out / "train" / "a").mkdir(parents=True)
        (out / "train" / "a" / "abc1.jpg").write_bytes(b"x")
        (out / "label_map.csv").write_text("old\n")
    inject(monkeypatch, errno.ENOSPC, "fsync", only="val_list" if existing else None)
    with pytest.raises(OutputError, match="no space left on device"):
        convert_gldv2(str(csv), str(out), val_classes=1)
    monkeypatch.undo()
    if existing:
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        assert left == ["label_map.csv", "train", "train/a", "train/a/abc1.jpg"]
        assert (out / "label_map.csv").read_text() == "old\n"
    else:
        assert not root.exists()


# ----------------------------------------------------------------------------- extraction lists


def test_repeated_line_in_an_extraction_list_is_named_not_blamed_on_ids(tiny_data, tmp_path):
    from metric.engine.extract import list_images

    shutil.copytree(os.path.join(tiny_data, "img"), tmp_path / "img")
    (tmp_path / "list.txt").write_text("img/0_0.jpg\nimg/0_1.jpg\n\nimg/0_2.jpg\n./img/0_1.jpg\n")
    with pytest.raises(DataError) as err:
        list_images(str(tmp_path / "list.txt"), id_mode="relpath")
    message = str(err.value)
    assert "lines 2 and 5" in message and "0_1.jpg" in message and "relpath" not in message
    with pytest.raises(DataError, match="lines 2 and 5") as err:
        list_images(str(tmp_path / "list.txt"))
    assert "relpath" not in str(err.value)
    # two files whose ids differ only by extension: relpath would not help either
    shutil.copy(tmp_path / "img" / "0_0.jpg", tmp_path / "img" / "0_0.png")
    (tmp_path / "ext.txt").write_text("img/0_0.jpg\nimg/0_0.png\n")
    with pytest.raises(DataError, match="same id 'img/0_0'.*extension") as err:
        list_images(str(tmp_path / "ext.txt"), id_mode="relpath")


# ----------------------------------------------------------------------------- batch norm on one image


@pytest.mark.parametrize(
    "extra,words",
    [
        (
            {"MODEL.HEADS.BN_NECK": True, "TRAIN.BATCH_SIZE": 1},
            ["TRAIN.BATCH_SIZE=1", "MODEL.HEADS.BN_NECK False", "NUM_GPUS"],
        ),
        (
            {"MODEL.HEADS.BN_NECK": True, "TRAIN.BATCH_SIZE": 2, "NUM_GPUS": 2, "DIST.ALLOW_OVERSUBSCRIBE": True},
            ["TRAIN.BATCH_SIZE=2 over 2 process(es)", "TRAIN.BATCH_SIZE to 4", "MODEL.HEADS.BN_NECK False"],
        ),
    ],
)
def test_one_image_per_process_with_batch_norm_is_refused_before_launch(tiny_data, tmp_path, extra, words):
    from metric.engine.precheck import check_training

    cfg = load_cfg(None, tiny_opts(tiny_data, str(tmp_path / "run"), **extra))
    with pytest.raises(ConfigError) as err:
        check_training(cfg)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not os.path.exists(tmp_path / "run")


def test_one_image_per_process_without_a_neck_is_refused_where_backbone_batch_norm_has_one_value(tiny_data, tmp_path):
    from metric.engine.precheck import check_training

    # the backbone's last batch norm sees a 1 x 1 map of a 32 px image
    cfg = load_cfg(None, tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.BATCH_SIZE": 1}))
    with pytest.raises(ConfigError, match=r"TRAIN.BATCH_SIZE=1 .* batch norm layer backbone\.\S+ .*\[1, \d+, 1, 1\]"):
        check_training(cfg)
    # at 64 px it sees a 2 x 2 map (4 values per channel): accepted
    cfg = load_cfg(None, tiny_opts(tiny_data, str(tmp_path / "run"), **{"TRAIN.BATCH_SIZE": 1, "TRAIN.IM_SIZE": 64}))
    check_training(cfg)
