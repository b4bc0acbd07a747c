"""Helpers for the packed-run tests: a loss hook that makes one member diverge, and the pack's
start-up line read back into numbers."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from reslab.engine.graphed import WARMUP_STEPS


def nan_at(member: int, step: int) -> Callable[[int, Tensor], Tensor]:
    """A loss hook making ``member``'s loss non-finite from optimizer step ``step`` (1-based) on."""

    def hook(s: int, losses: Tensor) -> Tensor:
        if s >= step:
            bad = torch.ones_like(losses)
            bad[member] = float("nan")
            return losses * bad
        return losses

    return hook


def startup_line(err: str, tail: str = "") -> tuple[float, list[float]]:
    """The one "pack start-up" line of ``err`` (ending in ``tail``, a regex), as ``(total, parts)``:
    build, warm-up, capture and first step, in seconds. Fails when there is not exactly one."""
    [line] = [x for x in err.splitlines() if x.startswith("pack start-up")]
    number = r"(\d+\.\d+)"
    m = re.fullmatch(
        rf"pack start-up {number} s: build {number} s, warm-up {number} s \({WARMUP_STEPS} eager steps\), "
        rf"capture {number} s, first step {number} s{tail}",
        line,
    )
    assert m, line
    total, *parts = (float(v) for v in m.groups())
    return total, parts
