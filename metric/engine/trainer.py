"""The training loop: one process, torchrun DDP, or self-spawned processes.

:func:`train_model` is what ``tools/train_metric.py`` calls. Each process builds
the model, optimizer and loaders, resumes from the newest complete checkpoint if
``TRAIN.AUTO_RESUME`` (or loads ``TRAIN.WEIGHTS``), then runs epochs of optimizer steps.

:class:`Trainer` is the loop; everything optional is a hook (:mod:`metric.engine.hooks`: EMA,
margin schedule, backbone freezing, Partial FC sampling, the periodic and the best checkpoint,
evaluation on the TEST split, TensorBoard), called at fixed points of the loop in the order of
:data:`metric.engine.hooks.HOOKS`. The checkpoint state (model, optimizer, scaler, RNGs, the
hooks' entries) is assembled and restored by a :class:`metric.checkpoint.Checkpointer`.
"""

import contextlib
import functools
import logging
import math
import os
import platform
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel

import metric.checkpoint as cp
from metric.config import dump_cfg
from metric.datasets.loader import build_train_loader, test_items, train_items
from metric.engine import classifier_shards as pfc
from metric.engine.accumulate import micro_batch_groups, steps_per_epoch, sync_context
from metric.engine.compile import CompiledForward
from metric.engine.hooks import HOOKS, build_hooks
from metric.engine.hooks.evaluation import evaluate
from metric.engine.memory_estimates import check_training_memory
from metric.engine.meters import IterTimer, RunClock, ScalarMeter, Timer
from metric.engine.optimizer import build_optimizer, lr_at
from metric.engine.param_groups import describe_groups, group_settings
from metric.engine.precheck import check_training
from metric.engine.predictor import autocast_dtype
from metric.engine.records import log_epoch, log_iter
from metric.engine.resume import resume_or_load
from metric.modeling import build_loss, build_model
from metric.modeling.builders import apply_dynamic_margins
from metric.utils import distributed as du
from metric.utils import lock
from metric.utils.errors import ConfigError, TrainingError
from metric.utils.io import mkdirs
from metric.utils.logger import FILE_ONLY, StatsWriter, format_seconds, setup_logging
from metric.utils.rng import seed_everything

logger = logging.getLogger(__name__)


def train_model(cfg):
    """Train as ``cfg`` says; spawns ``NUM_GPUS`` processes when asked and not under torchrun.

    First, in the launching process, the mistakes every process would hit are checked once
    (:mod:`metric.engine.precheck`). Then OUT_DIR is locked (``OUT_DIR/.lock``, see
    :mod:`metric.utils.lock`) for the whole run, so a second run on it stops with one line: by
    the launching process before it spawns any (the spawned processes take no lock), or under
    torchrun (and hand-launched ranks) by rank 0 alone, before it joins the process group.
    """
    lists = check_training(cfg)
    # A run in this process reuses the lists read by the check; spawned processes read their own.
    here = cfg.NUM_GPUS <= 1 or du.under_torchrun()
    fn = functools.partial(_train_process, lists=lists) if here else _train_process
    if du.under_torchrun() and int(os.environ["RANK"]) != 0:
        return du.launch(fn, cfg)
    mkdirs(cfg.OUT_DIR)
    with lock.folder_lock(cfg.OUT_DIR, f"OUT_DIR {cfg.OUT_DIR}", "choose another OUT_DIR"):
        return du.launch(fn, cfg)


def _train_process(cfg, lists=None):
    info = du.init_process(cfg)
    done = False
    try:
        result = Trainer(cfg, info, lists).fit()
        done = True
        return result
    except RuntimeError as err:
        # DistributedDataParallel's own collectives run outside the helpers of du: a peer that
        # died or is stuck ends them with one line too.
        mapped = None
        if info.distributed and du.looks_distributed(err):
            mapped = du.collective_error(_ddp_collective(err), err)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        du.cleanup(wait=done)


def _ddp_collective(err):
    """Which collective of DistributedDataParallel ``err`` came from, by its traceback."""
    names = {frame.name for frame in traceback.extract_tb(err.__traceback__)}
    if "backward" in names:
        return "the gradient all-reduce (DDP backward)"
    if "__init__" in names:
        return "the parameter broadcast (DDP setup)"
    return "a DistributedDataParallel collective (buffer broadcast in forward)"


class Trainer:
    """The training loop of one process; ``hooks``: the hook classes, in calling order
    (:data:`metric.engine.hooks.HOOKS`)."""

    ema = None  # the EMA of the weights (metric.engine.hooks.ema sets it with TRAIN.EMA)

    def __init__(self, cfg, info, lists=None, hooks=HOOKS):
        """``lists``: the ``(train, test)`` items when already read (:mod:`metric.engine.precheck`)."""
        self.cfg, self.info, self.device = cfg, info, info.device
        mkdirs(cfg.OUT_DIR)  # through the path manager: OUT_DIR may be on any storage backend
        setup_logging(cfg.OUT_DIR, info.rank)
        self.stats = StatsWriter(cfg.OUT_DIR, enabled=info.is_master)
        if info.is_master:
            dump_cfg(cfg, os.path.join(cfg.OUT_DIR, cfg.CFG_DEST))
        self.num_threads = du.set_num_threads(cfg.NUM_THREADS)  # NUM_THREADS (0: cores / local processes)
        self._log_environment()
        seed_everything(cfg.RNG_SEED)
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK
        self.amp_dtype = autocast_dtype(cfg.TRAIN.MIXED_PRECISION, self.device, "TRAIN.MIXED_PRECISION")
        self.channels_last = cfg.TRAIN.CHANNELS_LAST
        check_training_memory(cfg, self.device, info.world_size)  # an estimate: refuse what cannot fit

        # Data first: list-file errors should surface before any model is built.
        train_list, test_list = lists or (None, None)
        self.train_loader = build_train_loader(
            cfg, info.rank, info.world_size, train_items(cfg) if train_list is None else train_list
        )
        # Evaluation runs the extraction pipeline (metric.engine.predictor) on the TEST list.
        self.test_items = (test_items(cfg) if test_list is None else test_list) if cfg.TEST.DATASET else None
        if self.test_items is not None and cfg.TEST.BATCH_SIZE % info.world_size:
            raise ConfigError(
                f"TEST.BATCH_SIZE={cfg.TEST.BATCH_SIZE} must be divisible by the number of "
                f"processes ({info.world_size})"
            )
        # Optimizer steps per epoch: TRAIN.ACCUM_STEPS micro-batches each (metric.engine.accumulate).
        self.accum_steps = cfg.TRAIN.ACCUM_STEPS
        self.iters_per_epoch = steps_per_epoch(len(self.train_loader), self.accum_steps)

        model = build_model(cfg).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.loss_fn = build_loss(cfg).to(self.device)
        margins = apply_dynamic_margins(cfg, model.head, self.train_loader.dataset.labels)
        if margins is not None:
            logger.info(
                "dynamic margins from the class counts: %.4f to %.4f", float(margins.min()), float(margins.max())
            )
        self.optimizer = build_optimizer(cfg, model)
        self.group_settings = group_settings(self.optimizer)  # put back after a resume
        logger.info("parameter groups: %s", describe_groups(self.optimizer))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.bad_indices = set()  # unreadable training images seen (indices into the train list)
        # The checkpoint state; a Partial FC classifier is gathered into checkpoints, cut on resume.
        self.checkpointer = cp.Checkpointer(
            model,
            self.optimizer,
            self.scaler,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.RNG_SEED,
            states=pfc.checkpoint_states,
            shard_optimizer_state=pfc.shard_optimizer_state,
        )
        resumed = resume_or_load(self)  # (checkpoint, path) of a resume, else None
        self.start_epoch = resumed[0]["epoch"] + 1 if resumed else 0
        self._compiled = None  # TRAIN.COMPILE: the compiled training forward (see _forward_fn)
        # The learning rate is a function of the iteration (set before every step), so a resumed
        # run follows the same curve even if the number of processes changed.
        self.set_lr(self.start_epoch * self.iters_per_epoch)
        # Wall time and iterations done, for the ETA; fit() restarts it. Public so that callers
        # that drive train_epoch() themselves (benchmarks) can restart it too.
        self.clock = RunClock()
        self.last_metrics = None  # of the last evaluation (what fit() returns)
        # The hooks see the loaded or resumed weights and the start epoch; before DDP's wrap.
        self.hooks = build_hooks(self, hooks)
        self.checkpointer.hooks = self.hooks
        if resumed:
            self.checkpointer.restore_hooks(*resumed)
        if info.distributed:
            self.model = self.wrap_ddp(model)
        from metric.modeling.complexity import format_complexity, model_complexity

        logger.info(
            "model: %s, %s at %d px",
            cfg.MODEL.TYPE,
            format_complexity(model_complexity(model, cfg.TRAIN.IM_SIZE)),
            cfg.TRAIN.IM_SIZE,
        )

    # -- setup helpers -------------------------------------------------------
    def _log_environment(self):
        info = self.info
        logger.info(
            "pymetric: python %s, torch %s, device %s, %d process(es), %d CPU thread(s) each (NUM_THREADS)%s",
            platform.python_version(),
            torch.__version__,
            self.device,
            info.world_size,
            self.num_threads,
            f", cuda {torch.version.cuda}" if self.device.type == "cuda" else "",
        )
        logging.getLogger(FILE_ONLY).info("config:\n%s", self.cfg.dump())
        logger.info("merged config written to %s", os.path.join(self.cfg.OUT_DIR, self.cfg.CFG_DEST))

    def lr_at(self, iteration):
        """The schedule's learning rate at 0-based ``iteration`` of the whole run."""
        return lr_at(self.cfg, iteration, self.iters_per_epoch)

    def set_lr(self, iteration):
        """Put the learning rate of ``iteration`` on every parameter group, times the group's
        ``lr_scale`` (layer decay, head multiplier: :mod:`metric.engine.param_groups`); returns
        the schedule's learning rate."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def wrap_ddp(self, model):
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # -- hooks and records -----------------------------------------------------
    def call_hooks(self, point, *args):
        """Call ``point`` (a :class:`~metric.engine.hooks.HookBase` method) of every hook, in order."""
        for hook in self.hooks:
            getattr(hook, point)(*args)

    def record(self, kind, fields):
        """Write the stats record ``kind`` with ``fields`` (rank 0 writes); the hooks may add
        fields before (``before_record``) and see them after (``after_record``: TensorBoard)."""
        self.call_hooks("before_record", kind, fields)
        self.stats.write(kind, **fields)
        self.call_hooks("after_record", kind, fields)

    # -- main loop -------------------------------------------------------------
    def fit(self):
        """Train to OPTIM.MAX_EPOCH; the hooks' ``after_train`` runs however it ends (TensorBoard
        keeps the steps before a failure)."""
        try:
            return self._fit()
        finally:
            self.call_hooks("after_train")

    def _fit(self):
        max_epoch = self.cfg.OPTIM.MAX_EPOCH
        self.clock.start()
        self.last_metrics = None
        self.call_hooks("before_train")  # the evaluation a resumed run misses runs here
        if self.start_epoch >= max_epoch:
            finished = self.info.is_master and bool(self.stats.read("final"))
            if du.all_gather_objects(finished)[0]:
                logger.info("training already complete (%d epochs); nothing to do", max_epoch)
                return self.last_metrics
        for epoch in range(self.start_epoch, max_epoch):
            self.train_epoch(epoch)
            self.call_hooks("after_epoch", epoch)  # in order: EMA buffers, checkpoint, evaluation, ...
        digests = du.all_gather_objects(cp.weights_digest(self.model))
        self.record("final", {"epoch": max_epoch, "weights_digests": digests})
        if len(set(digests)) != 1:
            logger.error("weights differ between processes: %s", digests)
        logger.info("training done in %s", format_seconds(self.clock.elapsed()))
        return self.last_metrics

    def _step(self, images, labels):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, emb = self._forward_fn()(images, labels)
            loss, parts = self.loss_fn(logits, emb, labels)
        return loss, parts

    def _forward_fn(self):
        """The training forward: the model, or with TRAIN.COMPILE its compiled version (made again
        when the model is wrapped again; eager after a failed compile)."""
        c = self._compiled
        if not self.cfg.TRAIN.COMPILE or (c is not None and c.failed):
            return self.model
        if c is None or c.module is not self.model:
            self._compiled = c = CompiledForward(self.model)
        return c

    def train_epoch(self, epoch):
        """One pass over the training set (the hooks' ``before_epoch`` first): a ``train_iter``
        stats record every LOG_PERIOD iterations and at the end, then a ``train_epoch`` record,
        which is returned. :meth:`fit` calls the hooks' ``after_epoch`` after it."""
        loader, n_iters = self.train_loader, self.iters_per_epoch
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        self.model.train()
        self.call_hooks("before_epoch", epoch)
        window, totals = ScalarMeter(), ScalarMeter()  # since the last log line; the whole epoch
        epoch_timer, iter_timer, bad_images = Timer(), IterTimer(), 0
        # One iteration is one optimizer step over TRAIN.ACCUM_STEPS micro-batches.
        for it, group in enumerate(micro_batch_groups(loader, self.accum_steps)):
            data_time = iter_timer.data_loaded()
            iteration = epoch * n_iters + it
            lr = self.set_lr(iteration)
            self.call_hooks("before_step", iteration, group)
            values = self._train_step(group, epoch, it)
            self.call_hooks("after_step", iteration)
            values.update(
                images=sum(b[0].shape[0] for b in group) * self.info.world_size,
                data_time=data_time,
                iter_time=iter_timer.iteration_done(),
            )
            window.add(values)
            totals.add(values)
            self.clock.tick()
            for _, _, failed, bad in group:
                bad_images += int(failed.sum())
                self.bad_indices.update(bad[bad >= 0].tolist())
            if (it + 1) % self.cfg.LOG_PERIOD == 0 or it + 1 == n_iters:
                log_iter(self, epoch, it, lr, window)
                window.reset()
        du.average_buffers(cp.unwrap(self.model))
        bad_images = int(du.all_reduce_sum(torch.tensor(bad_images, device=self.device)).item())
        return log_epoch(self, epoch, totals, epoch_timer.seconds(), bad_images)

    def _train_step(self, group, epoch, it):
        """One optimizer step over the micro-batches of ``group`` (TRAIN.ACCUM_STEPS: each loss
        scaled by 1 / len(group), DDP's all-reduce on the last one only; see
        :mod:`metric.engine.accumulate`); returns ``loss`` and ``loss_<name>`` of each part, the
        mean over the micro-batches, averaged over processes."""
        names, n = self.loss_fn.names, len(group)
        self.optimizer.zero_grad(set_to_none=True)
        values = 0
        for j, (images, labels, *_) in enumerate(group):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with sync_context(self.model, last=j + 1 == n):
                loss, parts = self._step(images, labels)
                self.scaler.scale(loss / n if n > 1 else loss).backward()
            values = values + torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in names])
        loss_mean, *part_means = du.all_reduce_mean(values / n if n > 1 else values).tolist()
        if not math.isfinite(loss_mean):  # before the step: the weights stay those of the last one
            raise TrainingError(
                f"loss became {loss_mean} at epoch {epoch + 1}, iteration {it + 1}; stopping "
                "(the last checkpoint is kept; lower OPTIM.BASE_LR or add warmup)"
            )
        with contextlib.ExitStack() as around:  # the hooks' contexts (Partial FC: the sampled rows)
            for hook in self.hooks:
                around.enter_context(hook.around_optimizer_step())
            if self.cfg.TRAIN.GRAD_CLIP > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.TRAIN.GRAD_CLIP)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss_mean, **{f"loss_{n}": v for n, v in zip(names, part_means)}}

    # -- checkpoints and evaluation ----------------------------------------------
    def checkpoint_state(self, epoch):
        """The checkpoint dict after 0-based ``epoch`` on rank 0, ``None`` on the others (every
        rank calls it: the RNG states, the unreadable images and a Partial FC classifier are
        gathered)."""
        # Unreadable training images found by any rank (or worker) so far: resumed runs know them.
        for part in du.all_gather_objects(sorted(self.bad_indices)):
            self.bad_indices.update(part)
        bad_images = [self.train_loader.dataset.items[i][0] for i in sorted(self.bad_indices)]
        return self.checkpointer.state(epoch, bad_images=bad_images, cfg=self.cfg.dump())

    def save_checkpoint(self, epoch):
        state = self.checkpoint_state(epoch)
        if state is not None:
            path = cp.save_checkpoint(cp.checkpoint_path(self.cfg.OUT_DIR, epoch), state)
            logger.info("wrote checkpoint %s", path)
        du.barrier()

    def evaluate(self, epoch=None):
        """Retrieval among the TEST images by label (:func:`metric.engine.hooks.evaluation.evaluate`)."""
        self.last_metrics = evaluate(self, epoch)
        return self.last_metrics
