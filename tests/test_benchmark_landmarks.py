"""Landmark benchmarks (issue 19): query crops as revisitop/cirtorch make them, the converters on
replicas of the distributed layouts, +R1M scoring in bounded memory against the full ranking,
and tools/benchmark.py end to end (rerun only scores; bad input is one line, exit 2)."""

import csv
import json
import math
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from metric.config import load_cfg
from metric.datasets import benchmarks as bm
from metric.datasets.benchmarks import landmarks
from metric.datasets.benchmarks.landmarks import gldv2_relpath
from metric.datasets.transforms import crop_box, resize_longer, to_tensor
from metric.engine.predictor import ImageViews, Preprocess
from metric.modeling import build_model
from metric.retrieval.distractors import iter_row_blocks, revisited_map_with_distractors
from metric.retrieval.metrics import evaluate_glr, evaluate_labelled, evaluate_revisited
from metric.retrieval.metrics_revisited import rank_index, revisited_map
from metric.retrieval.pipeline import search_stores
from metric.retrieval.store import load_features, save_features
from metric.utils.errors import ConfigError, DataError
from tests.helpers import TINY_EXTRACT, run_py, tool_in_process

# Query names of the real qimlist of roxford5k / rparis6k (the original Oxford5k / Paris6k queries
# that revisitop kept), with boxes of the form revisitop stores (floats, halves included).
OXF_QUERIES = {
    "all_souls_000013": (136.5, 34.1, 648.5, 955.7),
    "ashmolean_000058": (2.5, 3.5, 41.5, 30.5),
    "balliol_000051": (-3.2, 10.0, 30.7, 70.2),  # outside the image on the left: PIL pads with black
    "christ_church_000179": (10.49, 0.51, 60.5, 46.5),
    "radcliffe_camera_000519": (0.0, 0.0, 64.0, 48.0),
}
PAR_QUERIES = {"paris_defense_000605": (5.5, 4.5, 50.5, 40.5), "paris_eiffel_000266": (1.0, 2.0, 30.0, 44.0)}
TINY = TINY_EXTRACT


def _image(rng, h, w):
    im = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
    return cv2.GaussianBlur(im, (5, 5), 0)


def write_revisited(root, name, queries, n_index=12, seed=0, ext=".jpg"):
    """A replica of revisitop's layout: root/jpg/<name>.jpg and root/gnd_<name>.pkl."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "jpg"), exist_ok=True)
    prefix = "paris_general_" if name == "rparis6k" else "oxford_"
    imlist = [f"{prefix}{i:06d}" for i in range(n_index)]
    for n in list(queries) + imlist:
        im = _image(rng, 48, 64) if n in queries else _image(rng, int(rng.integers(30, 60)), int(rng.integers(30, 60)))
        cv2.imwrite(os.path.join(root, "jpg", n + ext), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    gnd = []
    for box in queries.values():
        p = rng.permutation(n_index)
        gnd.append({"bbx": list(box), "easy": p[:3].tolist(), "hard": p[3:5].tolist(), "junk": p[5:6].tolist()})
    with open(os.path.join(root, f"gnd_{name}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": list(queries), "gnd": gnd}, f)
    return root


def write_r1m(root, n=9, seed=1, corrupt=0):
    """A revisitop1m-style list (paths relative to jpg/, extension included) and its tree; the
    first ``corrupt`` images are not decodable."""
    rng = np.random.default_rng(seed)
    rels = []
    for i in range(n):
        rel = f"{i % 3}/{i:032x}.jpg"
        os.makedirs(os.path.join(root, "jpg", os.path.dirname(rel)), exist_ok=True)
        cv2.imwrite(os.path.join(root, "jpg", rel), _image(rng, 40, 52))
        if i < corrupt:
            with open(os.path.join(root, "jpg", rel), "wb") as f:
                f.write(b"\xff\xd8\xff\xe0 not a jpeg")
        rels.append(rel)
    with open(os.path.join(root, "revisitop1m.txt"), "w") as f:
        f.write("\n".join(rels) + "\n")
    return root


# --- crops -----------------------------------------------------------------------------------------


def test_query_crop_equals_pil_and_scales_as_the_full_image(tmp_path):
    root = write_revisited(str(tmp_path / "oxf"), "roxford5k", OXF_QUERIES, n_index=2, ext=".png")
    paths = [os.path.join(root, "jpg", n + ".png") for n in OXF_QUERIES]
    boxes = list(OXF_QUERIES.values())
    size, scales = 40, (1.0, 0.7071, 1.4142)
    views = ImageViews(paths, Preprocess(size, scales), boxes=boxes)
    for i, (path, box) in enumerate(zip(paths, boxes)):
        pil = Image.open(path).convert("RGB")
        ours = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        assert np.array_equal(np.asarray(pil), ours)  # lossless: both decoders give the same pixels
        ref_crop = np.asarray(pil.crop(box))  # what revisitop / cirtorch feed the network
        assert np.array_equal(crop_box(ours, box), ref_crop), box
        got, index, failed = views[i]
        assert index == i and failed == ""
        # cirtorch: crop.thumbnail((imsize * max(crop.size) / max(full.size),) * 2), then per scale
        # interpolate(scale_factor=s), which floors the size
        thumb = pil.crop(box)
        thumb.thumbnail((size * max(thumb.size) / max(pil.size),) * 2)
        for s, view in zip(scales, got):
            side = max(8, math.floor(max(thumb.size) * s))
            want = to_tensor(resize_longer(ref_crop, side))
            assert max(view.shape[1:]) == side and torch.equal(view, want)
    # not blown up to the full size: PIL cuts (2.5, 3.5, 41.5, 30.5) as 2..42 x 4..30 (halves to
    # even), a 40 x 26 crop of a 64 x 48 image: its longer side becomes 40 * 40 / 64 = 25, not 40
    assert tuple(views[1][0][0].shape[1:]) == (16, 25)


def test_box_is_in_the_stored_pixels_not_the_exif_turned_image(tmp_path):
    """A JPEG whose EXIF says "rotate 90°": OpenCV turns it by default, PIL (the reference loaders)
    does not, and revisitop's bbx is in PIL's frame; a boxed image is cropped in that frame."""
    path = str(tmp_path / "turned.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(_image(np.random.default_rng(3), 30, 50)).save(path, quality=100, exif=exif.tobytes())
    pil = Image.open(path).convert("RGB")
    assert pil.size == (50, 30) and cv2.imread(path).shape[:2] == (50, 30)  # PIL: 50 wide; OpenCV: turned
    box = (4.5, 2.0, 44.5, 20.0)
    (view,), _, failed = ImageViews([path], Preprocess(40), boxes=[box])[0]
    assert failed == ""
    ref = np.asarray(pil.crop(box))  # 40 x 18 in PIL's frame
    stored = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB)
    assert np.abs(stored.astype(int) - np.asarray(pil).astype(int)).max() <= 2  # the same pixels (two libjpegs)
    assert torch.equal(view, to_tensor(resize_longer(crop_box(stored, box), 32)))  # 40 * 40 / 50
    assert tuple(view.shape[1:]) == (ref.shape[0] * 32 // 40, 32)


def test_box_rounding_is_pythons():
    im = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    for box in [(0.5, 1.5, 2.5, 3.5), (1.4999, 0.5001, 8.5, 9.5), (2.0, 2.0, 2.6, 3.0)]:
        assert np.array_equal(crop_box(im, box), np.asarray(Image.fromarray(im).crop(box)))
    with pytest.raises(ValueError):
        crop_box(im, (2.0, 2.0, 2.4, 3.0))  # rounds to no width


def test_box_inputs_bad_input(tmp_path):
    from metric.datasets.listfile import read_box_list
    from metric.engine.extract import list_images

    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1 2 3\n")
    with pytest.raises(DataError, match="bad.txt:1: expected 'path x1 y1 x2 y2'"):
        read_box_list(str(bad))
    bad.write_text("a.jpg 0 0 10 10\nb.jpg 5 5 5.2 9\n")
    with pytest.raises(DataError, match="bad.txt:2: box 5 5 5.2 9 has no area"):
        read_box_list(str(bad))
    oxf = write_revisited(str(tmp_path / "oxf"), "roxford5k", OXF_QUERIES, n_index=2)
    with pytest.raises(DataError, match="'oxford_000000' is not one of its 5 queries"):
        list_images(os.path.join(oxf, "jpg"), boxes=os.path.join(oxf, "gnd_roxford5k.pkl"))
    with pytest.raises(ConfigError, match="INFER.BOXES"):
        load_cfg(None, ["INFER.BOXES", "list", "INFER.CENTER_CROP", "True"])


# --- converters ------------------------------------------------------------------------------------


def test_revisited_converter_on_a_replica(tmp_path):
    root = write_revisited(str(tmp_path / "roxford5k"), "roxford5k", OXF_QUERIES)
    with pytest.raises(DataError, match="4993"):  # the distributed counts are checked by default
        bm.convert("roxford5k", root)
    splits = bm.convert("roxford5k", str(tmp_path), allow_subset=True)  # the parent folder works too
    assert splits.kind == "revisited" and not splits.complete and len(splits.notes) == 2
    assert [q for q, _ in splits.query] == list(OXF_QUERIES) and len(splits.index) == 12
    assert splits.query_boxes == [tuple(b) for b in OXF_QUERIES.values()]
    assert splits.query[0][1] == "jpg/all_souls_000013.jpg"
    r1m = write_r1m(str(tmp_path / "r1m"))
    both = bm.convert("roxford5k+r1m", root, r1m, allow_subset=True)
    assert both.name == "roxford5k+r1m" and len(both.distractors) == 9
    assert both.distractors[0] == ("r1m/0/" + f"{0:032x}", f"jpg/0/{0:032x}.jpg")
    with pytest.raises(DataError, match="revisitop1m.txt: 9 distractor images, but the distributed files have 1001001"):
        landmarks.r1m(r1m)


def test_revisited_converter_bad_input(tmp_path):
    oxf = write_revisited(str(tmp_path / "oxf"), "roxford5k", OXF_QUERIES)
    par = write_revisited(str(tmp_path / "par"), "rparis6k", PAR_QUERIES)
    with pytest.raises(DataError, match="gnd_rparis6k.pkl not found.*gnd_roxford5k.pkl: is it the roxford5k"):
        bm.convert("rparis6k", oxf, allow_subset=True)
    os.replace(os.path.join(par, "gnd_rparis6k.pkl"), os.path.join(oxf, "gnd_roxford5k.pkl"))  # wrong data set
    with pytest.raises(DataError, match="not the roxford5k ground truth.*paris_"):
        bm.convert("roxford5k", oxf, allow_subset=True)
    write_revisited(oxf, "roxford5k", OXF_QUERIES)
    with pytest.raises(DataError, match="unknown benchmark 'gldv2\\+r1m'"):
        bm.convert("gldv2+r1m", oxf)
    with pytest.raises(DataError, match="--distractors"):
        bm.convert("roxford5k+r1m", oxf, allow_subset=True)
    os.remove(os.path.join(oxf, "jpg", "oxford_000003.jpg"))
    with pytest.raises(DataError, match="1 of the 12 index images.*oxford_000003"):
        bm.convert("roxford5k", oxf, allow_subset=True)
    gnd_path = os.path.join(par, "gnd_rparis6k.pkl")
    write_revisited(par, "rparis6k", PAR_QUERIES)
    with open(gnd_path, "rb") as f:
        gnd = pickle.load(f)
    gnd["gnd"][1]["bbx"] = [float("nan"), 1.0, 20.0, 20.0]
    with open(gnd_path, "wb") as f:
        pickle.dump(gnd, f)
    with pytest.raises(DataError, match=r"\(gnd\[1\]\) has no usable bbx: \[nan"):
        bm.convert("rparis6k", par, allow_subset=True)


def write_gldv2(root, n_index=10, queries=(("q0", "Public"), ("q1", "Private"), ("q2", "Ignored")), seed=2):
    rng = np.random.default_rng(seed)
    index_ids = [f"{i:016x}" for i in rng.choice(2**40, n_index, replace=False)]
    for folder, ids in (("index", index_ids), ("test", [f"{q}{'a' * 15}" for q, _ in queries])):
        for image_id in ids:
            path = os.path.join(root, gldv2_relpath(image_id, folder))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cv2.imwrite(path, _image(rng, 40, 48))
    with open(os.path.join(root, "retrieval_solution_v2.1.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "images", "Usage"])
        for j, (q, usage) in enumerate(queries):
            w.writerow([f"{q}{'a' * 15}", "None" if usage == "Ignored" else " ".join(index_ids[j : j + 3]), usage])
    return root, index_ids


def test_gldv2_converter_on_a_replica(tmp_path):
    root, index_ids = write_gldv2(str(tmp_path / "gld"))
    with pytest.raises(DataError, match="1129"):
        bm.convert("gldv2-retrieval", root)
    splits = bm.convert("gldv2-retrieval", root, allow_subset=True)
    assert [q for q, _ in splits.query] == ["q0" + "a" * 15, "q1" + "a" * 15]  # the scored ones
    assert sorted(i for i, _ in splits.index) == sorted(index_ids)
    assert splits.query[0][1] == "test/q/0/a/q0" + "a" * 15 + ".jpg"
    os.makedirs(os.path.join(root, "metadata"))  # mmpretrain's layout keeps the csv files in metadata/
    csv_name = "retrieval_solution_v2.1.csv"
    os.replace(os.path.join(root, csv_name), os.path.join(root, "metadata", csv_name))
    moved = bm.convert("gldv2-retrieval", root, allow_subset=True)
    assert moved.ground_truth.endswith("metadata/retrieval_solution_v2.1.csv")
    assert (moved.query, moved.index) == (splits.query, splits.index)
    with open(moved.ground_truth, "a") as f:
        f.write("ab,x y,Public\n")  # an id too short to name its test/ folder
    with pytest.raises(DataError, match=r"retrieval_solution_v2.1.csv:5: 'ab' is not a GLDv2 image id"):
        bm.convert("gldv2-retrieval", root, allow_subset=True)


def test_conversion_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    from metric.datasets.benchmarks.prepare import convert_cached

    root = write_revisited(str(tmp_path / "oxf"), "roxford5k", OXF_QUERIES)
    cache = str(tmp_path / "cache")
    first = convert_cached("roxford5k", root, None, True, cache)
    calls = []
    real = bm.convert
    monkeypatch.setattr(bm, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert convert_cached("roxford5k", root, None, True, cache) == first and calls == []  # reused
    write_revisited(root, "roxford5k", OXF_QUERIES, n_index=10)  # a new gnd file (and jpg/ changes)
    again = convert_cached("roxford5k", root, None, True, cache)
    assert len(calls) == 1 and len(again.index) == 10
    with pytest.raises(DataError, match="4993"):  # other arguments: converted again, not reused
        convert_cached("roxford5k", root, None, False, cache)
    with open(os.path.join(cache, "conversion.json"), "w") as f:
        f.write("{not json")
    assert convert_cached("roxford5k", root, None, True, cache) == again and len(calls) == 3


def test_the_row_states_the_extraction_settings():
    from metric.engine.benchmark import describe_settings, settings_of

    cfg = load_cfg(None, ["INFER.SCALES", "[1.0, 0.7071, 1.4142]", "TEST.IM_SIZE", "1024", "INFER.MULTISCALE_P", "4"])
    assert describe_settings(settings_of(cfg, "float16"), True) == (
        "scales [1,0.7071,1.4142] (gem p=4), longer side 1024, no flip, float16, queries cropped to bbx"
    )
    opts = ["TEST.IM_SIZE", "224", "INFER.CENTER_CROP", "True", "INFER.CROP_FRACTION", "0.875", "INFER.FLIP", "True"]
    dml = settings_of(load_cfg(None, opts + ["INFER.MULTISCALE_POOL", "mean"]), "float32")
    assert describe_settings(dml, False) == "scales [1] (mean), shorter side / 0.875 + centre crop 224, flip, float32"
    assert describe_settings({**dml, "mixed_precision": "bf16"}, False).endswith("float32, bf16 autocast")
    # SuperGlobal pooling changes the descriptors: two rows with and without it never read alike
    sg = settings_of(load_cfg(None, ["INFER.POOL_P", "4.6", "INFER.REGIONAL_GEM", "True"]), "float32")
    assert sg["superglobal"] == {"pool_p": 4.6, "regional_gem_p": 2.5, "regional_gem_size": 5}
    assert describe_settings(sg, False).endswith("float32, SuperGlobal GeM+ p=4.6, regional GeM p=2.5 size 5")
    rgem = settings_of(load_cfg(None, ["INFER.REGIONAL_GEM", "True"]), "float32")
    assert describe_settings(rgem, False).endswith("float32, regional GeM p=2.5 size 5")
    assert settings_of(load_cfg(None, []), "float32")["superglobal"] is None


# --- +R1M in bounded memory -------------------------------------------------------------------------------


def test_distractor_scoring_equals_the_full_ranking(tmp_path):
    rng = np.random.default_rng(0)
    q, x, d = (rng.standard_normal((n, 8)).astype(np.float32) for n in (7, 60, 500))
    d[:20] = x[:20]  # distractors tied with index images rank after them
    d[20:25] = d[25:30]
    x, d, q = np.round(x * 8) / 8, np.round(d * 8) / 8, np.round(q * 4) / 4  # exact products: ties are ties
    gnd = []
    for _ in range(7):
        p = rng.permutation(60)
        gnd.append({"easy": p[:5], "hard": p[5:9], "junk": p[9:12]})
    want = revisited_map(rank_index(q, np.concatenate([x, d])), gnd)
    assert revisited_map_with_distractors(q, x, iter_row_blocks(d, rows=37), gnd) == want
    save_features(str(tmp_path / "d"), d, [f"d{i}" for i in range(500)], normalize=False, dtype="float16")
    store = load_features(str(tmp_path / "d"))
    blocks = list(iter_row_blocks(store.embeddings, rows=64))  # plain file reads of the memmap
    assert np.array_equal(np.concatenate(blocks), np.asarray(store.embeddings, np.float32))


# --- tools/benchmark.py end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("w") / "tiny.pth")
    torch.save(build_model(load_cfg(None, TINY)).state_dict(), path)
    return path


def _bench(weights, feats, *args, opts=()):
    argv = ["--no-progress", "--features", feats, *args, *TINY, "TEST.WEIGHTS", weights, *opts]
    return tool_in_process("benchmark", argv)


@pytest.mark.slow
def test_benchmark_tool_end_to_end(tmp_path, weights, monkeypatch):
    oxf = write_revisited(str(tmp_path / "roxford5k"), "roxford5k", OXF_QUERIES)
    r1m = write_r1m(str(tmp_path / "revisitop1m"), corrupt=1)
    feats, out = str(tmp_path / "feats"), str(tmp_path / "r.json")
    args = ["--benchmark", "roxford5k", "--data-root", oxf, "--allow-subset", "--json", out]
    run = _bench(weights, feats, *args)
    assert run.returncode == 0, run.stderr
    row = run.stdout.strip().splitlines()[-2]
    assert row.startswith("ROxf: mAP E/M/H ") and "queries cropped to bbx" in row and "longer side 40" in row
    assert "SUBSET: not comparable" in row
    result = json.load(open(out))
    # the scores are tools/evaluate.py's revisited scores of the stores written (tests/test_metrics_revisited.py)
    want = evaluate_revisited(
        result["stores"]["query"], result["stores"]["index"], os.path.join(oxf, "gnd_roxford5k.pkl")
    )
    assert result["metrics"] == want
    # the query store equals tools/extract_features.py with INFER.BOXES from the gnd file
    qlist = tmp_path / "q.txt"
    qlist.write_text("".join(f"{oxf}/jpg/{n}.jpg\n" for n in OXF_QUERIES))
    ext = tool_in_process(
        "extract_features",
        ["--no-progress", *TINY, "TEST.WEIGHTS", weights, "INFER.INPUT", str(qlist), "INFER.OUTPUT",
         str(tmp_path / "q"), "INFER.BOXES", os.path.join(oxf, "gnd_roxford5k.pkl")],
    )  # fmt: skip
    assert ext.returncode == 0, ext.stderr
    assert np.array_equal(
        load_features(str(tmp_path / "q")).embeddings, load_features(result["stores"]["query"]).embeddings
    )

    # a rerun only scores: extraction would fail
    import metric.engine.benchmark as engine

    def no_extraction(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(engine, "extract_shard", no_extraction)
    again = _bench(weights, feats, *args)
    assert again.returncode == 0, again.stderr
    assert json.load(open(out))["metrics"] == want
    monkeypatch.undo()

    # +R1M: the distractors appended to the index; equal to scoring the merged index store
    both = _bench(weights, feats, "--benchmark", "roxford5k+r1m", "--data-root", oxf, "--distractors", r1m,
                  "--allow-subset", "--json", out)  # fmt: skip
    assert both.returncode == 0, both.stderr
    # an undecodable distractor is reported and counted, not refused
    assert "ROxf+R1M:" in both.stdout and "| distractors 8 (1 unreadable, left out)" in both.stdout
    res = json.load(open(out))
    index, extra = load_features(res["stores"]["index"]), load_features(res["stores"]["distractors"])
    merged = save_features(
        str(tmp_path / "merged"), np.concatenate([index.embeddings, extra.embeddings]), index.ids + extra.ids
    )
    assert res["metrics"] == evaluate_revisited(res["stores"]["query"], merged, os.path.join(oxf, "gnd_roxford5k.pkl"))

    # RPar+R1M reuses the distractor store: only its own query and index stores are extracted
    par = write_revisited(str(tmp_path / "rparis6k"), "rparis6k", PAR_QUERIES)
    extracted = []
    real_extract = engine.extract_shard

    def recording(cfg, items, out_dir, *a, **k):
        extracted.append(os.path.relpath(out_dir, feats))
        return real_extract(cfg, items, out_dir, *a, **k)

    monkeypatch.setattr(engine, "extract_shard", recording)
    paris = _bench(weights, feats, "--benchmark", "rparis6k+r1m", "--data-root", par, "--distractors", r1m,
                   "--allow-subset")  # fmt: skip
    assert paris.returncode == 0, paris.stderr
    assert "RPar+R1M:" in paris.stdout and sorted(extracted) == ["rparis6k/index", "rparis6k/query"]
    monkeypatch.undo()

    # a store extracted with other settings is refused in one line
    bad = _bench(weights, feats, *args, opts=("INFER.SCALES", "[1.0, 0.7071]"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "extracted with other settings than asked: INFER.SCALES" in bad.stderr
    other = str(tmp_path / "other.pth")
    torch.manual_seed(1)
    torch.save(build_model(load_cfg(None, TINY)).state_dict(), other)
    bad = _bench(other, feats, *args)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "other settings than asked: model weights or MODEL config, TEST.WEIGHTS" in bad.stderr

    # --make-lists: the query list carries the boxes and extracts as the benchmark does
    lists = tool_in_process("benchmark", ["--benchmark", "roxford5k", "--data-root", oxf, "--allow-subset",
                                          "--make-lists", str(tmp_path / "lists")])  # fmt: skip
    assert lists.returncode == 0, lists.stderr
    first = (tmp_path / "lists" / "roxford5k_query.txt").read_text().splitlines()[0]
    assert first == f"{oxf}/jpg/all_souls_000013.jpg 136.5 34.1 648.5 955.7"
    from_list = tool_in_process(
        "extract_features",
        ["--no-progress", *TINY, "TEST.WEIGHTS", weights, "INFER.INPUT", str(tmp_path / "lists/roxford5k_query.txt"),
         "INFER.OUTPUT", str(tmp_path / "q_list"), "INFER.BOXES", "list"],
    )  # fmt: skip
    assert from_list.returncode == 0, from_list.stderr
    listed = load_features(str(tmp_path / "q_list"))
    assert listed.ids == list(OXF_QUERIES)
    assert np.array_equal(listed.embeddings, load_features(result["stores"]["query"]).embeddings)


@pytest.mark.slow
def test_benchmark_tool_gldv2(tmp_path, weights):
    root, _ = write_gldv2(str(tmp_path / "gld"))
    out = str(tmp_path / "g.json")
    run = _bench(weights, str(tmp_path / "f"), "--benchmark", "gldv2-retrieval", "--data-root", root,
                 "--allow-subset", "--json", out)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "GLDv2-retrieval: mAP@100 Public/Private " in run.stdout
    result = json.load(open(out))
    metrics = result["metrics"]
    assert set(metrics) == {"mAP@100", "mP@k"} and metrics["mAP@100"]["Public"] is not None
    # the same as tools/search.py + tools/evaluate.py on the stores written
    csv_path = str(tmp_path / "results.csv")
    search_stores(result["stores"]["query"], result["stores"]["index"], csv_path, topk=100)
    assert metrics == evaluate_glr(csv_path, os.path.join(root, "retrieval_solution_v2.1.csv"))


def test_benchmark_tool_bad_input_is_one_line(tmp_path, weights):
    oxf = write_revisited(str(tmp_path / "oxf"), "roxford5k", OXF_QUERIES, n_index=6)
    feats = str(tmp_path / "f")
    cases = {
        "4993": ["--benchmark", "roxford5k", "--data-root", oxf],  # real counts expected without --allow-subset
        "gnd_rparis6k.pkl not found": ["--benchmark", "rparis6k", "--data-root", oxf, "--allow-subset"],
        "unknown benchmark": ["--benchmark", "oxford105k", "--data-root", oxf],
    }
    for expected, args in cases.items():
        run = _bench(weights, feats, *args)
        assert run.returncode == 2 and expected in run.stderr and run.stderr.count("\n") == 1, (args, run.stderr)
    run = _bench(weights, feats, "--benchmark", "roxford5k", "--data-root", oxf, "--allow-subset",
                 opts=("INFER.CENTER_CROP", "True"))  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "error: INFER.CENTER_CROP True with roxford5k, whose queries are cropped" in run.stderr
    # an index image that cannot be decoded is refused (it is scored)
    with open(os.path.join(oxf, "jpg", "oxford_000002.jpg"), "wb") as f:
        f.write(b"not an image")
    run = _bench(weights, feats, "--benchmark", "roxford5k", "--data-root", oxf, "--allow-subset")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]  # (the extraction warned too)
    assert run.returncode == 2 and len(errors) == 1 and run.stderr.endswith(errors[0] + "\n")
    assert "1 index images could not be decoded (first: " in errors[0] and "oxford_000002.jpg" in errors[0]


@pytest.mark.slow
def test_benchmark_command_line_contract(tmp_path):
    """The real command line: one line on stderr and exit status 2 for a missing annotation file."""
    run = run_py(["tools/benchmark.py", "--benchmark", "roxford5k", "--data-root", str(tmp_path)])
    assert run.returncode == 2 and run.stderr.startswith("error: annotation file gnd_roxford5k.pkl not found")
    assert run.stderr.count("\n") == 1


def write_inshop(root, seed=3):
    """In-Shop's list_eval_partition.txt (two header lines) + img/: 3 training items, 4 test items
    of 2 query and 3 gallery images each (tiny images whose colour depends on the item)."""
    rng = np.random.default_rng(seed)
    rows = [(f"img/MEN/Denim/id_{i:08d}/{k:02d}_1_front.jpg", i, "train") for i in range(3) for k in range(2)]
    for i in range(3, 7):
        rows += [(f"img/WOMEN/Dresses/id_{i:08d}/{k:02d}_1_front.jpg", i, "query") for k in range(2)]
        rows += [(f"img/WOMEN/Dresses/id_{i:08d}/{k:02d}_2_side.jpg", i, "gallery") for k in range(3)]
    for rel, item, _ in rows:
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        im = np.clip(_image(rng, 36, 28).astype(int) // 2 + 30 * item, 0, 255).astype(np.uint8)
        cv2.imwrite(os.path.join(root, rel), im)
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
        f.writelines(f"{rel}  id_{item:08d}  {status}\n" for rel, item, status in rows)
    return root


@pytest.mark.slow
@pytest.mark.skipif("inshop" not in bm.BENCHMARKS, reason="the DML converters (dml.py) are not there")
def test_benchmark_tool_dml_query_against_gallery(tmp_path, weights):
    """The driver's labelled path (In-Shop: query vs gallery): its recall@1 and MAP@R equal
    tools/evaluate.py's on the stores it wrote."""
    root = write_inshop(str(tmp_path / "inshop"))
    out = str(tmp_path / "i.json")
    run = _bench(weights, str(tmp_path / "f"), "--benchmark", "inshop", "--data-root", root, "--allow-subset",
                 "--json", out)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "inshop: R@1/10/20/30/40 " in run.stdout and "MAP@R" in run.stdout
    result = json.load(open(out))
    labels = {}
    for part in ("query", "gallery"):
        store = load_features(result["stores"][part])
        path = tmp_path / f"{part}_labels.txt"
        path.write_text("".join(f"{i} {i.split('/')[-2]}\n" for i in store.ids))
        labels[part] = str(path)
    want = evaluate_labelled(result["stores"]["query"], labels["query"], result["stores"]["gallery"], labels["gallery"])
    got = result["metrics"]
    assert got["recall@1"] == pytest.approx(want["recall@1"]) and got["mAP@R"] == pytest.approx(want["mAP@R"])
    assert "[SUBSET: not comparable with published numbers; train 6 images / 3 classes (distributed: 25882 / 3997)" in (
        run.stdout
    )

    # a store extracted with other settings is refused naming the setting, whichever way it changed
    feats, args = str(tmp_path / "f2"), ["--benchmark", "inshop", "--data-root", root, "--allow-subset"]
    crop = ("INFER.CENTER_CROP", "True", "INFER.CROP_FRACTION", "0.875", "INFER.SCALES", "[1.0, 0.7071]",
            "INFER.MULTISCALE_P", "4")  # fmt: skip
    assert _bench(weights, feats, *args, opts=crop).returncode == 0
    for opts, named in [
        (crop[:2] + crop[4:], "INFER.CROP_FRACTION (0.875 there, 1.0 asked)"),
        (crop[4:], "INFER.CENTER_CROP (True there, False asked), INFER.CROP_FRACTION (0.875 there, 1.0 asked)"),
        (crop[:6], "INFER.MULTISCALE_P (4.0 there, 3.0 asked)"),
    ]:
        bad = _bench(weights, feats, *args, opts=opts)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert f"other settings than asked: {named}; choose another" in bad.stderr


def write_cub(root, classes=(1, 2, 101, 102, 150), per_class=3, seed=4):
    """CUB_200_2011/images.txt, image_class_labels.txt and images/ whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "CUB_200_2011")
    names, labels = [], []
    for c in classes:
        for i in range(per_class - (c == 150)):  # class 150: one image less
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            os.makedirs(os.path.dirname(os.path.join(base, "images", rel)), exist_ok=True)
            im = np.clip(_image(rng, 30, 34).astype(int) // 2 + 20 * (c % 7), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(base, "images", rel), im)
            names.append(rel)
            labels.append(c)
    with open(os.path.join(base, "images.txt"), "w") as f:
        f.writelines(f"{i + 1} {rel}\n" for i, rel in enumerate(names))
    with open(os.path.join(base, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i + 1} {c}\n" for i, c in enumerate(labels))
    return root


@pytest.mark.slow
@pytest.mark.skipif("cub200" not in bm.BENCHMARKS, reason="the DML converters (dml.py) are not there")
def test_benchmark_tool_dml_leave_one_out(tmp_path, weights):
    """The driver's leave-one-out path (CUB): classes 101-200 only, each test image against the
    others; equal to labelled_metrics on the store it wrote."""
    from metric.retrieval.metrics import labelled_metrics

    root = write_cub(str(tmp_path / "cub"))
    out = str(tmp_path / "c.json")
    run = _bench(weights, str(tmp_path / "f"), "--benchmark", "cub200", "--data-root", root, "--allow-subset",
                 "--json", out)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "cub200: R@1/2/4/8 " in run.stdout and "MAP@R" in run.stdout
    result = json.load(open(out))
    store = load_features(result["stores"]["query"])
    labels = [int(i.split("/")[-2].split(".")[0]) for i in store.ids]
    assert sorted(set(labels)) == [101, 102, 150] and len(labels) == 8
    assert result["metrics"] == labelled_metrics(np.asarray(store.embeddings), labels, ks=(1, 2, 4, 8))

    # an image that cannot be decoded is refused (every test image is scored); once the file is
    # replaced, the rerun extracts that store again instead of refusing it for ever
    image = os.path.join(root, "CUB_200_2011", "images", "101.Bird_101", "Bird_101_1.jpg")
    good = open(image, "rb").read()
    open(image, "wb").write(b"not a jpeg")
    feats, args = str(tmp_path / "g"), ["--benchmark", "cub200", "--data-root", root, "--allow-subset"]
    bad = _bench(weights, feats, *args, "--json", out)
    assert bad.returncode == 2 and "1 query images could not be decoded" in bad.stderr, bad.stderr
    open(image, "wb").write(good)
    fixed = _bench(weights, feats, *args, "--json", out)
    assert fixed.returncode == 0, fixed.stderr
    again = json.load(open(out))
    assert again["metrics"] == result["metrics"] and not load_features(again["stores"]["query"]).meta["failed_images"]
