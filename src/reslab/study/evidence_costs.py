"""What a pack of the evidence study costs on a card, estimated from the packs it recorded.

A call starts a pack only where its estimate fits in what is left of its budget: seconds per run and
epoch of the same model and technique on this card; else of another technique (times
:data:`UNTIMED_TECHNIQUE`) or another model (scaled by :func:`depth_weight`); else the same from other
cards (times :data:`UNTIMED_CARD`); plus the card's median start-up (a pack's wall time beyond its
training). A pack of k runs is counted as k runs: packing's gain is not assumed, so estimates err long.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: a technique not yet timed on any card is assumed this much slower than baseline (fusion was
#: measured at up to 1.71x on an H100, benchmarks/README.md "GPU")
UNTIMED_TECHNIQUE = 1.75
#: a card that has trained nothing yet is assumed this much slower than the cards that have
UNTIMED_CARD = 2.0


def depth_weight(model: str) -> float:
    """A model's cost per image relative to the others (its residual blocks; 1 when unknown)."""
    m = re.fullmatch(r"resnet(\d+)", model)
    return max(1.0, (int(m.group(1)) - 2) / 6) if m else 1.0


@dataclass(frozen=True)
class PackTime:
    device: str
    model: str
    technique: str
    epochs: int
    size: int
    wall_s: float  # the whole pack, start-up included
    train_s: float  # its training and evaluation (the longest member's elapsed_s)


def pack_times(records: Sequence[dict[str, Any]]) -> list[PackTime]:
    """Each recorded pack's timing (records of a pack share its ``pack.id``)."""
    packs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        p = r.get("pack")
        if isinstance(p, dict) and p.get("id") and isinstance(p.get("wall_s"), (int, float)):
            packs.setdefault(str(p["id"]), []).append(r)
    out = []
    for members in packs.values():
        r0 = members[0]
        train = max(float(m.get("elapsed_s") or 0.0) for m in members)
        wall = float(r0["pack"]["wall_s"])
        size = int(r0["pack"].get("size") or len(members))
        out.append(PackTime(r0["device"], r0["model"], r0["technique"], r0["epochs"], size, wall, min(train, wall)))
    return out


class Costs:
    """Estimated seconds of a pack on one card (module docstring); None when nothing was ever recorded."""

    def __init__(self, records: Sequence[dict[str, Any]], device: str) -> None:
        self.device = device
        self.times = pack_times(records)

    def _rate(self, times: list[PackTime], model: str, technique: str) -> float | None:
        def med(ts: list[PackTime]) -> float | None:
            vals = [t.train_s / (t.epochs * t.size) for t in ts if t.epochs and t.size]
            return float(np.median(vals)) if vals else None

        exact = med([t for t in times if t.model == model and t.technique == technique])
        if exact is not None:
            return exact
        same_model = med([t for t in times if t.model == model])
        if same_model is not None:
            return same_model * UNTIMED_TECHNIQUE
        scaled = [
            t.train_s / (t.epochs * t.size) * depth_weight(model) / depth_weight(t.model)
            for t in times
            if t.epochs and t.size
        ]
        return float(np.median(scaled)) * UNTIMED_TECHNIQUE if scaled else None

    def estimate(self, model: str, technique: str, epochs: int, k: int) -> float | None:
        here = [t for t in self.times if t.device == self.device]
        rate = self._rate(here, model, technique)
        factor = 1.0
        if rate is None:
            rate, factor = self._rate(self.times, model, technique), UNTIMED_CARD
        if rate is None:
            return None
        starts = [max(0.0, t.wall_s - t.train_s) for t in (here or self.times)]
        return float(np.median(starts)) + rate * factor * epochs * k


__all__ = ["UNTIMED_CARD", "UNTIMED_TECHNIQUE", "Costs", "PackTime", "depth_weight", "pack_times"]
