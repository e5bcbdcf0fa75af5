"""``TRAIN.ACCUM_STEPS``: gradient accumulation over micro-batches.

An optimizer step takes ``k`` micro-batches of the loader (``TRAIN.BATCH_SIZE`` images each,
over all processes): :func:`micro_batch_groups` cuts the loader into groups of ``k``
(``ceil(batches / k)`` groups per epoch, the last one shorter when ``k`` does not divide the
number of batches). Each micro-batch's loss is scaled by ``1 / len(group)`` before its
backward pass, so the accumulated gradient is the mean over the group's images, as one batch of
all of them would give for a model without batch statistics. Under DDP :func:`sync_context`
skips the gradient all-reduce on every micro-batch but the last (``no_sync``).
"""

import contextlib
import math


def steps_per_epoch(num_batches, k):
    """Optimizer steps in an epoch of ``num_batches`` micro-batches."""
    return math.ceil(num_batches / k)


def micro_batch_groups(loader, k):
    """Lists of ``k`` consecutive batches of ``loader`` (the last list may be shorter). A group
    holds its batches at once (their images, not their activations)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def sync_context(model, last):
    """``model.no_sync()`` for a DDP model on all but the ``last`` micro-batch, else nothing."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
