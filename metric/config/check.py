"""Validation of a merged config: allowed sets, ranges and cross-key rules, in one place.
Every problem is a :class:`~metric.utils.errors.ConfigError` naming the key, the value and what
is allowed."""

import difflib

from metric.config.defaults import _DEFAULTS, CURRENT_VERSION
from metric.utils.errors import ConfigError

RESNET_DEPTHS = (18, 34, 50, 101, 152)
RESNEST_DEPTHS = (50, 101, 200, 269)


def _choices(*values):
    return lambda v: v in values, "one of " + " | ".join(map(str, values))


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    def ok(v):
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return False
        return not (hi is not None and (v > hi or (hi_open and v == hi)))

    left = "" if lo is None else ("> " if lo_open else ">= ") + str(lo)
    right = "" if hi is None else ("< " if hi_open else "<= ") + str(hi)
    return ok, " and ".join(s for s in (left, right) if s)


_POS = _range(0, lo_open=True)
_NONNEG = _range(0)
_ONE_UP = _range(1)
_PROB = _range(0, 1, hi_open=True)

_RULES = {
    "MODEL.HEADS.NUM_CLASSES": _ONE_UP,
    "MODEL.NUM_CLASSES": _ONE_UP,
    "MODEL.HEADS.IN_FEAT": _NONNEG,
    "MODEL.HEADS.REDUCTION_DIM": _ONE_UP,
    "MODEL.HEADS.GEM_P": _POS,
    "MODEL.HEADS.DROPOUT": _PROB,
    "MODEL.HEADS.MARGIN": _NONNEG,
    "MODEL.HEADS.SCALE": _POS,
    "MODEL.HEADS.SUBCENTERS": _ONE_UP,
    "MODEL.HEADS.ADACOS_MODE": _choices("adaptive", "fixed"),
    "MODEL.HEADS.DYNAMIC_MARGIN_A": _NONNEG,
    "MODEL.HEADS.DYNAMIC_MARGIN_B": _NONNEG,
    "MODEL.HEADS.DYNAMIC_MARGIN_LAMBDA": _POS,
    "MODEL.HEADS.MARGIN_SCHEDULE_MODE": _choices("step", "linear"),
    "MODEL.LOSSES.LABEL_SMOOTHING": _PROB,
    "MODEL.LOSSES.CE.SCALE": _NONNEG,
    "MODEL.LOSSES.TRIPLET.MARGIN": _NONNEG,
    "MODEL.LOSSES.TRIPLET.SCALE": _NONNEG,
    "MODEL.LOSSES.CIRCLE.MARGIN": _NONNEG,
    "MODEL.LOSSES.CIRCLE.GAMMA": _POS,
    "MODEL.LOSSES.CIRCLE.SCALE": _NONNEG,
    "TRAIN.SAMPLER": _choices("random", "pk"),
    "TRAIN.NUM_INSTANCES": _ONE_UP,
    "RESNET.TRANS_FUN": _choices("auto", "basic_transform", "bottleneck_transform"),
    "RESNET.NUM_GROUPS": _ONE_UP,
    "RESNET.WIDTH_PER_GROUP": _ONE_UP,
    "RESNET.STEM_WIDTH": _ONE_UP,
    "BN.EPS": _POS,
    "BN.MOM": _range(0, 1, lo_open=True),
    "BN.CUSTOM_WEIGHT_DECAY": _NONNEG,
    "OPTIM.OPTIMIZER": _choices("sgd", "adamw"),
    "OPTIM.BASE_LR": _POS,
    "OPTIM.LR_POLICY": _choices("cos", "steps", "exp"),
    "OPTIM.GAMMA": _range(0, 1, lo_open=True),
    "OPTIM.LR_MULT": _POS,
    "OPTIM.MAX_EPOCH": _ONE_UP,
    "OPTIM.MOMENTUM": _PROB,
    "OPTIM.DAMPENING": _PROB,
    "OPTIM.WEIGHT_DECAY": _NONNEG,
    "OPTIM.WARMUP_FACTOR": _range(0, 1, lo_open=True),
    "OPTIM.WARMUP_EPOCHS": _NONNEG,
    "OPTIM.LR_UPDATE": _choices("iter", "epoch"),
    "TRAIN.BATCH_SIZE": _ONE_UP,
    "TRAIN.IM_SIZE": _range(8),
    "TRAIN.COLOR_JITTER": _range(0, 1),
    "TRAIN.EVAL_PERIOD": _NONNEG,
    "TRAIN.CHECKPOINT_PERIOD": _ONE_UP,
    "TRAIN.MIXED_PRECISION": _choices("none", "bf16", "fp16"),
    "TRAIN.GRAD_CLIP": _NONNEG,
    "TEST.BATCH_SIZE": _ONE_UP,
    "TEST.IM_SIZE": _range(8),
    "DATA_LOADER.NUM_WORKERS": _NONNEG,
    "INFER.TOTAL_NUM": _ONE_UP,
    "INFER.CUT_NUM": _ONE_UP,
    "INFER.ID_MODE": _choices("stem", "relpath"),
    "INFER.MULTISCALE_POOL": _choices("gem", "mean"),
    "INFER.MULTISCALE_P": _POS,
    "INFER.MIXED_PRECISION": _choices("none", "bf16", "fp16"),
    "NUM_GPUS": _ONE_UP,
    "RNG_SEED": _NONNEG,
    "LOG_PERIOD": _ONE_UP,
    "DIST_BACKEND": _choices("auto", "nccl", "gloo"),
    "PORT": _range(1, 65535),
    "VERSION": _choices(CURRENT_VERSION),
}


# Names whose allowed values come from registries in the layers above (the model registries):
# a registry created with a config key adds itself here (see
# :class:`metric.modeling.registry.Registry`), so the names are listed in one place only.
_NAME_SOURCES = {}


def register_name_source(key, registry):
    """Let ``registry`` (anything with ``__contains__`` and ``names()``) decide the allowed
    values of the config ``key`` (a name, or a list of names)."""
    _NAME_SOURCES[key] = registry


def _get(c, key):
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def _fail(key, value, allowed):
    raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def _validate_backbone(c):
    """ResNeSt depths (both spellings of the type) and the timm model name."""
    t, depth = c.MODEL.TYPE, c.MODEL.DEPTH
    if t == "resnest" and depth not in RESNEST_DEPTHS:
        _fail("MODEL.DEPTH", depth, "one of " + " | ".join(map(str, RESNEST_DEPTHS)) + " for MODEL.TYPE resnest")
    named = t[len("resnest"):] if t.startswith("resnest") else ""
    if named.isdigit() and depth not in (int(named), _DEFAULTS.MODEL.DEPTH):
        _fail("MODEL.DEPTH", depth, f"{named} (or left out) for MODEL.TYPE {t}")
    if t == "timm" and not c.MODEL.TIMM.NAME:
        _fail("MODEL.TIMM.NAME", "", "a timm model name for MODEL.TYPE timm, e.g. resnet50 or convnext_tiny")


# Margin layers that take per-class margins, and those with a margin to schedule.
DYNAMIC_MARGIN_LAYERS = ("arcface", "cosface", "subcenter_arcface", "curricularface")
SCHEDULED_MARGIN_LAYERS = DYNAMIC_MARGIN_LAYERS + ("circle",)


def _validate_heads_losses(c):
    """Dynamic margins, the margin schedule, AdaCos, the list of losses and the pk sampler."""
    h, losses = c.MODEL.HEADS, c.MODEL.LOSSES
    if h.DYNAMIC_MARGIN and h.CLS_LAYER not in DYNAMIC_MARGIN_LAYERS:
        _fail("MODEL.HEADS.DYNAMIC_MARGIN", True,
              f"False for MODEL.HEADS.CLS_LAYER {h.CLS_LAYER} (per-class margins: {' | '.join(DYNAMIC_MARGIN_LAYERS)})")
    schedule = [list(pair) for pair in h.MARGIN_SCHEDULE]
    if schedule:
        epochs = [e for e, _ in schedule]
        if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])) or any(m < 0 for _, m in schedule):
            _fail("MODEL.HEADS.MARGIN_SCHEDULE", schedule,
                  "[[epoch, margin], ...] with epochs strictly ascending from 0 and margins >= 0, "
                  "e.g. [[0, 0.1], [10, 0.2], [20, 0.3]]")
        if h.CLS_LAYER not in SCHEDULED_MARGIN_LAYERS:
            _fail("MODEL.HEADS.MARGIN_SCHEDULE", schedule,
                  f"[] for MODEL.HEADS.CLS_LAYER {h.CLS_LAYER} (it has no margin; margins: "
                  f"{' | '.join(SCHEDULED_MARGIN_LAYERS)})")
        if h.DYNAMIC_MARGIN and h.MARGIN <= 0:
            _fail("MODEL.HEADS.MARGIN", h.MARGIN,
                  "> 0 with DYNAMIC_MARGIN and MARGIN_SCHEDULE (class margins are scaled by scheduled / MARGIN)")
    if h.CLS_LAYER == "adacos" and h.NUM_CLASSES < 3:
        _fail("MODEL.HEADS.NUM_CLASSES", h.NUM_CLASSES, ">= 3 for MODEL.HEADS.CLS_LAYER adacos")
    names = list(losses.NAME)
    if not names or len(set(names)) != len(names):
        _fail("MODEL.LOSSES.NAME", names, "a non-empty list of different loss names, e.g. [cross_entropy, triplet]")
    k = c.TRAIN.NUM_INSTANCES
    if c.TRAIN.SAMPLER == "pk" and (c.TRAIN.BATCH_SIZE % k or c.TRAIN.BATCH_SIZE // k < 2):
        _fail("TRAIN.BATCH_SIZE", c.TRAIN.BATCH_SIZE,
              f"a multiple of TRAIN.NUM_INSTANCES={k} holding at least 2 classes (>= {2 * k}) for TRAIN.SAMPLER pk")


def validate(c):
    """Check allowed sets, ranges and cross-key constraints; raise ConfigError on the first problem."""
    for key, (ok, allowed) in _RULES.items():
        value = _get(c, key)
        if not ok(value):
            _fail(key, value, allowed)
    for key, registry in _NAME_SOURCES.items():
        value = _get(c, key)
        for name in value if isinstance(value, list) else [value]:  # MODEL.LOSSES.NAME is a list
            if name not in registry:
                hint = difflib.get_close_matches(str(name), registry.names(), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                _fail(key, name, "one of " + " | ".join(registry.names()) + extra)
    if c.MODEL.TYPE == "resnet" and c.MODEL.DEPTH not in RESNET_DEPTHS:
        _fail("MODEL.DEPTH", c.MODEL.DEPTH, "one of " + " | ".join(map(str, RESNET_DEPTHS)) + " for MODEL.TYPE resnet")
    _validate_backbone(c)
    _validate_heads_losses(c)
    if not c.INFER.SCALES or not all(s > 0 for s in c.INFER.SCALES):
        _fail("INFER.SCALES", list(c.INFER.SCALES), "a non-empty list of numbers > 0, e.g. [0.7071, 1.0, 1.4142]")
    if c.INFER.CUT_NUM > c.INFER.TOTAL_NUM:
        _fail("INFER.CUT_NUM", c.INFER.CUT_NUM, f"1..INFER.TOTAL_NUM ({c.INFER.TOTAL_NUM})")
    steps = c.OPTIM.STEPS
    if list(steps) != sorted(steps) or any(s < 0 for s in steps):
        _fail("OPTIM.STEPS", list(steps), "ascending epochs >= 0, e.g. [0, 30, 60, 90]")
    if c.OPTIM.LR_POLICY == "steps" and (not steps or steps[0] != 0):
        _fail("OPTIM.STEPS", list(steps), "epochs starting with 0 for OPTIM.LR_POLICY steps, e.g. [0, 30, 60, 90]")
    if len(c.OPTIM.BETAS) != 2 or not all(0 <= b < 1 for b in c.OPTIM.BETAS):
        _fail("OPTIM.BETAS", list(c.OPTIM.BETAS), "two numbers in [0, 1)")
    lo_hi = c.TRAIN.CROP_SCALE
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        _fail("TRAIN.CROP_SCALE", list(lo_hi), "two numbers 0 < lo <= hi <= 1")
    if c.OPTIM.NESTEROV and c.OPTIM.OPTIMIZER == "sgd" and (c.OPTIM.MOMENTUM <= 0 or c.OPTIM.DAMPENING != 0):
        _fail("OPTIM.NESTEROV", True, "False unless OPTIM.MOMENTUM > 0 and OPTIM.DAMPENING == 0")
    return c
