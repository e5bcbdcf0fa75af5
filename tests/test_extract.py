"""Feature extraction: inputs, multi-scale/flip, shards, torchrun, bad images, reruns, infer.sh."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metric import build_model, load_cfg
from metric.datasets.transforms import decode_image, resize_longer, to_tensor
from metric.engine.extract import list_images, shard_bounds
from metric.engine.predictor import combine_views
from metric.retrieval.store import load_features
from metric.utils.errors import DataError
from tests.helpers import REPO, TINY_EXTRACT, run_py, tool_in_process

TINY = TINY_EXTRACT


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(load_cfg(None, TINY))
    path = str(tmp_path_factory.mktemp("w") / "tiny.pth")
    torch.save(model.state_dict(), path)
    return path


def _opts(weights, src, out, *extra):
    return TINY + ["TEST.WEIGHTS", weights, "INFER.INPUT", src, "INFER.OUTPUT", out, *extra]


def _extract(weights, src, out, *extra):
    """tools/extract_features.py in this process (its command line: :func:`_extract_cli`)."""
    return tool_in_process("extract_features", ["--no-progress", *_opts(weights, src, out, *extra)])


def _extract_cli(weights, src, out, *extra, env=None):
    return run_py(["tools/extract_features.py", "--no-progress", *_opts(weights, src, out, *extra)], env=env)


def test_list_images_from_list_file_and_folder(tiny_data, tmp_path):
    items = list_images(os.path.join(tiny_data, "train.txt"))
    assert len(items) == 32 and items[0] == ("0_0", os.path.join(tiny_data, "img", "0_0.jpg"))
    folder = list_images(tiny_data)
    assert sorted(folder) == sorted(items)
    rel = list_images(tiny_data, id_mode="relpath")
    assert rel[0][0] == "img/0_0"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        shutil.copy(items[0][1], tmp_path / d / "same.jpg")
    with pytest.raises(DataError, match="same id 'same'.*INFER.ID_MODE relpath"):
        list_images(str(tmp_path))
    assert len(list_images(str(tmp_path), id_mode="relpath")) == 2
    with pytest.raises(DataError, match="neither a list file nor a folder"):
        list_images(str(tmp_path / "nope"))


def test_shard_bounds_cover_everything_once():
    for count in (0, 1, 7, 10, 33):
        for total in (1, 2, 3, 8):
            spans = [shard_bounds(count, total, k) for k in range(1, total + 1)]
            covered = [i for a, b in spans for i in range(a, b)]
            assert covered == list(range(count))


def test_combine_views_gem_and_mean():
    torch.manual_seed(0)
    v = F.normalize(torch.randn(3, 5, 8), dim=2)
    mean = combine_views(v, "mean")
    assert torch.allclose(mean, F.normalize(v.mean(0), dim=1))
    gem = combine_views(v, "gem", 3.0)
    m = (v.sign() * v.abs() ** 3).mean(0)
    assert torch.allclose(gem, F.normalize(m.sign() * m.abs() ** (1 / 3), dim=1), atol=1e-6)
    assert torch.allclose(combine_views(v[:1], "gem"), v[0])


@pytest.mark.slow
def test_single_scale_descriptor_equals_manual_forward(tiny_data, tmp_path, weights):
    out = str(tmp_path / "store")
    proc = _extract(weights, os.path.join(tiny_data, "test.txt"), out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = load_features(out)
    assert len(store) == 32 and store.dim == 16 and store.meta["shard"] == {"index": 1, "total": 1}
    model = build_model(load_cfg(None, TINY))
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    im = decode_image(os.path.join(tiny_data, "img", "2_3.jpg"))
    x = to_tensor(resize_longer(im, 40))[None]  # aspect ratio kept: 40 x 48 -> 33 x 40
    assert x.shape[2:] == (33, 40)
    with torch.no_grad():
        want = F.normalize(model(x), dim=1)[0].numpy()
    got = store.embeddings[store.ids.index("2_3")]
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.slow
@pytest.mark.dist
def test_multiscale_flip_shards_and_torchrun_equal_single_process(tiny_data, tmp_path, weights):
    src = os.path.join(tiny_data, "test.txt")
    ms = ["INFER.SCALES", "[0.75, 1.0, 1.25]", "INFER.FLIP", "True"]
    single = str(tmp_path / "single")
    assert _extract_cli(weights, src, single, *ms).returncode == 0
    ref = load_features(single)
    assert ref.meta["scales"] == [0.75, 1.0, 1.25] and ref.meta["flip"] is True
    # two shards by hand, merged by the merge tool
    shards = []
    for k in (1, 2):
        shards.append(str(tmp_path / f"shard{k}"))
        cut = ["INFER.TOTAL_NUM", "2", "INFER.CUT_NUM", str(k)]
        assert _extract_cli(weights, src, shards[-1], *ms, *cut).returncode == 0
    merged = str(tmp_path / "merged")
    run_py(["tools/merge_features.py", shards[1], shards[0], "--output", merged], check=True)
    # two ranks under torchrun (gloo), merged by rank 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranked = str(tmp_path / "ranked")
    run_py(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "tools/extract_features.py",
            "--no-progress",
            *_opts(weights, src, ranked, *ms),
        ],
        check=True,
    )
    for path in (merged, ranked):
        other = load_features(path)
        assert other.ids == ref.ids
        assert np.allclose(other.embeddings, ref.embeddings, atol=1e-6)


@pytest.mark.slow
def test_unreadable_image_is_reported_listed_and_left_out(tiny_data, tmp_path, weights):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    with open(os.path.join(data, "img", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    out = str(tmp_path / "store")
    proc = _extract(weights, data, out)
    assert proc.returncode == 0
    assert "cannot decode image" in proc.stderr and "broken.jpg" in proc.stderr
    store = load_features(out)
    assert len(store) == 32 and "broken" not in store.ids
    assert [os.path.basename(p) for p in store.meta["failed_images"]] == ["broken.jpg"]
    # still unreadable: the store is complete; readable now: extracted again, and said so
    assert "skipped" in (lambda p: p.stdout + p.stderr)(_extract(weights, data, out))
    shutil.copy(os.path.join(data, "img", "0_0.jpg"), os.path.join(data, "img", "broken.jpg"))
    again = _extract(weights, data, out)
    assert again.returncode == 0 and "readable now" in again.stdout + again.stderr
    store = load_features(out)
    assert len(store) == 33 and "broken" in store.ids and store.meta["failed_images"] == []


@pytest.mark.slow
def test_rerun_skips_a_complete_store_and_redoes_a_changed_one(tiny_data, tmp_path, weights):
    src, out = os.path.join(tiny_data, "test.txt"), str(tmp_path / "store")
    assert _extract(weights, src, out).returncode == 0
    mtime = os.path.getmtime(os.path.join(out, "embeddings.npy"))
    again = _extract(weights, src, out)
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr
    assert os.path.getmtime(os.path.join(out, "embeddings.npy")) == mtime
    changed = _extract(weights, src, out, "INFER.FLIP", "True")
    assert changed.returncode == 0 and load_features(out).meta["flip"] is True


@pytest.mark.parametrize(
    "opts, words",
    [
        (["INFER.INPUT", ""], ["INFER.INPUT"]),
        (["INFER.INPUT", "/no/such/list.txt"], ["neither a list file nor a folder"]),
        (["INFER.SCALES", "[]"], ["INFER.SCALES"]),
        (["INFER.ID_MODE", "basename"], ["INFER.ID_MODE", "stem | relpath"]),
        (["TEST.WEIGHTS", "/no/such.pth"], ["weights file not found"]),
    ],
)
def test_bad_input_exits_2(tiny_data, tmp_path, weights, opts, words, capsys):
    import runpy

    from metric.utils.cli import run_tool

    main = runpy.run_path(os.path.join(REPO, "tools", "extract_features.py"))["main"]
    argv = ["--no-progress", *_opts(weights, os.path.join(tiny_data, "test.txt"), str(tmp_path / "o")), *opts]
    assert run_tool(main, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: ")
    for w in words:
        assert w in line[0]


@pytest.mark.slow
def test_infer_sh_runs_shards_skips_done_ones_and_merges(tiny_data, tmp_path, weights):
    out = str(tmp_path / "feats")
    cmd = [
        "bash",
        os.path.join(REPO, "tools", "infer.sh"),
        "--cfg",
        os.path.join(REPO, "configs", "metric", "demo_cpu.yaml"),
        "--weights",
        weights,
        "--input",
        os.path.join(tiny_data, "test.txt"),
        "--output",
        out,
        "--shards",
        "3",
        "--gpus",
        "",
        *TINY,
    ]
    env = dict(os.environ, PYTHONPATH=REPO, PYTHON=sys.executable)
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    store = load_features(out)
    assert len(store) == 32 and "shard" not in store.meta
    shard1 = os.path.join(out + ".shards", "shard_0001_of_0003", "embeddings.npy")
    mtime = os.path.getmtime(shard1)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0 and os.path.getmtime(shard1) == mtime
    bad = subprocess.run(cmd[:2] + ["--cfg"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2
