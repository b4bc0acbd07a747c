"""One run's validation curve (reslab.study.curve): crossings, times and the late rise, checked
against values worked out by hand from straight lines between evaluations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reslab.study.curve import acc_at, epochs_to_target, rise_over_last, seconds_at, val_curve
from reslab.study.results import Cell, RunData


def run(
    val: list[float],
    *,
    evals: list[tuple[float, float]] | None = None,
    chance: float | None = 0.1,
    status: str = "completed",
    epoch_s: float = 10.0,
) -> RunData:
    metrics = [{"epoch": i + 1, "val_acc": a, "elapsed_s": epoch_s * (i + 1)} for i, a in enumerate(val)]
    summary = {"chance_acc": chance} if chance is not None else {}
    ev = [{"epoch": e, "val_acc": a} for e, a in evals] if evals else []
    return RunData(Cell("m", "t", 0), Path("."), status, summary=summary, metrics=metrics, evals=ev)


def test_curve_starts_at_chance_and_skips_broken_points() -> None:
    r = run([0.5, float("nan"), 0.7])
    assert val_curve(r) == [(0.0, 0.1), (1.0, 0.5), (3.0, 0.7)]
    assert val_curve(run([0.5], chance=None))[0] == (0.0, 0.0)


def test_epochs_to_target_interpolates_between_the_evaluations_around_the_crossing() -> None:
    # from 0.5 at epoch 1 to 0.7 at epoch 2, 0.6 is crossed half-way
    assert epochs_to_target(run([0.5, 0.7]), 0.6) == pytest.approx(1.5)
    # from chance (0.1 at epoch 0) to 0.5 at epoch 1: 0.3 at epoch 0.5
    assert epochs_to_target(run([0.5, 0.7]), 0.3) == pytest.approx(0.5)
    # mid-epoch evaluations, when the run made them, give the finer curve
    fine = run([0.5, 0.7], evals=[(0.5, 0.2), (1.0, 0.5), (1.5, 0.68), (2.0, 0.7)])
    assert epochs_to_target(fine, 0.6) == pytest.approx(1.0 + 0.5 * 0.1 / 0.18)
    assert epochs_to_target(run([0.5, 0.7]), 0.8) == math.inf
    assert epochs_to_target(run([0.5, 0.7], status="diverged"), 0.3) == math.inf


def test_seconds_at_interpolates_within_the_epoch() -> None:
    r = run([0.5, 0.7, 0.8], epoch_s=10.0)
    assert seconds_at(r, 1.5) == pytest.approx(15.0)
    assert seconds_at(r, 0.25) == pytest.approx(2.5)
    assert seconds_at(r, 3.0) == pytest.approx(30.0)
    assert seconds_at(r, math.inf) == math.inf
    assert math.isnan(seconds_at(r, 4.0))


def test_rise_over_the_last_quarter() -> None:
    # 4 epochs: the last quarter starts at epoch 3 (0.8); the end is 0.84
    assert rise_over_last(run([0.5, 0.7, 0.8, 0.84])) == pytest.approx(0.04)
    # 2 epochs: it starts at epoch 1.5, half-way from 0.5 to 0.7
    assert rise_over_last(run([0.5, 0.7])) == pytest.approx(0.1)
    assert acc_at([(0.0, 0.1), (1.0, 0.5)], 0.5) == pytest.approx(0.3)
    assert math.isnan(rise_over_last(run([0.5, 0.7], status="diverged")))
