"""tools/plot_stats.py and metric.utils.stats_plot: curves of stats.jsonl as a PNG, from synthetic
stats (one run, three runs, a half-written file) and the one-line error of a folder without stats."""

import json
import os

import cv2
import numpy as np
import pytest

from metric.utils.errors import DataError, OutputError
from metric.utils.stats_plot import RunCurves, plot_runs, run_labels
from tests.helpers import call_tool


def write_stats(folder, epochs=3, iters=4, parts=("cross_entropy",), evals=True, lr0=0.1):
    """A stats.jsonl as the trainer writes it: train_iter every 2 iterations, train_epoch, test_epoch."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for e in range(1, epochs + 1):
        for it in range(2, iters + 1, 2):
            step = (e - 1) * iters + it
            rec = {
                "_type": "train_iter",
                "epoch": e,
                "iter": it,
                "iters": iters,
                "loss": 5.0 / step,
                "lr": lr0 * (1 - step / (epochs * iters)),
                "im_per_s": 50.0,
                "eta": "00:00:01",
            }
            rec.update({f"loss_{p}": k / step for k, p in enumerate(parts, 1)})
            lines.append(rec)
        lines.append({"_type": "train_epoch", "epoch": e, "loss": 1.0 / e})
        if evals:
            lines.append({"_type": "test_epoch", "epoch": e, "recall@1": 0.5 + 0.1 * e, "mAP@R": 0.2 * e})
    path = os.path.join(folder, "stats.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    return path


def png_shape(path):
    data = np.fromfile(path, dtype=np.uint8)
    assert data.size > 10_000 and data[:8].tobytes() == b"\x89PNG\r\n\x1a\n"
    return cv2.imdecode(data, cv2.IMREAD_COLOR).shape


def test_one_run_curves_and_png(tmp_path):
    write_stats(tmp_path / "run")
    curves = RunCurves(str(tmp_path / "run"))
    xs, ys = curves.series["loss"]
    assert xs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])  # epoch - 1 + iter / iters
    assert ys == pytest.approx([5.0 / s for s in (2, 4, 6, 8, 10, 12)])
    assert curves.series["mAP@R"] == ([1, 2, 3], pytest.approx([0.2, 0.4, 0.6]))
    assert curves.loss_parts == []  # a single part is the loss itself
    by_iter = RunCurves(str(tmp_path / "run"), x="iteration")
    assert by_iter.series["loss"][0] == [2, 4, 6, 8, 10, 12] and by_iter.series["recall@1"][0] == [4, 8, 12]
    out = plot_runs([str(tmp_path / "run")], str(tmp_path / "curves.png"))
    assert out == str(tmp_path / "curves.png") and png_shape(out) == (800, 1200, 3)
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "run"]  # no temporary left behind


def test_three_runs_in_one_figure(tmp_path, capsys):
    write_stats(tmp_path / "a")
    write_stats(tmp_path / "b", parts=("cross_entropy", "triplet"), lr0=0.05)
    write_stats(tmp_path / "c" / "a", evals=False, epochs=2)  # same folder name as the first run
    runs = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "a")]
    assert RunCurves(runs[1]).loss_parts == ["loss_cross_entropy", "loss_triplet"]
    assert run_labels(runs) == [runs[0], "b", runs[2]]
    status, out, err = call_tool("plot_stats", [*runs, "--output", tmp_path / "cmp.png", "--x", "iteration"], capsys)
    assert status == 0 and out.strip() == f"wrote {tmp_path / 'cmp.png'}"
    one = plot_runs(runs[:1], str(tmp_path / "one.png"))
    assert png_shape(str(tmp_path / "cmp.png")) == png_shape(one)
    assert open(one, "rb").read() != (tmp_path / "cmp.png").read_bytes()


def test_half_written_stats_file(tmp_path):
    path = write_stats(tmp_path / "run")
    text = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as f:  # a killed job: its last record cut in the middle
        f.write(text[: text.rindex('{"_type": "test_epoch"') + 25])
    curves = RunCurves(str(tmp_path / "run"))
    assert curves.series["mAP@R"][0] == [1, 2]  # the cut record is skipped
    assert len(curves.series["loss"][0]) == 6
    assert png_shape(plot_runs([str(tmp_path / "run")], str(tmp_path / "p.png")))[0] == 800
    # records of a resumed run that were not dropped (a file being written) are drawn once
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + json.dumps({"_type": "train_iter", "epoch": 3, "iter": 4, "iters": 4, "loss": 9.0}) + "\n")
    xs, ys = RunCurves(str(tmp_path / "run")).series["loss"]
    assert xs.count(3.0) == 1 and ys[-1] == 9.0


def test_folder_without_stats_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        status, out, err = call_tool("plot_stats", [folder, "--output", tmp_path / "x.png"], capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error:") and str(folder) in lines[0]
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "stats.jsonl").write_text("")  # a run that has not logged yet
    with pytest.raises(DataError, match="no training records"):
        plot_runs([str(tmp_path / "new")], str(tmp_path / "x.png"))
    write_stats(tmp_path / "run")
    with pytest.raises(OutputError, match="does not exist"):
        plot_runs([str(tmp_path / "run")], str(tmp_path / "no" / "x.png"))
