"""``HookBase``: a part of training that runs at fixed points of the loop (detectron2's
``HookBase``, with epochs, records and checkpoint state added).

The trainer (:mod:`metric.engine.trainer`) calls every hook of its list, in list order, at each
point below; every method is optional (the base class does nothing). All processes call every
point, except where said.

====================================  =============================================================
``before_train()``                    :meth:`Trainer.fit` starts (after a resume).
``before_epoch(epoch)``               :meth:`Trainer.train_epoch` starts; the model is in train mode.
``before_step(iteration, batches)``   before an optimizer step; ``iteration`` counts from 0 over
                                      the run, ``batches`` are its micro-batches
                                      ``(images, labels, failed, bad)``.
``around_optimizer_step()``           a context manager around the optimizer step (the gradient
                                      unscaling and clipping included).
``after_step(iteration)``             after the optimizer step.
``after_epoch(epoch)``                :meth:`Trainer.fit`, after ``train_epoch(epoch)`` and its record:
                                      the periodic checkpoint and the evaluation are hooks here.
``after_eval(epoch, metrics)``        after the evaluation that follows ``epoch``, before its stats
                                      record (``metrics`` is None on ranks other than 0).
``before_record(kind, record)``       before a stats record (``train_iter``, ``train_epoch``,
                                      ``test_epoch``, ``final``) is written: a hook may add fields.
                                      ``test_epoch`` records are made on rank 0 only.
``after_record(kind, record)``        after it is written (by rank 0).
``after_train()``                     :meth:`Trainer.fit` ends, however it ends.
====================================  =============================================================

A hook's part of the checkpoint: ``state_dict()`` returns top-level checkpoint entries (every
rank calls it when a checkpoint is made, so it may gather); ``load_state_dict(checkpoint, path)``
gets the whole checkpoint dict the run resumes from (:class:`metric.checkpoint.Checkpointer`).

A hook is made by ``build(trainer)`` after the trainer has its model, optimizer, data and start
epoch (weights loaded or resumed), before the model is wrapped for DDP; it returns None when its
feature is off, so a hook never asks whether it is on.
"""

import contextlib
import weakref


class HookBase:
    def __init__(self, trainer):
        # A weak proxy, as detectron2's: the trainer holds its hooks, not the other way round.
        self.trainer = weakref.proxy(trainer)

    @classmethod
    def build(cls, trainer):
        """The hook of ``trainer``, or None when the config turns its feature off."""
        return cls(trainer)

    def before_train(self):
        pass

    def before_epoch(self, epoch):
        pass

    def before_step(self, iteration, batches):
        pass

    def around_optimizer_step(self):
        return contextlib.nullcontext()

    def after_step(self, iteration):
        pass

    def after_epoch(self, epoch):
        pass

    def after_eval(self, epoch, metrics):
        pass

    def before_record(self, kind, record):
        pass

    def after_record(self, kind, record):
        pass

    def after_train(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, checkpoint, path):
        pass
