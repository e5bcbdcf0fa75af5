"""The fine-tuning recipe: OPTIM.LAYER_DECAY (per ViT block, per ResNet stage), OPTIM.HEAD_LR_MULT,
OPTIM.NO_DECAY_NORM_BIAS, OPTIM.CLIP_GRAD_NORM (= TRAIN.GRAD_CLIP) and
TRAIN.FREEZE_BACKBONE_EPOCHS. The parameter groups, their learning rates and weight decays are
what the config says (against a naive per-parameter reading of the documented rules), the trainer
applies them, and a resumed run has them and ends with the same weights."""

import os
import re
import shutil

import pytest
import torch
import torch.nn as nn

from metric import build_model, load_cfg
from metric.checkpoint import list_checkpoints, read_checkpoint
from metric.engine.optimizer import build_optimizer
from metric.engine.param_groups import param_groups
from metric.utils.errors import CheckpointError, ConfigError
from tests.helpers import TINY_MODEL, call_tool, logging_restored, tiny_opts

TINY_WIDE = [
    "MODEL.TYPE",
    "resnet50x1",
    "RESNET.STEM_WIDTH",
    "4",
    "RESNET.WIDTH_PER_GROUP",
    "4",
    "MODEL.HEADS.IN_FEAT",
    "0",
    "MODEL.HEADS.REDUCTION_DIM",
    "8",
    "MODEL.HEADS.NUM_CLASSES",
    "5",
]
TINY_VIT = [
    "MODEL.TYPE",
    "vit",
    "MODEL.WIDTH",
    "64",
    "MODEL.LAYERS",
    "3",
    "MODEL.PATCH_SIZE",
    "8",
    "MODEL.EMB_DIM",
    "16",
    "TRAIN.IM_SIZE",
    "32",
    "TEST.IM_SIZE",
    "32",
    "MODEL.HEADS.POOL_LAYER",
    "identity",
    "MODEL.HEADS.IN_FEAT",
    "16",
    "MODEL.HEADS.REDUCTION_DIM",
    "8",
    "MODEL.HEADS.NUM_CLASSES",
    "5",
]
GEM = ["MODEL.HEADS.POOL_LAYER", "gempool"]


def _groups_of(opt):
    """parameter id -> its group."""
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def _naive_depth(name, model_type, layers=3):
    """The documented depth of a parameter (module docstring of metric.engine.param_groups)."""
    if not name.startswith("backbone."):
        return None  # the head
    n = name[len("backbone.") :]
    if model_type == "vit":
        m = re.match(r"transformer\.resblocks\.(\d+)\.", n)
        if m:
            return int(m.group(1)) + 1
        return 0 if n.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre") else layers + 1
    m = re.match(r"(?:s|layer)(\d)\.", n)
    return int(m.group(1)) if m else 0


def _naive_no_decay(model, name, p):
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    leaf = name.rsplit(".", 1)[-1]
    return (
        isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm))
        or leaf.endswith("bias")
        or p.ndim <= 1
        or leaf in ("class_embedding", "positional_embedding")
    )


# --- the groups against a naive reading of the rules ---------------------------------------------


@pytest.mark.parametrize("model_opts", [TINY_MODEL + GEM, TINY_WIDE, TINY_VIT], ids=["resnet", "wide", "vit"])
@pytest.mark.parametrize(
    "recipe",
    [
        ["OPTIM.LAYER_DECAY", "0.5"],
        [
            "OPTIM.LAYER_DECAY",
            "0.75",
            "OPTIM.HEAD_LR_MULT",
            "10",
            "OPTIM.OPTIMIZER",
            "adamw",
            "OPTIM.NESTEROV",
            "False",
        ],
        ["OPTIM.HEAD_LR_MULT", "0.1", "OPTIM.NO_DECAY_NORM_BIAS", "True"],
        ["OPTIM.OPTIMIZER", "adamw", "OPTIM.NESTEROV", "False", "OPTIM.WEIGHT_DECAY", "0.05"],
    ],
    ids=["decay", "decay-head-adamw", "head-nodecay-sgd", "adamw-auto"],
)
def test_every_parameter_gets_the_documented_lr_and_weight_decay(model_opts, recipe):
    cfg = load_cfg(None, model_opts + ["OPTIM.BASE_LR", "0.2", "OPTIM.WEIGHT_DECAY", "1e-3"] + recipe)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    groups = _groups_of(opt)
    o = cfg.OPTIM
    no_decay = o.NO_DECAY_NORM_BIAS == "True" or (o.NO_DECAY_NORM_BIAS == "auto" and o.OPTIMIZER == "adamw")
    top = 3 + 1 if cfg.MODEL.TYPE == "vit" else 5
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    for name, p in trainable:
        depth = _naive_depth(name, cfg.MODEL.TYPE)
        scale = o.HEAD_LR_MULT if depth is None else o.LAYER_DECAY ** (top - depth)
        wd = 0.0 if no_decay and _naive_no_decay(model, name, p) else o.WEIGHT_DECAY
        g = groups[id(p)]
        assert g["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert g["lr"] == pytest.approx(0.2 * scale, rel=1e-12), name
        assert g["weight_decay"] == wd, name
    keys = [(g["lr_scale"], g["weight_decay"]) for g in opt.param_groups]
    assert len(keys) == len(set(keys))  # one group per (lr, wd)


def test_defaults_keep_one_group_and_custom_bn_decay_keeps_two():
    plain = load_cfg(None, TINY_MODEL)
    (group,) = build_optimizer(plain, build_model(plain)).param_groups
    assert group["lr_scale"] == 1.0 and group["weight_decay"] == plain.OPTIM.WEIGHT_DECAY
    custom = load_cfg(
        None,
        TINY_MODEL
        + GEM
        + [
            "BN.USE_CUSTOM_WEIGHT_DECAY",
            "True",
            "BN.CUSTOM_WEIGHT_DECAY",
            "1e-5",
            "OPTIM.OPTIMIZER",
            "adamw",
            "OPTIM.NESTEROV",
            "False",
        ],
    )
    decayed, special = build_optimizer(custom, build_model(custom)).param_groups
    assert (decayed["weight_decay"], special["weight_decay"]) == (custom.OPTIM.WEIGHT_DECAY, 1e-5)  # custom wins


def test_vit_class_token_and_positional_embedding_are_not_decayed():
    cfg = load_cfg(None, TINY_VIT + ["OPTIM.OPTIMIZER", "adamw", "OPTIM.NESTEROV", "False"])
    model = build_model(cfg)
    groups = _groups_of(build_optimizer(cfg, model))
    b = model.backbone
    for p in (b.class_embedding, b.positional_embedding, b.ln_pre.weight, b.transformer.resblocks[0].attn.in_proj_bias):
        assert groups[id(p)]["weight_decay"] == 0.0
    for p in (
        b.conv1.weight,
        b.proj,
        b.transformer.resblocks[0].attn.in_proj_weight,
        model.head.embedding_layer.weight,
    ):
        assert groups[id(p)]["weight_decay"] == cfg.OPTIM.WEIGHT_DECAY


def test_layer_decay_on_a_backbone_without_depths_is_one_line():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 1)

    model = nn.Module()
    model.backbone, model.head = Odd(), nn.Linear(4, 2)
    cfg = load_cfg(None, ["OPTIM.LAYER_DECAY", "0.8"])
    with pytest.raises(ConfigError, match=r"backbone's features.weight .*set OPTIM.LAYER_DECAY 1") as err:
        param_groups(cfg, model)
    assert "\n" not in str(err.value)


# --- config: aliases, tri-state, conflicts ---------------------------------------------------------


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text("VERSION: 2\n" + text)
    return str(path)


def test_clip_grad_norm_is_an_alias_of_train_grad_clip(tmp_path):
    assert load_cfg(_yaml(tmp_path, "OPTIM:\n  CLIP_GRAD_NORM: 1.5\n")).TRAIN.GRAD_CLIP == 1.5
    assert load_cfg(_yaml(tmp_path, "TRAIN:\n  GRAD_CLIP: 2.5\n")).OPTIM.CLIP_GRAD_NORM == 2.5
    assert load_cfg(None, ["OPTIM.CLIP_GRAD_NORM", "3"]).TRAIN.GRAD_CLIP == 3.0
    both = _yaml(tmp_path, "OPTIM:\n  CLIP_GRAD_NORM: 1.0\nTRAIN:\n  GRAD_CLIP: 2.0\n")
    with pytest.raises(ConfigError, match="TRAIN.GRAD_CLIP=2 and OPTIM.CLIP_GRAD_NORM=1 are two names of one setting"):
        load_cfg(both)
    assert load_cfg(both, ["TRAIN.GRAD_CLIP", "4"]).OPTIM.CLIP_GRAD_NORM == 4.0  # the command line sets both


def test_no_decay_switch_takes_yaml_booleans_and_refuses_conflicts(tmp_path):
    assert load_cfg(_yaml(tmp_path, "OPTIM:\n  NO_DECAY_NORM_BIAS: true\n")).OPTIM.NO_DECAY_NORM_BIAS == "True"
    assert load_cfg(None, ["OPTIM.NO_DECAY_NORM_BIAS", "false"]).OPTIM.NO_DECAY_NORM_BIAS == "False"
    with pytest.raises(ConfigError, match="expected one of auto | True | False"):
        load_cfg(None, ["OPTIM.NO_DECAY_NORM_BIAS", "sometimes"])
    with pytest.raises(ConfigError, match="OPTIM.NO_DECAY_NORM_BIAS.*BN.USE_CUSTOM_WEIGHT_DECAY"):
        load_cfg(None, ["OPTIM.NO_DECAY_NORM_BIAS", "True", "BN.USE_CUSTOM_WEIGHT_DECAY", "True"])


@pytest.mark.parametrize(
    "opts, words",
    [
        (["OPTIM.LAYER_DECAY", "0"], ["OPTIM.LAYER_DECAY", "> 0 and <= 1"]),
        (["OPTIM.HEAD_LR_MULT", "-1"], ["OPTIM.HEAD_LR_MULT", "> 0"]),
        (["TRAIN.FREEZE_BACKBONE_EPOCHS", "-2"], ["TRAIN.FREEZE_BACKBONE_EPOCHS", ">= 0"]),
        (["OPTIM.CLIP_GRAD_NORM", "-1"], ["-1", ">= 0"]),
    ],
)
def test_bad_values_are_one_line_exit_2(opts, words, capsys):
    status, _, err = call_tool("model_info", TINY_MODEL + opts, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]


# --- the trainer: per-group learning rates, clipping, freezing, resume --------------------------------


@pytest.fixture
def trainer_of():
    """Trainer built in this process; its log handlers are removed afterwards."""
    from metric.engine.trainer import Trainer
    from metric.utils.distributed import DistInfo

    with logging_restored():
        yield lambda opts: Trainer(load_cfg(None, opts), DistInfo())


RECIPE = {
    "OPTIM.OPTIMIZER": "adamw",
    "OPTIM.NESTEROV": False,
    "OPTIM.BASE_LR": 0.002,
    "OPTIM.WEIGHT_DECAY": 0.05,
    "OPTIM.LAYER_DECAY": 0.6,
    "OPTIM.HEAD_LR_MULT": 5.0,
    "OPTIM.CLIP_GRAD_NORM": 0.5,
    "OPTIM.WARMUP_EPOCHS": 0.5,
    "TRAIN.FREEZE_BACKBONE_EPOCHS": 1,
    "TEST.DATASET": "",
    "LOG_PERIOD": 1,
    "MODEL.HEADS.DROPOUT": 0.1,
}


def test_set_lr_applies_each_groups_factor(tiny_data, tmp_path, trainer_of):
    trainer = trainer_of(tiny_opts(tiny_data, str(tmp_path / "run"), **RECIPE))
    for it in (0, 3, 7):
        base = trainer.set_lr(it)
        assert base == trainer.lr_at(it)
        for g in trainer.optimizer.param_groups:
            assert g["lr"] == base * g["lr_scale"]
    assert {g["lr_scale"] for g in trainer.optimizer.param_groups} >= {5.0, 0.6, 0.6**5}


def test_gradients_are_clipped_to_the_configured_norm(tiny_data, tmp_path, trainer_of, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, max_norm, **kw: seen.append(max_norm) or real(params, max_norm, **kw),
    )
    trainer = trainer_of(
        tiny_opts(tiny_data, str(tmp_path / "run"), **{"OPTIM.CLIP_GRAD_NORM": 0.25, "TEST.DATASET": ""})
    )
    trainer.train_epoch(0)
    assert seen and set(seen) == {0.25}


def test_frozen_backbone_does_not_change_then_trains(tiny_data, tmp_path, trainer_of):
    trainer = trainer_of(tiny_opts(tiny_data, str(tmp_path / "run"), **RECIPE))
    model = trainer.model
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # BN statistics too
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainer.train_epoch(0)
    assert all(torch.equal(v, backbone0[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(v, head0[k]) for k, v in model.head.state_dict().items())
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not any(id(p) in backbone_ids for p in trainer.optimizer.state)  # no optimizer state either
    trainer.train_epoch(1)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not torch.equal(model.backbone.stem.conv.weight, backbone0["stem.conv.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_opts",
    [
        {},
        {
            "MODEL.TYPE": "resnet50x1",
            "MODEL.DEPTH": 50,
            "RESNET.STEM_WIDTH": 4,
            "RESNET.WIDTH_PER_GROUP": 4,
            "MODEL.HEADS.ATTENTION": "spatial",
        },
    ],
    ids=["resnet18", "wide-spatial"],
)
def test_resume_restores_the_groups_and_ends_with_the_same_weights(tiny_data, tmp_path, trainer_of, model_opts):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    opts = {**RECIPE, **model_opts}
    trainer_of(tiny_opts(tiny_data, straight, **opts)).fit()
    shutil.copytree(straight, resumed)
    for path in list_checkpoints(resumed)[1:]:  # a kill after the first (frozen) epoch's checkpoint
        os.remove(path)
    trainer = trainer_of(tiny_opts(tiny_data, resumed, **opts))
    assert trainer.start_epoch == 1
    with torch.random.fork_rng():  # the resumed trainer's RNG state stays as restored
        fresh = build_optimizer(trainer.cfg, build_model(trainer.cfg))
    assert [
        (g["name"], g["lr_scale"], g["weight_decay"], len(g["params"])) for g in trainer.optimizer.param_groups
    ] == [(g["name"], g["lr_scale"], g["weight_decay"], len(g["params"])) for g in fresh.param_groups]
    trainer.fit()
    a, b = (read_checkpoint(list_checkpoints(d)[-1]) for d in (straight, resumed))
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    sa, sb = a["optimizer_state"], b["optimizer_state"]
    assert [{k: v for k, v in g.items() if k != "params"} for g in sa["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in sb["param_groups"]
    ]
    for i, state in sa["state"].items():
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in state.items())


@pytest.mark.slow
def test_an_older_adamw_checkpoint_with_one_group_is_refused_in_one_line(tiny_data, tmp_path, trainer_of):
    import metric.checkpoint as cp

    out = str(tmp_path / "run")
    base = {"OPTIM.OPTIMIZER": "adamw", "OPTIM.NESTEROV": False, "TEST.DATASET": "", "OPTIM.MAX_EPOCH": 1}
    trainer_of(tiny_opts(tiny_data, out, **base, **{"OPTIM.NO_DECAY_NORM_BIAS": False})).fit()
    path = list_checkpoints(out)[-1]
    state = read_checkpoint(path)  # as written before the key existed: one group, no key in its config
    state["cfg"] = "\n".join(line for line in state["cfg"].splitlines() if "NO_DECAY_NORM_BIAS" not in line)
    cp.save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="NO_DECAY_NORM_BIAS") as err:
        trainer_of(tiny_opts(tiny_data, out, **{**base, "OPTIM.MAX_EPOCH": 2}))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_two_processes_freeze_then_train_the_backbone_and_stay_identical(tiny_data, tmp_path):
    """Under DDP the model is wrapped again when the backbone starts training; ranks agree."""
    from metric.utils.logger import read_stats
    from tests.helpers import free_port, run_py

    out = str(tmp_path / "ddp")
    opts = tiny_opts(
        tiny_data, out, **{**RECIPE, "TRAIN.BATCH_SIZE": 8, "NUM_GPUS": 2, "HOST": "127.0.0.1", "PORT": free_port()}
    )
    run_py(["tools/train_metric.py", *opts], check=True)
    final = read_stats(os.path.join(out, "stats.jsonl"), "final")[-1]
    assert len(set(final["weights_digests"])) == 1 and len(final["weights_digests"]) == 2
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as f:
        log = f.read()
    assert "epoch 1: backbone frozen" in log and "epoch 2: backbone trains from now on" in log
    first = read_checkpoint(list_checkpoints(out)[0])["model_state"]
    last = read_checkpoint(list_checkpoints(out)[-1])["model_state"]
    # the frozen epoch left the backbone's BN statistics as initialized; the next one moved them
    assert int(first["backbone.stem.bn.num_batches_tracked"]) == 0 and torch.all(
        first["backbone.stem.bn.running_var"] == 1
    )
    assert int(last["backbone.stem.bn.num_batches_tracked"]) > 0
    assert not torch.equal(first["backbone.stem.conv.weight"], last["backbone.stem.conv.weight"])
