"""Drawing values from the samplers of ``SETUP.SAMPLERS`` (checked by :mod:`metric.sweep.config`):
the grid points (:func:`grid_points`) and random draws (:func:`draw`)."""

import itertools
import math

from metric.sweep.config import LIST_TYPES


def grid_points(samplers):
    """Every combination of the ``grid`` samplers' values, as ``{key: value}`` dicts (one empty
    dict when there is no grid sampler), in the order of the keys and of their values."""
    keys = [k for k, s in samplers.items() if s["TYPE"] == "grid"]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(samplers[k]["VALUES"] for k in keys))]


def random_keys(samplers):
    return [k for k, s in samplers.items() if s["TYPE"] != "grid"]


def quantize(value, step):
    """``value`` rounded to a multiple of ``step`` (0: unchanged), without float noise."""
    if not step:
        return value
    q = round(value / step) * step
    digits = max(0, -math.floor(math.log10(step)) + 6) if step < 1 else 6
    return round(q, digits)


def draw(spec, rng):
    """One value of sampler ``spec`` (``{TYPE, VALUES, RANGE, QUANTIZE}``) from numpy Generator ``rng``.
    With ``QUANTIZE`` q (the RANGE ends are multiples of it) the value is a multiple of q within the
    range, each with the probability of the whole bin of width q around it (the two ends too)."""
    kind, step = spec["TYPE"], spec["QUANTIZE"]
    if kind in LIST_TYPES:
        return spec["VALUES"][int(rng.integers(len(spec["VALUES"])))]
    lo, hi = spec["RANGE"]
    if kind == "int_uniform":
        if step:
            return int(lo + int(step) * int(rng.integers(round((hi - lo) / step) + 1)))
        return int(rng.integers(lo, hi + 1))
    if kind == "power2":
        return 2 ** int(rng.integers(int(math.log2(lo)), int(math.log2(hi)) + 1))
    a, b = (lo - step / 2, hi + step / 2) if step else (lo, hi)  # lo >= step > 0 for log_uniform
    if kind == "uniform":
        value = float(rng.uniform(a, b))
    else:  # log_uniform
        value = float(math.exp(rng.uniform(math.log(a), math.log(b))))
    if not step:
        return value
    value = min(max(quantize(value, step), lo), hi)
    return int(round(value)) if float(step).is_integer() else value


def draw_all(samplers, rng):
    """``{key: value}`` for every non-grid sampler."""
    return {k: draw(samplers[k], rng) for k in random_keys(samplers)}
