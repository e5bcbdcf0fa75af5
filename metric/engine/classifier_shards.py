"""What the trainer does for a Partial FC classifier (:mod:`metric.modeling.layers.partial_fc`):
the sampling step, optimizer steps on the sampled rows, and checkpoints that hold the full
classifier.

**Sampled rows (SAMPLE_RATE < 1).** A step's forward computes logits for the sampled classes
only, from a leaf copy ``sub`` of their rows (``PartialFC.sampled``). :func:`sampled_rows` puts
``sub`` in the optimizer in place of the shard for the step, with the rows of the shard's
optimizer state (SGD's momentum, AdamW's two moments) gathered to it; afterwards the updated rows
and state are scattered back and the shard is put back. So the rows that were not sampled keep
their weights and optimizer state exactly: no weight decay, no momentum step, no moment decay
(plain masking of their gradient would still move them by momentum and decay them). AdamW's step
count is one number for the shard (it counts the steps of the classifier, not of each row), and
a row's momentum starts at zero, not at its first gradient (the same unless OPTIM.DAMPENING > 0).

**Checkpoints.** :func:`checkpoint_states` gathers the shards (and their optimizer state) on rank
0 into one full matrix, chunk by chunk (:func:`metric.utils.distributed.gather_rows_to_master`),
so a checkpoint is the same as one of the non-parallel head: it resumes with another number of
processes and loads into either head; :func:`shard_optimizer_state` cuts the optimizer state
back to a process's rows on resume (the weights are cut by
:func:`metric.checkpoint.load.cut_classifier_to_shard`).
"""

import contextlib

import torch

from metric.checkpoint.load import CLASSIFIER_PREFIX, find_classifier_shard, unwrap
from metric.utils import distributed as du


def partial_fc(model):
    """The head's :class:`PartialFC`, or None."""
    return getattr(getattr(unwrap(model), "head", None), "partial_fc", None)


def set_step(model, iteration):
    """Name the iteration whose classes the next forward samples (deterministic sampling)."""
    pfc = partial_fc(model)
    if pfc is not None:
        pfc.set_step(iteration)


def _position(optimizer, param):
    """``(group, index in group, index in the state dict)`` of ``param`` in ``optimizer``."""
    flat = 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is param:
                return group, i, flat
            flat += 1
    return None


@contextlib.contextmanager
def sampled_rows(optimizer, model):
    """Around the optimizer step (gradient unscaling and clipping included): when the last forward
    sampled rows, the optimizer steps those rows alone (see the module's docstring)."""
    pfc = partial_fc(model)
    sampled = None if pfc is None else pfc.sampled
    found = None if sampled is None else _position(optimizer, unwrap(model).head.classifier.weight)
    if found is None:
        yield
        return
    rows, sub = sampled
    weight = unwrap(model).head.classifier.weight
    group, i, _ = found
    state = optimizer.state.pop(weight, {})
    optimizer.state[sub] = {k: (v[rows] if _row_shaped(v, weight) else v) for k, v in state.items()}
    group["params"][i] = sub
    try:
        yield
    finally:
        group["params"][i] = weight
        new = optimizer.state.pop(sub, {})
        with torch.no_grad():
            weight.index_copy_(0, rows, sub.detach().to(weight.dtype))
            for k, v in new.items():
                if isinstance(v, torch.Tensor) and v.shape == sub.shape:
                    full = state.get(k)
                    if full is None:
                        full = torch.zeros_like(weight, dtype=v.dtype)
                    full.index_copy_(0, rows, v)
                    state[k] = full
                else:
                    state[k] = v
        optimizer.state[weight] = state
        pfc.sampled = None


def _row_shaped(value, weight):
    return isinstance(value, torch.Tensor) and value.shape == weight.shape


def checkpoint_states(model, optimizer):
    """``(model state dict, optimizer state dict)`` for a checkpoint on rank 0, ``(None, None)`` on
    the others; every rank calls it. A Partial FC shard (and its optimizer state) is gathered into
    the full matrix of all classes."""
    found = find_classifier_shard(model)
    if found is None:
        if not du.rank() == 0:
            return None, None
        return unwrap(model).state_dict(), optimizer.state_dict()
    layer, first, _ = found
    total = layer.num_classes * layer.centers
    full_weight = du.gather_rows_to_master(layer.weight, total, first)
    where = _position(optimizer, layer.weight)
    state = optimizer.state.get(layer.weight, {}) if where is not None else {}
    full_state = {}
    for k in sorted(state):  # the same order on every rank
        v = state[k]
        if _row_shaped(v, layer.weight):
            full_state[k] = du.gather_rows_to_master(v, total, first)
    if du.rank() != 0:
        return None, None
    model_state = unwrap(model).state_dict()
    model_state[CLASSIFIER_PREFIX + "weight"] = full_weight
    optim_state = optimizer.state_dict()
    if where is not None and where[2] in optim_state["state"]:
        entry = dict(optim_state["state"][where[2]])
        entry.update(full_state)
        optim_state["state"][where[2]] = entry
    return model_state, optim_state


def shard_optimizer_state(optim_state, model, optimizer):
    """A checkpoint's optimizer state dict with the classifier's full row-shaped state cut to this
    process's shard (Partial FC); unchanged otherwise."""
    found = find_classifier_shard(model)
    if found is None or not isinstance(optim_state, dict):
        return optim_state
    layer, first, rows = found
    where = _position(optimizer, layer.weight)
    entry = optim_state.get("state", {}).get(where[2]) if where is not None else None
    if not entry:
        return optim_state
    total = layer.num_classes * layer.centers
    cut = {
        k: (
            v[first : first + rows].clone()
            if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[0] == total
            else v
        )
        for k, v in entry.items()
    }
    return {**optim_state, "state": {**optim_state["state"], where[2]: cut}}


# Settings a run may resume with changed: checkpoints do not depend on them.
RESUMABLE_CHANGES = ("MODEL.HEADS.PARTIAL_FC.ENABLED", "MODEL.HEADS.PARTIAL_FC.SAMPLE_RATE")
