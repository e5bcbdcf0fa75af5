"""The sweep config: its keys and defaults (every key commented), loading with type checks, and
the checks of ``SETUP.SAMPLERS`` (:func:`load_sweep_cfg`).

A sweep config is a yaml file (``configs/sweeps/*.yaml``) merged over :data:`DEFAULTS`; a key
that is not there, or a value of another type, is a :class:`~metric.utils.errors.ConfigError`
naming the file and the key. ``SETUP.SAMPLERS`` maps a key of the training config to its
sampler::

    SETUP:
      SAMPLERS:
        MODEL.HEADS.CLS_LAYER: {TYPE: grid, VALUES: [arcface, cosface]}
        OPTIM.BASE_LR: {TYPE: log_uniform, RANGE: [0.0005, 0.005], QUANTIZE: 0.0001}

Each sampler is checked here, before anything is sampled: the training key exists, the sampler
type and its fields are known, every value of a ``grid`` / ``choice`` has the key's type, the
ranges are ordered (and positive for ``log_uniform``, powers of two for ``power2``).
"""

import decimal
import difflib
import math
import os

import yaml
from yacs.config import CfgNode

from metric.config import all_keys, get_cfg, merge_from_list
from metric.utils import io
from metric.utils.cli import make_parser
from metric.utils.errors import ConfigError

_C = CfgNode()

# Name of the sweep: its runs, configs and reports go to ROOT_DIR/NAME. A folder name.
_C.NAME = ""

# Folder that holds sweeps. A relative path in the sweep config file is relative to that file's
# folder (so every tool finds the sweep from any folder); on the command line, to the current folder.
_C.ROOT_DIR = "output/sweeps"

_C.SETUP = CfgNode()

# The training config every run starts from (relative: as ROOT_DIR, to the sweep config file's
# folder; on the command line, to the current folder).
_C.SETUP.BASE_CFG = ""

# KEY VALUE overrides applied to BASE_CFG before the sampled values (a flat list of strings).
_C.SETUP.BASE_OPTS = []

# Training config key -> sampler {TYPE, VALUES, RANGE, QUANTIZE}. TYPE: grid (every value of
# VALUES; the grid keys form a Cartesian product) | choice (one of VALUES at random) | uniform
# (RANGE [lo, hi]) | log_uniform (log-uniform in RANGE, lo > 0) | int_uniform (integers in RANGE,
# both ends included) | power2 (2^k, RANGE [lo, hi] powers of two). QUANTIZE: round a sampled
# number to a multiple of it (0: no rounding).
_C.SETUP.SAMPLERS = CfgNode(new_allowed=True)

# Random configs drawn per grid point (for the random samplers; ignored when there are none).
_C.SETUP.NUM_CONFIGS = 1

# Each config is run once per seed (its RNG_SEED); [] runs it once with the base config's seed.
_C.SETUP.SEEDS = []

# Seed of the sampling itself (the same seed draws the same configs).
_C.SETUP.RNG_SEED = 0

# Draws per wanted random config before setup gives up (configs refused by the config check,
# duplicates and those outside SETUP.CONSTRAINTS are drawn again).
_C.SETUP.MAX_TRIES = 100

_C.SETUP.CONSTRAINTS = CfgNode()

# Allowed range [lo, hi] of the model's FLOPs on one TRAIN.IM_SIZE image (2 per multiply-add,
# metric/modeling/complexity.py); 0 leaves that end open ([0, 0]: no constraint).
_C.SETUP.CONSTRAINTS.FLOPS = [0.0, 0.0]

# Allowed range [lo, hi] of the model's parameters (the classifier included); 0: open end.
_C.SETUP.CONSTRAINTS.PARAMS = [0.0, 0.0]

_C.LAUNCH = CfgNode()

# Most runs at once: the local executor's cap (0: as many as the GPUs, or on CPU the cores,
# allow) and SLURM's array throttle (--array=0-N%PARALLEL_JOBS; 0: no throttle).
_C.LAUNCH.PARALLEL_JOBS = 0

# Attempts a failing run gets: a run that failed this many times is not launched again and is
# reported. Integer >= 1.
_C.LAUNCH.MAX_RETRY = 2

# GPUs (processes) per run: the training config's NUM_GPUS. Integer >= 1.
_C.LAUNCH.NUM_GPUS = 1

# SLURM: partition (--partition; "": the cluster's default).
_C.LAUNCH.PARTITION = ""

# SLURM: account (--account; "": none).
_C.LAUNCH.ACCOUNT = ""

# SLURM: time limit of one task in minutes (--time). Integer >= 1.
_C.LAUNCH.TIME_LIMIT = 240

# SLURM: GPUs per task (--gres=gpu:N; 0: LAUNCH.NUM_GPUS where the partition's nodes have GPUs,
# none on a CPU partition).
_C.LAUNCH.GPUS_PER_JOB = 0

# SLURM: CPU cores per task (--cpus-per-task). Integer >= 1.
_C.LAUNCH.CPUS_PER_JOB = 4

# SLURM: memory per task (--mem, e.g. "32G"; "": the partition's default).
_C.LAUNCH.MEM = ""

# SLURM: seconds before the time limit at which a task is signalled to requeue itself (it
# resumes from its last checkpoint).
_C.LAUNCH.SIGNAL_SECONDS = 120

# SLURM: more sbatch options, each a string such as "--qos=high".
_C.LAUNCH.EXTRA_SBATCH = []

_C.ANALYZE = CfgNode()

# The metric a run is ranked by: any key of the runs' test_epoch stats records (recall@1,
# recall@5, recall@10, mAP@R, ...) or "loss" (the training loss of the last epoch).
_C.ANALYZE.METRIC = "mAP@R"

# Which value of a run: last (its last evaluation) | best (its best evaluation).
_C.ANALYZE.PICK = "last"

# Whether a higher value of ANALYZE.METRIC is better. True | False.
_C.ANALYZE.HIGHER_IS_BETTER = True

DEFAULTS = _C

SAMPLER_TYPES = ("grid", "choice", "uniform", "log_uniform", "int_uniform", "power2")
LIST_TYPES = ("grid", "choice")  # take VALUES
RANGE_TYPES = ("uniform", "log_uniform", "int_uniform", "power2")  # take RANGE
LOG_TYPES = ("log_uniform", "power2")  # plotted on a log axis
SAMPLER_FIELDS = ("TYPE", "VALUES", "RANGE", "QUANTIZE")

_RULES = {
    "SETUP.NUM_CONFIGS": (lambda v: v >= 1, ">= 1"),
    "SETUP.MAX_TRIES": (lambda v: v >= 1, ">= 1"),
    "LAUNCH.PARALLEL_JOBS": (lambda v: v >= 0, ">= 0"),
    "LAUNCH.MAX_RETRY": (lambda v: v >= 1, ">= 1"),
    "LAUNCH.NUM_GPUS": (lambda v: v >= 1, ">= 1"),
    "LAUNCH.TIME_LIMIT": (lambda v: v >= 1, ">= 1"),
    "LAUNCH.GPUS_PER_JOB": (lambda v: v >= 0, ">= 0"),
    "LAUNCH.CPUS_PER_JOB": (lambda v: v >= 1, ">= 1"),
    "LAUNCH.SIGNAL_SECONDS": (lambda v: v >= 0, ">= 0"),
    "ANALYZE.PICK": (lambda v: v in ("last", "best"), "last | best"),
}


def _type_name(value):
    if isinstance(value, bool):
        return "True/False"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list"


def _coerce(key, value, default, source):
    """``value`` as the type of ``default`` (an int is a float too), else a ConfigError."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # a list
        ok = isinstance(value, list)
        if ok and default and isinstance(default[0], float):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                ok = False
            value = [float(v) for v in value] if ok else value
        elif ok and key in ("SETUP.SEEDS",):
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        elif ok:
            value = [str(v) for v in value]
    if not ok:
        raise ConfigError(f"{source}: {key}={value!r} has the wrong type: expected {_type_name(default)}")
    return value


def _merge(node, data, prefix, source):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at {prefix or 'top level'}, got {data!r}")
    for k, v in data.items():
        full = prefix + str(k)
        if full == "SETUP.SAMPLERS":
            continue  # checked by check_samplers
        if k not in node:
            known = [prefix + str(n) for n in node]
            near = difflib.get_close_matches(full, known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{source}: unknown sweep config key {full}{hint}")
        if isinstance(node[k], CfgNode):
            _merge(node[k], v, full + ".", source)
        else:
            node[k] = _coerce(full, v, node[k], source)


PATH_KEYS = ("ROOT_DIR", "SETUP.BASE_CFG")


def _resolve(path, folder):
    """``path`` made absolute: a relative local path is taken from ``folder``."""
    if not path or not io.is_local(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(folder, path))


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _multiple_of(v, step):
    """Whether ``v`` is a whole multiple of ``step``, in decimal as the yaml wrote them (0.3 of 0.1)."""
    return (decimal.Decimal(repr(float(v))) % decimal.Decimal(repr(float(step)))) == 0


def _is_power2(v):
    return _number(v) and v >= 1 and float(v).is_integer() and (int(v) & (int(v) - 1)) == 0


def check_sampler(key, spec, source, base=None):
    """The sampler ``spec`` of training key ``key`` normalized to ``{TYPE, VALUES, RANGE,
    QUANTIZE}``, or a ConfigError naming ``source``, the key and the fix."""
    where = f"{source}: SETUP.SAMPLERS.{key}"
    keys = all_keys()
    if key not in keys:
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{source}: SETUP.SAMPLERS: unknown training config key {key}{hint}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping {{TYPE: ..., VALUES or RANGE: ...}}, not {spec!r}")
    unknown = [f for f in spec if f not in SAMPLER_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: unknown sampler field {unknown[0]}; allowed: {', '.join(SAMPLER_FIELDS)}")
    kind = spec.get("TYPE")
    if kind not in SAMPLER_TYPES:
        raise ConfigError(f"{where}: TYPE={kind!r} is not allowed: expected one of {' | '.join(SAMPLER_TYPES)}")
    quantize = spec.get("QUANTIZE", 0)
    if not _number(quantize) or quantize < 0:
        raise ConfigError(f"{where}: QUANTIZE={quantize!r} has the wrong type: expected a number >= 0")
    base = get_cfg() if base is None else base
    default = _default(base, key)
    out = {"TYPE": kind, "VALUES": [], "RANGE": [], "QUANTIZE": float(quantize)}
    if kind in LIST_TYPES:
        if spec.get("RANGE") not in (None, []) or quantize:
            raise ConfigError(f"{where}: a {kind} sampler takes VALUES (a list), not RANGE or QUANTIZE")
        values = spec.get("VALUES")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: VALUES={values!r} has the wrong type: expected a list of values")
        if not values:
            raise ConfigError(f"{where}: VALUES is empty (an empty {kind} samples nothing); give at least one value")
        for v in values:  # the key's type, as a KEY VALUE override would check it
            probe = base.clone()
            probe.defrost()
            try:
                merge_from_list(probe, [key, v])
            except ConfigError as err:
                raise ConfigError(f"{where}: value {v!r}: {err}") from None
        out["VALUES"] = [_plain(v) for v in values]
        return out
    if spec.get("VALUES") not in (None, []):
        raise ConfigError(f"{where}: a {kind} sampler takes RANGE [lo, hi], not VALUES")
    rng = spec.get("RANGE")
    if not (isinstance(rng, list) and len(rng) == 2 and all(_number(v) for v in rng)):
        raise ConfigError(f"{where}: RANGE={rng!r} has the wrong type: expected [lo, hi], two numbers")
    lo, hi = rng
    if lo > hi:
        raise ConfigError(f"{where}: RANGE [{lo}, {hi}] is reversed; give [lo, hi] with lo <= hi")
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise ConfigError(
            f"{where}: a {kind} sampler draws numbers but {key} takes {_type_name(default)}; use grid or choice"
        )
    integral = kind in ("int_uniform", "power2") or (quantize and float(quantize).is_integer())
    if isinstance(default, int) and not integral:
        raise ConfigError(
            f"{where}: {key} takes an integer but a {kind} sampler draws fractions; use int_uniform, "
            "power2 or an integer QUANTIZE"
        )
    if kind == "log_uniform" and lo <= 0:
        raise ConfigError(f"{where}: log_uniform needs a positive RANGE, got [{lo}, {hi}]; give lo > 0")
    if kind == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{where}: int_uniform needs integer RANGE ends, got [{lo}, {hi}]")
    if kind == "power2" and not (_is_power2(lo) and _is_power2(hi)):
        raise ConfigError(f"{where}: power2 needs RANGE ends that are powers of two (1, 2, 4, ...), got [{lo}, {hi}]")
    if quantize and kind == "power2":
        raise ConfigError(f"{where}: a power2 sampler draws powers of two; QUANTIZE does not apply to it")
    if quantize and kind == "int_uniform" and not float(quantize).is_integer():
        raise ConfigError(f"{where}: int_uniform needs an integer QUANTIZE, got {quantize}")
    if quantize and not all(_multiple_of(v, quantize) for v in (lo, hi)):
        raise ConfigError(
            f"{where}: RANGE [{lo}, {hi}] ends must be multiples of QUANTIZE={quantize} (every drawn value is one, "
            "and within the range)"
        )
    out["RANGE"] = [int(lo), int(hi)] if kind in ("int_uniform", "power2") else [float(lo), float(hi)]
    return out


def _default(node, key):
    for part in key.split("."):
        node = node[part]
    return node


def _plain(v):
    """A yaml value as plain Python (lists of lists stay lists)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _read(path):
    if not io.isfile(path):
        raise ConfigError(f"sweep config not found: {path}")
    with io.open_text(path, ConfigError, "sweep config") as lines:
        text = "".join(lines)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"sweep config {path} is not valid yaml{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep config {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def sweep_parser(description, cfg_help="sweep config (yaml)"):
    """The command line of the sweep tools: ``--sweep-cfg S`` and ``KEY VALUE`` overrides of the
    sweep keys (the tool adds its own options)."""
    parser = make_parser(description, config=False)
    parser.add_argument("--sweep-cfg", required=True, help=cfg_help)
    parser.add_argument("opts", nargs="*", help="sweep config overrides: KEY VALUE ...")
    return parser


def load_sweep_cfg(path, opts=()):
    """The sweep config of yaml file ``path`` with ``KEY VALUE`` overrides ``opts`` (sweep keys,
    not SETUP.SAMPLERS), checked and frozen; paths made absolute."""
    data = _read(path)
    c = DEFAULTS.clone()
    c.defrost()
    _merge(c, data, "", path)
    here = os.path.dirname(os.path.abspath(path))
    c.ROOT_DIR = _resolve(c.ROOT_DIR, here)  # the file's paths: from its folder
    c.SETUP.BASE_CFG = _resolve(c.SETUP.BASE_CFG, here)
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, text in zip(opts[0::2], opts[1::2]):
        if key == "SETUP.SAMPLERS" or key.startswith("SETUP.SAMPLERS."):
            raise ConfigError(f"{key}: the samplers cannot be overridden on the command line; edit them in {path}")
        value = text
        if isinstance(text, str):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
            node = c
            for part in key.split(".")[:-1]:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict) and isinstance(node.get(key.split(".")[-1]), str):
                value = text  # a string key keeps the text as typed
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(c, nested, "", "command line")
        if key in PATH_KEYS:  # the command line's paths: from the current folder
            node, leaf = (c.SETUP, "BASE_CFG") if key == "SETUP.BASE_CFG" else (c, "ROOT_DIR")
            node[leaf] = _resolve(node[leaf], os.getcwd())
    if not c.NAME or "/" in c.NAME or c.NAME in (".", ".."):
        raise ConfigError(f"{path}: NAME={c.NAME!r} is not allowed: give a folder name for the sweep")
    if not c.ROOT_DIR:
        raise ConfigError(f"{path}: ROOT_DIR is empty; name the folder that holds sweeps")
    if not c.SETUP.BASE_CFG:
        raise ConfigError(f"{path}: SETUP.BASE_CFG is empty; name the training config the runs start from")
    if len(c.SETUP.BASE_OPTS) % 2:
        raise ConfigError(f"{path}: SETUP.BASE_OPTS must be KEY VALUE pairs; {c.SETUP.BASE_OPTS[-1]!r} has no value")
    for key, (ok, allowed) in _RULES.items():
        value = _default(c, key)
        if not ok(value):
            raise ConfigError(f"{path}: {key}={value!r} is not allowed: expected {allowed}")
    repeated = sorted({s for s in c.SETUP.SEEDS if c.SETUP.SEEDS.count(s) > 1})
    if repeated:
        raise ConfigError(
            f"{path}: SETUP.SEEDS repeats {repeated}: a repeated seed repeats a run and understates the "
            "spread over seeds; give each seed once"
        )
    for key in ("SETUP.CONSTRAINTS.FLOPS", "SETUP.CONSTRAINTS.PARAMS"):
        bounds = _default(c, key)
        if len(bounds) != 2 or min(bounds) < 0 or (bounds[1] and bounds[0] > bounds[1]):
            raise ConfigError(f"{path}: {key}={bounds} is not allowed: expected [lo, hi] with 0 <= lo <= hi (0: open)")
    samplers = (data.get("SETUP") or {}).get("SAMPLERS") or {}
    if not isinstance(samplers, dict):
        raise ConfigError(f"{path}: SETUP.SAMPLERS must map training config keys to samplers, not {samplers!r}")
    if not samplers:
        raise ConfigError(f"{path}: SETUP.SAMPLERS is empty; give at least one training config key to sample")
    c.SETUP.SAMPLERS = CfgNode({str(k): CfgNode(check_sampler(str(k), v, path)) for k, v in samplers.items()})
    c.freeze()
    return c


def sweep_dir(c):
    """ROOT_DIR/NAME of sweep config ``c``."""
    return os.path.join(c.ROOT_DIR, c.NAME)


def setup_part(c):
    """What identifies a sweep's runs (NAME and SETUP), as yaml text: two sweep configs that
    agree on it are the same sweep (LAUNCH and ANALYZE may change between launches)."""
    setup = _to_dict(c.SETUP)
    if io.is_local(setup["BASE_CFG"]):  # one file reached through a symlink is the same file
        setup["BASE_CFG"] = os.path.realpath(setup["BASE_CFG"])
    return yaml.safe_dump({"NAME": c.NAME, "SETUP": setup}, sort_keys=True)


def _to_dict(node):
    if isinstance(node, CfgNode):
        return {k: _to_dict(v) for k, v in node.items()}
    return node
