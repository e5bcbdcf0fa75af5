"""Training checkpoints assembled and put back: :class:`Checkpointer`.

A training checkpoint (the file format is :mod:`metric.checkpoint.files`'s) holds

- ``epoch``, ``model_state``, ``optimizer_state``, ``scaler_state`` (the AMP grad scaler) and
  ``rng_states`` (one entry per process), which the Checkpointer collects itself;
- the entries the trainer passes to :meth:`Checkpointer.state` (``bad_images``, ``cfg``);
- the entries of the training hooks (:mod:`metric.engine.hooks`; e.g. the EMA's ``ema_state``
  and ``ema_updates``). A hook is any object with ``state_dict()`` -> a dict of top-level
  checkpoint entries (every rank calls it, so it may gather) and
  ``load_state_dict(checkpoint, path)``, given the whole checkpoint dict on resume (so a hook
  sees what is missing, as in a checkpoint written without its feature). The checkpoint stays
  one flat dict, the format of earlier versions and of the original project.

The trainer gives a Checkpointer its model, optimizer and scaler once; it asks it for the state
after an epoch, for the newest complete checkpoint and to restore one. The trainer's model may
hold a shard of a model-parallel classifier (Partial FC): ``states`` gathers the full model and
optimizer state on rank 0, ``shard_optimizer_state`` cuts a checkpoint's optimizer state back to
this process's rows (the trainer passes :mod:`metric.engine.classifier_shards`'s functions).
"""

import logging

import torch

from metric.checkpoint.files import check_resumable, floating_tensors, latest_checkpoint, read_checkpoint
from metric.checkpoint.load import load_for_resume, unwrap
from metric.utils import distributed as du
from metric.utils.errors import CheckpointError, TrainingError
from metric.utils.rng import get_rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)


def plain_states(model, optimizer):
    """``(model state dict, optimizer state dict)`` on rank 0, ``(None, None)`` on the others."""
    if du.rank() != 0:
        return None, None
    return unwrap(model).state_dict(), optimizer.state_dict()


def _unchanged(optim_state, model, optimizer):
    return optim_state


class Checkpointer:
    """Assembles and restores the training state of one process (see the module's docstring).

    ``hooks``: objects with ``state_dict`` / ``load_state_dict``, whose entries join every
    checkpoint (set the attribute once the hooks exist); ``seed``: the reseed of a resume with
    another number of processes (``RNG_SEED``)."""

    def __init__(
        self,
        model,
        optimizer,
        scaler,
        *,
        rank=0,
        world_size=1,
        seed=0,
        states=plain_states,
        shard_optimizer_state=_unchanged,
    ):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.states, self.shard_optimizer_state = states, shard_optimizer_state
        self.hooks = []

    # -- saving --------------------------------------------------------------------------------
    def state(self, epoch, **entries):
        """The checkpoint dict after 0-based ``epoch`` on rank 0, ``None`` on the others (every
        rank calls it: it gathers the RNG states, a sharded classifier and the hooks' states).
        ``entries``: further top-level entries. A non-finite weight is a :class:`TrainingError`
        (nothing is written)."""
        rng_states = du.all_gather_objects(get_rng_state())
        model_state, optimizer_state = self.states(self.model, self.optimizer)
        hook_states = [hook.state_dict() for hook in self.hooks]
        if self.rank != 0:
            return None
        state = {
            "epoch": epoch,
            "model_state": model_state,
            "optimizer_state": optimizer_state,
            "scaler_state": self.scaler.state_dict(),
            "rng_states": rng_states,
            **entries,
        }
        for hook, part in zip(self.hooks, hook_states):
            taken = sorted(set(part) & set(state))
            if taken:
                raise ValueError(
                    f"{type(hook).__name__}.state_dict() returns the checkpoint entry {taken[0]!r}, "
                    "which another part of the checkpoint holds already"
                )
            state.update(part)
        # The gathered weights: every process's classifier shard, and the hooks' weights (the EMA).
        checked = [(k, v) for k, v in model_state.items() if torch.is_tensor(v) and v.is_floating_point()]
        for part in hook_states:
            checked += list(floating_tensors(part))
        bad = [k for k, v in checked if not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(f"non-finite weights after epoch {epoch + 1} ({bad[0]}); checkpoint not written")
        return state

    # -- resuming ------------------------------------------------------------------------------
    def latest(self, out_dir):
        """``(path, checkpoint)`` of the newest complete checkpoint in ``out_dir``, or ``(None, None)``.
        Rank 0 picks it and every rank reads that same file, so all start at the same epoch (or
        fail with one message) even without a shared view of ``out_dir``; every rank calls it."""
        path, state = latest_checkpoint(out_dir) if self.rank == 0 else (None, None)
        path = du.all_gather_objects(path)[0]
        if path is not None and state is None:  # rank 0 has read its choice already
            state = check_resumable(read_checkpoint(path), path)
        return path, state

    def restore(self, state, path):
        """Put the model, optimizer, scaler and this process's RNG state of checkpoint ``state``
        (read from ``path``) back; the hooks' entries are :meth:`restore_hooks`'s."""
        load_for_resume(self.model, state, path)
        try:
            self.optimizer.load_state_dict(
                self.shard_optimizer_state(state["optimizer_state"], self.model, self.optimizer)
            )
        except ValueError as err:  # another number or size of parameter groups
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this config's parameter groups ({err}); "
                "resume with the OPTIM.* settings it was trained with (OPTIM.NO_DECAY_NORM_BIAS is on "
                "for adamw by default: set it False for older adamw checkpoints), or use a new OUT_DIR"
            ) from None
        if state.get("scaler_state"):
            self.scaler.load_state_dict(state["scaler_state"])
        rng_states = state.get("rng_states") or []
        if len(rng_states) == self.world_size:
            set_rng_state(rng_states[self.rank])
        else:
            logger.warning(
                "checkpoint has RNG states of %d processes, running %d: reseeding", len(rng_states), self.world_size
            )
            seed_everything(self.seed + state["epoch"] + 1)

    def restore_hooks(self, state, path):
        """Give every hook the checkpoint ``state`` it resumes from (``load_state_dict``)."""
        for hook in self.hooks:
            hook.load_state_dict(state, path)
