"""``tools/sweep_collect.py``: what every run of a sweep recorded, as ``sweep.jsonl``, and a status
table (:func:`collect`, :func:`format_table`). Safe while the sweep runs: each run's
``stats.jsonl`` is read up to its last complete record (a line being written, or cut by a kill,
is left out) and its status file is written atomically.

One JSON object per run: ``job``, ``config`` (runs of one config differ only in ``seed``),
``seed``, ``values`` (the sampled values), ``state`` (pending | running | interrupted | done |
failed), ``attempts``, ``failures``, ``last_line`` (of its log, when not done), ``epochs`` (trained),
``max_epoch``, ``final`` (the metrics of the last evaluation), ``best`` and ``best_epoch`` (each
metric's best evaluation), ``train_loss`` (of the last epoch), ``time`` (seconds of training and
evaluation, from the stats), ``wall`` (seconds of all attempts), ``flops``, ``params``,
``out_dir``.
"""

import math
import os

import yaml

from metric.sweep import jobs as J
from metric.utils import io
from metric.utils.errors import DataError
from metric.utils.logger import StatsWriter, read_stats

SWEEP_JSONL = "sweep.jsonl"
NOT_METRICS = ("_type", "epoch", "num_images", "bad_images", "time")
TABLE_STATES = ("done", "running", "interrupted", "failed", "pending")


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _max_epoch(path):
    try:
        with io.open_path(path, "r") as f:
            return int(yaml.safe_load(f)["OPTIM"]["MAX_EPOCH"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def run_record(root, entry):
    """The record of one run (``entry``: its item of ``setup.json``)."""
    job = entry["job"]
    status = J.read_status(root, job)
    rdir = J.run_dir(root, job)
    rec = {
        "job": job,
        "config": entry["config"],
        "seed": entry["seed"],
        "values": entry["values"],
        "state": J.live_state(status),
        "attempts": status["attempts"],
        "failures": status["failures"],
        "last_line": status.get("last_line", "") if status["state"] != "done" else "",
        "epochs": 0,
        "max_epoch": _max_epoch(J.cfg_path(root, job)),
        "final": {},
        "best": {},
        "best_epoch": {},
        "train_loss": None,
        "time": 0.0,
        "wall": status.get("total_seconds", 0.0),
        "flops": entry.get("flops"),
        "params": entry.get("params"),
        "out_dir": rdir,
    }
    stats_path = os.path.join(rdir, StatsWriter.FILE)
    if not io.isfile(stats_path):
        return rec
    try:
        records = read_stats(stats_path)  # up to the last complete line
    except DataError as err:
        rec["stats_error"] = str(err)
        return rec
    for r in records:
        kind = r.get("_type")
        if kind == "train_epoch":
            rec["epochs"] = max(rec["epochs"], int(r.get("epoch") or 0))
            rec["train_loss"] = r.get("loss") if _number(r.get("loss")) else rec["train_loss"]
            rec["time"] += r.get("time", 0.0) if _number(r.get("time")) else 0.0
        elif kind == "test_epoch" and r.get("epoch") is not None:
            rec["time"] += r.get("time", 0.0) if _number(r.get("time")) else 0.0
            metrics = {k: v for k, v in r.items() if k not in NOT_METRICS and _number(v)}
            rec["final"] = metrics
            for k, v in metrics.items():
                if k not in rec["best"] or v > rec["best"][k]:
                    rec["best"][k], rec["best_epoch"][k] = v, r["epoch"]
    return rec


def collect(root):
    """The records of every run of sweep folder ``root``, in job order."""
    return [run_record(root, entry) for entry in J.read_setup(root)["jobs"]]


def write_jsonl(root, records):
    import simplejson

    text = "".join(simplejson.dumps(r, ignore_nan=True) + "\n" for r in records)
    return io.write_text_atomic(os.path.join(root, SWEEP_JSONL), text, what="sweep records")


def run_value(rec, metric, pick="last"):
    """The value of ``metric`` of run record ``rec`` (``loss``: the last epoch's training loss), or None."""
    if metric == "loss":
        return rec["train_loss"]
    return (rec["best"] if pick == "best" else rec["final"]).get(metric)


def counts(records):
    out = dict.fromkeys(TABLE_STATES, 0)
    for r in records:
        out[r["state"]] = out.get(r["state"], 0) + 1
    return out


def format_table(records, metric, pick="last"):
    """The status table: a count per state, then one line per run (failed runs with their log's last line)."""
    n = counts(records)
    lines = [f"{len(records)} runs: " + ", ".join(f"{n[s]} {s}" for s in TABLE_STATES)]
    lines.append(f"{'job':>6}  {'state':<11} {'epochs':>7} {metric + ' (' + pick + ')':>16}  seed  values")
    for r in records:
        value = run_value(r, metric, pick)
        shown = f"{value:.4f}" if _number(value) else "-"
        epochs = f"{r['epochs']}/{r['max_epoch'] or '?'}"
        values = " ".join(f"{k}={v}" for k, v in r["values"].items())
        lines.append(f"{r['job']:>6}  {r['state']:<11} {epochs:>7} {shown:>16}  {r['seed']:>4}  {values}")
        if r["state"] in ("failed", "interrupted") and r["last_line"]:
            lines.append(f"{'':>8}last line: {r['last_line']}")
        if r.get("stats_error"):
            lines.append(f"{'':>8}stats: {r['stats_error']}")
    return "\n".join(lines)
