"""``tools/sweep_setup.py``: sample the configs of a sweep and write them (:func:`setup_sweep`).

The grid samplers' Cartesian product, each point with ``SETUP.NUM_CONFIGS`` random draws of the
other samplers, gives the candidate configs. Each candidate is the base config with the sampled
values merged in and validated by the training config's check (:func:`metric.config.load_cfg`):
one the check refuses is dropped and counted (never launched), so is a duplicate and one whose
model lies outside ``SETUP.CONSTRAINTS`` (FLOPs and parameters measured by
:func:`metric.modeling.complexity.model_complexity` at ``TRAIN.IM_SIZE``); random candidates are
drawn again, up to ``SETUP.MAX_TRIES`` draws per wanted config. Every kept config is written once
per seed of ``SETUP.SEEDS``, as a complete training config ``cfgs/NNNNNN.yaml`` (its ``RNG_SEED``
and its ``OUT_DIR`` ``runs/NNNNNN`` set); ``setup.json`` lists them with their sampled values,
FLOPs and parameters.
"""

import collections
import logging
import os

import numpy as np

from metric.config import dump_cfg, get_cfg, load_cfg
from metric.modeling import build_model
from metric.modeling.complexity import model_complexity, si_units
from metric.sweep import jobs as J
from metric.sweep.config import load_sweep_cfg, setup_part, sweep_dir
from metric.sweep.samplers import draw_all, grid_points, random_keys
from metric.utils import io, lock
from metric.utils.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)


def _flat(values):
    out = []
    for k, v in values.items():
        out += [k, v]
    return out


def _identity(cfg):
    """The text of a training config without what differs between the runs of one config."""
    c = cfg.clone()
    c.defrost()
    c.RNG_SEED, c.OUT_DIR = 0, ""
    return c.dump()


# Config parts that do not change the network or its input size (the complexity is measured
# once per architecture: runs that differ only in these share the figures).
_NOT_ARCHITECTURE = (
    "OPTIM",
    "TEST",
    "DATA_LOADER",
    "CUDNN",
    "INFER",
    "DIST",
    "LOG",
    "NUM_GPUS",
    "NUM_THREADS",
    "OUT_DIR",
    "CFG_DEST",
    "RNG_SEED",
    "LOG_PERIOD",
    "DIST_BACKEND",
    "HOST",
    "PORT",
    "DATA_DIR",
)


def _architecture(cfg):
    """The text of the parts of a training config that decide its model's complexity."""
    c, defaults = cfg.clone(), get_cfg()
    c.defrost()
    for key in _NOT_ARCHITECTURE:
        if key in c:
            c[key] = defaults[key]
    c.TRAIN = defaults.TRAIN
    c.TRAIN.IM_SIZE = cfg.TRAIN.IM_SIZE
    return c.dump()


def _within(value, bounds):
    lo, hi = bounds
    return (not lo or value >= lo) and (not hi or value <= hi)


def _absolute_paths(cfg):
    """Make the relative paths of training config ``cfg`` absolute, from the current folder (as the
    training tool reads them), so that its runs find their data wherever they are launched from:
    DATA_DIR always, TRAIN.WEIGHTS / TEST.WEIGHTS when they name an existing file."""
    if cfg.DATA_DIR and io.is_local(cfg.DATA_DIR):
        cfg.DATA_DIR = os.path.abspath(cfg.DATA_DIR)
    for node in (cfg.TRAIN, cfg.TEST):
        w = node.WEIGHTS
        if w and io.is_local(w) and not os.path.isabs(w) and os.path.exists(w):
            node.WEIGHTS = os.path.abspath(w)


def check_folder(c, root):
    """Refuse a ROOT/NAME that holds something other than this sweep, or this sweep once started."""
    if not io.exists(root):
        return
    if not io.isdir(root):
        raise OutputError(f"{root} exists and is not a folder; choose another NAME or ROOT_DIR")
    saved = os.path.join(root, J.SWEEP_CFG_FILE)
    entries = [n for n in io.ls(root) if n != ".lock"]
    if not io.isfile(saved):
        if entries:
            raise OutputError(
                f"{root} is not empty and holds no sweep ({J.SWEEP_CFG_FILE} is missing); "
                "choose another NAME or ROOT_DIR"
            )
        return
    if setup_part(load_sweep_cfg(saved)) != setup_part(c):
        raise OutputError(
            f"{root} holds another sweep (its {J.SWEEP_CFG_FILE} has other NAME/SETUP values); "
            "choose another NAME or ROOT_DIR"
        )
    runs = os.path.join(root, "runs")
    started = [n for n in (io.ls(runs) if io.isdir(runs) else []) if io.isfile(os.path.join(runs, n, J.STATUS_FILE))]
    if started:
        raise OutputError(
            f"sweep {root} has started ({len(started)} runs have a status): setup would overwrite their "
            "configs; launch it to resume, or choose another NAME"
        )


class _Sampler:
    """Draws candidate configs and keeps count of what was dropped and why."""

    def __init__(self, c):
        self.c = c
        self.samplers = {k: dict(v) for k, v in c.SETUP.SAMPLERS.items()}
        self.rng = np.random.default_rng(c.SETUP.RNG_SEED)
        self.seen = set()
        self.complexity = {}  # architecture text -> model_complexity
        self.kept = []  # (values, cfg, complexity)
        self.counts = collections.Counter()
        self.refused = collections.Counter()
        self.measured = {"flops": [], "params": []}
        self.constrained = any(any(b) for b in (c.SETUP.CONSTRAINTS.FLOPS, c.SETUP.CONSTRAINTS.PARAMS))

    def candidate(self, values):
        """Try one config; True if kept."""
        self.counts["tried"] += 1
        try:
            cfg = load_cfg(self.c.SETUP.BASE_CFG, list(self.c.SETUP.BASE_OPTS) + _flat(values))
        except ConfigError as err:
            self.counts["refused"] += 1
            self.refused[str(err)] += 1
            return False
        ident = _identity(cfg)
        if ident in self.seen:
            self.counts["duplicates"] += 1
            return False
        arch = _architecture(cfg)
        if arch not in self.complexity:
            try:  # a model the config check passes can still not build (e.g. channels that do not match)
                self.complexity[arch] = model_complexity(build_model(cfg), cfg.TRAIN.IM_SIZE)
            except ConfigError as err:
                self.complexity[arch] = err
        cx = self.complexity[arch]
        if isinstance(cx, ConfigError):
            self.counts["refused"] += 1
            self.refused[str(cx)] += 1
            return False
        self.measured["flops"].append(cx["flops"])
        self.measured["params"].append(cx["params"])
        cons = self.c.SETUP.CONSTRAINTS
        if not (_within(cx["flops"], cons.FLOPS) and _within(cx["params"], cons.PARAMS)):
            self.counts["outside_constraints"] += 1
            return False
        self.seen.add(ident)
        self.kept.append((values, cfg, cx))
        return True

    def run(self):
        randoms = random_keys(self.samplers)
        wanted = self.c.SETUP.NUM_CONFIGS if randoms else 1
        points, short = grid_points(self.samplers), []
        self.counts["grid_points"] = len(points) if len(points) > 1 or points[0] else 0
        for point in points:
            got, draws = 0, 0
            budget = wanted * self.c.SETUP.MAX_TRIES if randoms else 1
            while got < wanted and draws < budget:
                draws += 1
                got += self.candidate({**point, **draw_all(self.samplers, self.rng)})
            if randoms and got < wanted:
                self.counts["short"] += wanted - got
                short.append(f"{point or 'the random samplers'}: {got} of {wanted} configs after {draws} draws")
        if not self.kept:
            raise ConfigError(self.nothing_kept())
        for line in short:
            logger.warning("%s", line)
        return self.kept

    def nothing_kept(self):
        tried, cons = self.counts["tried"], self.c.SETUP.CONSTRAINTS
        if self.counts["outside_constraints"]:
            f, p = self.measured["flops"], self.measured["params"]
            return (
                f"no sampled config meets SETUP.CONSTRAINTS (FLOPS {list(cons.FLOPS)}, PARAMS {list(cons.PARAMS)}): "
                f"{tried} tried, {self.counts['outside_constraints']} outside, {self.counts['refused']} refused by "
                f"the config check (measured FLOPs {si_units(min(f))}-{si_units(max(f))}, params "
                f"{si_units(min(p))}-{si_units(max(p))}); widen the ranges"
            )
        reason = self.refused.most_common(1)[0][0] if self.refused else "duplicates only"
        return f"every sampled config was refused by the config check ({tried} tried), e.g.: {reason}"


def setup_sweep(c):
    """Sample and write the sweep of config ``c`` (:func:`metric.sweep.config.load_sweep_cfg`);
    returns the summary written to ``setup.json``."""
    root = sweep_dir(c)
    if not io.isfile(c.SETUP.BASE_CFG):
        raise ConfigError(
            f"SETUP.BASE_CFG {c.SETUP.BASE_CFG} not found (a relative BASE_CFG in a sweep config file is "
            "relative to that file's folder; on the command line, to the current folder)"
        )
    load_cfg(c.SETUP.BASE_CFG, list(c.SETUP.BASE_OPTS))  # the base config itself is valid
    check_folder(c, root)
    sampler = _Sampler(c)
    kept = sampler.run()
    base_seed = kept[0][1].RNG_SEED
    seeds = list(c.SETUP.SEEDS) or [base_seed]
    entries = []
    for ci, (values, _, cx) in enumerate(kept):
        for seed in seeds:
            entries.append(
                {
                    "job": len(entries),
                    "config": ci,
                    "seed": seed,
                    "values": values,
                    "flops": cx["flops"],
                    "params": cx["params"],
                }
            )
    io.mkdirs(root, "sweep")
    with lock.folder_lock(root, f"sweep {root}", "stop the launcher that runs it"):
        check_folder(c, root)  # again under the lock
        cfgs = os.path.join(root, "cfgs")
        if io.isdir(cfgs):
            io.rmtree(cfgs)
        io.mkdirs(cfgs)
        for entry in entries:
            cfg = kept[entry["config"]][1].clone()
            cfg.defrost()
            cfg.RNG_SEED, cfg.OUT_DIR = entry["seed"], J.run_dir(root, entry["job"])
            _absolute_paths(cfg)
            cfg.freeze()
            dump_cfg(cfg, J.cfg_path(root, entry["job"]))
        io.write_text_atomic(os.path.join(root, J.SWEEP_CFG_FILE), c.dump(), what="sweep config")
        counts = dict(sampler.counts)
        summary = {
            "name": c.NAME,
            "samplers": {k: dict(v) for k, v in c.SETUP.SAMPLERS.items()},
            "num_configs": len(kept),
            "seeds": seeds,
            "counts": {
                k: counts.get(k, 0)
                for k in ("grid_points", "tried", "duplicates", "refused", "outside_constraints", "short")
            },
            "refused_reasons": dict(sampler.refused.most_common()),
            "jobs": entries,
        }
        io.write_json_atomic(os.path.join(root, J.SETUP_FILE), summary, what="sweep setup")
    return summary


def format_summary(summary, root):
    """Lines for the user: what was sampled and dropped, and where the configs are."""
    n = summary["counts"]
    lines = [
        f"sweep {summary['name']}: {summary['num_configs']} configs x {len(summary['seeds'])} seeds = "
        f"{len(summary['jobs'])} runs in {root}",
        f"  tried {n['tried']}: {n['duplicates']} duplicates removed, {n['refused']} refused by the config check, "
        f"{n['outside_constraints']} outside SETUP.CONSTRAINTS"
        + (f", {n['short']} random configs short" if n["short"] else ""),
    ]
    for reason, count in summary["refused_reasons"].items():
        lines.append(f"  refused {count}x: {reason}")
    by_key = collections.defaultdict(set)
    for job in summary["jobs"]:
        for k, v in job["values"].items():
            by_key[k].add(repr(v))
    for key, spec in summary["samplers"].items():
        vals = sorted(by_key[key])
        shown = ", ".join(vals[:8]) + (f", ... ({len(vals)} values)" if len(vals) > 8 else "")
        lines.append(f"  {key} ({spec['TYPE']}): {shown}")
    return "\n".join(lines)
