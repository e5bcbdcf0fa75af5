"""Process-group setup and small collective helpers.

Three ways to run: a single process; ``torchrun --nproc_per_node=N`` (multi-node
through torchrun's own flags), detected from the ``WORLD_SIZE`` environment
variable; or ``NUM_GPUS > 1`` without torchrun, in which case :func:`launch`
spawns that many processes itself, meeting at ``HOST:PORT``. The backend is
nccl on CUDA and gloo on CPU (``DIST_BACKEND`` overrides).
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metric.utils.errors import ConfigError, MetricError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_master(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def under_torchrun():
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _backend(cfg, device):
    if cfg.DIST_BACKEND != "auto":
        return cfg.DIST_BACKEND
    return "nccl" if device.type == "cuda" else "gloo"


def init_process(cfg):
    """Join the process group (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local_rank} on this node has no GPU ({torch.cuda.device_count()} visible); "
                "lower NUM_GPUS / --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=_backend(cfg, device), init_method="env://", device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def cleanup(wait=True):
    """Leave the process group. With ``wait`` (the normal end) every rank first waits for the
    others: tearing gloo down while a peer still talks to it can abort the process. After an
    error, ``wait=False`` leaves at once (the launcher stops the other ranks)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _spawned_worker(local_rank, fn, cfg, world):
    os.environ.update(
        RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    try:
        fn(cfg)
    except MetricError as err:
        # The child's one-line message; the parent turns the exit code into an error of its own.
        import sys

        sys.stderr.write(f"error (rank {local_rank}): {err}\n")
        sys.exit(2)


def launch(fn, cfg):
    """Run ``fn(cfg)`` in this process, or in ``NUM_GPUS`` spawned processes when that is > 1
    and the process was not started by torchrun."""
    if cfg.NUM_GPUS <= 1 or under_torchrun():
        return fn(cfg)
    if torch.cuda.is_available() and cfg.NUM_GPUS > torch.cuda.device_count():
        raise ConfigError(f"NUM_GPUS={cfg.NUM_GPUS} but only {torch.cuda.device_count()} GPUs are visible")
    os.environ["MASTER_ADDR"] = cfg.HOST
    os.environ["MASTER_PORT"] = str(cfg.PORT)
    try:
        mp.start_processes(_spawned_worker, args=(fn, cfg, cfg.NUM_GPUS), nprocs=cfg.NUM_GPUS, start_method="spawn")
    except mp.ProcessExitedException as err:
        raise MetricError(f"training process {err.error_index} exited with status {err.exit_code}") from None
    return None


# --- collectives (no-ops in a single process) ---------------------------------

def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device():
    """The device collectives run on: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor):
    """Sum over ranks; the result is on the device ``tensor`` came from."""
    if world_size() == 1:
        return tensor
    out = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def all_reduce_mean(tensor):
    if world_size() == 1:
        return tensor
    return all_reduce_sum(tensor) / world_size()


def average_buffers(module):
    """Average floating-point buffers (BN running statistics) over ranks, so every rank holds
    the same model for evaluation and checkpoints (DDP keeps parameters, not buffers, in sync)."""
    if world_size() == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size())


def all_gather_objects(obj):
    """A list with every rank's ``obj`` (rank order)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if world_size() > 1:
        dist.barrier()
