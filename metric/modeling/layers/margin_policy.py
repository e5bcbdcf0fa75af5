"""How large a margin is: per class from the class frequency (dynamic margins), and per
epoch (margin schedule). Pure functions; the trainer applies them to the margin layer
through ``set_class_margins`` and ``set_margin``."""

import bisect

import torch


def dynamic_margins(counts, a, b, lam, normalize=True):
    """Per-class margins from the number of training images ``n_c`` of each class.

    ``normalize=False``: ``m_c = a * n_c ** -lam + b`` literally.

    ``normalize=True`` (the published Google Landmark 2020 recipe): ``x_c = n_c ** -lam`` is
    min-max scaled over the classes to [0, 1] first, ``m_c = a * (x_c - min x) / (max x - min x)
    + b``, so the most frequent class gets the smallest margin ``b`` and the rarest the largest,
    ``a + b`` (``a`` is the margin range, ``b`` the smallest margin). If every class has the
    same count, every class gets ``b``.

    A class with no training image gets the margin of the rarest class that has some (it is
    never a target, so its margin is never used). Returns a float32 tensor [C].
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if (counts < 0).any():
        raise ValueError("class counts must be >= 0")
    present = counts > 0
    if not present.any():
        raise ValueError("no class has a training image")
    x = torch.where(present, counts, counts[present].min()).pow(-lam)
    if normalize:
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return (a * x + b).float()


def scheduled_margin(schedule, epoch, mode="step"):
    """The margin at (0-based) ``epoch`` for ``schedule`` = ``[[epoch, margin], ...]``, epochs
    ascending and starting at 0.

    ``step``: the margin of the last pair whose epoch is <= ``epoch``.
    ``linear``: interpolated linearly between neighbouring pairs; after the last pair its margin.
    """
    epochs = [float(e) for e, _ in schedule]
    margins = [float(m) for _, m in schedule]
    i = bisect.bisect_right(epochs, epoch) - 1
    if i < 0:
        raise ValueError(f"margin schedule starts at epoch {epochs[0]}, after epoch {epoch}")
    if mode == "step" or i + 1 == len(epochs):
        return margins[i]
    if mode != "linear":
        raise ValueError(f"unknown margin schedule mode {mode!r}: step | linear")
    frac = (epoch - epochs[i]) / (epochs[i + 1] - epochs[i])
    return margins[i] + frac * (margins[i + 1] - margins[i])
