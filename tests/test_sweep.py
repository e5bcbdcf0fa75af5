"""Sweeps (metric/sweep, tools/sweep_*.py, docs/SWEEPS.md): the sweep config's checks, setup
(grid x random x seeds, refused values and duplicates counted, constraints), the local launcher
(a crash reported with its log's last line, retries, relaunch after a kill loses no finished run
and resumes the interrupted one), collect (readable while stats are half-written), analyze (the
HTML checked in headless Chromium), and Welch's interval."""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import yaml

from tests.helpers import REPO, call_tool, tiny_opts, tool_in_process

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
REQUIRE_SERVICES = os.environ.get("PYMETRIC_REQUIRE_SERVICES") == "1"


def base_opts(data_dir, **extra):
    """The tiny training run's overrides (1 epoch, no TensorBoard) without OUT_DIR."""
    opts = tiny_opts(data_dir, "unused", **{"OPTIM.MAX_EPOCH": 1, "LOG.TENSORBOARD": False, **extra})
    i = opts.index("OUT_DIR")
    return opts[:i] + opts[i + 2 :]


def write_sweep(tmp_path, data_dir, samplers, file="sweep.yaml", setup=None, **top):
    base = tmp_path / "base.yaml"
    base.write_text("VERSION: 2\n")
    cfg = {
        "NAME": "s",
        "ROOT_DIR": str(tmp_path / "sweeps"),
        "SETUP": {"BASE_CFG": str(base), "BASE_OPTS": base_opts(data_dir), "SAMPLERS": samplers, **(setup or {})},
        **top,
    }
    path = tmp_path / file
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(status, err, *needles):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- the sweep config ----------------------------------------------------------------------------

BAD_SAMPLERS = [
    ({"MODEL.HEADS.MARGN": {"TYPE": "grid", "VALUES": [0.1]}}, "unknown training config key MODEL.HEADS.MARGN"),
    ({"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUE": [0.1]}}, "unknown sampler field VALUE"),
    ({"MODEL.HEADS.MARGIN": {"TYPE": "sobol", "RANGE": [0, 1]}}, "TYPE='sobol' is not allowed"),
    ({"OPTIM.MAX_EPOCH": {"TYPE": "grid", "VALUES": [2, "ten"]}}, "value 'ten'"),
    ({"MODEL.HEADS.CLS_LAYER": {"TYPE": "uniform", "RANGE": [0, 1]}}, "draws numbers but MODEL.HEADS.CLS_LAYER"),
    ({"OPTIM.MAX_EPOCH": {"TYPE": "uniform", "RANGE": [1, 5]}}, "takes an integer"),
    ({"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": []}}, "VALUES is empty"),
    ({"OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [0.0, 0.1]}}, "log_uniform needs a positive RANGE"),
    ({"OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [-1, 0.1]}}, "log_uniform needs a positive RANGE"),
    ({"OPTIM.BASE_LR": {"TYPE": "uniform", "RANGE": [0.1, 0.01]}}, "is reversed"),
    ({"TRAIN.BATCH_SIZE": {"TYPE": "power2", "RANGE": [4, 12]}}, "powers of two"),
    ({"OPTIM.BASE_LR": {"TYPE": "uniform", "RANGE": "0.1"}}, "RANGE='0.1' has the wrong type"),
    ({"MODEL.HEADS.MARGIN": {"TYPE": "uniform", "RANGE": [0.12, 0.38], "QUANTIZE": 0.1}}, "multiples of QUANTIZE"),
    ({"OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [0.0001, 0.003], "QUANTIZE": 0.002}}, "multiples of QUANTIZE"),
    ({"TRAIN.BATCH_SIZE": {"TYPE": "power2", "RANGE": [4, 16], "QUANTIZE": 4}}, "QUANTIZE does not apply"),
    ({"OPTIM.MAX_EPOCH": {"TYPE": "int_uniform", "RANGE": [0, 10], "QUANTIZE": 2.5}}, "integer QUANTIZE"),
]


@pytest.mark.parametrize("samplers, needle", BAD_SAMPLERS, ids=[n for _, n in BAD_SAMPLERS])
def test_a_bad_sampler_is_one_line_and_exit_2(tmp_path, tiny_data, capsys, samplers, needle):
    path = write_sweep(tmp_path, tiny_data, samplers)
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    one_line_error(status, err, needle, path)
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(
    "top, needle",
    [
        (
            {"LAUNCH": {"PARALEL_JOBS": 2}},
            "unknown sweep config key LAUNCH.PARALEL_JOBS (did you mean LAUNCH.PARALLEL_JOBS?)",
        ),
        ({"SETUP": {"NUM_CONFIGS": "many"}}, "SETUP.NUM_CONFIGS='many' has the wrong type"),
        ({"LAUNCH": {"MAX_RETRY": 0}}, "LAUNCH.MAX_RETRY=0 is not allowed"),
        ({"ANALYZE": {"PICK": "median"}}, "ANALYZE.PICK='median' is not allowed"),
        ({"SETUP": {"SEEDS": [1, 2, 1]}}, "SETUP.SEEDS repeats [1]"),
    ],
)
def test_a_bad_sweep_key_is_one_line_and_exit_2(tmp_path, tiny_data, capsys, top, needle):
    setup = top.pop("SETUP", None)
    path = write_sweep(
        tmp_path, tiny_data, {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1]}}, setup=setup, **top
    )
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    one_line_error(status, err, needle)


# --- setup ---------------------------------------------------------------------------------------


def test_setup_mixes_grid_and_random_over_seeds_and_drops_refused_values(tmp_path, tiny_data, capsys):
    samplers = {
        "OPTIM.LR_POLICY": {"TYPE": "grid", "VALUES": ["cos", "exp", "no_such_policy"]},
        "OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [0.01, 0.1], "QUANTIZE": 0.01},
        "TRAIN.BATCH_SIZE": {"TYPE": "power2", "RANGE": [4, 8]},
        "OPTIM.WEIGHT_DECAY": {"TYPE": "choice", "VALUES": [0.0, 0.001]},
    }
    setup = {"NUM_CONFIGS": 3, "SEEDS": [1, 2], "RNG_SEED": 5, "MAX_TRIES": 2}
    path = write_sweep(tmp_path, tiny_data, samplers, setup=setup)
    status, out, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    assert status == 0, err
    root = tmp_path / "sweeps" / "s"
    summary = json.loads((root / "setup.json").read_text())
    assert summary["num_configs"] == 6 and len(summary["jobs"]) == 12  # 2 valid grid points x 3 draws x 2 seeds
    # the refused grid point: every one of its 3 x MAX_TRIES draws refused by the config check, counted
    assert summary["counts"]["refused"] == 6 and "refused by the config check" in out
    assert any("no_such_policy" in reason for reason in summary["refused_reasons"])
    from metric.config import load_cfg

    seen = set()
    for job in summary["jobs"]:
        cfg = load_cfg(str(root / "cfgs" / f"{job['job']:06d}.yaml"))  # complete and valid
        v = job["values"]
        assert cfg.RNG_SEED == job["seed"] and cfg.OUT_DIR == str(root / "runs" / f"{job['job']:06d}")
        assert cfg.OPTIM.LR_POLICY == v["OPTIM.LR_POLICY"] != "no_such_policy"
        assert cfg.OPTIM.BASE_LR == v["OPTIM.BASE_LR"] and 0.01 <= v["OPTIM.BASE_LR"] <= 0.1
        assert round(v["OPTIM.BASE_LR"] / 0.01, 6).is_integer()  # quantized
        assert cfg.TRAIN.BATCH_SIZE == v["TRAIN.BATCH_SIZE"] in (4, 8)
        assert cfg.OPTIM.WEIGHT_DECAY == v["OPTIM.WEIGHT_DECAY"] in (0.0, 0.001)
        assert job["params"] > 0 and job["flops"] > 0
        seen.add((json.dumps(v, sort_keys=True), job["seed"]))
    assert len(seen) == 12  # duplicates removed
    # the same sampling seed draws the same configs; a sweep not started may be set up again
    first = (root / "cfgs" / "000005.yaml").read_text()
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    assert status == 0, err
    assert (root / "cfgs" / "000005.yaml").read_text() == first


def test_samplers_on_the_command_line_are_refused_not_ignored(tmp_path, tiny_data, capsys):
    path = write_sweep(tmp_path, tiny_data, {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1]}})
    opts = ["SETUP.SAMPLERS.MODEL.HEADS.MARGIN", "{TYPE: grid, VALUES: [0.5]}"]
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path, *opts], capsys)
    one_line_error(status, err, "SETUP.SAMPLERS.MODEL.HEADS.MARGIN: the samplers cannot be overridden", path)


def test_quantized_draws_stay_in_range_and_give_every_value_its_whole_bin():
    from metric.sweep.samplers import draw

    def freq(kind, lo, hi, q, n=40000):
        rng = np.random.default_rng(0)
        values = [draw({"TYPE": kind, "RANGE": [lo, hi], "QUANTIZE": q}, rng) for _ in range(n)]
        return {v: c / n for v, c in zip(*np.unique(values, return_counts=True))}

    f = freq("uniform", 1.0, 4.0, 1.0)  # an integer by uniform: the ends as likely as the middle
    assert set(f) == {1, 2, 3, 4} and all(abs(p - 0.25) < 0.01 for p in f.values()), f
    f = freq("uniform", 0.1, 0.3, 0.1)
    assert set(f) == {0.1, 0.2, 0.3} and all(abs(p - 1 / 3) < 0.01 for p in f.values()), f
    f = freq("int_uniform", 0, 10, 5.0)  # QUANTIZE applies to int_uniform too
    assert set(f) == {0, 5, 10} and all(abs(p - 1 / 3) < 0.01 for p in f.values()), f
    f = freq("log_uniform", 0.001, 0.004, 0.001)  # log bins: [0.0005, 0.0015) ... [0.0035, 0.0045)
    assert set(f) == {0.001, 0.002, 0.003, 0.004}, f
    edges = np.log([0.0005, 0.0015, 0.0025, 0.0035, 0.0045])
    want = np.diff(edges) / (edges[-1] - edges[0])
    assert np.allclose([f[v] for v in (0.001, 0.002, 0.003, 0.004)], want, atol=0.01)


def test_a_sampled_model_that_does_not_build_is_dropped_and_counted(tmp_path, tiny_data, capsys):
    samplers = {"MODEL.HEADS.IN_FEAT": {"TYPE": "grid", "VALUES": [0, 100]}}  # 100: not the backbone's 64
    path = write_sweep(tmp_path, tiny_data, samplers, setup={"SEEDS": [1]})
    status, out, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "sweeps/s/setup.json").read_text())
    assert [j["values"]["MODEL.HEADS.IN_FEAT"] for j in summary["jobs"]] == [0]
    assert summary["counts"]["refused"] == 1 and "refused by the config check" in out
    assert any("IN_FEAT=100 but the resnet backbone outputs 64" in r for r in summary["refused_reasons"])


def test_duplicate_draws_are_removed_and_counted_and_a_short_sweep_says_so(tmp_path, tiny_data, capsys):
    samplers = {"MODEL.HEADS.MARGIN": {"TYPE": "choice", "VALUES": [0.1, 0.2]}}  # 2 distinct configs at most
    setup = {"NUM_CONFIGS": 3, "MAX_TRIES": 4, "SEEDS": [1, 2]}
    path = write_sweep(tmp_path, tiny_data, samplers, setup=setup)
    status, out, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "sweeps/s/setup.json").read_text())
    n = summary["counts"]
    assert summary["num_configs"] == 2 and len(summary["jobs"]) == 4  # 2 configs x 2 seeds
    assert n["tried"] == 12 and n["duplicates"] == 10 and n["short"] == 1  # 3 x MAX_TRIES draws for 3 configs
    assert sorted(j["values"]["MODEL.HEADS.MARGIN"] for j in summary["jobs"]) == [0.1, 0.1, 0.2, 0.2]
    assert "10 duplicates removed" in out and "1 random configs short" in out


def test_constraints_filter_by_params_and_unmeetable_ones_say_how_many_were_tried(tmp_path, tiny_data, capsys):
    samplers = {"RESNET.WIDTH_PER_GROUP": {"TYPE": "grid", "VALUES": [4, 8]}}
    path = write_sweep(tmp_path, tiny_data, samplers)
    assert call_tool("sweep_setup", ["--sweep-cfg", path], capsys)[0] == 0
    params = [j["params"] for j in json.loads((tmp_path / "sweeps/s/setup.json").read_text())["jobs"]]
    assert params[0] < params[1]
    mid = (params[0] + params[1]) / 2
    path = write_sweep(tmp_path, tiny_data, samplers, setup={"CONSTRAINTS": {"PARAMS": [0, mid]}}, NAME="narrow")
    assert call_tool("sweep_setup", ["--sweep-cfg", path], capsys)[0] == 0
    summary = json.loads((tmp_path / "sweeps/narrow/setup.json").read_text())
    assert [j["values"] for j in summary["jobs"]] == [{"RESNET.WIDTH_PER_GROUP": 4}]
    assert summary["counts"]["outside_constraints"] == 1
    samplers["OPTIM.BASE_LR"] = {"TYPE": "uniform", "RANGE": [0.01, 0.1]}
    setup = {"CONSTRAINTS": {"PARAMS": [1, 10]}, "NUM_CONFIGS": 2, "MAX_TRIES": 3}
    path = write_sweep(tmp_path, tiny_data, samplers, setup=setup, NAME="none")
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    one_line_error(status, err, "no sampled config meets SETUP.CONSTRAINTS", "12 tried, 12 outside")
    assert not (tmp_path / "sweeps/none").exists()


def test_setup_refuses_a_folder_of_another_sweep_and_a_started_sweep(tmp_path, tiny_data, capsys):
    samplers = {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1, 0.2]}}
    (tmp_path / "sweeps" / "s").mkdir(parents=True)
    (tmp_path / "sweeps" / "s" / "notes.txt").write_text("mine")
    path = write_sweep(tmp_path, tiny_data, samplers)
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    one_line_error(status, err, "holds no sweep")
    (tmp_path / "sweeps" / "s" / "notes.txt").unlink()
    assert call_tool("sweep_setup", ["--sweep-cfg", path], capsys)[0] == 0
    other = write_sweep(tmp_path, tiny_data, samplers, file="other.yaml", setup={"SEEDS": [3, 4]})
    for tool in ("sweep_setup", "sweep_launch", "sweep_collect"):
        status, _, err = call_tool(tool, ["--sweep-cfg", other], capsys)
        one_line_error(status, err, "holds another sweep")
    assert call_tool("sweep_setup", ["--sweep-cfg", path, "LAUNCH.PARALLEL_JOBS", "1"], capsys)[0] == 0
    status_file = tmp_path / "sweeps/s/runs/000001/sweep_status.json"
    status_file.parent.mkdir(parents=True)
    status_file.write_text(json.dumps({"state": "done", "attempts": 1, "failures": 0}))
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", path], capsys)
    one_line_error(status, err, "has started (1 runs have a status)")
    status, _, err = call_tool("sweep_launch", ["--sweep-cfg", path, "--run-job", "7"], capsys)
    one_line_error(status, err, "--run-job 7", "jobs 0 to 1")


def test_relative_paths_are_taken_from_the_sweep_file_and_the_runs_get_absolute_ones(
    tmp_path, tiny_data, capsys, monkeypatch
):
    """ROOT_DIR and SETUP.BASE_CFG in the file: from the file's folder (every tool finds the same sweep
    from any folder); on the command line: from the current folder. The runs' DATA_DIR is made absolute."""
    from metric.config import load_cfg

    (tmp_path / "base.yaml").write_text("VERSION: 2\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    data_root = os.path.dirname(tiny_data)
    opts = base_opts(tiny_data)
    opts[opts.index("DATA_DIR") + 1] = "."  # relative: the folder setup runs in
    sweep = {
        "NAME": "rel",
        "ROOT_DIR": "../sweeps",
        "SETUP": {"BASE_CFG": "../base.yaml", "BASE_OPTS": opts,
                  "SAMPLERS": {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1, 0.2]}}},
    }  # fmt: skip
    path = tmp_path / "conf" / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    monkeypatch.chdir(data_root)
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", str(path)], capsys)
    assert status == 0, err
    root = tmp_path / "sweeps" / "rel"
    assert load_cfg(str(root / "cfgs" / "000001.yaml")).DATA_DIR == data_root
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same sweep from another folder, by a relative path
    status, out, err = call_tool("sweep_collect", ["--sweep-cfg", "../conf/sweep.yaml"], capsys)
    assert status == 0 and "2 runs: 0 done" in out, err
    status, _, err = call_tool("sweep_collect", ["--sweep-cfg", str(path), "ROOT_DIR", "sweeps"], capsys)
    one_line_error(status, err, str(tmp_path / "elsewhere" / "sweeps" / "rel"), "is not set up")
    sweep["SETUP"]["BASE_CFG"] = "base.yaml"  # not beside the sweep file (it is in the current folder's parent)
    path.write_text(yaml.safe_dump(sweep))
    status, _, err = call_tool("sweep_setup", ["--sweep-cfg", str(path), "NAME", "other"], capsys)
    one_line_error(status, err, f"SETUP.BASE_CFG {tmp_path / 'conf' / 'base.yaml'} not found", "relative to that file")


def test_the_demo_sweep_config_loads_from_any_folder(tmp_path, monkeypatch):
    from metric.sweep.config import load_sweep_cfg

    monkeypatch.chdir(tmp_path)
    c = load_sweep_cfg(os.path.join(REPO, "configs/sweeps/demo_margins.yaml"))
    assert c.ROOT_DIR == os.path.join(REPO, "output", "sweeps") and c.NAME == "demo_margins"
    assert c.SETUP.BASE_CFG == os.path.join(REPO, "configs", "metric", "demo_cpu.yaml")
    assert os.path.isfile(c.SETUP.BASE_CFG)
    assert c.SETUP.SAMPLERS["MODEL.HEADS.CLS_LAYER"].VALUES == ["arcface", "cosface", "circle"]
    assert len(c.SETUP.SAMPLERS["MODEL.HEADS.MARGIN"].VALUES) == 2 and list(c.SETUP.SEEDS) == [1, 2]


# --- launch, collect, analyze --------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_data):
    """A sweep of 4 runs launched once in this process: 2 seeds of a config that trains, 2 of one
    whose training list is missing (each fails twice, LAUNCH.MAX_RETRY 2)."""
    tmp = tmp_path_factory.mktemp("sweep")
    samplers = {"TRAIN.SPLIT": {"TYPE": "grid", "VALUES": ["train.txt", "missing.txt"]}}
    path = write_sweep(tmp, tiny_data, samplers, setup={"SEEDS": [1, 2]}, LAUNCH={"MAX_RETRY": 2, "PARALLEL_JOBS": 2})

    def run(tool):
        proc = tool_in_process(tool, ["--sweep-cfg", path])
        return proc.returncode, proc.stdout, proc.stderr

    assert run("sweep_setup")[0] == 0
    before = os.environ.get("SWEEP_NUM_THREADS")
    os.environ["SWEEP_NUM_THREADS"] = "1"  # one thread per run, as the tests' processes have
    try:
        t0 = time.time()
        launch = run("sweep_launch")
        seconds = time.time() - t0
        relaunch = run("sweep_launch")
    finally:
        if before is None:
            del os.environ["SWEEP_NUM_THREADS"]
        else:
            os.environ["SWEEP_NUM_THREADS"] = before
    analyze = run("sweep_analyze")
    return {
        "path": path,
        "root": tmp / "sweeps" / "s",
        "launch": launch,
        "relaunch": relaunch,
        "analyze": analyze,
        "seconds": seconds,
    }


@pytest.mark.slow
def test_launch_reports_a_crashing_run_with_its_last_line_and_retries_it(launched, capsys):
    status, out, err = launched["launch"]
    root = launched["root"]
    assert status == 1, out + err  # two runs never finished
    assert "sweep s: 4 runs to do, 2 at once on CPU" in out
    for job in (0, 1):
        assert f"done  job {job:06d}" in out
        st = json.loads((root / f"runs/{job:06d}/sweep_status.json").read_text())
        assert st["state"] == "done" and st["attempts"] == 1 and st["returncode"] == 0
    for job in (2, 3):
        st = json.loads((root / f"runs/{job:06d}/sweep_status.json").read_text())
        assert st["state"] == "failed" and st["attempts"] == st["failures"] == 2 and st["returncode"] == 2
        assert "missing.txt" in st["last_line"]  # the trainer's one-line error: the log's last line
        assert re.search(
            rf"FAILED job {job:06d} \(attempt 1, failure 1 of 2, exit 2\): .*missing\.txt.*; retrying", out
        )
        assert re.search(
            rf"FAILED job {job:06d} \(attempt 2, failure 2 of 2, exit 2\): .*missing\.txt.*; giving up", out
        )
        assert re.search(rf"not done: job {job:06d}: .*missing\.txt", out)
    assert "] 2/4 done, 0 running, 2 failed" in out
    overhead = re.search(r"launcher overhead per run: ([\d.]+)s", out)
    assert overhead, out
    print(f"\nlauncher: {launched['seconds']:.1f}s for 4 runs; {overhead.group(0)}")
    # relaunching: the finished runs are skipped, the failed ones reported and not launched again
    status, out, _ = launched["relaunch"]
    assert status == 1 and "nothing to launch: 2 of 4 runs done" in out
    assert "not launched: job 000002 failed 2 times" in out and "start job" not in out
    # one run, as a SLURM task runs it: a done run is not trained again
    status, out, _ = call_tool("sweep_launch", ["--sweep-cfg", launched["path"], "--run-job", "1"], capsys)
    assert status == 0 and "job 000001: already done" in out


@pytest.mark.slow
def test_collect_writes_records_and_a_status_table(launched, capsys):
    status, out, err = call_tool("sweep_collect", ["--sweep-cfg", launched["path"]], capsys)
    assert status == 0, err
    assert "4 runs: 2 done, 0 running, 0 interrupted, 2 failed, 0 pending" in out
    assert re.search(r"last line: .*missing\.txt", out)
    records = [json.loads(line) for line in (launched["root"] / "sweep.jsonl").read_text().splitlines()]
    assert [r["state"] for r in records] == ["done", "done", "failed", "failed"]
    for r in records[:2]:
        assert r["epochs"] == r["max_epoch"] == 1 and 0 <= r["final"]["mAP@R"] <= 1 and 0 <= r["final"]["mAP@100"] <= 1
        assert r["best"]["recall@1"] == r["final"]["recall@1"] and r["flops"] > 0 and r["params"] > 0
        assert r["values"] == {"TRAIN.SPLIT": "train.txt"} and r["time"] > 0


@pytest.mark.slow
def test_collect_reads_a_half_written_stats_file_up_to_its_last_whole_record(launched, tmp_path):
    from metric.sweep.collect import collect

    root = tmp_path / "copy"
    shutil.copytree(launched["root"], root)
    before = collect(str(root))[0]
    stats = root / "runs/000000/stats.jsonl"
    with open(stats, "a") as f:
        f.write('{"_type": "test_epoch", "epoch": 2, "mAP@R": 0.')  # killed mid-line
    after = collect(str(root))[0]
    assert after["final"] == before["final"] and after["epochs"] == before["epochs"] and "stats_error" not in after
    lines = stats.read_text().splitlines()
    stats.write_text("\n".join(lines[:1] + ["{garbage"] + lines[1:]) + "\n")  # a broken line inside
    broken = collect(str(root))[0]
    assert "not a JSON stats record" in broken["stats_error"]


@pytest.mark.slow
def test_analyze_writes_one_self_contained_html(launched):
    status, out, err = launched["analyze"]
    assert status == 0, err
    html = (launched["root"] / "analysis.html").read_text()
    assert "mAP@R mean ± std" in html and "Runs left out" in html and "missing.txt" in html
    assert re.search(r"<td>1</td><td>0</td><td>[\d.]+ ± [\d.]+</td><td>2</td>", html)  # one config, 2 seeds
    assert "Only one config finished" in html
    assert not re.search(r'src="(?!data:)', html)  # every image embedded
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3  # EDF, mAP@R vs TRAIN.SPLIT, training curves
    for data in images:
        im = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert im is not None and im.shape[0] > 100 and im.std() > 10
    assert re.search(r"[01]\.\d{4} ± [01]\.\d{4}\s+n=2\s+TRAIN\.SPLIT=train\.txt", out)
    # any metric the runs record: GLR's mAP@100 (the training evaluation records it) too
    glr = tool_in_process("sweep_analyze", ["--sweep-cfg", launched["path"], "ANALYZE.METRIC", "mAP@100"])
    assert glr.returncode == 0, glr.stderr
    assert re.search(r"[01]\.\d{4} ± [01]\.\d{4}\s+n=2\s+TRAIN\.SPLIT=train\.txt", glr.stdout)
    assert "mAP@100 mean ± std" in (launched["root"] / "analysis.html").read_text()
    assert tool_in_process("sweep_analyze", ["--sweep-cfg", launched["path"]]).returncode == 0  # back to mAP@R


@pytest.mark.slow
def test_analysis_html_renders_in_headless_chromium(launched, tmp_path):
    if CHROMIUM is None:
        if REQUIRE_SERVICES:
            pytest.fail(
                "chromium is not installed but PYMETRIC_REQUIRE_SERVICES=1 (tools/setup_ci_services.sh installs it)"
            )
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    page = tmp_path / "page.html"
    check = (
        "<script>window.addEventListener('load', function () { var imgs = Array.from(document.images);"
        " document.body.setAttribute('data-images', imgs.length + ':' +"
        " imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length); });</script>"
    )
    page.write_text((launched["root"] / "analysis.html").read_text().replace("</body>", check + "</body>"))
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert 'data-images="3:3"' in dom.stdout, dom.stderr[-2000:]  # the page loaded, every image decoded
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,2400", f"--screenshot={shot}", (launched["root"] / "analysis.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    im = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert im is not None and im.shape == (2400, 1200)
    assert im.std() > 10  # not blank
    for band in np.array_split(im[:2000], 4):  # every part of the page holds something
        assert band.std() > 5


@pytest.mark.slow
def test_killing_the_launcher_loses_no_finished_run_and_relaunch_resumes(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("SWEEP_NUM_THREADS", "1")
    samplers = {"OPTIM.MAX_EPOCH": {"TYPE": "grid", "VALUES": [1, 40]}}
    setup = {"BASE_OPTS": base_opts(tiny_data, **{"TRAIN.EVAL_PERIOD": 0})}  # evaluated after the last epoch only
    path = write_sweep(tmp_path, tiny_data, samplers, setup=setup, LAUNCH={"PARALLEL_JOBS": 1})
    assert call_tool("sweep_setup", ["--sweep-cfg", path], capsys)[0] == 0
    root = tmp_path / "sweeps" / "s"
    env = dict(os.environ, PYTHONPATH=REPO, SWEEP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools/sweep_launch.py"), "--sweep-cfg", path],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status1 = root / "runs/000001/sweep_status.json"
    checkpoint = root / "runs/000001/checkpoints/model_epoch_0001.pyth"
    try:
        deadline = time.time() + 120
        while not (checkpoint.exists() and status1.exists()) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert checkpoint.exists(), "job 1 wrote no checkpoint"
        # a second launcher of the sweep is refused while the first runs it (two never run one run)
        status, _, err = call_tool("sweep_launch", ["--sweep-cfg", path], capsys)
        one_line_error(status, err, "is in use by another run", "stop the launcher that runs it")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 60  # the run hears of it (PR_SET_PDEATHSIG) and stops its training
    run_lock = root / "runs/000001/.sweep_lock"  # removed by the run as it ends
    while (json.loads(status1.read_text())["state"] == "running" or run_lock.exists()) and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(status1.read_text())["state"] == "interrupted"
    done0 = (root / "runs/000000/stats.jsonl").read_bytes()
    assert json.loads((root / "runs/000000/sweep_status.json").read_text())["state"] == "done"
    # shorten the interrupted run (a resume may change OPTIM.MAX_EPOCH) so that the test is quick
    cfg1 = root / "cfgs/000001.yaml"
    cfg1.write_text(cfg1.read_text().replace("MAX_EPOCH: 40", "MAX_EPOCH: 2"))
    status, out, err = call_tool("sweep_launch", ["--sweep-cfg", path], capsys)
    assert status == 0, out + err
    assert "start job 000001 attempt 2 (resuming)" in out and "start job 000000" not in out
    assert (root / "runs/000000/stats.jsonl").read_bytes() == done0  # the finished run untouched
    st1 = json.loads(status1.read_text())
    assert st1["state"] == "done" and st1["attempts"] == 2 and st1["failures"] == 0
    assert "resumed from" in (root / "runs/000001/job.log").read_text()


# --- statistics ----------------------------------------------------------------------------------


def test_t_quantiles_and_welch_interval_match_tables():
    from metric.sweep.significance import t_quantile, welch_interval

    # two-sided 95% critical values of Student's t (any statistics table)
    for df, t in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1e6, 1.9600)):
        assert abs(t_quantile(0.975, df) - t) < 1e-4
    assert abs(t_quantile(0.025, 4) + 2.7764) < 1e-4
    w = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    # variances 1 and 5/3: se^2 = 1/3 + 5/12 = 0.75, df = 0.75^2 / ((1/3)^2 / 2 + (5/12)^2 / 3)
    df = 0.75**2 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    assert abs(w["df"] - df) < 1e-12 and w["diff"] == -3.5
    half = t_quantile(0.975, df) * 0.75**0.5
    assert abs(w["low"] - (-3.5 - half)) < 1e-9 and abs(w["high"] - (-3.5 + half)) < 1e-9
    assert w["high"] < 0  # a real difference
    assert welch_interval([1.0], [2.0, 3.0]) is None


def test_analysis_ranks_configs_by_mean_over_seeds_and_judges_the_top_two(tmp_path, tiny_data):
    """The ranking on run records made here (no training): the order, mean ± std, n, the Welch verdict."""
    from metric.sweep.analyze import analyze, comparison_text, group_configs, top_two
    from metric.sweep.config import load_sweep_cfg

    samplers = {
        "MODEL.HEADS.CLS_LAYER": {"TYPE": "grid", "VALUES": ["arcface", "cosface"]},
        "OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [0.001, 0.1]},
    }
    runs = {  # config -> (values, mAP@R of its seeds)
        0: ({"MODEL.HEADS.CLS_LAYER": "arcface", "OPTIM.BASE_LR": 0.01}, [0.80, 0.82, 0.81]),
        1: ({"MODEL.HEADS.CLS_LAYER": "cosface", "OPTIM.BASE_LR": 0.001}, [0.70, 0.71, 0.69]),
        2: ({"MODEL.HEADS.CLS_LAYER": "arcface", "OPTIM.BASE_LR": 0.05}, [0.79, 0.60]),
    }
    records = []
    for config, (values, maps) in runs.items():
        for seed, m in enumerate(maps, 1):
            records.append(
                {"job": len(records), "config": config, "seed": seed, "values": values, "state": "done", "epochs": 1,
                 "final": {"mAP@R": m}, "best": {"mAP@R": m}, "train_loss": 3.0 - m, "last_line": "",
                 "flops": 1e6, "params": 1e5, "out_dir": ""}
            )  # fmt: skip
    records.append(dict(records[-1], job=len(records), state="failed", last_line="RuntimeError: boom", final={}))
    groups, left_out = group_configs(records, "mAP@R")
    assert [g["config"] for g in groups] == [0, 1, 2] and [r["job"] for r in left_out] == [8]
    assert abs(groups[0]["mean"] - 0.81) < 1e-12 and abs(groups[0]["std"] - 0.01) < 1e-12 and groups[0]["n"] == 3
    assert "the interval excludes 0: the difference exceeds seed noise" in comparison_text(top_two(groups), "mAP@R")
    close = top_two([groups[1], groups[2]])  # 0.70 ± 0.01 vs 0.695 ± 0.134: within noise
    assert "the interval includes 0: the difference is within seed noise" in comparison_text(close, "mAP@R")
    assert abs(groups[2]["mean"] - 0.695) < 1e-12 and abs(groups[2]["std"] - 0.1343502884) < 1e-9
    assert [g["config"] for g in group_configs(records, "loss", higher_is_better=False)[0]] == [0, 1, 2]
    assert [g["config"] for g in group_configs(records, "mAP@R", pick="best", higher_is_better=False)[0]] == [2, 1, 0]
    from metric.utils.errors import ConfigError

    bad = load_sweep_cfg(write_sweep(tmp_path, tiny_data, samplers), ["ANALYZE.METRIC", "mAP@100"])
    with pytest.raises(ConfigError, match=r"ANALYZE.METRIC='mAP@100' is not recorded .* they record: loss, mAP@R"):
        analyze(bad, str(tmp_path), records)


def test_metric_vs_key_plots_use_a_log_axis_for_log_samplers_and_a_colour_per_categorical_combination():
    from metric.sweep.analyze import key_figure

    specs = {
        "OPTIM.BASE_LR": {"TYPE": "log_uniform", "RANGE": [0.001, 0.1], "VALUES": [], "QUANTIZE": 0.0},
        "TRAIN.BATCH_SIZE": {"TYPE": "power2", "RANGE": [4, 16], "VALUES": [], "QUANTIZE": 0.0},
        "MODEL.HEADS.MARGIN": {"TYPE": "uniform", "RANGE": [0.1, 0.5], "VALUES": [], "QUANTIZE": 0.0},
        "MODEL.HEADS.CLS_LAYER": {"TYPE": "grid", "VALUES": ["arcface", "cosface"], "RANGE": [], "QUANTIZE": 0.0},
        "OPTIM.LR_POLICY": {"TYPE": "choice", "VALUES": ["cos", "exp"], "RANGE": [], "QUANTIZE": 0.0},
    }
    groups = []
    for i, (layer, policy) in enumerate([("arcface", "cos"), ("arcface", "exp"), ("cosface", "cos")]):
        values = {"OPTIM.BASE_LR": 0.001 * 10**i, "TRAIN.BATCH_SIZE": 4 * 2**i, "MODEL.HEADS.MARGIN": 0.1 * (i + 1),
                  "MODEL.HEADS.CLS_LAYER": layer, "OPTIM.LR_POLICY": policy}  # fmt: skip
        groups.append({"values": values, "values_list": [0.5 + i / 10, 0.52 + i / 10], "mean": 0.51 + i / 10})
    cats = ["MODEL.HEADS.CLS_LAYER", "OPTIM.LR_POLICY"]

    def axis(key):
        fig = key_figure(groups, key, specs[key], "mAP@R", [k for k in cats if k != key])
        return fig.axes[0]

    lr, bs, margin = axis("OPTIM.BASE_LR"), axis("TRAIN.BATCH_SIZE"), axis("MODEL.HEADS.MARGIN")
    assert lr.get_xscale() == "log" and bs.get_xscale() == "log" and margin.get_xscale() == "linear"
    assert "log axis" in lr.get_xlabel() and "log axis" not in margin.get_xlabel()
    labels = sorted(t.get_text() for t in lr.get_legend().get_texts())
    assert labels == [
        "MODEL.HEADS.CLS_LAYER=arcface, OPTIM.LR_POLICY=cos",
        "MODEL.HEADS.CLS_LAYER=arcface, OPTIM.LR_POLICY=exp",
        "MODEL.HEADS.CLS_LAYER=cosface, OPTIM.LR_POLICY=cos",
    ]
    colours = {tuple(c.get_facecolor()[0]) for c in lr.collections[::2]}  # the dots of each combination
    assert len(colours) == 3
    grid = dict(specs["MODEL.HEADS.MARGIN"], TYPE="grid", VALUES=[0.1, 0.2, 0.3], RANGE=[])
    same = [
        dict(g, values=dict(g["values"], **{"MODEL.HEADS.MARGIN": 0.2 if i else 0.1})) for i, g in enumerate(groups)
    ]
    ax = key_figure(same, "MODEL.HEADS.MARGIN", grid, "mAP@R", cats).axes[0]
    xs = [float(c.get_offsets()[0][0]) for c in ax.collections[::2]]  # one value, two colours: side by side
    assert len(set(xs)) == 3 and all(abs(x - round(x, 1)) < 0.01 for x in xs), xs
    layer = axis("MODEL.HEADS.CLS_LAYER")  # a categorical key: its values on the axis, coloured by the other
    assert [t.get_text() for t in layer.get_xticklabels()] == ["arcface", "cosface"]
    assert sorted(t.get_text() for t in layer.get_legend().get_texts()) == [
        "OPTIM.LR_POLICY=cos",
        "OPTIM.LR_POLICY=exp",
    ]


def test_local_slots_follow_the_gpus_or_split_the_cores(tmp_path, tiny_data, monkeypatch):
    from metric.sweep.config import load_sweep_cfg
    from metric.sweep.local import plan_slots
    from metric.utils.errors import ConfigError

    path = write_sweep(tmp_path, tiny_data, {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1]}})
    monkeypatch.delenv("SWEEP_NUM_THREADS", raising=False)
    c = load_sweep_cfg(path, ["LAUNCH.NUM_GPUS", "2"])
    assert plan_slots(c, 10, gpus=["0", "1", "2", "3", "4"], cores=16) == (["0,1", "2,3"], 4)
    assert plan_slots(c, 10, gpus=[], cores=16) == ([None] * 8, 1)  # 2 CPU processes per run
    with pytest.raises(ConfigError, match="LAUNCH.NUM_GPUS=2 but this machine has 1 GPUs"):
        plan_slots(c, 10, gpus=["3"], cores=16)
    c = load_sweep_cfg(path, ["LAUNCH.PARALLEL_JOBS", "3"])
    assert plan_slots(c, 10, gpus=["0", "1", "2", "3"], cores=16) == (["0", "1", "2"], 5)
    assert plan_slots(c, 10, gpus=[], cores=2) == ([None, None], 1)
    assert plan_slots(c, 1, gpus=[], cores=2) == ([None], 2)  # one run left: it gets every core
    monkeypatch.setenv("SWEEP_NUM_THREADS", "3")
    assert plan_slots(c, 10, gpus=[], cores=16) == ([None] * 3, 3)
    monkeypatch.setenv("SWEEP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="SWEEP_NUM_THREADS='many'"):
        plan_slots(c, 10, gpus=[], cores=16)


def test_one_run_records_a_crash_a_kill_and_an_interruption(tmp_path, tiny_data, capsys, monkeypatch):
    """``--run-job I`` (what every executor runs) with the training replaced here: the forked child
    that trains raises, is killed by a signal, or the run itself is signalled."""
    import metric.sweep.run as run

    path = write_sweep(tmp_path, tiny_data, {"MODEL.HEADS.MARGIN": {"TYPE": "grid", "VALUES": [0.1]}})
    assert call_tool("sweep_setup", ["--sweep-cfg", path], capsys)[0] == 0
    status_file = tmp_path / "sweeps/s/runs/000000/sweep_status.json"

    def crash(cfg):
        print("training starts")
        raise RuntimeError(f"boom in {cfg.MODEL.HEADS.CLS_LAYER}")

    def killed(cfg):
        print("about to die", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def interrupted(cfg):
        os.kill(os.getppid(), signal.SIGTERM)  # to the run, as SLURM's requeue or a killed launcher does
        time.sleep(60)

    expected = [
        (crash, 1, "failed", 1, "RuntimeError: boom in arcface"),
        (killed, 137, "failed", 2, "killed by SIGKILL; last output: about to die"),
        (interrupted, 143, "interrupted", 2, ""),
    ]
    for attempt, (fn, code, state, failures, line) in enumerate(expected, 1):
        monkeypatch.setattr(run, "train_model", fn)
        status, out, _ = call_tool("sweep_launch", ["--sweep-cfg", path, "--run-job", "0"], capsys)
        st = json.loads(status_file.read_text())
        assert status == code and (st["state"], st["failures"], st["attempts"]) == (state, failures, attempt), out
        assert st["last_line"] == line or (state == "interrupted" and "attempt 3" in st["last_line"])
    log = (tmp_path / "sweeps/s/runs/000000/job.log").read_text()
    assert "Traceback" in log and log.count("=== attempt") == 3
