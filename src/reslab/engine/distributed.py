"""Processes of one run: the device it trains on, and DistributedDataParallel's ranks
(one process is a world of one, where every collective is the identity)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reslab.engine.config import TrainConfig
from reslab.engine.devices import pick_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where collectives run: NCCL only reduces CUDA tensors, gloo CPU ones
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: whether :func:`setup_distributed` created the process group (and :meth:`close` ends it)
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks (identity in one process); the result is on the CPU."""
        if self.enabled:
            import torch.distributed as dist

            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm running statistics (each rank updated its
        own from its half of the batch), so evaluation shards agree with the saved model."""
        if self.enabled:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """End the process group this run created, explicitly rather than at the interpreter's
        exit (PyTorch asks for it; an implicit teardown is where gloo's threads can race)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    dev = torch.device(f"cuda:{local}") if device_name.startswith("cuda") else torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    device = pick_device(cfg.device)
    if d.enabled and cfg.device in ("auto", "cuda") and device.type == "cuda":
        return torch.device(f"cuda:{d.local_rank}")
    return device


def all_finite(d: Dist, value: float) -> bool:
    """Whether ``value`` is finite on every rank (all ranks stop together)."""
    bad = torch.tensor(0.0 if math.isfinite(value) else 1.0)
    return d.all_sum(bad).item() == 0
