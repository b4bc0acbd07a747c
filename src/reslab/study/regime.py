"""How far a grid's training went: was baseline still learning when its runs stopped?

A comparison of runs that stop while accuracy is still climbing compares *early training*:
its differences say which technique gets there faster, not where each ends up, and they can
reverse when the same models train to their plateau. The report therefore states, per model:

- how much baseline's validation accuracy rose over the last quarter of its training (mean
  over seeds, with a t interval), measured on the same curve as every other figure
  (:mod:`reslab.study.curve`);
- optionally, how far baseline's end is from a *reference run* of the same model trained
  long (``reslab report --reference RUN``), the better measure when one exists.

Training counts as early when either gap exceeds the comparison's equivalence margin: a
later point of the same curve could then differ by more than the margin the decision uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from reslab.errors import UsageError
from reslab.study.curve import curve_rise, val_curve
from reslab.study.results import BASELINE, Cell, RunData, read_run

#: the share of training whose rise is measured
LAST = 0.25


@dataclass(frozen=True)
class Reference:
    """A run of a grid's model trained long, read from its folder."""

    path: Path
    model: str
    epochs: float
    val_acc: float  # its last evaluation
    rise: float  # its own rise over its last quarter


@dataclass(frozen=True)
class Regime:
    """One model's training regime in a grid."""

    model: str
    epochs: float  # epochs baseline trained
    steps: int | None  # optimizer steps baseline took (None when not recorded)
    seeds: int  # baseline seeds measured
    end_acc: float  # baseline's mean validation accuracy at its last evaluation
    rise: float  # mean rise over the last quarter
    rise_low: float  # its 95% t interval over seeds (nan with one seed)
    rise_high: float
    margin: float
    reference: Reference | None = None

    @property
    def gap(self) -> float:
        """Reference's end minus baseline's end (nan without a reference)."""
        return self.reference.val_acc - self.end_acc if self.reference else math.nan

    @property
    def early(self) -> bool:
        """Still rising by more than the margin, or short of the reference by more than it."""
        return (math.isfinite(self.rise) and self.rise > self.margin) or (
            math.isfinite(self.gap) and self.gap > self.margin
        )

    @property
    def measured(self) -> bool:
        return math.isfinite(self.rise) or math.isfinite(self.gap)

    @property
    def length(self) -> str:
        """How long baseline trained, e.g. '2 epochs, 63 steps'."""
        e = f"{self.epochs:g} epoch{'s' if self.epochs != 1 else ''}"
        return e + (f", {self.steps} steps" if self.steps else "")

    @property
    def label(self) -> str:
        """The short words a decision row carries."""
        if not self.measured:
            return "regime not measured"
        if self.early:
            return "early training"
        return "flat at the end"

    def sentence(self) -> str:
        """The regime in one short sentence: length, where baseline ended, distance to the plateau,
        and so which question the model's verdicts answer."""
        if not self.measured:
            return f"{self.model}: {self.length}; baseline has no completed curve, so how far it got is unknown."
        iv = (
            f" [{100 * self.rise_low:+.1f}, {100 * self.rise_high:+.1f}]"
            if math.isfinite(self.rise_low) and math.isfinite(self.rise_high)
            else ""
        )
        where = f"{self.model}: {self.length}; baseline ended at {100 * self.end_acc:.1f}% validation accuracy"
        rise = f"{100 * self.rise:+.1f} pp{iv} over the last quarter"
        ref = ""
        if self.reference is not None:
            r = self.reference
            ref = (
                f", {100 * self.gap:.1f} pp short of the reference run {r.path.name} "
                f"({r.epochs:g} epochs, {100 * r.val_acc:.1f}%)"
            )
        if self.early:
            return (
                f"{where}, still rising ({rise}){ref}: its verdicts are about accuracy this early "
                "(convergence speed), not after full training."
            )
        return f"{where}, flat by then ({rise}, within the {100 * self.margin:.2g} pp margin){ref}."


def read_reference(path: str | Path) -> Reference:
    """A reference run's folder (of 'reslab train' or of a compare grid's runs/); a
    :class:`UsageError` naming the folder and the fix when it is not a completed run."""
    p = Path(path)
    run = read_run(p) if p.is_dir() else None
    if run is None:
        raise UsageError(
            f"--reference {p}: not a run folder (no config.yaml naming its model); give the folder of a run trained "
            "long with 'reslab train --out'"
        )
    if run.status != "completed":
        raise UsageError(f"--reference {p}: the run is {run.status}, not completed; finish it or give another run")
    curve = val_curve(run)
    return Reference(p, run.cell.model, curve[-1][0], curve[-1][1], curve_rise(curve, LAST))


def regimes(
    runs: dict[Cell, RunData], models: Sequence[str], margin: float, references: Sequence[Reference] = ()
) -> dict[str, Regime]:
    """Each model's :class:`Regime` from its completed baseline runs (and its reference, if any).
    A reference whose model is not in the grid is a :class:`UsageError`."""
    by_model: dict[str, Reference] = {}
    for ref in references:
        if ref.model not in models:
            raise UsageError(
                f"--reference {ref.path}: its model is {ref.model}, which this grid does not have "
                f"({', '.join(models)}); give a run of one of them"
            )
        by_model[ref.model] = ref
    out = {}
    for m in models:
        base = [r for c, r in sorted(runs.items()) if c.model == m and c.technique == BASELINE]
        done = [r for r in base if r.status == "completed"]
        curves = [c for r in done if len(c := val_curve(r)) > 1]  # each run's curve, read once
        rises = np.array([curve_rise(c, LAST) for c in curves], dtype=float)
        rises = rises[np.isfinite(rises)]
        ends = [c[-1][1] for c in curves]
        planned = float((base[0].config.get("epochs") if base else 0) or 0)
        epochs = max((c[-1][0] for c in curves), default=planned)
        steps = next((int(s) for r in done if r.evals and isinstance(s := r.evals[-1].get("step"), int)), None)
        low = high = math.nan
        if len(rises) >= 2:
            half = float(sps.t.ppf(0.975, len(rises) - 1)) * float(rises.std(ddof=1)) / math.sqrt(len(rises))
            low, high = float(rises.mean()) - half, float(rises.mean()) + half
        out[m] = Regime(
            model=m,
            epochs=epochs,
            steps=steps,
            seeds=len(rises),
            end_acc=float(np.mean(ends)) if ends else math.nan,
            rise=float(rises.mean()) if len(rises) else math.nan,
            rise_low=low,
            rise_high=high,
            margin=margin,
            reference=by_model.get(m),
        )
    return out


__all__ = ["LAST", "Reference", "Regime", "read_reference", "regimes"]
