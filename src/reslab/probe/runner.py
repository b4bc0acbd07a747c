"""Probing many models: the batches, one (technique, depth) cell, and cells spread over
worker processes that die with their parent."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from reslab.engine.devices import synchronize
from reslab.nn.models import cifar_resnet, fast_memory_format
from reslab.nn.normalize import Normalize
from reslab.nn.plugins import import_from_env
from reslab.pool import WorkerPool
from reslab.probe.measure import ModelProbe, ProbeEntry, probe_model, verdict


def resolve_depths(spec: str | Sequence[int]) -> list[int]:
    """Comma-separated CIFAR-style depths, each ``6n + 2`` with ``n >= 1``."""
    if isinstance(spec, str):
        try:
            depths = [int(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"depths must be comma-separated integers like 20,56,110, got {spec!r}") from None
    else:
        depths = [int(d) for d in spec]
    if not depths:
        raise ValueError("no depths given; use e.g. 20,56,110")
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ValueError(
            f"depth {bad[0]} is not a CIFAR-style ResNet depth; use 6n+2 with n >= 1 (8, 14, 20, 26, ..., 56, 110, 218)"
        )
    return sorted(dict.fromkeys(depths))


def make_batches(
    x: Tensor,
    y: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batches: int,
    batch_size: int,
    seed: int,
) -> list[tuple[Tensor, Tensor]]:
    """``batches`` disjoint random batches from uint8 images ``x`` (N,C,H,W), normalized.

    The draw depends only on ``seed``, so every technique and depth sees the same images.
    """
    need = batches * batch_size
    if need > len(x):
        raise ValueError(f"{batches} batches of {batch_size} need {need} images; the dataset has {len(x)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:need]
    xs = Normalize(mean, std).from_unit(x[idx].float().div_(255.0))
    ys = y[idx].long()
    return [
        (xs[i * batch_size : (i + 1) * batch_size], ys[i * batch_size : (i + 1) * batch_size]) for i in range(batches)
    ]


def probe_cell(
    technique: str,
    depth: int,
    batches: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    width: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelProbe:
    """Build ``cifar_resnet(depth, technique)`` with default init from ``seed`` (drawn on the
    CPU, so the init does not depend on the device) and probe it on ``device``."""
    torch.manual_seed(seed)
    in_channels = batches[0][0].shape[1]
    model = cifar_resnet(depth, technique=technique, num_classes=num_classes, in_channels=in_channels, width=width)
    return probe_model(*prepare(model, batches, dtype, device))


def prepare(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """``model`` and ``batches`` on ``device``, in ``dtype`` and the faster memory layout the
    model allows there (:func:`reslab.nn.models.fast_memory_format`); the layout does not
    change the maths."""
    fmt = fast_memory_format(model, device)
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    return model, [(x.to(device=device, dtype=dtype).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]


# Per-process state of a worker: the batches arrive once, through the pool initializer.
_WORKER_BATCHES: list[tuple[Tensor, Tensor]] = []


def _worker_init(threads: int, batches: list[tuple[Tensor, Tensor]]) -> None:
    torch.set_num_threads(threads)
    _WORKER_BATCHES[:] = batches
    # A spawned worker is a fresh interpreter: import the modules given with --import too.
    import_from_env()


def _cell_job(
    job: tuple[str, int, int, float, int, str, str], batches: Sequence[tuple[Tensor, Tensor]] | None = None
) -> tuple[str, int, ModelProbe, float]:
    technique, depth, num_classes, width, seed, dtype, device = job
    t0 = time.perf_counter()
    data = _WORKER_BATCHES if batches is None else batches
    with full_precision():
        probe = probe_cell(technique, depth, data, num_classes, width, seed, getattr(torch, dtype), device)
    synchronize(torch.device(device))
    return technique, depth, probe, time.perf_counter() - t0


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 convolutions and matrix products in float32, not TF32 (which cuDNN uses by default
    on a GPU): the probe's figures then agree with the CPU's to float32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cell_cost(depth: int, batches: int) -> float:
    """Relative cost of one cell (blocks x batches), for scheduling and the progress ETA."""
    return (depth - 2) / 6 * 3 * batches


def run_probe(
    techniques: Sequence[str],
    depths: Sequence[int],
    batches: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    width: float = 1.0,
    seed: int = 0,
    dtype: str = "float32",
    workers: int = 1,
    on_done: Callable[[ProbeEntry, float], None] | None = None,
    device: str | torch.device = "cpu",
) -> list[ProbeEntry]:
    """Probe every technique x depth on ``device``; results in (depth, technique) order.

    ``workers > 1`` runs cells in that many processes with one thread each: on a small
    CPU this beats one process with several threads, because much of a ResNet's step at
    these sizes is memory-bound elementwise work (BatchNorm, ReLU) that threads share
    badly. On a GPU the cells run one after another in this process (one card, one queue).
    ``on_done(entry, cost)`` is called as each cell finishes (for progress).
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    cells = [(t, d) for d in depths for t in techniques]
    # Biggest first, so the last cells to finish are short ones and workers end together.
    order = sorted(cells, key=lambda c: -c[1])
    done: dict[tuple[str, int], ProbeEntry] = {}

    def finish(cell: tuple[str, int], probe: ModelProbe, seconds: float) -> None:
        entry = ProbeEntry(cell[0], cell[1], probe, verdict(probe), seconds)
        done[cell] = entry
        if on_done is not None:
            on_done(entry, cell_cost(cell[1], len(batches)))

    data = [(x.contiguous(), y.contiguous()) for x, y in batches]
    dev = str(device)
    jobs = [(t, d, num_classes, width, seed, dtype, dev) for t, d in order]
    if workers <= 1 or len(cells) == 1 or torch.device(dev).type != "cpu":
        for job in jobs:
            t, d, probe, seconds = _cell_job(job, data)
            finish((t, d), probe, seconds)
    else:
        # Workers ignore Ctrl-C: only this process handles it, and a half-probed cell is
        # worth nothing, so on any stop the workers are terminated at once.
        pool = WorkerPool(min(workers, len(cells)), _worker_init, (1, data), ignore_sigint=True)
        completed = False
        try:
            for t, d, probe, seconds in pool.map_unordered(_cell_job, jobs):
                finish((t, d), probe, seconds)
            completed = True
        finally:
            pool.close(grace_s=5.0 if completed else 0.0)
    return [done[c] for c in cells]


def default_workers() -> int:
    """One process per available core, at most 4 (memory: a depth-218 cell holds ~2 GB)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))
