"""The training loop: one process, torchrun DDP, or self-spawned processes.

:func:`train_model` is what ``tools/train_metric.py`` calls. Each process builds
the model, optimizer and loaders, resumes from the newest complete checkpoint if
``TRAIN.AUTO_RESUME`` (or loads ``TRAIN.WEIGHTS``), then alternates training
epochs, atomic checkpoints and retrieval evaluation on the TEST split
(recall@k and mAP@R among test images by label, from embeddings only).
"""

import functools
import logging
import math
import os
import platform
import traceback

import torch
from torch.nn.parallel import DistributedDataParallel

import metric.checkpoint as cp
from metric.utils import distributed as du
from metric.utils import lock
from metric.engine.precheck import check_training
from metric.utils.io import mkdirs
from metric.config import dump_cfg
from metric.utils.errors import CheckpointError, ConfigError, TrainingError
from metric.engine.evaluator import evaluate_retrieval, format_metrics
from metric.engine.predictor import Predictor, autocast_dtype
from metric.utils.logger import FILE_ONLY, StatsWriter, format_seconds, setup_logging
from metric.engine.meters import IterTimer, RunClock, ScalarMeter, Timer
from metric.engine.memory import check_training_memory
from metric.engine.tb_writer import adaptive_scale, build_training_board
from metric.engine.optimizer import build_optimizer, lr_at
from metric.engine.accumulate import micro_batch_groups, steps_per_epoch, sync_context
from metric.engine.best import BestCheckpoint
from metric.engine.compile import CompiledForward
from metric.engine.ema import ModelEma
from metric.engine.param_groups import describe_groups, group_settings, reapply_group_settings
from metric.utils.rng import get_rng_state, seed_everything, set_rng_state
from metric.datasets.loader import build_train_loader, test_items, train_items
from metric.modeling import build_loss, build_model
from metric.modeling.builders import apply_dynamic_margins, apply_margin_schedule
from metric.engine import partial_fc as pfc

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
    def __init__(self, cfg, info, lists=None):
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
        self.train_loader = build_train_loader(cfg, info.rank, info.world_size,
                                               train_items(cfg) if train_list is None else train_list)
        # Evaluation runs the extraction pipeline (metric.engine.predictor) on the TEST list.
        self.test_items = (test_items(cfg) if test_list is None else test_list) if cfg.TEST.DATASET else None
        if self.test_items is not None and cfg.TEST.BATCH_SIZE % info.world_size:
            raise ConfigError(f"TEST.BATCH_SIZE={cfg.TEST.BATCH_SIZE} must be divisible by the number of "
                              f"processes ({info.world_size})")
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
            logger.info("dynamic margins from the class counts: %.4f to %.4f", float(margins.min()), float(margins.max()))
        self.optimizer = build_optimizer(cfg, model)
        self._group_settings = group_settings(self.optimizer)  # put back after a resume
        logger.info("parameter groups: %s", describe_groups(self.optimizer))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.bad_indices = set()  # unreadable training images seen (indices into the train list)
        self._resumed = None  # (checkpoint, path) of a resume, for the EMA
        self.start_epoch = self._resume_or_load()
        self.ema = ModelEma.from_cfg(cfg, model)  # TRAIN.EMA: a copy of the loaded or resumed weights
        if self.ema is not None and self._resumed is not None:
            self.ema.load(*self._resumed)
        self._resumed = None
        self.best = BestCheckpoint(cfg.TRAIN.BEST_METRIC, cfg.OUT_DIR) if cfg.TRAIN.BEST_METRIC else None
        if self.best is not None and info.is_master and self.start_epoch:
            self.best.restore(self.stats.read("test_epoch"))  # cut back to the resumed epoch already
        elif self.best is not None and info.is_master:
            self.best.forget_earlier_run()  # a fresh run: TEST.WEIGHTS best must not name an old run's file
        self._compiled = None  # TRAIN.COMPILE: the compiled training forward (see _forward_fn)
        # The learning rate is a function of the iteration (set before every step), so a resumed
        # run follows the same curve even if the number of processes changed.
        self.set_lr(self.start_epoch * self.iters_per_epoch)
        # TensorBoard (LOG.TENSORBOARD, rank 0): steps are iterations done; a resume purges later ones.
        self.tb = build_training_board(cfg, info.is_master, self.start_epoch * self.iters_per_epoch)
        # Wall time and iterations done, for the ETA; fit() restarts it. Public so that callers
        # that drive train_epoch() themselves (benchmarks) can restart it too.
        self.clock = RunClock()
        self._frozen, self._backbone_trainable = None, []
        self._freeze_backbone(self.start_epoch)  # before DDP, which skips parameters without gradients
        if info.distributed:
            self.model = self._wrap_ddp(model)
        from metric.modeling.complexity import format_complexity, model_complexity

        logger.info("model: %s, %s at %d px", cfg.MODEL.TYPE,
                    format_complexity(model_complexity(model, cfg.TRAIN.IM_SIZE)), cfg.TRAIN.IM_SIZE)

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

    def _wrap_ddp(self, model):
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _freeze_backbone(self, epoch):
        """TRAIN.FREEZE_BACKBONE_EPOCHS: during the first epochs the backbone runs in eval mode and
        its parameters do not require gradients (so the optimizer skips them: no update, no weight
        decay, no state); under DDP the model is wrapped again when that changes."""
        frozen = epoch < self.cfg.TRAIN.FREEZE_BACKBONE_EPOCHS
        model = cp.unwrap(self.model)
        if frozen:
            model.backbone.eval()
        if frozen == self._frozen:
            return
        if self._frozen is None:  # the first call: which backbone parameters train at all
            self._backbone_trainable = [p for p in model.backbone.parameters() if p.requires_grad]
        for p in self._backbone_trainable:
            p.requires_grad_(not frozen)
        changed, self._frozen = self._frozen is not None, frozen
        if frozen or changed:
            logger.info("epoch %d: backbone %s (TRAIN.FREEZE_BACKBONE_EPOCHS %d)", epoch + 1,
                        "frozen" if frozen else "trains from now on", self.cfg.TRAIN.FREEZE_BACKBONE_EPOCHS)
        if changed and self.info.distributed:
            self.model = self._wrap_ddp(model)

    def _resume_or_load(self):
        cfg = self.cfg
        if cfg.TRAIN.AUTO_RESUME:
            # Rank 0 picks the checkpoint and every rank reads that same file, so all start at the
            # same epoch (or fail with one message) even without a shared view of OUT_DIR.
            # Rank 0 has read its choice already; the others read it once here.
            path, state = cp.latest_checkpoint(cfg.OUT_DIR) if self.info.is_master else (None, None)
            path = du.all_gather_objects(path)[0]
            if path is not None:
                if state is None:
                    state = cp.check_resumable(cp.read_checkpoint(path), path)
                changed = cp.config_differences(state.get("cfg"), cfg, ignore=pfc.RESUMABLE_CHANGES)
                if changed:
                    raise CheckpointError(
                        f"{path} was trained with another {changed[0]}; use a new OUT_DIR, or "
                        "TRAIN.AUTO_RESUME False and TRAIN.WEIGHTS to start from it"
                    )
                self._check_schedule_unchanged(state, path)
                cp.load_for_resume(self.model, state, path)
                self._resumed = (state, path)
                try:
                    self.optimizer.load_state_dict(pfc.shard_optimizer_state(state["optimizer_state"], self.model,
                                                                             self.optimizer))
                except ValueError as err:  # another number or size of parameter groups
                    raise CheckpointError(
                        f"{path}: its optimizer state does not fit this config's parameter groups ({err}); "
                        "resume with the OPTIM.* settings it was trained with (OPTIM.NO_DECAY_NORM_BIAS is on "
                        "for adamw by default: set it False for older adamw checkpoints), or use a new OUT_DIR"
                    ) from None
                # The config's learning-rate factors and weight decays (the same unless resumed with
                # TRAIN.RESUME_CHANGED_CONFIG).
                reapply_group_settings(self.optimizer, self._group_settings)
                if state.get("scaler_state"):
                    self.scaler.load_state_dict(state["scaler_state"])
                rng_states = state.get("rng_states") or []
                if len(rng_states) == self.info.world_size:
                    set_rng_state(rng_states[self.info.rank])
                else:
                    logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding",
                                   len(rng_states), self.info.world_size)
                    seed_everything(cfg.RNG_SEED + state["epoch"] + 1)
                self._restore_bad_images(state.get("bad_images") or [])
                logger.info("resumed from %s (epoch %d done)", path, state["epoch"] + 1)
                if self.info.is_master:
                    done = state["epoch"] + 1
                    dropped = self.stats.truncate(done, keep_final=done >= cfg.OPTIM.MAX_EPOCH)
                    if dropped:
                        logger.info("dropped %d stats records written after that checkpoint", dropped)
                return state["epoch"] + 1
        if cfg.TRAIN.WEIGHTS:
            cp.load_weights(self.model, cfg.TRAIN.WEIGHTS)
        return 0

    def _check_schedule_unchanged(self, state, path):
        """Refuse to resume with another optimizer or schedule unless TRAIN.RESUME_CHANGED_CONFIG."""
        sections = ("OPTIM", "TRAIN.BATCH_SIZE", "TRAIN.GRAD_CLIP", "TRAIN.FREEZE_BACKBONE_EPOCHS", "TRAIN.ACCUM_STEPS")
        changed = cp.config_differences(state.get("cfg"), self.cfg, sections=sections, ignore=("OPTIM.MAX_EPOCH",))
        if not changed:
            return
        names = ", ".join(changed)
        if not self.cfg.TRAIN.RESUME_CHANGED_CONFIG:
            raise CheckpointError(
                f"{path} was trained with other optimizer/schedule settings ({names}); use the same values, "
                "a new OUT_DIR, or TRAIN.RESUME_CHANGED_CONFIG True to resume with the new ones"
            )
        logger.warning("resuming %s with changed settings (TRAIN.RESUME_CHANGED_CONFIG): %s", path, names)

    def _restore_bad_images(self, paths):
        """Mark the unreadable images a checkpoint lists as known (they are not decoded again)."""
        dataset = self.train_loader.dataset
        index = dataset.indices_of(paths)  # a search of the compact item list, no dict of every path
        known = [index[p] for p in paths if p in index]
        self.bad_indices.update(known)
        dataset.add_known_bad(known)
        if known:
            logger.info("%d unreadable training images known from the checkpoint", len(known))

    def _eval_due(self, epoch):
        """Whether the TEST split is evaluated after 0-based ``epoch``."""
        period = self.cfg.TRAIN.EVAL_PERIOD
        last = epoch + 1 == self.cfg.OPTIM.MAX_EPOCH
        return self.test_items is not None and (last or bool(period and (epoch + 1) % period == 0))

    def _missing_evaluation(self):
        """True if the epoch the run resumed after was due an evaluation that is not in the stats
        (a kill between its checkpoint and its evaluation); decided on rank 0, shared."""
        done = self.start_epoch
        missing = False
        if self.info.is_master and done > 0 and self._eval_due(done - 1):
            missing = not any(r.get("epoch") == done for r in self.stats.read("test_epoch"))
        return du.all_gather_objects(missing)[0]

    # -- main loop -------------------------------------------------------------
    def fit(self):
        """Train to OPTIM.MAX_EPOCH (evaluating and checkpointing on the way); the TensorBoard
        events are flushed however it ends, so the steps before a failure are kept."""
        try:
            return self._fit()
        finally:
            self.tb.close()

    def _fit(self):
        cfg = self.cfg
        max_epoch = cfg.OPTIM.MAX_EPOCH
        self.clock.start()
        result = None
        if self._missing_evaluation():
            logger.info("the evaluation after epoch %d is missing (stopped before it ran): running it",
                        self.start_epoch)
            result = self.evaluate(self.start_epoch - 1)
        if self.start_epoch >= max_epoch:
            finished = self.info.is_master and bool(self.stats.read("final"))
            if du.all_gather_objects(finished)[0]:
                logger.info("training already complete (%d epochs); nothing to do", max_epoch)
                return result
        for epoch in range(self.start_epoch, max_epoch):
            self.train_epoch(epoch)
            last = epoch + 1 == max_epoch
            if last or (epoch + 1) % cfg.TRAIN.CHECKPOINT_PERIOD == 0:
                self.save_checkpoint(epoch)
            if self._eval_due(epoch):
                result = self.evaluate(epoch)
        digests = du.all_gather_objects(cp.weights_digest(self.model))
        ema = {} if self.ema is None else {"ema_digests": du.all_gather_objects(cp.weights_digest(self.ema.module))}
        self.stats.write("final", epoch=max_epoch, weights_digests=digests, **ema)
        if len(set(digests)) != 1:
            logger.error("weights differ between processes: %s", digests)
        logger.info("training done in %s", format_seconds(self.clock.elapsed()))
        return result

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
        """One pass over the training set: a ``train_iter`` stats record every LOG_PERIOD
        iterations and at the end, then a ``train_epoch`` record, which is returned."""
        loader, n_iters = self.train_loader, self.iters_per_epoch
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        margin = self._apply_margin_schedule(epoch)
        self.model.train()
        self._freeze_backbone(epoch)
        window, totals = ScalarMeter(), ScalarMeter()  # since the last log line; the whole epoch
        epoch_timer, iter_timer, bad_images = Timer(), IterTimer(), 0
        # One iteration is one optimizer step over TRAIN.ACCUM_STEPS micro-batches.
        for it, group in enumerate(micro_batch_groups(loader, self.accum_steps)):
            data_time = iter_timer.data_loaded()
            lr = self.set_lr(epoch * n_iters + it)
            self.tb.log_images(epoch * n_iters + it + 1, group[0][0], group[0][1])  # the first batch only
            values = self._train_step(group, epoch, it)
            values.update(images=sum(b[0].shape[0] for b in group) * self.info.world_size, data_time=data_time,
                          iter_time=iter_timer.iteration_done())
            window.add(values)
            totals.add(values)
            self.clock.tick()
            for _, _, failed, bad in group:
                bad_images += int(failed.sum())
                self.bad_indices.update(bad[bad >= 0].tolist())
            if (it + 1) % self.cfg.LOG_PERIOD == 0 or it + 1 == n_iters:
                self._log_iter(epoch, it, lr, window, margin)
                window.reset()
        du.average_buffers(cp.unwrap(self.model))
        if self.ema is not None:
            self.ema.sync_buffers()  # the EMA of the rank-averaged BN statistics (metric.engine.ema)
        bad_images = int(du.all_reduce_sum(torch.tensor(bad_images, device=self.device)).item())
        return self._log_epoch(epoch, totals, epoch_timer.seconds(), bad_images, margin)

    def _apply_margin_schedule(self, epoch):
        margin = apply_margin_schedule(self.cfg, cp.unwrap(self.model).head, epoch)
        if margin is not None:
            logger.info("epoch %d: margin %.4f (MODEL.HEADS.MARGIN_SCHEDULE)", epoch + 1, margin)
        return margin

    def _train_step(self, group, epoch, it):
        """One optimizer step over the micro-batches of ``group`` (TRAIN.ACCUM_STEPS: each loss
        scaled by 1 / len(group), DDP's all-reduce on the last one only; see
        :mod:`metric.engine.accumulate`), then the EMA update; returns ``loss`` and ``loss_<name>``
        of each part, the mean over the micro-batches, averaged over processes."""
        names, n = self.loss_fn.names, len(group)
        pfc.set_step(self.model, epoch * self.iters_per_epoch + it)  # Partial FC's sampled classes
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
        with pfc.sampled_rows(self.optimizer, self.model):  # Partial FC: step only the sampled rows
            if self.cfg.TRAIN.GRAD_CLIP > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.TRAIN.GRAD_CLIP)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss_mean, **{f"loss_{n}": v for n, v in zip(names, part_means)}}

    def _loss_parts(self, meter):
        return {f"loss_{n}": meter.mean(f"loss_{n}") for n in self.loss_fn.names}

    def _log_iter(self, epoch, it, lr, window, margin):
        n_iters, max_epoch = self.iters_per_epoch, self.cfg.OPTIM.MAX_EPOCH
        stats = {
            "epoch": epoch + 1,
            "iter": it + 1,
            "iters": n_iters,
            "loss": window.mean("loss"),
            "lr": lr,
            "im_per_s": window.rate("images", "iter_time"),
            "data_time": window.mean("data_time"),
            "iter_time": window.mean("iter_time"),
            "eta": format_seconds(self.clock.eta(n_iters * max_epoch - (epoch * n_iters + it + 1))),
            **self._loss_parts(window),
        }
        if margin is not None:
            stats["margin"] = margin
        scale = adaptive_scale(cp.unwrap(self.model).head)  # AdaCos: a scale that changes
        if scale is not None:
            stats["scale"] = scale
        if self.device.type == "cuda":
            stats["mem_mb"] = int(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.stats.write("train_iter", **stats)
        self.tb.log_iter(epoch * n_iters + it + 1, stats, self.optimizer.param_groups)
        logger.info(
            "epoch %d/%d iter %d/%d  loss %.4f  lr %.5f  %.1f im/s  data %.3fs  eta %s",
            epoch + 1, max_epoch, it + 1, n_iters, stats["loss"], lr,
            stats["im_per_s"], stats["data_time"], stats["eta"],
        )

    def _log_epoch(self, epoch, totals, seconds, bad_images, margin):
        summary = {
            "epoch": epoch + 1,
            "loss": totals.mean("loss"),
            # The rate after the epoch's last step: the first one of the next epoch.
            "lr": self.lr_at((epoch + 1) * self.iters_per_epoch),
            "im_per_s": totals.sums["images"] / max(seconds, 1e-9),
            "time": seconds,
            "bad_images": bad_images,
            **self._loss_parts(totals),
        }
        if margin is not None:
            summary["margin"] = margin
        self.stats.write("train_epoch", **summary)
        self.tb.log_epoch((epoch + 1) * self.iters_per_epoch, summary)
        logger.info(
            "epoch %d done: loss %.4f  %.1f im/s  %.1fs%s", epoch + 1, summary["loss"], summary["im_per_s"],
            seconds, f"  ({bad_images} unreadable images replaced)" if bad_images else "",
        )
        return summary

    def _checkpoint_state(self, epoch):
        """The checkpoint dict after 0-based ``epoch`` on rank 0, ``None`` on the others (every
        rank calls it: it gathers the RNG states and the unreadable images)."""
        rng_states = du.all_gather_objects(get_rng_state())
        # Unreadable training images found by any rank (or worker) so far: resumed runs know them.
        for part in du.all_gather_objects(sorted(self.bad_indices)):
            self.bad_indices.update(part)
        # Every rank takes part: a Partial FC classifier is gathered from all of them.
        model_state, optimizer_state = pfc.checkpoint_states(self.model, self.optimizer)
        ema_state = self.ema.state() if self.ema is not None else {}  # gathered the same way
        if not self.info.is_master:
            return None
        # The gathered states: every process's classifier shard, and the EMA weights too.
        checked = {**model_state, **{f"ema:{k}": v for k, v in ema_state.get("ema_state", {}).items()}}
        bad = [k for k, v in checked.items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(f"non-finite weights after epoch {epoch + 1} ({bad[0]}); checkpoint not written")
        state = {
            "epoch": epoch,
            "model_state": model_state,
            "optimizer_state": optimizer_state,
            "scaler_state": self.scaler.state_dict(),
            "rng_states": rng_states,
            "bad_images": [self.train_loader.dataset.items[i][0] for i in sorted(self.bad_indices)],
            "cfg": self.cfg.dump(),
        }
        state.update(ema_state)
        return state

    def save_checkpoint(self, epoch):
        state = self._checkpoint_state(epoch)
        if state is not None:
            path = cp.save_checkpoint(cp.checkpoint_path(self.cfg.OUT_DIR, epoch), state)
            logger.info("wrote checkpoint %s", path)
        du.barrier()

    def _keep_best(self, metrics, epoch):
        """TRAIN.BEST_METRIC: write OUT_DIR/checkpoints/best.pyth when ``metrics`` beat the best
        (decided on rank 0, where the metrics are; :mod:`metric.engine.best`)."""
        if not du.all_gather_objects(self.info.is_master and self.best.improves(metrics))[0]:
            return
        state = self._checkpoint_state(epoch)
        if state is not None:
            self.best.save(state, metrics, epoch)
        du.barrier()

    def evaluate(self, epoch=None):
        """Retrieval among the TEST images by label (see :mod:`metric.engine.evaluator`)."""
        # The EMA weights when TRAIN.EMA.ENABLED, unless TEST.WEIGHTS_KIND raw.
        use_ema = self.ema is not None and self.cfg.TEST.WEIGHTS_KIND != "raw"
        predictor = Predictor.from_cfg(self.cfg, model=self.ema.module if use_ema else self.model,
                                       device=self.device, channels_last=self.channels_last)
        metrics = evaluate_retrieval(predictor, self.test_items, self.cfg.TEST.BATCH_SIZE // self.info.world_size,
                                     self.cfg.DATA_LOADER.NUM_WORKERS, self.info.rank, self.info.world_size)
        if self.best is not None and epoch is not None:
            self._keep_best(metrics, epoch)  # before the stats record: a kill between them re-runs this
        if metrics is not None:
            self.stats.write("test_epoch", epoch=None if epoch is None else epoch + 1, **metrics)
            if epoch is not None:
                self.tb.log_eval((epoch + 1) * self.iters_per_epoch, metrics)
            logger.info("eval%s: %s", "" if epoch is None else f" epoch {epoch + 1}", format_metrics(metrics))
        return metrics
