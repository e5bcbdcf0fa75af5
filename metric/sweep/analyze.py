"""``tools/sweep_analyze.py``: one self-contained ``analysis.html`` of a sweep (:func:`analyze`).

From the records of :mod:`metric.sweep.collect` (finished runs only), the value of
``ANALYZE.METRIC`` of each run (its last or best evaluation, ``ANALYZE.PICK``) is grouped by
config (the runs of one config differ only in their seed). The page holds:

- the configs sorted by the metric: mean ± sample standard deviation over seeds, and n;
- whether the top two configs differ by more than seed noise: Welch's 95% interval for the
  difference of their means (:mod:`metric.sweep.significance`);
- the metric's empirical distribution function over configs and over runs (pycls's EDF plot);
- for each sampled key, the metric against the key's value (a log axis for ``log_uniform`` and
  ``power2`` keys), one colour per combination of the values of the other categorical keys;
- the training curves (:mod:`metric.utils.stats_plot`) of the runs of the best and the worst config;
- the runs left out (not done, or without the metric), with the last line of their logs.

Images are PNGs drawn with matplotlib's Agg canvas and embedded as ``data:`` URIs, so the file
can be mailed or opened anywhere.
"""

import base64
import datetime
import html
import io as _bytes_io
import math
import os

from metric.sweep.collect import counts, run_value
from metric.sweep.config import LIST_TYPES, LOG_TYPES
from metric.sweep.significance import mean_std, welch_interval
from metric.utils import io
from metric.utils.errors import ConfigError, DataError
from metric.utils.stats_plot import RunCurves, render_png

ANALYSIS_HTML = "analysis.html"


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_configs(records, metric, pick="last", higher_is_better=True):
    """``(groups, left_out)``: one dict per config with a finished run that has the metric
    (``config``, ``values``, ``values_list``, ``jobs``, ``seeds``, ``mean``, ``std``, ``n``,
    ``flops``, ``params``), best first; and the run records left out."""
    by_config, left_out = {}, []
    for r in records:
        value = run_value(r, metric, pick)
        if r["state"] != "done" or not _number(value):
            left_out.append(r)
            continue
        g = by_config.setdefault(
            r["config"],
            {"config": r["config"], "values": r["values"], "runs": [], "flops": r["flops"], "params": r["params"]},
        )
        g["runs"].append((r, value))
    groups = []
    for g in by_config.values():
        vals = [v for _, v in g["runs"]]
        g["mean"], g["std"] = mean_std(vals)
        g.update(
            n=len(vals),
            values_list=vals,
            jobs=[r["job"] for r, _ in g["runs"]],
            seeds=[r["seed"] for r, _ in g["runs"]],
        )
        groups.append(g)
    groups.sort(key=lambda g: (-g["mean"] if higher_is_better else g["mean"], g["config"]))
    return groups, left_out


def recorded_metrics(records):
    names = {"loss"} if any(r["train_loss"] is not None for r in records) else set()
    for r in records:
        names.update(r["final"])
    return sorted(names)


def top_two(groups, level=0.95):
    """The comparison of the two best configs: Welch's interval, or None with fewer than two configs."""
    if len(groups) < 2:
        return None
    a, b = groups[0], groups[1]
    return {"a": a, "b": b, "welch": welch_interval(a["values_list"], b["values_list"], level)}


def _png(fig):
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(size=(7, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def edf_png(groups, metric):
    """The empirical distribution function of the metric over configs (means) and over runs."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for vals, label, style in (
        (sorted(g["mean"] for g in groups), f"configs (mean over seeds, {len(groups)})", "-"),
        (sorted(v for g in groups for v in g["values_list"]), "runs", "--"),
    ):
        n = len(vals)
        ax.step(
            [vals[0], *vals], [0.0, *[(i + 1) / n for i in range(n)]], where="post", linestyle=style, label=f"{label}"
        )
    ax.set_xlabel(metric)
    ax.set_ylabel(f"fraction with {metric} <= x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"EDF of {metric}")
    fig.tight_layout()
    return _png(fig)


def _categorical(spec, values):
    return spec["TYPE"] in LIST_TYPES and not all(_number(v) for v in values)


def _colour_label(values, colour_keys):
    """The colour group of a config: its values of ``colour_keys`` as ``K=v, K2=w`` ("runs" if none)."""
    return ", ".join(f"{k}={values.get(k)}" for k in colour_keys) if colour_keys else "runs"


def key_figure(groups, key, spec, metric, colour_keys=()):
    """The metric of every run (dots) and config mean (rings) against the value of ``key``: one
    colour per combination of the values of ``colour_keys`` (the other categorical keys); a log
    axis for log-sampled keys. Returns the matplotlib Figure."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    runs = [
        (g["values"].get(key), _colour_label(g["values"], colour_keys), v, g["mean"])
        for g in groups
        for v in g["values_list"]
    ]
    xs_all = [x for x, _, _, _ in runs]
    categorical = _categorical(spec, xs_all)
    cats = sorted({str(x) for x in xs_all}) if categorical else None
    colours = sorted({c for _, c, _, _ in runs})
    if len(colours) <= 10:
        colour_of = {c: f"C{i}" for i, c in enumerate(colours)}
    else:  # 20 colours, then they repeat
        from matplotlib import colormaps

        colour_of = {c: colormaps["tab20"](i % 20) for i, c in enumerate(colours)}
    log_axis = spec["TYPE"] in LOG_TYPES and all(_number(x) and x > 0 for x in xs_all)
    # Few numbers (grid / choice): the colours side by side around each value, not on top of each other.
    spread = 0.0
    if not categorical and spec["TYPE"] in LIST_TYPES and len(colours) > 1 and len(set(xs_all)) > 1:
        spread = 0.015 * (max(xs_all) - min(xs_all))
    for ci, c in enumerate(colours):
        pts = [(x, v, m) for x, cc, v, m in runs if cc == c]
        step = ci - (len(colours) - 1) / 2
        if categorical:
            pos = [cats.index(str(x)) + step * min(0.08, 0.6 / len(colours)) for x, _, _ in pts]
        else:  # (grid / choice keys are never on a log axis: no factor needed)
            pos = [x + step * spread for x, _, _ in pts]
        ax.scatter(pos, [v for _, v, _ in pts], s=18, alpha=0.7, color=colour_of[c], label=c)
        ax.scatter(pos, [m for _, _, m in pts], s=70, facecolors="none", edgecolors=colour_of[c], linewidths=1.2)
    if categorical:
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=20 if max(len(s) for s in cats) > 10 else 0, fontsize=8)
        ax.set_xlim(-0.6, len(cats) - 0.4)
    elif log_axis:
        ax.set_xscale("log", base=2 if spec["TYPE"] == "power2" else 10)
    ax.set_xlabel(f"{key} ({spec['TYPE']}{', log axis' if log_axis else ''})")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7 if len(colours) > 4 else 8, title="dots: runs, rings: config means", title_fontsize=7)
    ax.set_title(f"{metric} vs {key}")
    fig.tight_layout()
    return fig


def key_png(groups, key, spec, metric, colour_keys=()):
    """:func:`key_figure` as PNG bytes."""
    return _png(key_figure(groups, key, spec, metric, colour_keys))


def curves_png(best, worst):
    """Training curves of the runs of the best and the worst config."""
    runs, labels = [], []
    for tag, g in (("best", best), ("worst", worst)) if worst is not best else (("only", best),):
        for r, _ in g["runs"]:
            curves = RunCurves(r["out_dir"])
            if curves.series:
                runs.append(curves)
                labels.append(f"{tag}: config {g['config']} seed {r['seed']} (job {r['job']:06d})")
    if not runs:
        return None
    return render_png(runs, labels, title="training curves of the best and the worst config")


def _fmt(v, digits=4):
    return f"{v:.{digits}f}" if _number(v) else "-"


def _si(n):
    if not _number(n):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n}"


def _value(v):
    """A sampled value for the table: numbers to 6 significant digits."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _img(png, alt):
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def comparison_text(cmp, metric):
    """The top-two paragraph (plain text, escaped by the caller)."""
    if cmp is None:
        return "Only one config finished: nothing to compare."
    a, b, w = cmp["a"], cmp["b"], cmp["welch"]

    def name(g):
        return f"config {g['config']} ({g['mean']:.4f} ± {_fmt(g['std'])}, n={g['n']})"

    if w is None:
        return (
            f"{name(a)} vs {name(b)}: difference {a['mean'] - b['mean']:+.4f}. Cannot be judged against seed "
            "noise: Welch's interval needs at least two seeds of each (SETUP.SEEDS)."
        )
    verdict = (
        "the interval excludes 0: the difference exceeds seed noise"
        if w["low"] > 0 or w["high"] < 0
        else "the interval includes 0: the difference is within seed noise"
    )
    return (
        f"{name(a)} vs {name(b)}: difference of the {metric} means {w['diff']:+.4f}, "
        f"{w['level']:.0%} Welch interval [{w['low']:+.4f}, {w['high']:+.4f}] (Welch-Satterthwaite df "
        f"{w['df']:.1f}, unequal variances); {verdict}."
    )


def analyze(c, root, records):
    """Write ``ROOT/NAME/analysis.html`` for the run records of the sweep of config ``c``; returns its path."""
    metric, pick, higher = c.ANALYZE.METRIC, c.ANALYZE.PICK, c.ANALYZE.HIGHER_IS_BETTER
    known = recorded_metrics(records)
    if not any(r["state"] == "done" for r in records):
        raise DataError(f"no run of sweep {c.NAME} is done yet ({root}); analyze when some are")
    if metric not in known:
        raise ConfigError(
            f"ANALYZE.METRIC={metric!r} is not recorded by the runs of {c.NAME}; they record: {', '.join(known)}"
        )
    groups, left_out = group_configs(records, metric, pick, higher)
    if not groups:
        raise DataError(f"no finished run of sweep {c.NAME} has {metric}; nothing to analyze")
    samplers = {k: dict(v) for k, v in c.SETUP.SAMPLERS.items()}
    keys = list(samplers)
    cat_keys = [k for k in keys if _categorical(samplers[k], [g["values"].get(k) for g in groups])]
    n = counts(records)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sweep {html.escape(c.NAME)}: {html.escape(metric)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "th{background:#eee}td{white-space:nowrap}td.l,th.l{text-align:left}"
        "img{max-width:100%;border:1px solid #ddd;margin:6px 0}"
        "p.note{color:#555;font-size:13px}</style></head><body>",
        f"<h1>Sweep {html.escape(c.NAME)}</h1>",
        f"<p>{html.escape(root)} · base config {html.escape(c.SETUP.BASE_CFG)} · written "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}</p>",
        f"<p>{len(records)} runs: " + ", ".join(f"{v} {k}" for k, v in n.items()) + ". "
        f"Metric: <b>{html.escape(metric)}</b> "
        + (
            "(the training loss of each run's last epoch)"
            if metric == "loss"
            else f"of each run's {pick} evaluation (ANALYZE.PICK {pick})"
        )
        + f"; {'higher' if higher else 'lower'} is better.</p>",
        f"<h2>Configs by {html.escape(metric)}</h2>",
        '<p class="note">mean ± sample standard deviation over the seeds that finished; n: their number.</p>',
        "<table><tr><th>rank</th><th>config</th>"
        + f"<th>{html.escape(metric)} mean ± std</th><th>n</th><th class='l'>seeds</th>"
        + "".join(f"<th class='l'>{html.escape(k)}</th>" for k in keys)
        + "<th>FLOPs</th><th>params</th><th class='l'>jobs</th></tr>",
    ]
    for rank, g in enumerate(groups, 1):
        std = f" ± {g['std']:.4f}" if g["std"] is not None else " (one seed)"
        out.append(
            f"<tr><td>{rank}</td><td>{g['config']}</td><td>{g['mean']:.4f}{std}</td><td>{g['n']}</td>"
            f"<td class='l'>{html.escape(', '.join(map(str, g['seeds'])))}</td>"
            + "".join(f"<td class='l'>{html.escape(_value(g['values'].get(k)))}</td>" for k in keys)
            + f"<td>{_si(g['flops'])}</td><td>{_si(g['params'])}</td>"
            f"<td class='l'>{html.escape(', '.join(f'{j:06d}' for j in g['jobs']))}</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Top two vs seed noise</h2>")
    out.append(f"<p>{html.escape(comparison_text(top_two(groups), metric))}</p>")
    stds = [g["std"] for g in groups if g["std"] is not None]
    if stds:
        out.append(
            f'<p class="note">Seed noise of this sweep: the standard deviation over seeds is {min(stds):.4f} to '
            f"{max(stds):.4f} (median {sorted(stds)[len(stds) // 2]:.4f}) across the {len(stds)} configs with two "
            "or more seeds.</p>"
        )
    out.append(f"<h2>EDF of {html.escape(metric)}</h2>")
    out.append(_img(edf_png(groups, metric), f"EDF of {metric}"))
    out.append(f"<h2>{html.escape(metric)} vs each sampled key</h2>")
    for key in keys:
        colour_keys = [k for k in cat_keys if k != key]
        out.append(_img(key_png(groups, key, samplers[key], metric, colour_keys), f"{metric} vs {key}"))
    png = curves_png(groups[0], groups[-1])
    out.append("<h2>Training curves: best and worst config</h2>")
    out.append(_img(png, "training curves") if png else "<p>No training records.</p>")
    if left_out:
        out.append(
            "<h2>Runs left out</h2><table><tr><th>job</th><th class='l'>state</th>"
            "<th class='l'>last line of its log</th></tr>"
        )
        for r in left_out:
            why = r["last_line"] or ("done, without " + metric if r["state"] == "done" else "")
            out.append(
                f"<tr><td>{r['job']:06d}</td><td class='l'>{r['state']}</td><td class='l'>{html.escape(why)}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    path = os.path.join(root, ANALYSIS_HTML)
    return io.write_text_atomic(path, "\n".join(out) + "\n", what="sweep analysis")
