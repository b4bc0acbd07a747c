"""How long the evidence study trains each model: where baseline levels off.

Baseline is trained at each length of a ladder (10, 20 and 40 epochs in the study, each length with
its full learning-rate schedule, on seeds 0, 1 and 2), and the study trains at the shortest length
after which doubling the training gains less than the equivalence margin in baseline's mean
validation accuracy: the validation set, not the test set the rows are decided on. When even the
last doubling gains more, the longest length is used and the sentence says baseline was still
rising. A plateau is measured on one card (the card of its first run), so no doubling compares two
cards. Only seeds 0..n-1 are read, so later runs at a length never move the choice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps


def final_val_acc(record: dict[str, Any]) -> float:
    """A completed run's validation accuracy at its last epoch (nan otherwise)."""
    if record["status"] != "completed" or not record["curve"]:
        return math.nan
    v = record["curve"][-1].get("val_acc")
    return float(v) if v is not None else math.nan


@dataclass
class Plateau:
    """One model's training length: ``state`` levelled (doubling gained less than the margin),
    longest (the ladder ended while baseline still gained more), set (a ladder of one length: not
    measured) or pending (``needs`` lists the baseline runs to train, ``(epochs, seeds)``)."""

    model: str
    epochs: int | None
    state: str
    points: list[dict[str, Any]] = field(default_factory=list)  # per length: epochs, runs, val_acc
    gain: float = math.nan  # the deciding doubling's gain in mean validation accuracy
    low: float = math.nan  # its 95% Welch interval
    high: float = math.nan
    needs: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    #: the card measuring it (of its first run): only that card trains its other runs, so that no
    #: doubling compares two cards
    card: str | None = None
    #: the two lengths of the deciding doubling
    pair: tuple[int, int] | None = None

    def sentence(self, margin: float) -> str:
        """The measurement in words."""
        if self.state == "pending":
            on = f" on {self.card}" if self.card else ""
            return f"epochs not chosen yet: baseline's plateau is measured first{on} ({self._points()})"
        if self.state == "set":
            return f"{self.epochs} epochs, set (the ladder has one length: the plateau was not measured)"
        e, f = self.pair or (self.epochs, self.epochs)
        if self.state == "longest":
            return (
                f"{self.epochs} epochs, the longest measured; baseline was still rising "
                f"({_pp(self.gain)} pp{_iv(self.low, self.high)} from {e} to {f} epochs, more than the "
                f"{100 * margin:g} pp margin)"
            )
        return (
            f"{self.epochs} epochs: doubling to {f} gained {_pp(self.gain)} pp{_iv(self.low, self.high)} in "
            f"baseline's mean validation accuracy, within the {100 * margin:g} pp margin"
        )

    def _points(self) -> str:
        done = [f"{p['epochs']} epochs: {p['runs']} runs" for p in self.points if p["runs"]]
        return "; ".join(done) or "nothing trained yet"


def _pp(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}"


def _iv(low: float, high: float) -> str:
    return f" [{_pp(low)}, {_pp(high)}]" if math.isfinite(low) and math.isfinite(high) else ""


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` with its Welch t interval (nan bounds with fewer than 2 values a side)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(x) or not len(y):
        return math.nan, math.nan, math.nan
    d = float(y.mean() - x.mean())
    if len(x) < 2 or len(y) < 2:
        return d, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return d, d, d
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    return d, d - half, d + half


def measure_plateau(
    model: str,
    ladder: Sequence[int],
    seeds: int,
    margin: float,
    get: Callable[[int, int], dict[str, Any] | None],
    order: Sequence[dict[str, Any]],
) -> Plateau:
    """Where ``model``'s baseline levels off, from its baseline runs ``get(epochs, seed)`` of seeds
    ``0..seeds-1`` at each length of ``ladder`` (later seeds never move the choice); ``order``: the
    records in recorded order (the first of these runs names the card measuring the plateau)."""
    seed_list = range(seeds)
    recs = {e: [get(e, s) for s in seed_list] for e in ladder}
    mine = {id(r) for rs in recs.values() for r in rs if r is not None}
    card = next((r["device"] for r in order if id(r) in mine), None)
    vals = {e: [v for r in rs if r is not None and math.isfinite(v := final_val_acc(r))] for e, rs in recs.items()}
    points = [
        {"epochs": e, "runs": len(vals[e]), "val_acc": float(np.mean(vals[e])) if vals[e] else None} for e in ladder
    ]
    if len(ladder) == 1:
        return Plateau(model, ladder[0], "set", points, card=card)
    gain = low = high = math.nan
    pair: tuple[int, int] | None = None
    for e, f in itertools.pairwise(ladder):
        missing = [(x, tuple(s for s, r in zip(seed_list, recs[x], strict=True) if r is None)) for x in (e, f)]
        needs = [(x, m) for x, m in missing if m]
        if needs:
            return Plateau(model, None, "pending", points, needs=needs, card=card)
        gain, low, high = welch_interval(vals[e], vals[f])
        pair = (e, f)
        if math.isfinite(gain) and gain <= margin:
            return Plateau(model, e, "levelled", points, gain, low, high, card=card, pair=pair)
    return Plateau(model, ladder[-1], "longest", points, gain, low, high, card=card, pair=pair)


__all__ = ["Plateau", "final_val_acc", "measure_plateau", "welch_interval"]
