"""The sequential procedure keeps its error rate despite looking repeatedly: proved by simulation.

Simulations here use their own random streams (not the one that calibrates the nominal
level), so they are independent checks of it, and a fixed seed so the test is repeatable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from reslab.study.sequential import Plan, decide_paths, look, nominal_level, run_to_decision, seeds_to_decide, simulate
from reslab.study.stats import t_interval

PLAN = Plan(min_seeds=3, max_seeds=8, step=1, alpha=0.05, margin=0.005)
SIMS = 40_000


def test_vectorized_simulation_matches_the_decision_function() -> None:
    """`simulate` (all grids at once) takes the same decisions as `run_to_decision`, path by path."""
    rng = np.random.default_rng(7)
    for true_diff, sd in ((0.0, 0.006), (0.01, 0.006), (0.004, 0.001)):
        paths = rng.normal(true_diff, sd, (300, PLAN.max_seeds))
        want = {k: 0 for k in ("better", "worse", "equivalent", "undecided")}
        for d in paths:
            want[run_to_decision(list(d), PLAN)[-1].decision] += 1
        outcome, _ = decide_paths(paths, PLAN)
        assert {k: int(np.sum(outcome == k)) for k in want} == want


def test_nominal_level_is_between_bonferroni_and_alpha() -> None:
    a = PLAN.nominal
    k = len(PLAN.looks)
    # Bonferroni (alpha / K) is always valid; correlated looks allow a little more, never alpha itself.
    assert 0.05 / k < a < 0.05
    assert nominal_level((5,), 0.05) == 0.05


def test_false_better_or_worse_under_the_null_is_at_most_alpha() -> None:
    """True difference 0: any 'better' or 'worse' is an error. The rate must be <= 5%
    within simulation error (3 standard errors of a 5% rate over 40,000 grids: 0.33 pp)."""
    res = simulate(PLAN, 0.0, 0.006, SIMS, seed=1)
    false_rate = res["better"] + res["worse"]
    se = math.sqrt(0.05 * 0.95 / SIMS)
    assert false_rate <= 0.05 + 3 * se, res
    # and it is not wasteful: a naive procedure (plain 95% t interval at every look) errs far more often
    rng = np.random.default_rng(2)
    naive_errors = 0
    for _ in range(5000):
        d = rng.normal(0.0, 0.006, PLAN.max_seeds)
        for n in PLAN.looks:
            iv = t_interval(d[:n], 0.95)
            if iv.low > 0 or iv.high < 0:
                naive_errors += 1
                break
    assert naive_errors / 5000 > 0.10  # about 0.14: why repeated looks need the correction


def test_false_equivalence_at_the_margin_is_at_most_alpha() -> None:
    """True difference exactly at the margin: 'equivalent' is an error (at most alpha)."""
    res = simulate(PLAN, PLAN.margin, 0.002, SIMS, seed=3)
    se = math.sqrt(0.05 * 0.95 / SIMS)
    assert res["equivalent"] <= 0.05 + 3 * se, res


def test_power_at_a_realistic_effect() -> None:
    """A realistic effect: +1 pp of test accuracy with a paired seed-to-seed spread of 0.6 pp
    (a modest effect on Fashion-MNIST). The procedure decides 'better' in about 91% of grids
    (0.911 with this seed), using about 5.5 of the 8 seeds on average; a false 'worse' never."""
    res = simulate(PLAN, 0.010, 0.006, SIMS, seed=4)
    assert res["better"] >= 0.85, res
    assert res["worse"] < 1e-3
    assert res["mean_seeds"] < 6.0


def test_each_label() -> None:
    plan = PLAN
    assert look([0.02, 0.021, 0.019], plan).decision == "better"
    assert look([-0.02, -0.021, -0.019], plan).decision == "worse"
    assert look([0.0001, -0.0002, 0.0, 0.0001], plan).decision == "equivalent"
    assert look([0.01, -0.01, 0.004], plan).decision == "continue"
    assert look([0.01, -0.01, 0.004], plan, final=True).decision == "undecided"
    # a diverged technique counted at chance level is far below baseline in every seed
    assert look([0.1 - 0.85, 0.1 - 0.86, 0.1 - 0.84], plan).decision == "worse"


def test_run_to_decision_stops_at_the_first_decisive_look_and_at_max_seeds() -> None:
    diffs = [0.03, 0.031, 0.029, 0.03, 0.03, 0.03, 0.03, 0.03]
    out = run_to_decision(diffs, PLAN)
    assert [lk.n for lk in out] == [3] and out[-1].decision == "better"
    noisy = [0.01, -0.01, 0.004, -0.006, 0.008, -0.009, 0.003, -0.002]
    out = run_to_decision(noisy, PLAN)
    assert [lk.n for lk in out] == list(PLAN.looks) and out[-1].decision == "undecided"
    # fewer seeds available than the next look needs: the last look says 'continue'
    out = run_to_decision(noisy[:4], PLAN, available=4)
    assert [lk.n for lk in out] == [3, 4] and out[-1].decision == "continue"


def test_repeated_interval_coverage_at_n3() -> None:
    """The first look's interval (n = 3) covers the true mean at least as often as a plain
    95% t interval does (it is wider), which itself holds its level at n = 3."""
    rng = np.random.default_rng(5)
    sims = 20_000
    cover_t = cover_rci = 0
    for _ in range(sims):
        d = rng.normal(0.004, 0.01, 3)
        iv = t_interval(d, 0.95)
        cover_t += iv.low <= 0.004 <= iv.high
        lk = look(d, PLAN)
        cover_rci += lk.low <= 0.004 <= lk.high
    se = math.sqrt(0.05 * 0.95 / sims)
    assert abs(cover_t / sims - 0.95) < 3 * se
    assert cover_rci / sims >= cover_t / sims


def test_seeds_to_decide_is_a_monotone_planning_figure() -> None:
    n_small = seeds_to_decide(0.004, 0.0, PLAN)
    n_big = seeds_to_decide(0.008, 0.0, PLAN)
    assert n_small is not None and n_big is not None and n_big > n_small
    assert seeds_to_decide(0.0, 0.01, PLAN) is None


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Plan(min_seeds=1)
    with pytest.raises(ValueError, match="max seeds"):
        Plan(min_seeds=4, max_seeds=3)
    assert Plan(min_seeds=3, max_seeds=8, step=2).looks == (3, 5, 7, 8)
