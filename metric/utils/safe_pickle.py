"""Restricted unpickling: load a pickle of plain data (containers, numbers, strings, numpy arrays).

The revisited Oxford/Paris ground truth (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``) is
distributed as a pickle; :func:`restricted_load` reads such a file through
:class:`RestrictedUnpickler`, which refuses any other class or function named in the file before
anything runs. It lives here, at the bottom layer, so that the retrieval readers
(:mod:`metric.retrieval.groundtruth`) and the benchmark converters (:mod:`metric.datasets.benchmarks`)
share it.
"""

import pickle

from metric.utils.errors import MetricError
from metric.utils.io import isfile, open_path

# (module, name) pairs a pickle may name: what numpy arrays, dtypes and scalars need to be
# rebuilt (under numpy 1.x and 2.x module names), bytes under protocol 2, and plain sets.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytes"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only plain containers, numbers, strings and numpy arrays.

    Every global a pickle refers to goes through :meth:`find_class`; anything not in the small
    allow-list (``os.system``, ``builtins.eval``, any user class, ...) raises :class:`MetricError`
    before it is called.
    """

    def __init__(self, file, source="<pickle>"):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module.replace("__builtin__", "builtins"), name) in _ALLOWED:  # protocol 2 spelling
            return super().find_class(module, name)
        if module.startswith("numpy") and module.endswith(".dtypes") and name.endswith("DType"):
            return super().find_class(module, name)  # numpy >= 1.25 pickles dtypes by class
        raise MetricError(
            f"{self.source} refers to '{module}.{name}', which a ground-truth file never needs; "
            "refusing to load it (only plain containers, numbers, strings and numpy arrays are allowed)"
        )

    def persistent_load(self, pid):
        raise MetricError(f"{self.source} uses persistent ids; not a plain data pickle")


def restricted_load(path):
    """Load a pickle of plain data through :class:`RestrictedUnpickler`."""
    if not isfile(path):
        raise MetricError(f"ground-truth file {path!r} does not exist or is not a file; check the path")
    with open_path(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=path).load()
        except MetricError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise MetricError(f"{path} is not a readable ground-truth pickle ({type(err).__name__}: {err})") from None
