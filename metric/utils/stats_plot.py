"""Curves of training runs from their ``stats.jsonl`` as one PNG (``tools/plot_stats.py``).

Four panels: the training loss (each part of a combined loss dashed in the run's colour), the
learning rate, recall@1 and mAP@R of the evaluations, against the epoch (fractional for the
``train_iter`` records) or the iteration. Several runs share the figure, one colour each, with a
legend. A ``stats.jsonl`` that is being written (a running or killed job) is read up to its last
complete line. Drawn with matplotlib's Agg canvas (no display needed); the PNG is written
atomically.
"""

import io as _bytes_io
import logging
import math
import os

import metric.utils.io as io
from metric.utils.errors import DataError
from metric.utils.logger import StatsWriter, read_stats

logger = logging.getLogger(__name__)

X_CHOICES = ("epoch", "iteration")
PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("recall@1", "recall@1 (eval)"),
    ("mAP@R", "mAP@R (eval)"),
)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stats_file(path):
    """The ``stats.jsonl`` of an OUT_DIR (or ``path`` itself when it is that file)."""
    if io.isfile(path):
        return path
    stats = os.path.join(path, StatsWriter.FILE)
    if not io.isfile(stats):
        what = "is not a folder or file" if not io.exists(path) else f"has no {StatsWriter.FILE}"
        raise DataError(f"{path} {what}; give the OUT_DIR of a training run (its {StatsWriter.FILE} holds the curves)")
    return stats


class RunCurves:
    """The points of one run: ``series[name] = ([x], [y])`` for loss, loss parts, lr, metrics."""

    def __init__(self, path, x="epoch"):
        if x not in X_CHOICES:
            raise DataError(f"x axis {x!r} is not one of {', '.join(X_CHOICES)}")
        self.path = path
        records = read_stats(stats_file(path))
        iters = [r for r in records if r.get("_type") == "train_iter"]
        per_epoch = next((r["iters"] for r in iters if _number(r.get("iters"))), None)
        self.series = {}
        for r in iters:
            if not (_number(r.get("epoch")) and _number(r.get("iter"))):
                continue
            n = r.get("iters") if _number(r.get("iters")) else per_epoch
            pos = (r["epoch"] - 1 + r["iter"] / n) if x == "epoch" else (r["epoch"] - 1) * n + r["iter"]
            for key, value in r.items():
                if (key in ("loss", "lr") or key.startswith("loss_")) and _number(value):
                    self._add(key, pos, value)
        for r in records:
            if r.get("_type") != "test_epoch" or not _number(r.get("epoch")):
                continue
            if x == "iteration" and per_epoch is None:
                continue  # no training record tells the iterations of an epoch
            pos = r["epoch"] if x == "epoch" else r["epoch"] * per_epoch
            for key in ("recall@1", "mAP@R"):
                if _number(r.get(key)):
                    self._add(key, pos, r[key])
        for name, (xs, ys) in self.series.items():  # a resumed run's records in order, each x once
            points = dict(zip(xs, ys))
            self.series[name] = (sorted(points), [points[k] for k in sorted(points)])

    def _add(self, name, x, y):
        xs, ys = self.series.setdefault(name, ([], []))
        xs.append(x)
        ys.append(y)

    @property
    def loss_parts(self):
        parts = sorted(k for k in self.series if k.startswith("loss_"))
        return parts if len(parts) > 1 else []  # one part is the loss itself


def run_labels(paths):
    """Legend labels: the folder names, or the paths as given where two names are equal."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def plot_runs(paths, output, x="epoch", title=None):
    """Draw the curves of the runs in ``paths`` (OUT_DIRs or stats.jsonl files) into the PNG
    ``output`` (written atomically); returns its path. Raises :class:`DataError` for a folder
    without stats and when no run has any training record."""
    if not paths:
        raise DataError("give at least one OUT_DIR")
    output = io.check_output_path(output, "plot")
    runs = [RunCurves(p, x) for p in paths]
    labels = run_labels(list(paths))
    if not any(run.series for run in runs):
        raise DataError(f"no training records in {', '.join(stats_file(p) for p in paths)} yet; plot again later")
    for run, label in zip(runs, labels):
        if not run.series:
            logger.warning("%s: no training records yet (left out of the plot)", label)
    png = render_png(runs, labels, x, title)
    return io.write_bytes_atomic(output, png, what="plot")


def render_png(runs, labels, x="epoch", title=None):
    """The PNG bytes of the figure of ``runs`` (:class:`RunCurves`) labelled ``labels``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, name) in zip(axes, PANELS):
        drawn = False
        for run, label, color in zip(runs, labels, colors):
            if key in run.series:
                xs, ys = run.series[key]
                ax.plot(xs, ys, color=color, label=label, marker="o" if len(xs) < 30 and "@" in key else None)
                drawn = True
            if key == "loss":
                for part in run.loss_parts:
                    xs, ys = run.series[part]
                    ax.plot(xs, ys, color=color, linestyle="--", linewidth=1, label=f"{label}: {part[5:]}")
        if key == "lr" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not drawn:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(name)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
