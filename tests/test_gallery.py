"""Result gallery: one row per query, only existing images embedded, placeholders otherwise."""

import base64
import os
import re

import cv2
import numpy as np
import pytest

from metric.retrieval.gallery import ImageFinder, build_gallery
from metric.utils.errors import MetricError
from tests.helpers import call_tool


def image(path, h=60, w=90, value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), value, dtype=np.uint8))


@pytest.fixture
def gallery_data(tmp_path):
    q, x = tmp_path / "query", tmp_path / "index"
    image(q / "q1.jpg")
    image(q / "sub" / "q2.png", h=300, w=200)  # found by stem, resized
    # q<3>&: no image -> placeholder
    image(x / "a.jpg")
    image(x / "b.JPEG")
    image(x / "deep" / "er" / "c.png")
    (x / "broken.jpg").write_bytes(b"not an image")  # unreadable -> placeholder
    # "gone" has no file -> placeholder
    results = tmp_path / "results.csv"
    results.write_text("id,images\nq1,a b c gone\nq2,c broken a\nq<3>&,a\n")
    scores = tmp_path / "scores.csv"
    scores.write_text("id,scores\nq1,0.9 0.8 0.7 0.6\nq2,0.5 0.4 0.3\nq<3>&,0.1\n")
    gt = tmp_path / "gt.csv"
    gt.write_text("id,images,Usage\nq1,a c,Public\nq2,b,Private\nq<3>&,,Ignored\n")
    return tmp_path, str(q), str(x), str(results), str(scores), str(gt)


def cells(text):
    return re.findall(r'<div class="cell[^"]*">', text)


def test_gallery_rows_and_embedding(gallery_data):
    tmp_path, q, x, results, scores, gt = gallery_data
    out = build_gallery(results, q, x, str(tmp_path / "g.html"), gt_path=gt, scores_path=scores, topk=10)
    text = open(out, encoding="utf-8").read()
    assert text.count('<div class="row"') == 3
    # every src is an embedded JPEG: no links to files at all
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    # existing readable images: q1, q2, and a, b, c, c, a, a in the result lists
    assert len(srcs) == 2 + 3 + 2 + 1
    assert text.count('class="missing"') == 3  # the query q<3>&, and the results gone, broken
    assert "missing<br>gone" in text and "unreadable<br>broken" in text
    assert "q&lt;3&gt;&amp;" in text and "q<3>&" not in text
    # frames: q1: a, c relevant; b, gone not; q2: b relevant -> c, broken, a not; q<3>& ignored
    assert len(re.findall(r'class="cell relevant"', text)) == 2
    assert len(re.findall(r'class="cell wrong"', text)) == 5
    assert "#1 &middot; 0.9000" in text
    # thumbnails are resized to at most 128 px
    decoded = [
        cv2.imdecode(np.frombuffer(base64.b64decode(s.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR) for s in srcs
    ]
    assert all(d is not None for d in decoded)
    assert max(max(d.shape[:2]) for d in decoded) == 128


def test_gallery_limits_and_no_gt(gallery_data):
    tmp_path, q, x, results, _, _ = gallery_data
    out = build_gallery(results, q, x, str(tmp_path / "g2.html"), topk=1, max_queries=2)
    text = open(out, encoding="utf-8").read()
    assert text.count('<div class="row"') == 2
    assert len(cells(text)) == 2 * 2  # query + one result
    assert "relevant" not in "".join(cells(text)) and "wrong" not in "".join(cells(text))


def test_image_finder_prefers_direct_path(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "nested" / "a.jpg")
    finder = ImageFinder(str(tmp_path))
    assert finder.find("a") == str(tmp_path / "a.png")
    assert finder.find("nested/a") == str(tmp_path / "nested" / "a.jpg")
    assert finder.find("zzz") is None


def test_gallery_errors(gallery_data):
    tmp_path, q, x, results, _, _ = gallery_data
    with pytest.raises(MetricError, match="not a folder"):
        build_gallery(results, str(tmp_path / "nope"), x, str(tmp_path / "g.html"))
    with pytest.raises(MetricError, match="does not exist"):
        build_gallery(results, q, x, str(tmp_path / "no" / "g.html"))
    with pytest.raises(MetricError, match="--topk"):
        build_gallery(results, q, x, str(tmp_path / "g.html"), topk=0)


def test_visualize_tool(gallery_data, capsys):
    tmp_path, q, x, results, scores, gt = gallery_data
    out = tmp_path / "tool.html"
    argv = [
        "--results",
        results,
        "--query-root",
        q,
        "--index-root",
        x,
        "--gt",
        gt,
        "--scores",
        scores,
        "--topk",
        "2",
        "--output",
        str(out),
    ]
    assert call_tool("visualize", argv, capsys)[0] == 0
    assert out.read_text(encoding="utf-8").count('<div class="row"') == 3
    status, _, err = call_tool("visualize", argv[:-1] + [str(tmp_path / "missing" / "x.html")], capsys)
    assert status == 2
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_gallery_header_figures_and_per_query_ap(gallery_data):
    tmp_path, q, x, results, scores, gt = gallery_data
    out = build_gallery(
        results,
        q,
        x,
        str(tmp_path / "h.html"),
        gt_path=gt,
        scores_path=scores,
        topk=2,
        figures={"recall@1": 0.75, "checkpoint": "model_epoch_0030.pyth"},
    )
    text = open(out, encoding="utf-8").read()
    header = text[text.index('<table class="figures">') : text.index("</table>")]
    assert "<th>recall@1</th><td>0.7500</td>" in header and "model_epoch_0030.pyth" in header
    # q1: relevant a (rank 1) and c (rank 3, beyond the shown top 2): AP@100 = (1/1 + 2/3) / 2;
    # q2: its relevant b is not retrieved: 0; q<3>& is Ignored: no AP, not in the mean
    assert "<th>mAP@100 (2 scored queries)</th><td>0.4167</td>" in header
    rows = text.split('<div class="row"')[1:]
    assert "AP@100 0.8333" in rows[0] and "AP@100 0.0000" in rows[1] and "AP@100" not in rows[2]
    # without a ground truth there is no AP to show
    plain = open(build_gallery(results, q, x, str(tmp_path / "p.html")), encoding="utf-8").read()
    assert "AP@100" not in plain and "figures" not in plain.split("</style>")[1]
