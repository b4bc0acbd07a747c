"""A dedicated, interleaved step-time pass: what each technique costs, measured side by side.

Throughput read off a grid's own runs is not a cost figure: those runs share the CPU with
each other (a technique that happened to train beside a heavy run looks slow). Here every
(model, technique) takes a few training steps (forward, backward, SGD update) on a batch of
the grid's input size, in a freshly shuffled order each round, nothing else running, on the
device the grid trains on, with its precision and memory layout and (on the CPU) the thread
count the grid's workers use; a technique's cost is the median over rounds of
its step time divided by baseline's *in the same round*, so slow drifts of the machine
cancel. ``reslab compare`` runs it once per results folder before training (a few seconds)
and uses it both for the report's cost column and for its time estimate.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from reslab.engine.devices import autocast_factory, describe_device, pick_device, pick_precision, synchronize
from reslab.engine.graphed import WARMUP_STEPS, GraphedStep
from reslab.nn.models import build_model, fast_memory_format


def measure_step_times(
    models: Sequence[str],
    techniques: Sequence[str],
    input_size: tuple[int, int, int],
    num_classes: int,
    *,
    batch_size: int,
    width: float = 1.0,
    technique_args: dict[str, Any] | None = None,
    rounds: int = 3,
    steps: int = 1,
    threads: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    channels_last: bool = True,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Seconds per training step of every model x technique, ``rounds`` interleaved rounds.

    ``device``, ``precision`` and ``channels_last`` are the grid's settings, resolved as the
    engine resolves them (``auto``: CUDA when visible, bf16 autocast there, fp32 on the CPU;
    channels_last where :func:`~reslab.nn.models.channels_last_safe` allows it; the settings'
    ``channels_last`` says whether every variant ran in it). On CUDA the device is
    synchronised before and after each timed block of steps. ``threads`` is the CPU thread
    count for the pass (the runs'). ``cuda_graphs`` (the grid's, on CUDA): each variant's
    step is replayed as a CUDA graph (:class:`~reslab.engine.graphed.GraphedStep`), captured
    during the warm-up, as the runs train.

    Returns ``{"settings": {...}, "device": {...}, "steps": {"MODEL/TECHNIQUE": [seconds per
    step, per round]}}``; ``device`` is :func:`~reslab.engine.devices.describe_device`'s record.
    """
    dev = device if isinstance(device, torch.device) else pick_device(device)
    precision = pick_precision(precision, dev)
    autocast = autocast_factory(precision, dev)
    graphs = cuda_graphs and dev.type == "cuda"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c, h, w = input_size
        variants: dict[str, Callable[[], None]] = {}
        gen = torch.Generator().manual_seed(seed)
        layouts = set()
        for m in models:
            for t in techniques:
                torch.manual_seed(seed)
                model = build_model(m, t, num_classes, c, width=width, technique_args=dict(technique_args or {}))
                fmt = fast_memory_format(model, dev) if channels_last else torch.contiguous_format
                layouts.add(fmt)
                model = model.to(dev).to(memory_format=fmt).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
                x = torch.randn(batch_size, c, h, w, generator=gen).to(dev).contiguous(memory_format=fmt)
                y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
                variants[f"{m}/{t}"] = step = training_step(model, opt, x, y, autocast, graphs)
                # warm-up: first-call allocations and kernel choices (and a graph's capture); the
                # CPU's second step still paid for some of them on a cold install (1.2 s, not 0.03)
                for _ in range(WARMUP_STEPS + 1 if graphs else 2):
                    step()
        synchronize(dev)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        rng = random.Random(seed)
        for _ in range(rounds):
            rng.shuffle(order)
            for k in order:
                step = variants[k]
                synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                synchronize(dev)
                times[k].append((time.perf_counter() - t0) / steps)
        return {
            "settings": {
                "batch_size": batch_size,
                "input_size": list(input_size),
                "width": width,
                "rounds": rounds,
                "steps": steps,
                "threads": threads,
                "precision": precision,
                # as run: the CPU falls back to NCHW where channels_last is unsafe
                "channels_last": layouts == {torch.channels_last},
                "cuda_graphs": graphs,
                "torch": torch.__version__,
            },
            "device": describe_device(dev, threads),
            "steps": times,
        }
    finally:
        torch.set_num_threads(previous)


def training_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable[..., Any],
    graphs: bool,
) -> Callable[[], None]:
    """One training step of ``model`` on ``x, y``: eager, or replayed as a CUDA graph."""
    if graphs:
        graphed = GraphedStep(model, torch.nn.CrossEntropyLoss(), opt, autocast)

        def replay() -> None:
            graphed(x, y, 0.01)

        return replay

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_ratio(timing: dict[str, Any], model: str, technique: str) -> tuple[float, float, float] | None:
    """(median, low, high) over rounds of the technique's step time / baseline's in the same
    round; low and high are the smallest and largest round ratios. None when not measured."""
    steps = timing.get("steps", {}) if isinstance(timing, dict) else {}
    base, mine = steps.get(f"{model}/baseline"), steps.get(f"{model}/{technique}")
    if not base or not mine or len(base) != len(mine):
        return None
    ratios = [a / b for a, b in zip(mine, base, strict=True) if b > 0]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def step_seconds(timing: dict[str, Any], model: str, technique: str) -> float | None:
    """Median seconds per training step of one model x technique (None when not measured)."""
    steps = timing.get("steps", {}) if isinstance(timing, dict) else {}
    v = steps.get(f"{model}/{technique}")
    return statistics.median(v) if v else None


__all__ = ["measure_step_times", "step_ratio", "step_seconds", "training_step"]
