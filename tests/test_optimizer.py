import math

import pytest
import torch

from metric import build_model, load_cfg
from metric.engine.optimizer import build_optimizer, get_epoch_lr, lr_at, lr_factor


def _cfg(*opts):
    return load_cfg(None, list(opts))


def test_steps_policy_original_semantics():
    c = _cfg(
        "OPTIM.LR_POLICY",
        "steps",
        "OPTIM.STEPS",
        "[0, 30, 60, 90]",
        "OPTIM.LR_MULT",
        "0.1",
        "OPTIM.BASE_LR",
        "0.1",
        "OPTIM.MAX_EPOCH",
        "100",
    )
    assert get_epoch_lr(c, 0) == pytest.approx(0.1)
    assert get_epoch_lr(c, 29.9) == pytest.approx(0.1)
    assert get_epoch_lr(c, 30) == pytest.approx(0.01)
    assert get_epoch_lr(c, 95) == pytest.approx(1e-4)


def test_cos_exp_and_warmup():
    c = _cfg(
        "OPTIM.LR_POLICY",
        "cos",
        "OPTIM.BASE_LR",
        "0.2",
        "OPTIM.MAX_EPOCH",
        "10",
        "OPTIM.WARMUP_EPOCHS",
        "2",
        "OPTIM.WARMUP_FACTOR",
        "0.1",
    )
    assert get_epoch_lr(c, 0) == pytest.approx(0.02)
    assert get_epoch_lr(c, 1) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.1)) * 0.55)
    assert get_epoch_lr(c, 5) == pytest.approx(0.1)
    e = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0")
    assert get_epoch_lr(e, 3) == pytest.approx(0.125)
    per_epoch = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0", "OPTIM.LR_UPDATE", "epoch")
    assert get_epoch_lr(per_epoch, 2.7) == pytest.approx(0.25)


def test_lr_at_steps_per_iteration():
    c = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0", "MODEL.DEPTH", "18")
    assert [lr_at(c, i, 4) for i in range(8)] == pytest.approx([0.5 ** (i / 4) for i in range(8)])


SCHEDULES = {
    "cos_warmup": (
        "OPTIM.LR_POLICY",
        "cos",
        "OPTIM.BASE_LR",
        "0.2",
        "OPTIM.MAX_EPOCH",
        "6",
        "OPTIM.WARMUP_EPOCHS",
        "2",
        "OPTIM.WARMUP_FACTOR",
        "0.1",
    ),
    "steps": (
        "OPTIM.LR_POLICY",
        "steps",
        "OPTIM.STEPS",
        "[0, 2, 4]",
        "OPTIM.LR_MULT",
        "0.1",
        "OPTIM.BASE_LR",
        "0.1",
        "OPTIM.MAX_EPOCH",
        "6",
        "OPTIM.WARMUP_EPOCHS",
        "1",
    ),
    "exp": ("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.7", "OPTIM.BASE_LR", "0.05", "OPTIM.MAX_EPOCH", "6"),
    "cos_per_epoch": (
        "OPTIM.LR_POLICY",
        "cos",
        "OPTIM.BASE_LR",
        "0.3",
        "OPTIM.MAX_EPOCH",
        "6",
        "OPTIM.WARMUP_EPOCHS",
        "1.5",
        "OPTIM.LR_UPDATE",
        "epoch",
    ),
}


def _defined_lr(o, epoch):
    """The schedules as documented (pycls), written out naively."""
    if o.LR_UPDATE == "epoch":
        epoch = math.floor(epoch)
    if o.LR_POLICY == "cos":
        lr = o.BASE_LR * 0.5 * (1.0 + math.cos(math.pi * epoch / o.MAX_EPOCH))
    elif o.LR_POLICY == "steps":
        lr = o.BASE_LR * o.LR_MULT ** sum(1 for s in o.STEPS[1:] if epoch >= s)
    else:
        lr = o.BASE_LR * o.GAMMA**epoch
    if epoch < o.WARMUP_EPOCHS:
        alpha = epoch / o.WARMUP_EPOCHS
        lr *= o.WARMUP_FACTOR * (1 - alpha) + alpha
    return lr


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_lr_at_matches_the_schedule_definitions(name):
    c = _cfg(*SCHEDULES[name])
    ipe = 5
    for i in range(c.OPTIM.MAX_EPOCH * ipe + 1):
        assert lr_at(c, i, ipe) == pytest.approx(_defined_lr(c.OPTIM, i / ipe), rel=1e-12, abs=1e-15), i


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_lr_at_is_bit_identical_to_the_former_lambdalr(name):
    """The trainer used to step a LambdaLR(lr_factor(step / iters_per_epoch)) once per iteration,
    starting at the resumed iteration: lr_at gives the very same floats."""
    c = _cfg(*SCHEDULES[name])
    ipe = 7
    for start in (0, 3 * ipe):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.OPTIM.BASE_LR)
        opt.param_groups[0]["initial_lr"] = c.OPTIM.BASE_LR
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(c, step / ipe), last_epoch=start - 1)
        for i in range(start, c.OPTIM.MAX_EPOCH * ipe):
            assert opt.param_groups[0]["lr"] == lr_at(c, i, ipe), i
            opt.step()
            sched.step()


def test_custom_weight_decay_groups():
    c = _cfg(
        "MODEL.DEPTH",
        "18",
        "RESNET.WIDTH_PER_GROUP",
        "4",
        "RESNET.STEM_WIDTH",
        "4",
        "MODEL.HEADS.IN_FEAT",
        "0",
        "MODEL.HEADS.POOL_LAYER",
        "gempool",
        "BN.USE_CUSTOM_WEIGHT_DECAY",
        "True",
        "BN.CUSTOM_WEIGHT_DECAY",
        "0.0",
        "OPTIM.WEIGHT_DECAY",
        "1e-4",
    )
    model = build_model(c)
    opt = build_optimizer(c, model)
    decayed, special = opt.param_groups
    assert special["weight_decay"] == 0.0 and decayed["weight_decay"] == 1e-4
    special_ids = {id(p) for p in special["params"]}
    assert id(model.head.pool_layer.p) in special_ids
    assert id(model.backbone.stem.bn.weight) in special_ids and id(model.backbone.stem.bn.bias) in special_ids
    assert id(model.backbone.stem.conv.weight) not in special_ids
    assert len(decayed["params"]) + len(special["params"]) == len(list(model.parameters()))


def test_adamw():
    c = _cfg(
        "OPTIM.OPTIMIZER",
        "adamw",
        "OPTIM.BETAS",
        "[0.8, 0.9]",
        "OPTIM.NESTEROV",
        "False",
        "MODEL.DEPTH",
        "18",
        "MODEL.HEADS.IN_FEAT",
        "0",
    )
    opt = build_optimizer(c, build_model(c))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
