"""How far training went (reslab.study.regime): the rise over the last quarter with its t
interval, the reference run, and what counts as early training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats as sps

from reslab.errors import UsageError
from reslab.study.regime import read_reference, regimes
from reslab.study.results import collect
from synthetic import write_grid, write_run


def _grid(root: Path, curves: dict[int, list[float]]) -> dict:
    write_grid(root, ["baseline"])
    for s, c in curves.items():
        write_run(root, "baseline", s, c, chance=0.1)
    return collect([root])[1]


def test_rise_is_the_mean_over_seeds_with_a_t_interval(tmp_path: Path) -> None:
    runs = _grid(tmp_path / "g", {0: [0.5, 0.6, 0.7, 0.8], 1: [0.5, 0.6, 0.7, 0.76], 2: [0.5, 0.6, 0.7, 0.72]})
    r = regimes(runs, ["resnet8"], margin=0.005)["resnet8"]
    rises = [0.10, 0.06, 0.02]
    assert r.rise == pytest.approx(sum(rises) / 3)
    lo, hi = sps.t.interval(0.95, 2, loc=sum(rises) / 3, scale=sps.sem(rises))
    assert (r.rise_low, r.rise_high) == (pytest.approx(lo), pytest.approx(hi))
    assert r.end_acc == pytest.approx((0.8 + 0.76 + 0.72) / 3)
    assert r.epochs == 4 and r.seeds == 3
    assert r.early and r.label == "early training"
    assert "still rising" in r.sentence() and "convergence speed" in r.sentence()


def test_flat_curves_are_not_early_training(tmp_path: Path) -> None:
    runs = _grid(tmp_path / "g", {0: [0.8, 0.85, 0.88, 0.88], 1: [0.8, 0.85, 0.87, 0.872]})
    r = regimes(runs, ["resnet8"], margin=0.005)["resnet8"]
    assert not r.early and r.label == "flat at the end"
    assert "flat by then" in r.sentence() and "within the 0.5 pp margin" in r.sentence()


def test_a_reference_run_trained_long_shows_the_gap(tmp_path: Path) -> None:
    runs = _grid(tmp_path / "g", {0: [0.8, 0.85, 0.88, 0.88], 1: [0.8, 0.85, 0.87, 0.872]})
    ref_dir = write_run(tmp_path / "ref", "baseline", 9, [0.8, 0.88, 0.9, 0.92, 0.93, 0.935, 0.936, 0.936])
    ref = read_reference(ref_dir)
    assert ref.model == "resnet8" and ref.epochs == 8 and ref.val_acc == pytest.approx(0.936)
    r = regimes(runs, ["resnet8"], margin=0.005, references=[ref])["resnet8"]
    # flat over its own last quarter, but 6 pp short of where the same model gets with longer training
    assert r.gap == pytest.approx(0.936 - 0.876)
    assert r.early and ref_dir.name in r.sentence() and "still rising" in r.sentence()


def test_a_bad_reference_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a run folder"):
        read_reference(tmp_path)
    broken = write_run(tmp_path / "r", "baseline", 0, [0.5, 0.6], status="diverged")
    with pytest.raises(UsageError, match="diverged, not completed"):
        read_reference(broken)
    other = write_run(tmp_path / "o", "baseline", 0, [0.5, 0.6], model="resnet20")
    runs = _grid(tmp_path / "g", {0: [0.5, 0.6]})
    with pytest.raises(UsageError, match="resnet20, which this grid does not have"):
        regimes(runs, ["resnet8"], 0.005, [read_reference(other)])


def test_no_completed_baseline_measures_nothing(tmp_path: Path) -> None:
    write_grid(tmp_path, ["baseline"])
    write_run(tmp_path, "baseline", 0, [0.5, 0.6], status="diverged")
    r = regimes(collect([tmp_path])[1], ["resnet8"], 0.005)["resnet8"]
    assert not r.measured and not r.early and math.isnan(r.rise) and "unknown" in r.sentence()
