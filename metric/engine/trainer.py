"""The training loop: one process, torchrun DDP, or self-spawned processes.

:func:`train_model` is what ``tools/train_metric.py`` calls. Each process builds
the model, optimizer and loaders, resumes from the newest complete checkpoint if
``TRAIN.AUTO_RESUME`` (or loads ``TRAIN.WEIGHTS``), then alternates training
epochs, atomic checkpoints and retrieval evaluation on the TEST split
(recall@k and mAP@R among test images by label, from embeddings only).
"""

import logging
import math
import os
import platform
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import metric.checkpoint as cp
from metric.utils import distributed as du
from metric.config import dump_cfg
from metric.utils.errors import CheckpointError, TrainingError
from metric.engine.evaluator import evaluate_retrieval, format_metrics
from metric.utils.logger import FILE_ONLY, StatsWriter, format_seconds, setup_logging
from metric.engine.optimizer import build_optimizer, build_scheduler
from metric.utils.rng import get_rng_state, seed_everything, set_rng_state
from metric.datasets.loader import build_test_loader, build_train_loader, test_items, train_items
from metric.modeling import build_loss, build_model
from metric.modeling.builders import apply_dynamic_margins, apply_margin_schedule

logger = logging.getLogger(__name__)


def train_model(cfg):
    """Train as ``cfg`` says; spawns ``NUM_GPUS`` processes when asked and not under torchrun."""
    return du.launch(_train_process, cfg)


def _train_process(cfg):
    info = du.init_process(cfg)
    done = False
    try:
        result = Trainer(cfg, info).fit()
        done = True
        return result
    finally:
        du.cleanup(wait=done)


def _amp_dtype(cfg, device):
    mode = cfg.TRAIN.MIXED_PRECISION
    if mode == "none":
        return None
    if device.type != "cuda":
        logger.warning("TRAIN.MIXED_PRECISION %s ignored: mixed precision is used on CUDA only", mode)
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


class Trainer:
    def __init__(self, cfg, info):
        self.cfg, self.info, self.device = cfg, info, info.device
        os.makedirs(cfg.OUT_DIR, exist_ok=True)
        setup_logging(cfg.OUT_DIR, info.rank)
        self.stats = StatsWriter(cfg.OUT_DIR, enabled=info.is_master)
        if info.is_master:
            dump_cfg(cfg, os.path.join(cfg.OUT_DIR, cfg.CFG_DEST))
        self._log_environment()
        seed_everything(cfg.RNG_SEED)
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.channels_last = cfg.TRAIN.CHANNELS_LAST

        # Data first: list-file errors should surface before any model is built.
        self.train_loader = build_train_loader(cfg, info.rank, info.world_size, train_items(cfg))
        self.test_loader = None
        if cfg.TEST.DATASET:
            self.test_loader = build_test_loader(cfg, info.rank, info.world_size, test_items(cfg))
        self.iters_per_epoch = len(self.train_loader)

        model = build_model(cfg).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.loss_fn = build_loss(cfg).to(self.device)
        margins = apply_dynamic_margins(cfg, model.head, self.train_loader.dataset.labels)
        if margins is not None:
            logger.info("dynamic margins from the class counts: %.4f to %.4f", float(margins.min()), float(margins.max()))
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch = self._resume_or_load()
        for group in self.optimizer.param_groups:
            group["initial_lr"] = cfg.OPTIM.BASE_LR
        # The schedule is a function of the iteration; rebuilding it from the epoch makes a
        # resumed run follow the same curve even if the number of processes changed.
        self.scheduler = build_scheduler(cfg, self.optimizer, self.iters_per_epoch)
        self._set_schedule_step(self.start_epoch * self.iters_per_epoch)
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        from metric.modeling.complexity import format_complexity, model_complexity

        logger.info("model: %s, %s at %d px", cfg.MODEL.TYPE,
                    format_complexity(model_complexity(model, cfg.TRAIN.IM_SIZE)), cfg.TRAIN.IM_SIZE)

    # -- setup helpers -------------------------------------------------------
    def _log_environment(self):
        info = self.info
        logger.info(
            "pymetric: python %s, torch %s, device %s, %d process(es)%s",
            platform.python_version(),
            torch.__version__,
            self.device,
            info.world_size,
            f", cuda {torch.version.cuda}" if self.device.type == "cuda" else "",
        )
        logging.getLogger(FILE_ONLY).info("config:\n%s", self.cfg.dump())
        logger.info("merged config written to %s", os.path.join(self.cfg.OUT_DIR, self.cfg.CFG_DEST))

    def _set_schedule_step(self, step):
        self.scheduler.last_epoch = step
        factor = self.scheduler.lr_lambdas[0](step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _resume_or_load(self):
        cfg = self.cfg
        if cfg.TRAIN.AUTO_RESUME:
            # Rank 0 picks the checkpoint and every rank reads that same file, so all start at the
            # same epoch (or fail with one message) even without a shared view of OUT_DIR.
            path = cp.latest_checkpoint(cfg.OUT_DIR)[0] if self.info.is_master else None
            path = du.all_gather_objects(path)[0]
            if path is not None:
                state = cp.read_checkpoint(path)
                changed = cp.model_config_differences(state.get("cfg"), cfg)
                if changed:
                    raise CheckpointError(
                        f"{path} was trained with another {changed[0]}; use a new OUT_DIR, or "
                        "TRAIN.AUTO_RESUME False and TRAIN.WEIGHTS to start from it"
                    )
                cp.load_for_resume(self.model, state, path)
                self.optimizer.load_state_dict(state["optimizer_state"])
                if state.get("scaler_state"):
                    self.scaler.load_state_dict(state["scaler_state"])
                rng_states = state.get("rng_states") or []
                if len(rng_states) == self.info.world_size:
                    set_rng_state(rng_states[self.info.rank])
                else:
                    logger.warning("checkpoint has RNG states of %d processes, running %d: reseeding",
                                   len(rng_states), self.info.world_size)
                    seed_everything(cfg.RNG_SEED + state["epoch"] + 1)
                logger.info("resumed from %s (epoch %d done)", path, state["epoch"] + 1)
                return state["epoch"] + 1
        if cfg.TRAIN.WEIGHTS:
            cp.load_weights(self.model, cfg.TRAIN.WEIGHTS)
        return 0

    # -- main loop -------------------------------------------------------------
    def fit(self):
        cfg = self.cfg
        max_epoch = cfg.OPTIM.MAX_EPOCH
        if self.start_epoch >= max_epoch:
            logger.info("training already complete (%d epochs); nothing to do", max_epoch)
            return None
        self._t_start, self._iters_done = time.time(), 0
        result = None
        for epoch in range(self.start_epoch, max_epoch):
            self.train_epoch(epoch)
            last = epoch + 1 == max_epoch
            if last or (epoch + 1) % cfg.TRAIN.CHECKPOINT_PERIOD == 0:
                self.save_checkpoint(epoch)
            period = cfg.TRAIN.EVAL_PERIOD
            if self.test_loader is not None and (last or (period and (epoch + 1) % period == 0)):
                result = self.evaluate(epoch)
        digests = du.all_gather_objects(cp.weights_digest(self.model))
        self.stats.write("final", epoch=max_epoch, weights_digests=digests)
        if len(set(digests)) != 1:
            logger.error("weights differ between processes: %s", digests)
        logger.info("training done in %s", format_seconds(time.time() - self._t_start))
        return result

    def _step(self, images, labels):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits, emb = self.model(images, labels)
            loss, parts = self.loss_fn(logits, emb, labels)
        return loss, parts

    def train_epoch(self, epoch):
        cfg, loader = self.cfg, self.train_loader
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        margin = apply_margin_schedule(cfg, cp.unwrap(self.model).head, epoch)
        if margin is not None:
            logger.info("epoch %d: margin %.4f (MODEL.HEADS.MARGIN_SCHEDULE)", epoch + 1, margin)
        names = self.loss_fn.names
        part_sums, win_parts = [0.0] * len(names), [0.0] * len(names)
        self.model.train()
        n_iters, total_iters = self.iters_per_epoch, self.iters_per_epoch * cfg.OPTIM.MAX_EPOCH
        world = self.info.world_size
        loss_sum = torch.zeros((), dtype=torch.float64)
        bad_images, seen = 0, 0
        win_loss, win_n, win_data, win_time = 0.0, 0, 0.0, 0.0
        t_epoch = t_last = time.time()
        for it, (images, labels, failed) in enumerate(loader):
            t_data = time.time() - t_last
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss, parts = self._step(images, labels)
            values = torch.stack([loss.detach().float()] + [parts[n].detach().float() for n in names])
            loss_mean, *part_means = du.all_reduce_mean(values).tolist()
            if not math.isfinite(loss_mean):
                raise TrainingError(
                    f"loss became {loss_mean} at epoch {epoch + 1}, iteration {it + 1}; stopping "
                    "(the last checkpoint is kept; lower OPTIM.BASE_LR or add warmup)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.TRAIN.GRAD_CLIP > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.TRAIN.GRAD_CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()

            bad_images += int(failed.sum())
            seen += images.shape[0] * world
            loss_sum += loss_mean
            part_sums = [a + b for a, b in zip(part_sums, part_means)]
            win_parts = [a + b for a, b in zip(win_parts, part_means)]
            self._iters_done += 1
            now = time.time()
            win_loss, win_n, win_data, win_time = win_loss + loss_mean, win_n + 1, win_data + t_data, win_time + now - t_last
            t_last = now
            if (it + 1) % cfg.LOG_PERIOD == 0 or it + 1 == n_iters:
                avg_iter = (now - self._t_start) / self._iters_done
                done = epoch * n_iters + it + 1
                stats = {
                    "epoch": epoch + 1,
                    "iter": it + 1,
                    "iters": n_iters,
                    "loss": win_loss / win_n,
                    "lr": lr,
                    "im_per_s": images.shape[0] * world * win_n / max(win_time, 1e-9),
                    "data_time": win_data / win_n,
                    "iter_time": win_time / win_n,
                    "eta": format_seconds(avg_iter * (total_iters - done)),
                }
                stats.update({f"loss_{n}": v / win_n for n, v in zip(names, win_parts)})
                if margin is not None:
                    stats["margin"] = margin
                if self.device.type == "cuda":
                    stats["mem_mb"] = int(torch.cuda.max_memory_allocated(self.device) / 2**20)
                self.stats.write("train_iter", **stats)
                logger.info(
                    "epoch %d/%d iter %d/%d  loss %.4f  lr %.5f  %.1f im/s  data %.3fs  eta %s",
                    epoch + 1, cfg.OPTIM.MAX_EPOCH, it + 1, n_iters, stats["loss"], lr,
                    stats["im_per_s"], stats["data_time"], stats["eta"],
                )
                win_loss, win_n, win_data, win_time = 0.0, 0, 0.0, 0.0
                win_parts = [0.0] * len(names)
        du.average_buffers(cp.unwrap(self.model))
        bad_images = int(du.all_reduce_sum(torch.tensor(bad_images, device=self.device)).item())
        elapsed = time.time() - t_epoch
        summary = {
            "epoch": epoch + 1,
            "loss": float(loss_sum) / n_iters,
            "lr": self.optimizer.param_groups[0]["lr"],
            "im_per_s": seen / max(elapsed, 1e-9),
            "time": elapsed,
            "bad_images": bad_images,
        }
        summary.update({f"loss_{n}": v / n_iters for n, v in zip(names, part_sums)})
        if margin is not None:
            summary["margin"] = margin
        self.stats.write("train_epoch", **summary)
        logger.info(
            "epoch %d done: loss %.4f  %.1f im/s  %.1fs%s", epoch + 1, summary["loss"], summary["im_per_s"],
            elapsed, f"  ({bad_images} unreadable images replaced)" if bad_images else "",
        )
        return summary

    def save_checkpoint(self, epoch):
        rng_states = du.all_gather_objects(get_rng_state())
        if self.info.is_master:
            model = cp.unwrap(self.model)
            bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise TrainingError(f"non-finite weights after epoch {epoch + 1} ({bad[0]}); checkpoint not written")
            state = {
                "epoch": epoch,
                "model_state": model.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "scheduler_state": self.scheduler.state_dict(),
                "scaler_state": self.scaler.state_dict(),
                "rng_states": rng_states,
                "cfg": self.cfg.dump(),
            }
            path = cp.save_checkpoint(cp.checkpoint_path(self.cfg.OUT_DIR, epoch), state)
            logger.info("wrote checkpoint %s", path)
        du.barrier()

    def evaluate(self, epoch=None):
        """Retrieval among the TEST images by label (see :mod:`metric.engine.evaluator`)."""
        metrics = evaluate_retrieval(
            self.model, self.test_loader, self.device, self.amp_dtype, self.channels_last, self.info.is_master
        )
        if metrics is not None:
            self.stats.write("test_epoch", epoch=None if epoch is None else epoch + 1, **metrics)
            logger.info("eval%s: %s", "" if epoch is None else f" epoch {epoch + 1}", format_metrics(metrics))
        return metrics
