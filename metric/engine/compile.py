"""``TRAIN.COMPILE``: the training forward through ``torch.compile``, eager where that fails.

:class:`CompiledForward` compiles a module once and calls the compiled version. A platform that
cannot compile shows it either when ``torch.compile`` is called (an unsupported Python, no
dynamo) or at the first call, when the graph is traced and the backend builds its code (no C++
compiler, a backend error): then one warning line is logged and the module runs eagerly from
then on. Our own errors (:class:`~metric.utils.errors.MetricError`, e.g. a dead peer) and
out-of-memory errors are never taken for a compiler failure. After a successful first call
nothing is caught, so a bug in the model still raises.

The compiled wrapper is only called, never saved: checkpoints and evaluation use the module
itself (:func:`metric.checkpoint.unwrap` removes a ``_orig_mod`` wrapper too), so a compiled
run's checkpoints have the keys of an uncompiled one.
"""

import logging

import torch

from metric.utils.errors import MetricError

logger = logging.getLogger(__name__)


def _first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


class CompiledForward:
    """Call ``module`` through ``torch.compile`` (falling back to eager once, with one warning)."""

    def __init__(self, module, what="TRAIN.COMPILE"):
        self.module, self.what = module, what
        self.failed, self._checked, self.compiled = False, False, None
        try:
            self.compiled = torch.compile(module)
        except Exception as err:  # torch raises many types where it cannot compile
            self._fall_back(err)

    def _fall_back(self, err):
        self.failed = True
        logger.warning("%s: torch.compile is not usable here (%s); training runs eagerly", self.what, _first_line(err))

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.module(*args, **kwargs)
        if self._checked:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except (MetricError, torch.OutOfMemoryError):
            raise  # not the compiler: our own errors (a dead peer, bad data) and memory stop the run
        except Exception as err:  # tracing or the backend failed: the platform cannot compile
            self._fall_back(err)
            return self.module(*args, **kwargs)
        self._checked = True
        return out
