"""Bad inputs that used to crash with a traceback: each is refused with one line naming the key,
file or class (exit status 2 from the tools), before anything large is allocated."""

import os

import numpy as np
import pytest
import torch

from metric.config import load_cfg
from metric.engine import memory_estimates
from metric.utils.errors import ConfigError, DataError, MetricError
from tests.helpers import call_tool, run_py, tiny_opts, write_tiny_dataset

BIG_CLASSIFIER = ["MODEL.HEADS.NUM_CLASSES", "50000000", "MODEL.HEADS.REDUCTION_DIM", "512", "OPTIM.OPTIMIZER", "adamw"]


def _one_line_exit_2(status, err):
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_rng_seed_outside_numpy_range_is_refused():
    for bad in (str(2**32), "-1", str(10**30)):
        with pytest.raises(ConfigError, match=r"RNG_SEED=.* expected >= 0 and <= 4294967295"):
            load_cfg(None, ["RNG_SEED", bad])
    assert load_cfg(None, ["RNG_SEED", str(2**32 - 1)]).RNG_SEED == 2**32 - 1
    from metric.utils.rng import seed_everything

    with torch.random.fork_rng(devices=[]):
        state = np.random.get_state()
        seed_everything(2**32 - 1 + 3)  # a derived seed (RNG_SEED + epoch + 1 on resume) past 32 bits
        np.random.set_state(state)


def test_memory_estimate_refuses_what_cannot_fit():
    cpu = torch.device("cpu")
    cfg = load_cfg(None, BIG_CLASSIFIER)
    # 50M x 512 x 4 bytes x (weights, gradient, 2 adamw slots) = 410 GB; nothing is allocated.
    with pytest.raises(
        ConfigError,
        match=r"^MODEL.HEADS.NUM_CLASSES=50000000 x REDUCTION_DIM=512 \(the classifier, "
        r"its gradient and its adamw state\) needs about 410 GB, more than this "
        r"machine's 24.0 GB of memory \(CPU\)",
    ):
        memory_estimates.check_training_memory(cfg, cpu, cpu_bytes=24e9)
    with pytest.raises(ConfigError, match=r"REDUCTION_DIM=512 \(the classifier weights\) needs about 102 GB"):
        memory_estimates.check_extraction_memory(cfg, cpu, cpu_bytes=24e9)
    # On a GPU the classifier state counts against the GPU's memory (and its weights against the CPU's).
    cfg = load_cfg(None, ["MODEL.HEADS.NUM_CLASSES", "5000000", "MODEL.HEADS.REDUCTION_DIM", "512"])
    with pytest.raises(ConfigError, match=r"needs about 30.7 GB, more than the 16.0 GB of GPU memory of cuda:0"):
        memory_estimates.check_training_memory(cfg, torch.device("cuda", 0), cpu_bytes=1e12, gpu_bytes=16e9)
    with pytest.raises(
        ConfigError,
        match=r"^TRAIN.BATCH_SIZE=4096 \(4096 per process\) at TRAIN.IM_SIZE=224 .* "
        r"needs about \d+ GB",
    ):
        memory_estimates.check_training_memory(load_cfg(None, ["TRAIN.BATCH_SIZE", "4096"]), cpu, cpu_bytes=24e9)
    with pytest.raises(ConfigError, match=r"TEST.IM_SIZE=256 x INFER.SCALES max 40.0 = 10240 px needs about"):
        memory_estimates.check_extraction_memory(load_cfg(None, ["INFER.SCALES", "[1.0, 40.0]"]), cpu, cpu_bytes=24e9)
    with pytest.raises(
        ConfigError,
        match=r"^DATA_LOADER.NUM_WORKERS=1000 starts 1000 loader processes on this "
        r"machine's 2 CPU core\(s\); use at most 8",
    ):
        memory_estimates.check_extraction_memory(
            load_cfg(None, ["DATA_LOADER.NUM_WORKERS", "1000"]), cpu, cpu_bytes=24e9, cores=2
        )
    few_pixels = ["TRAIN.BATCH_SIZE", "16", "TRAIN.IM_SIZE", "64"]
    with pytest.raises(
        ConfigError,
        match=r"^DATA_LOADER.NUM_WORKERS=32 \(32 loader processes of about 102 MB each\) "
        r"needs about 3.3 GB, more than this machine's 2.0 GB",
    ):
        memory_estimates.check_training_memory(
            load_cfg(None, few_pixels + ["DATA_LOADER.NUM_WORKERS", "32"]), cpu, cpu_bytes=2e9, cores=8
        )
    # The shipped defaults fit a 32 GB machine; the machine's own memory is found.
    memory_estimates.check_training_memory(load_cfg(None, []), cpu, cpu_bytes=32e9, cores=4)
    memory_estimates.check_extraction_memory(load_cfg(None, []), cpu, cpu_bytes=32e9, cores=4)
    assert memory_estimates.machine_memory() > 10**8 and memory_estimates.cpu_cores() >= 1


def test_trainer_and_extraction_check_memory_before_allocating(tiny_data, tmp_path, monkeypatch, capsys):
    import metric.engine.extract as extract
    import metric.engine.trainer as trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("the model must not be built")

    monkeypatch.setattr(trainer, "build_model", forbidden)
    monkeypatch.setattr(extract.Predictor, "from_cfg", forbidden)
    monkeypatch.setattr(memory_estimates, "machine_memory", lambda: 8 * 10**9)
    opts = tiny_opts(
        tiny_data, str(tmp_path / "run"), **{"MODEL.HEADS.NUM_CLASSES": 10**9, "MODEL.HEADS.REDUCTION_DIM": 512}
    )
    status, _, err = call_tool("train_metric", opts, capsys)
    _one_line_exit_2(status, err)
    assert "MODEL.HEADS.NUM_CLASSES=1000000000 x REDUCTION_DIM=512" in err and "8.0 GB of memory (CPU)" in err
    opts = tiny_opts(
        tiny_data,
        str(tmp_path / "run"),
        **{
            "INFER.INPUT": os.path.join(tiny_data, "img"),
            "INFER.OUTPUT": str(tmp_path / "store"),
            "INFER.SCALES": "[1.0, 300.0]",
        },
    )
    status, _, err = call_tool("extract_features", opts, capsys)
    _one_line_exit_2(status, err)
    assert "INFER.SCALES max 300.0 = 10800 px" in err and not os.path.exists(tmp_path / "store")


def test_views_too_small_for_the_backbone_are_refused(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"TEST.IM_SIZE=36 x the smallest of INFER.SCALES \(0.2\) gives 7 px views"):
        load_cfg(None, ["TEST.IM_SIZE", "36", "INFER.SCALES", "[0.2, 1.0]"])
    timm = ["MODEL.TYPE", "timm", "MODEL.TIMM.NAME", "convnext_atto"]
    with pytest.raises(ConfigError, match=r"TRAIN.IM_SIZE=16 is not allowed: expected >= 32 for MODEL.TYPE timm"):
        load_cfg(None, timm + ["TRAIN.IM_SIZE", "16"])
    with pytest.raises(ConfigError, match=r"TEST.IM_SIZE=40 x .*\(0.5\) gives 20 px views, less than 32 px"):
        load_cfg(None, timm + ["TRAIN.IM_SIZE", "32", "TEST.IM_SIZE", "40", "INFER.SCALES", "[0.5, 1.0]"])
    # ResNet / ResNeSt take any size (padded convolutions): 8 px views, and a TEST.IM_SIZE below
    # TRAIN.IM_SIZE with a centre crop (which used to crash after the last epoch), train and evaluate.
    from metric.engine.predictor import Predictor

    cfg = load_cfg(
        None,
        [
            "MODEL.HEADS.IN_FEAT",
            "0",
            "MODEL.HEADS.REDUCTION_DIM",
            "16",
            "TEST.IM_SIZE",
            "8",
            "INFER.CENTER_CROP",
            "True",
        ],
    )
    emb = Predictor.from_cfg(cfg, device="cpu", missing_weights="ignore").describe([np.zeros((5, 300, 3), np.uint8)])
    assert emb.shape == (1, 16) and np.isfinite(emb).all()
    opts = tiny_opts(
        tiny_data,
        str(tmp_path / "run"),
        **{"TEST.IM_SIZE": 16, "INFER.SCALES": "[0.5, 1.0]", "INFER.CENTER_CROP": True, "OPTIM.MAX_EPOCH": 1},
    )
    status, _, err = call_tool("train_metric", opts, capsys)
    assert status == 0, err


def test_files_that_are_not_utf8_name_file_and_line(tmp_path):
    from metric.datasets.gldv2 import read_gldv2_csv
    from metric.datasets.listfile import read_list
    from metric.retrieval.groundtruth import read_glr_solution, read_labels

    lst = tmp_path / "list.txt"
    lst.write_bytes(b"a.jpg 0\nb\xe9.jpg 1\n")
    with pytest.raises(
        DataError,
        match=r"list.txt:2: the list file is not UTF-8 text \(invalid continuation byte: "
        r"byte 0xe9 at column 2\); save it as UTF-8$",
    ):
        read_list(str(lst), check_files=False)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"a 1\nb 2\n\xff\xfec 3\n")
    with pytest.raises(MetricError, match=r"labels.txt:3: the label file is not UTF-8 text"):
        read_labels(str(labels))
    solution = tmp_path / "solution.csv"
    solution.write_bytes(b"id,images,Usage\nq\x80,a b,Public\n")
    with pytest.raises(MetricError, match=r"solution.csv:2: the ground-truth solution is not UTF-8"):
        read_glr_solution(str(solution))
    gld = tmp_path / "train.csv"
    gld.write_bytes(b"id,url,landmark_id\nabc1,http://x,7\nab\xc3,http://x,7\n")
    with pytest.raises(DataError, match=r"train.csv:3: the GLDv2 csv is not UTF-8 text"):
        read_gldv2_csv(str(gld))
    # A byte-order mark is not part of the first line (Windows editors write one).
    lst.write_bytes("\ufeffa.jpg 0\r\nb.jpg 1\r\n".encode("utf-8"))
    assert [os.path.basename(p) for p, _ in read_list(str(lst), check_files=False)] == ["a.jpg", "b.jpg"]
    gld.write_bytes("\ufefflandmark_id,images\r\n7,abc1 abd2\r\n".encode("utf-8"))
    assert read_gldv2_csv(str(gld)) == {"7": ["abc1", "abd2"]}


def test_class_without_readable_image_is_refused_at_start(tmp_path):
    from metric.datasets.loader import train_items
    from metric.utils.cli import one_line

    data = write_tiny_dataset(str(tmp_path / "data"), num_classes=3, per_class=2)
    for i in range(2):  # every image of class 1: a failed download saved as an HTML page
        (tmp_path / "data" / "img" / f"1_{i}.jpg").write_bytes(b"<html>404 not found</html>")
    (tmp_path / "data" / "img" / "2_0.jpg").write_bytes(b"")  # class 2 keeps one readable image
    opts = tiny_opts(data, str(tmp_path / "run"), **{"MODEL.HEADS.NUM_CLASSES": 3, "TRAIN.BATCH_SIZE": 2})
    cfg = load_cfg(None, opts)
    with pytest.raises(
        DataError,
        match=r"^class 1 of .*train.txt has no readable image: none of its 2 image\(s\) "
        r"can be decoded \(e.g. .*1_0.jpg\); replace the images or remove",
    ):
        train_items(cfg)
    # Without DATA_LOADER.CHECK_FILES the class is found when drawn, in a loader worker; the tools
    # still print only the message (not the worker's traceback that torch puts into it).
    cfg = load_cfg(None, opts + ["DATA_LOADER.CHECK_FILES", "False", "DATA_LOADER.NUM_WORKERS", "1"])
    from metric.datasets.loader import build_train_loader

    loader = build_train_loader(cfg, items=train_items(cfg))
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    assert one_line(info.value).startswith("no readable image left in class 1 (2 images, e.g. ")


def test_gldv2_csv_refuses_ambiguous_or_path_like_rows(tmp_path):
    from metric.datasets.gldv2 import convert_gldv2, read_gldv2_csv

    csv = tmp_path / "train.csv"
    cases = {
        "abc1,http://x,7\nabd2,http://x,8\nabc1,http://x,9\n": (
            r"train.csv:4: image 'abc1' is listed under landmark 9 here and under landmark 7 before"
        ),
        "abc1,http://x,7\n../../etc/passwd,http://x,7\n": r"train.csv:3: image id '../../etc/passwd' looks like a path",
        "a/b/c,http://x,7\n": r"train.csv:2: image id 'a/b/c' looks like a path",
        "a\\bc,http://x,7\n": r"train.csv:2: image id 'a\\\\bc' looks like a path",
        ".hidden,http://x,7\n": r"train.csv:2: image id '.hidden' looks like a path",
        "abc1,http://x,7\nabd2,http://x,seven\n": r"train.csv:3: landmark id 'seven' is not an integer >= 0",
        "abc1,http://x,-7\n": r"train.csv:2: landmark id '-7' is not an integer >= 0",
        "abc1,http://x,1.5\n": r"train.csv:2: landmark id '1.5' is not an integer >= 0",
        "abc1,http://x,\n": r"train.csv:2: landmark id '' is not an integer >= 0",
        "ab c1,http://x,7\n": r"train.csv:2: image id 'ab c1' has white space",
    }
    for rows, message in cases.items():
        csv.write_text("id,url,landmark_id\n" + rows)
        with pytest.raises(DataError, match=message):
            convert_gldv2(str(csv), str(tmp_path / "out"))
        assert not (tmp_path / "out" / "train_list.txt").exists()
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,abc1 abd2\n8,bcd3 abd2\n")
    with pytest.raises(
        DataError,
        match=r"train_clean.csv:3: image 'abd2' is listed under landmark 8 here and under "
        r"landmark 7 before",
    ):
        read_gldv2_csv(str(clean))
    # The same image twice under one landmark is kept once; 007 and 7 are one landmark.
    clean.write_text("landmark_id,images\n7,abc1 abd2 abc1\n007,abd2 bcd3\n")
    assert read_gldv2_csv(str(clean)) == {"7": ["abc1", "abd2", "bcd3"]}


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(tiny_data, tmp_path):
    proc = run_py(["tools/train_metric.py", *tiny_opts(tiny_data, str(tmp_path / "run"), RNG_SEED=2**32)])
    assert proc.returncode == 2 and proc.stderr.startswith("error: RNG_SEED=4294967296 is not allowed")
    assert len(proc.stderr.splitlines()) == 1
    csv = tmp_path / "train.csv"
    csv.write_text("id,url,landmark_id\nabc1,http://x,7\nabc1,http://x,8\n")
    proc = run_py(["tools/gldv2_to_list.py", "--csv", str(csv), "--output", str(tmp_path / "o")])
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: {csv}:3: image 'abc1' is listed under landmark 8 here")
