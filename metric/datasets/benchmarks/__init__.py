"""Standard retrieval benchmarks, read from the files as their authors distribute them.

:data:`BENCHMARKS` maps a name to its converter, ``fn(data_root, allow_subset=False,
check_files=True)``: landmark retrieval (``roxford5k``, ``rparis6k``, ``gldv2-retrieval``:
:mod:`.landmarks`, giving a :class:`~.landmarks.LandmarkSplits`) and deep metric learning
(``cub200``, ``cars196``, ``sop``, ``inshop``: :mod:`.dml`, giving a ``LabelledSplits``). A
``+r1m`` suffix (``roxford5k+r1m``, ``rparis6k+r1m``) appends the revisitop1m distractors
(``--distractors DIR``). :func:`convert` resolves a name and runs its converter; an unknown name
is a :class:`~metric.utils.errors.DataError` listing the known ones. ``allow_subset``: accept
files whose counts differ from the distributed ones (a replica or part of the data; the result
says it is not complete).
"""

from metric.datasets.benchmarks.landmarks import LANDMARK_BENCHMARKS, R1M_BASES, with_r1m
from metric.utils.errors import DataError

R1M_SUFFIX = "+r1m"


def _dml_benchmarks():
    """The deep-metric-learning converters (``{}`` while :mod:`.dml` is absent or incomplete)."""
    try:
        from metric.datasets.benchmarks.dml import DML_BENCHMARKS
    except ImportError:
        return {}
    return dict(DML_BENCHMARKS)


BENCHMARKS = {**LANDMARK_BENCHMARKS, **_dml_benchmarks()}


def benchmark_names():
    """Every name :func:`convert` takes, ``+r1m`` variants included."""
    return sorted(BENCHMARKS) + [f"{b}{R1M_SUFFIX}" for b in R1M_BASES]


def resolve(name):
    """``(base name, with distractors)`` of a benchmark name; a :class:`DataError` naming the
    known ones for an unknown name."""
    base, r1m = (name[: -len(R1M_SUFFIX)], True) if name.endswith(R1M_SUFFIX) else (name, False)
    if base not in BENCHMARKS or (r1m and base not in R1M_BASES):
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(benchmark_names())}")
    return base, r1m


def is_landmark(name):
    return resolve(name)[0] in LANDMARK_BENCHMARKS


def convert(name, data_root, distractors=None, allow_subset=False, check_files=True):
    """The splits of benchmark ``name`` read from ``data_root`` (and ``distractors`` for ``+r1m``)."""
    base, r1m = resolve(name)
    if not data_root:
        raise DataError(f"benchmark {name} needs --data-root, the folder of its files as distributed")
    splits = BENCHMARKS[base](data_root, allow_subset=allow_subset, check_files=check_files)
    if r1m:
        splits = with_r1m(splits, distractors, allow_subset=allow_subset, check_files=check_files)
    elif distractors:
        raise DataError(f"--distractors is for the +r1m benchmarks ({base}{R1M_SUFFIX}), not {name}")
    return splits
