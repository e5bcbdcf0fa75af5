"""Validation of a merged config: allowed sets, ranges and cross-key rules, in one place.
Every problem is a :class:`~metric.utils.errors.ConfigError` naming the key, the value and what
is allowed."""

import difflib
import re

from metric.config.defaults import CURRENT_VERSION, DEFAULTS
from metric.utils.distributed import MAX_TIMEOUT_S
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
    "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE": _range(0, 1, lo_open=True),
    "MODEL.LAYERS": _ONE_UP,
    "MODEL.PATCH_SIZE": _ONE_UP,
    "MODEL.EMB_DIM": _ONE_UP,
    "MODEL.DOLG.S3_DIM": _NONNEG,
    "MODEL.DOLG.S4_DIM": _NONNEG,
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
    "OPTIM.LAYER_DECAY": _range(0, 1, lo_open=True),
    "OPTIM.HEAD_LR_MULT": _POS,
    "OPTIM.NO_DECAY_NORM_BIAS": _choices("auto", "True", "False"),
    "OPTIM.CLIP_GRAD_NORM": _NONNEG,
    "TRAIN.FREEZE_BACKBONE_EPOCHS": _NONNEG,
    "TRAIN.BATCH_SIZE": _ONE_UP,
    "TRAIN.IM_SIZE": _range(8),
    "TRAIN.COLOR_JITTER": _range(0, 1),
    "TRAIN.EVAL_PERIOD": _NONNEG,
    "TRAIN.CHECKPOINT_PERIOD": _ONE_UP,
    "TRAIN.MIXED_PRECISION": _choices("none", "bf16", "fp16"),
    "TRAIN.GRAD_CLIP": _NONNEG,
    "TRAIN.ACCUM_STEPS": _ONE_UP,
    "TRAIN.BEST_METRIC": (
        lambda v: v in ("", "recall@1", "recall@5", "recall@10", "mAP@R", "mAP@100"),
        'one of "" (off) | recall@1 | recall@5 | recall@10 | mAP@R | mAP@100',
    ),
    "TRAIN.EMA.DECAY": _range(0, 1, lo_open=True, hi_open=True),
    "TRAIN.EMA.WARMUP_GAMMA": _POS,
    "TRAIN.EMA.WARMUP_POWER": _POS,
    "TEST.WEIGHTS_KIND": _choices("auto", "ema", "raw"),
    "NUM_THREADS": _NONNEG,
    "TEST.BATCH_SIZE": _ONE_UP,
    "TEST.IM_SIZE": _range(8),
    "DATA_LOADER.NUM_WORKERS": _NONNEG,
    "DATA_LOADER.MAX_IMAGE_PIXELS": _NONNEG,
    "INFER.TOTAL_NUM": _ONE_UP,
    "INFER.CUT_NUM": _ONE_UP,
    "INFER.ID_MODE": _choices("stem", "relpath"),
    "INFER.MULTISCALE_POOL": _choices("gem", "mean", "max", "sgem"),
    "INFER.MULTISCALE_P": _POS,
    "INFER.POOL_P": _NONNEG,
    "INFER.REGIONAL_GEM_P": _POS,
    "INFER.REGIONAL_GEM_SIZE": _ONE_UP,
    "INFER.MIXED_PRECISION": _choices("none", "bf16", "fp16"),
    "INFER.CROP_FRACTION": _range(0, 1, lo_open=True),
    "NUM_GPUS": _ONE_UP,
    "RNG_SEED": _range(0, 2**32 - 1),  # numpy seeds are 32-bit
    "LOG_PERIOD": _ONE_UP,
    "LOG.TENSORBOARD_IMAGES": _range(0, 64),
    "DIST_BACKEND": _choices("auto", "nccl", "gloo"),
    "PORT": _range(1, 65535),
    "DIST.TIMEOUT_S": _range(1, MAX_TIMEOUT_S),
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
    named = t[len("resnest") :] if t.startswith("resnest") else ""
    if named.isdigit() and depth not in (int(named), DEFAULTS.MODEL.DEPTH):
        _fail("MODEL.DEPTH", depth, f"{named} (or left out) for MODEL.TYPE {t}")
    if t == "timm" and not c.MODEL.TIMM.NAME:
        _fail("MODEL.TIMM.NAME", "", "a timm model name for MODEL.TYPE timm, e.g. resnet50 or convnext_tiny")
    if t == "vit":
        _validate_vit(c)
    _validate_wide_resnet(c)


# The wide ResNets (MODEL.TYPE resnet50x1 ...; registered by the backbone): torchvision
# bottlenecks, one group.
WIDE_RESNET_TYPE = re.compile(r"resnet(\d+)x(\d+)$")


def _validate_wide_resnet(c):
    m = WIDE_RESNET_TYPE.match(c.MODEL.TYPE)
    if not m:
        return
    t, named = c.MODEL.TYPE, int(m.group(1))
    if c.MODEL.DEPTH not in (named, DEFAULTS.MODEL.DEPTH):
        _fail("MODEL.DEPTH", c.MODEL.DEPTH, f"{named} (or left out) for MODEL.TYPE {t}")
    if c.RESNET.NUM_GROUPS != 1:
        _fail("RESNET.NUM_GROUPS", c.RESNET.NUM_GROUPS, f"1 for MODEL.TYPE {t} (no grouped convolutions)")
    if c.RESNET.TRANS_FUN == "basic_transform":
        _fail("RESNET.TRANS_FUN", c.RESNET.TRANS_FUN, f"auto | bottleneck_transform for MODEL.TYPE {t}")


def _nearest(value, step):
    """The multiples of ``step`` next to ``value`` (``"192 or 256"``, or one of them)."""
    options = sorted({max(step, value // step * step), (value // step + 1) * step})
    return " or ".join(map(str, options))


def _validate_vit(c):
    """CLIP ViT: WIDTH in whole 64-channel heads, image sizes in whole patches, a vector output."""
    m = c.MODEL
    if m.WIDTH < 64 or m.WIDTH % 64:
        _fail(
            "MODEL.WIDTH",
            m.WIDTH,
            f"a multiple of 64 for MODEL.TYPE vit (heads = WIDTH / 64), e.g. {_nearest(m.WIDTH, 64)}",
        )
    p = m.PATCH_SIZE
    for key in ("TRAIN.IM_SIZE", "TEST.IM_SIZE"):
        size = _get(c, key)
        if size % p:
            _fail(key, size, f"a multiple of MODEL.PATCH_SIZE={p} for MODEL.TYPE vit, e.g. {_nearest(size, p)}")
    if m.HEADS.POOL_LAYER != "identity" and m.HEADS.NAME == "LinearHead":
        _fail(
            "MODEL.HEADS.POOL_LAYER",
            m.HEADS.POOL_LAYER,
            "identity for MODEL.TYPE vit (its output is already a vector [N, EMB_DIM])",
        )


def _validate_finetune(c):
    """The attention block needs a map; the two weight-decay rules for norms and biases exclude
    each other; the two names of the gradient clipping agree (see merge)."""
    h = c.MODEL.HEADS
    if h.ATTENTION != "none" and h.POOL_LAYER == "identity":
        _fail(
            "MODEL.HEADS.ATTENTION",
            h.ATTENTION,
            "none with MODEL.HEADS.POOL_LAYER identity (an attention block needs a feature map)",
        )
    if c.OPTIM.NO_DECAY_NORM_BIAS == "True" and c.BN.USE_CUSTOM_WEIGHT_DECAY:
        _fail(
            "OPTIM.NO_DECAY_NORM_BIAS",
            "True",
            "auto | False with BN.USE_CUSTOM_WEIGHT_DECAY True (which sets the decay of norms and biases itself)",
        )
    if c.OPTIM.CLIP_GRAD_NORM != c.TRAIN.GRAD_CLIP:
        raise ConfigError(
            f"OPTIM.CLIP_GRAD_NORM={c.OPTIM.CLIP_GRAD_NORM:g} and TRAIN.GRAD_CLIP={c.TRAIN.GRAD_CLIP:g} "
            "are two names of one setting and disagree; set one of them"
        )


# Margin layers that take per-class margins, and those with a margin to schedule.
DYNAMIC_MARGIN_LAYERS = ("arcface", "cosface", "subcenter_arcface", "curricularface")
SCHEDULED_MARGIN_LAYERS = DYNAMIC_MARGIN_LAYERS + ("circle",)


def _validate_heads_losses(c):
    """Dynamic margins, the margin schedule, AdaCos, the list of losses and the pk sampler."""
    h, losses = c.MODEL.HEADS, c.MODEL.LOSSES
    if h.DYNAMIC_MARGIN and h.CLS_LAYER not in DYNAMIC_MARGIN_LAYERS:
        _fail(
            "MODEL.HEADS.DYNAMIC_MARGIN",
            True,
            f"False for MODEL.HEADS.CLS_LAYER {h.CLS_LAYER} (per-class margins: {' | '.join(DYNAMIC_MARGIN_LAYERS)})",
        )
    schedule = [list(pair) for pair in h.MARGIN_SCHEDULE]
    if schedule:
        epochs = [e for e, _ in schedule]
        if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:])) or any(m < 0 for _, m in schedule):
            _fail(
                "MODEL.HEADS.MARGIN_SCHEDULE",
                schedule,
                "[[epoch, margin], ...] with epochs strictly ascending from 0 and margins >= 0, "
                "e.g. [[0, 0.1], [10, 0.2], [20, 0.3]]",
            )
        if h.CLS_LAYER not in SCHEDULED_MARGIN_LAYERS:
            _fail(
                "MODEL.HEADS.MARGIN_SCHEDULE",
                schedule,
                f"[] for MODEL.HEADS.CLS_LAYER {h.CLS_LAYER} (it has no margin; margins: "
                f"{' | '.join(SCHEDULED_MARGIN_LAYERS)})",
            )
        if h.DYNAMIC_MARGIN and h.MARGIN <= 0:
            _fail(
                "MODEL.HEADS.MARGIN",
                h.MARGIN,
                "> 0 with DYNAMIC_MARGIN and MARGIN_SCHEDULE (class margins are scaled by scheduled / MARGIN)",
            )
    if h.CLS_LAYER == "adacos" and h.NUM_CLASSES < 3:
        _fail("MODEL.HEADS.NUM_CLASSES", h.NUM_CLASSES, ">= 3 for MODEL.HEADS.CLS_LAYER adacos")
    names = list(losses.NAME)
    if not names or len(set(names)) != len(names):
        _fail("MODEL.LOSSES.NAME", names, "a non-empty list of different loss names, e.g. [cross_entropy, triplet]")
    _validate_partial_fc(c, names)
    k = c.TRAIN.NUM_INSTANCES
    if c.TRAIN.SAMPLER == "pk" and (c.TRAIN.BATCH_SIZE % k or c.TRAIN.BATCH_SIZE // k < 2):
        _fail(
            "TRAIN.BATCH_SIZE",
            c.TRAIN.BATCH_SIZE,
            f"a multiple of TRAIN.NUM_INSTANCES={k} holding at least 2 classes (>= {2 * k}) for TRAIN.SAMPLER pk",
        )


def _validate_partial_fc(c, loss_names):
    """Partial FC computes the cross-entropy itself; the global gradient norm of TRAIN.GRAD_CLIP and
    gradient accumulation over differently sampled classes are not supported with it."""
    if not c.MODEL.HEADS.PARTIAL_FC.ENABLED:
        return
    if "cross_entropy" not in loss_names:
        _fail(
            "MODEL.LOSSES.NAME",
            loss_names,
            "a list with cross_entropy when MODEL.HEADS.PARTIAL_FC.ENABLED is "
            "True (Partial FC is a classifier: it computes the cross-entropy)",
        )
    if c.TRAIN.GRAD_CLIP > 0:
        _fail(
            "TRAIN.GRAD_CLIP",
            c.TRAIN.GRAD_CLIP,
            "0 with MODEL.HEADS.PARTIAL_FC.ENABLED True (the gradient norm "
            "would need every process's classifier shard)",
        )
    ema = c.TRAIN.get("EMA")
    if ema is not None and ema.ENABLED:
        _fail(
            "TRAIN.EMA.ENABLED",
            True,
            "False with MODEL.HEADS.PARTIAL_FC.ENABLED True (the EMA copy would hold "
            "every process's classifier shard; not supported yet)",
        )
    if c.TRAIN.MIXED_PRECISION == "fp16":
        _fail(
            "TRAIN.MIXED_PRECISION",
            "fp16",
            "bf16 or none with MODEL.HEADS.PARTIAL_FC.ENABLED True (fp16's "
            "gradient scaler decides to skip a step from each process's own classifier shard, so the "
            "processes would drift apart)",
        )
    if (
        c.MODEL.HEADS.CLS_LAYER == "adacos"
        and c.MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE < 1
        and c.MODEL.HEADS.ADACOS_MODE == "adaptive"
    ):
        _fail(
            "MODEL.HEADS.ADACOS_MODE",
            "adaptive",
            "fixed, or MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE 1.0 (the adaptive "
            "scale sums over every class, but a sampled step sees only the sampled ones)",
        )
    accum = c.TRAIN.get("ACCUM_STEPS", 1)
    if accum > 1 and c.MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE < 1:
        _fail(
            "TRAIN.ACCUM_STEPS",
            accum,
            "1 with MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE < 1 (each step samples other classes)",
        )


# Smallest image side (px) a backbone is given. ResNet and ResNeSt (padded convolutions and
# pooling) run on any size, down to 1 px (checked); a timm backbone may downsample by its total
# stride 32 without padding (ConvNeXt fails below 32 px), so it needs 32.
MIN_VIEW = 8
MIN_VIEW_TIMM = 32


def _validate_sizes(c):
    """TRAIN.IM_SIZE and the smallest test view, TEST.IM_SIZE x min(INFER.SCALES), against the
    smallest side the backbone takes (the test preprocessing would otherwise enlarge it silently
    to 8 px, and a timm backbone would fail on it after the last epoch)."""
    timm = c.MODEL.TYPE == "timm"
    least = MIN_VIEW_TIMM if timm else MIN_VIEW
    why = " for MODEL.TYPE timm (a total stride of 32)" if timm else ""
    if c.TRAIN.IM_SIZE < least:
        _fail("TRAIN.IM_SIZE", c.TRAIN.IM_SIZE, f">= {least}{why}")
    smallest = min(c.INFER.SCALES)
    view = int(round(c.TEST.IM_SIZE * smallest))
    if view < least:
        raise ConfigError(
            f"TEST.IM_SIZE={c.TEST.IM_SIZE} x the smallest of INFER.SCALES ({smallest:g}) gives {view} px views, "
            f"less than {least} px{why}; raise TEST.IM_SIZE or the smallest scale of INFER.SCALES"
        )


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
    _validate_sizes(c)
    if c.INFER.CUT_NUM > c.INFER.TOTAL_NUM:
        _fail("INFER.CUT_NUM", c.INFER.CUT_NUM, f"1..INFER.TOTAL_NUM ({c.INFER.TOTAL_NUM})")
    if c.INFER.BOXES and c.INFER.CENTER_CROP:
        _fail("INFER.BOXES", c.INFER.BOXES, '"" with INFER.CENTER_CROP True (a box crop keeps the aspect ratio)')
    if c.INFER.CROP_FRACTION != 1.0 and not c.INFER.CENTER_CROP:
        _fail(
            "INFER.CROP_FRACTION",
            c.INFER.CROP_FRACTION,
            "1.0 unless INFER.CENTER_CROP is True (it sizes the centre crop)",
        )
    if c.INFER.REGIONAL_GEM_SIZE % 2 == 0:
        _fail("INFER.REGIONAL_GEM_SIZE", c.INFER.REGIONAL_GEM_SIZE, "an odd integer >= 1 (paper: 5)")
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
    if c.TRAIN.BEST_METRIC and not c.TEST.DATASET:
        _fail(
            "TRAIN.BEST_METRIC",
            c.TRAIN.BEST_METRIC,
            '"" when TEST.DATASET is empty (the best checkpoint is chosen by the TEST evaluation)',
        )
    _validate_finetune(c)
    return c
