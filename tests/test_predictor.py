"""One predictor, one preprocessing: evaluation during training, tools/test_metric.py,
tools/extract_features.py + tools/evaluate.py, export and the notebook API describe images alike."""

import json
import os

import numpy as np
import pytest
import torch

from metric.config import load_cfg
from metric.datasets.transforms import decode_image
from metric.engine.predictor import Predictor, Preprocess, build_inference_model
from metric.utils.cli import run_tool
from metric.utils.errors import ConfigError
from tests.helpers import load_tool, tiny_model, tiny_opts

TINY = tiny_model(width=8, dim=None, num_classes=None)


def _tool(name):
    return load_tool(name).main


def heldout_figures_agree(cfg_file, opts, out_dir, list_path):
    """Train (``opts``), then return (training-time eval of the last epoch, test_metric of the final
    checkpoint, extract_features + evaluate of the TEST list with it)."""
    from metric.checkpoint import list_checkpoints
    from metric.engine.trainer import train_model

    cfg = load_cfg(cfg_file, opts)
    train_model(cfg)
    tests = [
        json.loads(line)
        for line in open(os.path.join(out_dir, "stats.jsonl"), encoding="utf-8")
        if '"test_epoch"' in line
    ]
    during = tests[-1]
    weights = list_checkpoints(out_dir)[-1]
    store, metrics_json = os.path.join(out_dir, "heldout_store"), os.path.join(out_dir, "heldout.json")
    extra = ["TEST.WEIGHTS", weights, "INFER.INPUT", list_path, "INFER.OUTPUT", store]
    assert run_tool(_tool("extract_features"), (["--cfg", cfg_file] if cfg_file else []) + opts + extra) == 0
    assert run_tool(_tool("evaluate"), ["--query", store, "--query-labels", list_path, "--json", metrics_json]) == 0
    with open(metrics_json, encoding="utf-8") as f:
        extracted = json.load(f)
    tested_json = os.path.join(out_dir, "tested.json")
    assert (
        run_tool(
            _tool("test_metric"),
            (["--cfg", cfg_file] if cfg_file else []) + opts + ["TEST.WEIGHTS", weights, "--json", tested_json],
        )
        == 0
    )
    with open(tested_json, encoding="utf-8") as f:
        tested = json.load(f)
    return during, tested, extracted


@pytest.mark.slow
def test_training_eval_equals_extraction_and_evaluate(tiny_data, tmp_path):
    """The recall@1 / mAP@R logged while training are those of the deployed pipeline."""
    out = str(tmp_path / "run")
    opts = tiny_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 1, "INFER.SCALES": "[0.75, 1.0]", "INFER.FLIP": True})
    during, tested, extracted = heldout_figures_agree(None, opts, out, os.path.join(tiny_data, "test.txt"))
    for key in ("recall@1", "mAP@R"):
        assert during[key] == pytest.approx(extracted[key], abs=1e-6), key
        assert tested[key] == pytest.approx(extracted[key], abs=1e-6), key


def test_random_weights_equal_training_initial_weights_and_leave_rng_alone():
    from metric.modeling import build_model
    from metric.utils.rng import seed_everything

    cfg = load_cfg(None, TINY + ["MODEL.HEADS.NUM_CLASSES", "4", "RNG_SEED", "5"])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_inference_model(cfg, missing_weights="ok")
    assert torch.equal(torch.get_rng_state(), before)
    seed_everything(5)
    reference = build_model(cfg)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    assert not model.training


def test_missing_weights_policy():
    cfg = load_cfg(None, TINY)
    with pytest.raises(ConfigError, match="TEST.WEIGHTS is empty"):
        build_inference_model(cfg, missing_weights="error")


def test_describe_equals_loader_run_and_manual_forward(tiny_data):
    """describe() (export checks), run() over a loader (extraction, evaluation) and a manual
    forward of the preprocessed views agree."""
    cfg = load_cfg(
        None,
        TINY
        + [
            "MODEL.HEADS.REDUCTION_DIM",
            "16",
            "TEST.IM_SIZE",
            "40",
            "INFER.SCALES",
            "[0.5, 1.0]",
            "INFER.FLIP",
            "True",
            "INFER.MULTISCALE_POOL",
            "mean",
        ],
    )
    predictor = Predictor.from_cfg(cfg, device="cpu", missing_weights="ok")
    paths = sorted(os.path.join(tiny_data, "img", f) for f in os.listdir(os.path.join(tiny_data, "img")))[:5]
    images = [decode_image(p) for p in paths]
    described = predictor.describe(images)
    emb, ok, failed = predictor.run(predictor.loader(paths, batch_size=2))
    assert ok == list(range(5)) and failed == []
    np.testing.assert_allclose(described, emb, atol=1e-6)
    with torch.no_grad():
        views = Preprocess(40, [0.5, 1.0])(images[0])
        descs = []
        for v in views:
            for x in (v[None], torch.flip(v[None], dims=[3])):
                descs.append(torch.nn.functional.normalize(predictor.model(x), dim=1))
        manual = torch.nn.functional.normalize(torch.stack(descs).mean(0), dim=1)[0].numpy()
    np.testing.assert_allclose(described[0], manual, atol=1e-5)
