"""One run's validation curve, read one way for every section of a report.

The curve is the run's validation evaluations (``evals.jsonl`` when it evaluated inside
epochs, else one point per epoch from ``metrics.jsonl``), starting at chance level at epoch 0.
Everything that asks "when did it get there" or "how much did it still gain" reads it here:

- :func:`epochs_to_target`: where the curve first crosses a target, interpolated linearly
  between the two evaluations around the crossing (so it is not a multiple of the
  evaluation interval);
- :func:`seconds_at`: the training time at a point of the curve, interpolated within the
  epoch from the cumulative time recorded at each epoch's end;
- :func:`rise_over_last`: how much the curve gained over the last part of training, the
  report's measure of whether training had reached its plateau.
"""

from __future__ import annotations

import itertools
import math

from reslab.study.results import RunData


def val_curve(run: RunData) -> list[tuple[float, float]]:
    """``[(epoch, val_acc), ...]`` in training order, starting with ``(0, chance)`` (0 when the run
    did not record its chance level); evaluations without a finite accuracy are skipped."""
    rows = run.evals or [{"epoch": m.get("epoch"), "val_acc": m.get("val_acc")} for m in run.metrics]
    chance = run.summary.get("chance_acc")
    out = [(0.0, float(chance) if isinstance(chance, (int, float)) and math.isfinite(chance) else 0.0)]
    for row in rows:
        try:
            e, acc = float(row["epoch"]), float(row["val_acc"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(e) and math.isfinite(acc) and e > out[-1][0]:
            out.append((e, acc))
    return out


def epochs_to_target(run: RunData, target: float) -> float:
    """Epoch at which validation accuracy first reaches ``target``, interpolated linearly between
    the evaluations around the crossing; inf when never reached or the run did not complete
    (a diverged model is not usable, whatever it reached before)."""
    if run.status != "completed":
        return math.inf
    curve = val_curve(run)
    for (e0, a0), (e1, a1) in itertools.pairwise(curve):
        if a1 >= target:
            if a0 >= target or a1 == a0:
                return e1
            return e0 + (target - a0) / (a1 - a0) * (e1 - e0)
    return math.inf


def seconds_at(run: RunData, epoch: float) -> float:
    """Cumulative training time (``elapsed_s``) at ``epoch``, interpolated linearly within the
    epoch that holds it; inf for inf, nan when the run recorded no time for that epoch."""
    if not math.isfinite(epoch):
        return math.inf
    prev_e, prev_t = 0.0, 0.0
    for m in run.metrics:
        try:
            e, t = float(m["epoch"]), float(m["elapsed_s"])
        except (KeyError, TypeError, ValueError):
            continue
        if epoch <= e:
            return prev_t + (epoch - prev_e) / (e - prev_e) * (t - prev_t) if e > prev_e else t
        prev_e, prev_t = e, t
    return math.nan


def acc_at(curve: list[tuple[float, float]], epoch: float) -> float:
    """Validation accuracy at ``epoch``, interpolated linearly between evaluations (nan outside
    the curve)."""
    for (e0, a0), (e1, a1) in itertools.pairwise(curve):
        if e0 <= epoch <= e1:
            return a0 if e1 == e0 else a0 + (epoch - e0) / (e1 - e0) * (a1 - a0)
    return math.nan


def rise_over_last(run: RunData, fraction: float = 0.25) -> float:
    """Validation accuracy gained over the last ``fraction`` of the run's training: its last
    evaluation minus the curve's value at ``(1 - fraction)`` of the epochs trained. nan when
    the run did not complete or has no evaluation after that point."""
    return curve_rise(val_curve(run), fraction) if run.status == "completed" else math.nan


def curve_rise(curve: list[tuple[float, float]], fraction: float = 0.25) -> float:
    """:func:`rise_over_last` of a curve :func:`val_curve` already read (nan without an
    evaluation)."""
    if len(curve) < 2:
        return math.nan
    end_e, end_a = curve[-1]
    return end_a - acc_at(curve, (1.0 - fraction) * end_e)


__all__ = ["acc_at", "curve_rise", "epochs_to_target", "rise_over_last", "seconds_at", "val_curve"]
