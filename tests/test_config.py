import glob
import os
import re

import pytest

from metric.config import all_keys, get_cfg, load_cfg, validate
from metric.config import check as config_check
from metric.config import defaults as config_mod
from metric.utils.errors import ConfigError
from tests.helpers import REPO, call_tool, run_py


def test_defaults_validate():
    validate(get_cfg())


def _key_comments():
    """dotted key -> the comment block right above its assignment in config.py."""
    lines = open(config_mod.__file__, encoding="utf-8").read().splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"_C\.([A-Z0-9_.]+) = ", line)
        if not m:
            continue
        j, block = i - 1, []
        while j >= 0 and lines[j].startswith("#"):
            block.insert(0, lines[j].lstrip("# "))
            j -= 1
        out[m.group(1)] = " ".join(block)
    return out


def test_every_key_is_commented_with_its_allowed_values():
    comments = _key_comments()
    for key in all_keys():
        assert comments.get(key, "").strip(), f"{key} has no comment in config.py"
    for key, (_ok, allowed) in config_check._RULES.items():
        if allowed.startswith("one of "):
            for value in allowed[len("one of ") :].split(" | "):
                assert value in comments[key], f"comment of {key} does not mention {value}"


def test_config_doc_is_up_to_date():
    from metric.config.doc import render_config_doc

    with open(os.path.join(REPO, "docs", "CONFIG.md"), encoding="utf-8") as f:
        assert f.read() == render_config_doc(), "docs/CONFIG.md is stale: run python tools/gen_config_doc.py"


@pytest.mark.parametrize(
    "opts, words",
    [
        (["OPTIM.BASELR", "0.1"], ["OPTIM.BASELR", "did you mean OPTIM.BASE_LR"]),
        (["TRAIN.BASE_LR", "0.1"], ["TRAIN.BASE_LR", "OPTIM.BASE_LR"]),
        (["OPTIM.LR_POLICY", "linear"], ["OPTIM.LR_POLICY", "'linear'", "cos | steps | exp"]),
        (["OPTIM.MAX_EPOCH", "ten"], ["OPTIM.MAX_EPOCH", "'ten'", "integer"]),
        (["OPTIM.MAX_EPOCH", "2.5"], ["OPTIM.MAX_EPOCH", "integer"]),
        (["TRAIN.AUTO_RESUME", "maybe"], ["TRAIN.AUTO_RESUME", "True/False"]),
        (["OPTIM.BASE_LR", "-1"], ["OPTIM.BASE_LR", "> 0"]),
        (["MODEL.HEADS.CLS_LAYER", "arcfase"], ["MODEL.HEADS.CLS_LAYER", "arcface"]),
        (["MODEL.DEPTH", "77"], ["MODEL.DEPTH", "77", "18 | 34 | 50 | 101 | 152"]),
        (["OPTIM.STEPS", "[30, 10]"], ["OPTIM.STEPS", "ascending"]),
        (["OPTIM.MAX_EPOCH"], ["KEY VALUE"]),
    ],
)
def test_bad_config_raises_naming_key(opts, words):
    with pytest.raises(ConfigError) as err:
        load_cfg(None, opts)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize(
    "opts, words",
    [
        (["OPTIM.BASELR", "0.1"], ["OPTIM.BASELR", "did you mean OPTIM.BASE_LR"]),
        (["OPTIM.LR_POLICY", "linear"], ["OPTIM.LR_POLICY", "cos | steps | exp"]),
        (["TRAIN.BATCH_SIZE", "big"], ["TRAIN.BATCH_SIZE", "integer"]),
        (["--cfg", os.path.join(REPO, "configs", "metric", "nope.yaml")], ["config file not found", "nope.yaml"]),
    ],
)
def test_train_tool_exits_2_on_config_error(opts, words, capsys):
    status, _, err = call_tool("train_metric", opts, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0]


@pytest.mark.slow
def test_train_tool_command_line_exits_2_with_one_line():
    """The real command line: a config error is exactly one stderr line and exit status 2."""
    proc = run_py(["tools/train_metric.py", "OPTIM.BASELR", "0.1"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "did you mean OPTIM.BASE_LR" in lines[0]


def test_yaml_types_and_base_inheritance(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("OPTIM:\n  BASE_LR: 1e-3\n  MAX_EPOCH: 7\nMODEL:\n  HEADS:\n    SCALE: 30\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nOPTIM:\n  MAX_EPOCH: 9\n")
    c = load_cfg(str(child), ["OPTIM.WARMUP_EPOCHS", "2"])
    assert c.OPTIM.BASE_LR == pytest.approx(1e-3) and isinstance(c.OPTIM.BASE_LR, float)
    assert c.OPTIM.MAX_EPOCH == 9
    assert c.MODEL.HEADS.SCALE == 30.0 and isinstance(c.MODEL.HEADS.SCALE, float)
    assert c.OPTIM.WARMUP_EPOCHS == 2.0


def test_base_cycle_and_bad_yaml(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_cfg(str(a))
    b = tmp_path / "b.yaml"
    b.write_text("OPTIM: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_cfg(str(b))


def test_num_classes_alias(tmp_path):
    assert load_cfg(None, ["MODEL.NUM_CLASSES", "7"]).MODEL.HEADS.NUM_CLASSES == 7
    assert load_cfg(None, ["MODEL.HEADS.NUM_CLASSES", "9"]).MODEL.NUM_CLASSES == 9
    # on the command line either name sets both, over a yaml file that sets both
    c = load_cfg(
        os.path.join(REPO, "configs", "metric", "R-50-1x64d_step_8gpu.yaml"), ["MODEL.HEADS.NUM_CLASSES", "81313"]
    )
    assert (c.MODEL.NUM_CLASSES, c.MODEL.HEADS.NUM_CLASSES) == (81313, 81313)
    y = tmp_path / "both.yaml"
    y.write_text("VERSION: 2\nMODEL:\n  NUM_CLASSES: 7\n  HEADS:\n    NUM_CLASSES: 9\n")
    with pytest.raises(ConfigError, match="disagree"):
        load_cfg(str(y))


def test_string_keys_keep_command_line_text_and_numbers_must_be_finite():
    c = load_cfg(None, ["OUT_DIR", "2024", "TRAIN.DATASET", "1e5"])
    assert c.OUT_DIR == "2024" and c.TRAIN.DATASET == "1e5"
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match="OPTIM.BASE_LR.*finite"):
            load_cfg(None, ["OPTIM.BASE_LR", bad])
    with pytest.raises(ConfigError, match="OPTIM.STEPS.*starting with 0"):
        load_cfg(None, ["OPTIM.LR_POLICY", "steps", "OPTIM.STEPS", "[30, 60, 90]"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)))
def test_shipped_configs_merge(path):
    if os.sep + os.path.join("configs", "sweeps") + os.sep in path:
        from metric.sweep.config import load_sweep_cfg

        sweep = load_sweep_cfg(path)  # a sweep config, and the training config it samples around
        load_cfg(sweep.SETUP.BASE_CFG)
    else:
        load_cfg(path)


def test_original_project_config_merges_unchanged():
    # configs/metric/R-50-1x64d_step_8gpu.yaml is the original project's file, byte for byte.
    c = load_cfg(os.path.join(REPO, "configs", "metric", "R-50-1x64d_step_8gpu.yaml"))
    assert c.MODEL.HEADS.NUM_CLASSES == 96264 and c.MODEL.HEADS.SCALE == 30.0
    assert c.RESNET.TRANS_FUN == "bottleneck_transform" and c.OPTIM.STEPS == [0, 30, 60, 90]
