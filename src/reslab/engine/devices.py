"""Which device a grid's measurements run on, and how a file names it.

The timing pass and the init probe run where the grid trains (its ``device`` setting), so a
cost figure describes the machine that trained the runs; :func:`describe_device` is what
their files record about that machine.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from reslab.errors import UsageError


def device_name(name: str | None) -> str:
    """The device a setting names, ``auto`` resolved (CUDA when a GPU is visible, else the CPU);
    other names are returned as they are, checked by :func:`pick_device`."""
    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when a GPU is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    ``cuda`` is the first GPU this process sees, so a ``CUDA_VISIBLE_DEVICES`` pin is kept.

    Choosing a GPU also lets cuDNN time its convolution algorithms for each new shape
    (``torch.backends.cudnn.benchmark``) instead of guessing: a run's shapes repeat every
    step, and the guess is worst for the grouped convolutions that packed runs train with.
    cuDNN's kernels are not bitwise reproducible on a GPU either way (no deterministic mode
    is set), so nothing reslab promises depends on the choice."""
    name = device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name} was asked for but no CUDA GPU is available; use --device cpu")
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def pick_precision(precision: str, device: torch.device) -> str:
    """The engine's rule for ``precision``: ``auto`` is bf16 autocast on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device, threads: int | None = None) -> dict[str, Any]:
    """What a measurement file records about the device it ran on.

    CPU: ``{"type": "cpu", "name": model name, "threads": N}``; CUDA: ``{"type": "cuda",
    "name": the card, "capability": "M.m", "index": i}`` (``index`` among the GPUs this
    process sees). ``torch`` is the version in both."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": f"{major}.{minor}",
            "index": index,
            "torch": torch.__version__,
        }
    if device.type == "cpu":
        return {
            "type": "cpu",
            "name": cpu_name(),
            "threads": int(threads if threads is not None else torch.get_num_threads()),
            "torch": torch.__version__,
        }
    return {"type": device.type, "name": str(device), "torch": torch.__version__}


__all__ = ["cpu_name", "describe_device", "device_name", "pick_device", "pick_precision", "synchronize"]


def autocast_factory(precision: str, device: torch.device) -> Callable[..., Any]:
    """A fresh autocast context per call for ``precision`` (bf16 autocast, or a null context
    in fp32) on ``device``; ``cache=False`` turns off its cache of weight casts, as a CUDA
    graph capture needs."""
    if precision != "bf16":
        return lambda cache=True: nullcontext()
    return lambda cache=True: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
