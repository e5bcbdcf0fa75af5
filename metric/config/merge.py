"""Loading and merging configs: yaml files (with ``_BASE_`` inheritance and the upgrade of
original-project files), ``KEY VALUE`` overrides, type checks and did-you-mean hints.

The keys themselves and their defaults are in :mod:`metric.config`; allowed values are
checked by :mod:`metric.config.check`.
"""

import ast
import difflib
import logging
import math
import os
import re

import yaml
from yacs.config import CfgNode

from metric.config.check import validate
from metric.config.defaults import CURRENT_VERSION, DEFAULTS
from metric.utils import io
from metric.utils.errors import ConfigError

# Element types of list-valued keys whose default is empty or ambiguous.
_LIST_ELEMENT_TYPES = {
    "OPTIM.STEPS": (int, float),
    "OPTIM.BETAS": (float,),
    "TRAIN.CROP_SCALE": (float,),
    "INFER.SCALES": (float,),
}

# List-valued keys whose elements are [number, number] pairs.
_PAIR_LIST_KEYS = ("MODEL.HEADS.MARGIN_SCHEDULE",)


def get_cfg():
    """A fresh, unfrozen copy of the defaults."""
    c = DEFAULTS.clone()
    c.defrost()
    return c


def all_keys(node=None, prefix=""):
    """Every leaf key of a config as a dotted name, in definition order."""
    node = DEFAULTS if node is None else node
    keys = []
    for k, v in node.items():
        if isinstance(v, CfgNode):
            keys.extend(all_keys(v, prefix + k + "."))
        else:
            keys.append(prefix + k)
    return keys


def _suggest(full_key):
    known = all_keys()
    hits = difflib.get_close_matches(full_key, known, n=1, cutoff=0.6)
    if not hits:
        leaf = full_key.rsplit(".", 1)[-1]
        same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
        hits = same_leaf[:1] or difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    return f" (did you mean {hits[0]}?)" if hits else ""


def _type_name(t):
    return {bool: "True/False", int: "an integer", float: "a number", str: "a string"}.get(t, t.__name__)


def _coerce_scalar(key, value, want):
    """Return ``value`` converted to type ``want`` or raise a ConfigError."""
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif want is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value!r} is not allowed: expected a finite number")
            return number
    elif want is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(want)}")


def _coerce_pair(key, item):
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return [x if type(x) in (int, float) else _coerce_scalar(f"{key} element", x, float) for x in item]
    raise ConfigError(f"{key} element {item!r} has the wrong type: expected a pair [number, number]")


def _names_from_text(key, text):
    """``"name"`` -> ``["name"]``; ``"[a, b]"`` (unquoted names, as in yaml) -> ``["a", "b"]``."""
    if not text.strip().startswith("["):
        return [text]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={text!r} has the wrong type: expected a name or a list of names, e.g. [a, b]")
    return value


def _coerce(key, value, default):
    if isinstance(default, (list, tuple)):
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str) and default and isinstance(default[0], str):
            # a list of names also takes a single name, and "[a, b]" from the command line
            value = _names_from_text(key, value)
        if key in _PAIR_LIST_KEYS and isinstance(value, list):
            return [_coerce_pair(key, item) for item in value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list, e.g. {list(default) or [1]}")
        types = _LIST_ELEMENT_TYPES.get(key)
        if types is None and default:
            types = (type(default[0]),)
        if types is None:
            return value
        out = []
        for item in value:
            if type(item) in types:
                out.append(item)
            else:
                out.append(_coerce_scalar(f"{key} element", item, types[-1]))
        return out
    if key in _TRISTATE_KEYS:  # auto | True | False, stored as text
        text = str(value)
        if isinstance(value, (bool, str)) and text.lower() in ("auto", "true", "false"):
            return text.lower() if text.lower() == "auto" else text.capitalize()
        raise ConfigError(f"{key}={value!r} is not allowed: expected one of auto | True | False")
    return _coerce_scalar(key, value, type(default))


# String keys that also take True / False (yaml booleans): "auto" or a switch.
_TRISTATE_KEYS = ("OPTIM.NO_DECAY_NORM_BIAS",)


def _merge_dict(node, data, prefix, source):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at {prefix or 'top level'}, got {data!r}")
    for k, v in data.items():
        full = prefix + str(k)
        if k not in node:
            raise ConfigError(f"{source}: unknown config key {full}{_suggest(full)}")
        default = node[k]
        if isinstance(default, CfgNode):
            _merge_dict(default, v, full + ".", source)
        else:
            node[k] = _coerce(full, v, default)


def _read_yaml(path, seen):
    path = io.abspath(path)
    if path in seen:
        raise ConfigError(f"config file {path} inherits from itself through _BASE_")
    if not io.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    # Decoded line by line: bytes that are not UTF-8 (a binary file, latin-1 text) are one
    # ConfigError naming the file, line and byte, not a decoder traceback.
    with io.open_text(path, ConfigError, "config file") as lines:
        text = "".join(lines)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.reader.ReaderError as err:  # a control character: its __str__ spans two lines
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        raise ConfigError(
            f"config file {path} is not valid yaml at line {line}, column {column}: unacceptable "
            f"character #x{err.character:04x} ({err.reason}); is it a text file?"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line
        raise ConfigError(f"config file {path} is not valid yaml{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    bases = data.pop("_BASE_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    chain = []
    for base in bases:
        absolute = os.path.isabs(base) or not io.is_local(base)  # a URI of a storage backend is absolute
        base_path = base if absolute else os.path.join(os.path.dirname(path), base)
        chain.extend(_read_yaml(base_path, seen | {path}))
    chain.append((path, data))
    return chain


_logger = logging.getLogger(__name__)


def upgrade_original(data, source):
    """Rewrite a version-1 (original pymetric) config dict in place to the current meaning.

    Version 1 called CurricularFace "arcface" (its layer kept an adaptive ``t`` buffer that
    re-weights hard negatives); ours is the additive-angular-margin ArcFace. So an original
    "arcface" becomes "curricularface", and original files train and load as they did there.
    The DOLG project's ``MODEL.S3_DIM`` / ``S4_DIM`` / ``WITH_MA`` become ``MODEL.DOLG.*``.
    An ``IN_FEAT`` of 512 on a ResNet whose last map has 2048 x k channels was the width of the
    original's spatial attention (its ``*_att`` configs): it becomes ``HEADS.ATTENTION spatial``.
    """
    heads = (data.get("MODEL") or {}).get("HEADS") or {}
    if heads.get("CLS_LAYER") == "arcface":
        heads["CLS_LAYER"] = "curricularface"
        _logger.info("%s: original pymetric config (no VERSION): CLS_LAYER arcface -> curricularface", source)
    model = data.get("MODEL")
    for old, new in (("S3_DIM", "S3_DIM"), ("S4_DIM", "S4_DIM"), ("WITH_MA", "MULTI_ATROUS")):
        if isinstance(model, dict) and old in model:  # the authors' DOLG project's names
            model.setdefault("DOLG", {})[new] = model.pop(old)
            _logger.info("%s: original config (no VERSION): MODEL.%s -> MODEL.DOLG.%s", source, old, new)
    if (
        isinstance(model, dict)
        and isinstance(heads, dict)
        and "ATTENTION" not in heads
        and heads.get("IN_FEAT") == 512
        and _original_channels(model) not in (None, 512)
    ):
        heads["ATTENTION"] = "spatial"
        _logger.info(
            "%s: original pymetric config (no VERSION): IN_FEAT 512 on a %d-channel %s -> "
            "MODEL.HEADS.ATTENTION spatial (whose output has 512 channels)",
            source,
            _original_channels(model),
            model.get("TYPE", DEFAULTS.MODEL.TYPE),
        )
    data["VERSION"] = CURRENT_VERSION
    return data


def _original_channels(model):
    """Channels of the last feature map of an original file's ResNet-family backbone (``MODEL``
    dict; defaults for keys it leaves out), or None for other backbones."""
    t = str(model.get("TYPE", DEFAULTS.MODEL.TYPE))
    depth = model.get("DEPTH", DEFAULTS.MODEL.DEPTH)
    wide = re.fullmatch(r"resnet(\d+)x(\d+)", t)
    if wide:
        return 2048 * int(wide.group(2))
    if t.startswith("resnest") or (t == "resnet" and isinstance(depth, int) and depth >= 50):
        return 2048
    return None


def _merge_versioned(node, data, source):
    version = data.get("VERSION", 1)
    if version not in (1, CURRENT_VERSION):
        raise ConfigError(f"{source}: VERSION={version!r} is not allowed: expected 1 (original pymetric) or 2")
    if version == 1:
        data = upgrade_original(dict(data), source)
    _merge_dict(node, data, "", source)


def merge_from_file(node, path):
    """Merge a yaml file (and the files it names in ``_BASE_``, first) into ``node``.

    Each file is read with its own VERSION: a file without one is upgraded from the original
    project's format (:func:`upgrade_original`)."""
    for source, data in _read_yaml(path, frozenset()):
        _merge_versioned(node, data, source)


def _parse_cli_value(text):
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def merge_from_list(node, opts):
    """Merge ``[KEY, VALUE, KEY, VALUE, ...]`` command-line overrides into ``node``."""
    opts = list(opts or [])
    if opts and opts[0] == "--":
        opts = opts[1:]
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, text in zip(opts[0::2], opts[1::2]):
        if key.startswith("-"):
            raise ConfigError(f"unexpected option {key!r} among KEY VALUE overrides (options go before them)")
        # The number of classes has two names (MODEL.NUM_CLASSES is the legacy one): setting
        # either on the command line sets both, whatever the yaml file said.
        # So has the gradient clipping (TRAIN.GRAD_CLIP, OPTIM.CLIP_GRAD_NORM).
        for name in _ALIASES.get(key, (key,)):
            data = {}
            cur = data
            parts = name.split(".")
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            # A string-valued key keeps the text as typed (OUT_DIR 2024 is a folder, not a number).
            cur[parts[-1]] = text if isinstance(_default_of(name), str) else _parse_cli_value(text)
            _merge_dict(node, data, "", "command line")


_NUM_CLASSES_KEYS = ("MODEL.NUM_CLASSES", "MODEL.HEADS.NUM_CLASSES")
_GRAD_CLIP_KEYS = ("TRAIN.GRAD_CLIP", "OPTIM.CLIP_GRAD_NORM")
_ALIASES = {k: pair for pair in (_NUM_CLASSES_KEYS, _GRAD_CLIP_KEYS) for k in pair}


def _default_of(key):
    node = DEFAULTS
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return None
        node = node[part]
    return node


def _sync_num_classes(c):
    top, head = c.MODEL.NUM_CLASSES, c.MODEL.HEADS.NUM_CLASSES
    d_top, d_head = DEFAULTS.MODEL.NUM_CLASSES, DEFAULTS.MODEL.HEADS.NUM_CLASSES
    if top == head:
        return
    if head == d_head:
        c.MODEL.HEADS.NUM_CLASSES = top
    elif top == d_top:
        c.MODEL.NUM_CLASSES = head
    else:
        raise ConfigError(
            f"MODEL.NUM_CLASSES={top} and MODEL.HEADS.NUM_CLASSES={head} disagree; set both to the number of classes"
        )


def _sync_grad_clip(c):
    """TRAIN.GRAD_CLIP (the original's name) and OPTIM.CLIP_GRAD_NORM are one setting: the one set
    (non-zero) gives its value to the other; both set to different values is an error."""
    a, b = c.TRAIN.GRAD_CLIP, c.OPTIM.CLIP_GRAD_NORM
    if a == b:
        return
    if a and b:
        raise ConfigError(
            f"TRAIN.GRAD_CLIP={a:g} and OPTIM.CLIP_GRAD_NORM={b:g} are two names of one setting "
            "and disagree; set one of them"
        )
    c.TRAIN.GRAD_CLIP = c.OPTIM.CLIP_GRAD_NORM = a or b


def load_cfg(cfg_file=None, opts=None, validate_cfg=True):
    """Defaults <- ``cfg_file`` <- ``opts``, validated and frozen (``metric.load_cfg``)."""
    c = get_cfg()
    if cfg_file:
        merge_from_file(c, cfg_file)
    merge_from_list(c, opts)
    _sync_num_classes(c)
    _sync_grad_clip(c)
    if validate_cfg:
        validate(c)
    c.freeze()
    return c


def dump_cfg(c, path):
    """Write the config as yaml to ``path`` atomically (:func:`metric.utils.io.write_text_atomic`)."""
    return io.write_text_atomic(path, c.dump(), what="config")
