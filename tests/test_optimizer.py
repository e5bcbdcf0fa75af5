import math

import pytest
import torch

from metric import build_model, load_cfg
from metric.engine.optimizer import build_optimizer, build_scheduler, get_epoch_lr


def _cfg(*opts):
    return load_cfg(None, list(opts))


def test_steps_policy_original_semantics():
    c = _cfg("OPTIM.LR_POLICY", "steps", "OPTIM.STEPS", "[0, 30, 60, 90]", "OPTIM.LR_MULT", "0.1",
             "OPTIM.BASE_LR", "0.1", "OPTIM.MAX_EPOCH", "100")
    assert get_epoch_lr(c, 0) == pytest.approx(0.1)
    assert get_epoch_lr(c, 29.9) == pytest.approx(0.1)
    assert get_epoch_lr(c, 30) == pytest.approx(0.01)
    assert get_epoch_lr(c, 95) == pytest.approx(1e-4)


def test_cos_exp_and_warmup():
    c = _cfg("OPTIM.LR_POLICY", "cos", "OPTIM.BASE_LR", "0.2", "OPTIM.MAX_EPOCH", "10",
             "OPTIM.WARMUP_EPOCHS", "2", "OPTIM.WARMUP_FACTOR", "0.1")
    assert get_epoch_lr(c, 0) == pytest.approx(0.02)
    assert get_epoch_lr(c, 1) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.1)) * 0.55)
    assert get_epoch_lr(c, 5) == pytest.approx(0.1)
    e = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0")
    assert get_epoch_lr(e, 3) == pytest.approx(0.125)
    per_epoch = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0", "OPTIM.LR_UPDATE", "epoch")
    assert get_epoch_lr(per_epoch, 2.7) == pytest.approx(0.25)


def test_scheduler_steps_per_iteration():
    c = _cfg("OPTIM.LR_POLICY", "exp", "OPTIM.GAMMA", "0.5", "OPTIM.BASE_LR", "1.0", "MODEL.DEPTH", "18")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(c, opt, iters_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 ** (i / 4) for i in range(8)])
    assert all(v is None for v in sched.state_dict()["lr_lambdas"])  # nothing unpicklable saved


def test_custom_weight_decay_groups():
    c = _cfg("MODEL.DEPTH", "18", "RESNET.WIDTH_PER_GROUP", "4", "RESNET.STEM_WIDTH", "4", "MODEL.HEADS.IN_FEAT", "0",
             "MODEL.HEADS.POOL_LAYER", "gempool", "BN.USE_CUSTOM_WEIGHT_DECAY", "True",
             "BN.CUSTOM_WEIGHT_DECAY", "0.0", "OPTIM.WEIGHT_DECAY", "1e-4")
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
    c = _cfg("OPTIM.OPTIMIZER", "adamw", "OPTIM.BETAS", "[0.8, 0.9]", "OPTIM.NESTEROV", "False",
             "MODEL.DEPTH", "18", "MODEL.HEADS.IN_FEAT", "0")
    opt = build_optimizer(c, build_model(c))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
