"""reslab.stats against hand-computed values, scipy, and exact bootstrap enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from reslab.study.stats import (
    Interval,
    bootstrap_interval,
    censored_median,
    curve_auc,
    paired_test,
    ratio_interval,
    summarize,
    t_interval,
)

# t quantiles from a printed table (Student's t, two-sided 95%): df=1 12.7062, df=2 4.3027, df=4 2.7764.
T975 = {1: 12.706205, 2: 4.302653, 4: 2.776445}


def test_t_interval_hand_computed() -> None:
    # mean 0.92, s = 0.02, se = 0.02/sqrt(3) = 0.0115470, half-width = 4.302653 * 0.0115470 = 0.0496828
    iv = t_interval([0.90, 0.92, 0.94])
    assert iv.estimate == pytest.approx(0.92)
    assert iv.low == pytest.approx(0.92 - 0.0496828, abs=1e-6)
    assert iv.high == pytest.approx(0.92 + 0.0496828, abs=1e-6)
    assert iv.method == "t"


def test_t_interval_two_seeds_is_wide() -> None:
    # n=2: half-width = 12.706 * s / sqrt 2 with s = |a-b|/sqrt 2, i.e. 12.706 * |a-b| / 2.
    iv = t_interval([0.80, 0.82])
    assert iv.high - iv.estimate == pytest.approx(T975[1] * 0.01, rel=1e-5)


def test_summary_drops_non_finite_and_handles_one_value() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0, float("nan"), float("inf")])
    assert s.n == 5 and s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert s.ci.high - 3.0 == pytest.approx(T975[4] * math.sqrt(2.5) / math.sqrt(5), rel=1e-5)
    one = summarize([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std) and not one.ci.defined


def test_paired_test_hand_computed_and_scipy() -> None:
    a = [0.91, 0.93, 0.90, 0.94]
    b = [0.90, 0.90, 0.89, 0.91]
    # d = [0.01, 0.03, 0.01, 0.03]: mean 0.02, s = sqrt(4 * 0.0001 / 3) = 0.0115470, se = 0.0057735, t = 3.4641
    r = paired_test(a, b)
    assert r.n == 4
    assert r.mean_diff == pytest.approx(0.02)
    assert r.std_diff == pytest.approx(0.0115470, abs=1e-6)
    assert r.t == pytest.approx(3.4641016, rel=1e-6)
    ref = sps.ttest_rel(a, b)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    # df = 3, t_975 = 3.182446: half-width 0.0183740
    assert r.ci.low == pytest.approx(0.02 - 3.182446 * 0.0057735, abs=1e-6)
    assert r.significant


def test_paired_test_no_difference_when_interval_contains_zero() -> None:
    r = paired_test([0.90, 0.92, 0.91], [0.91, 0.90, 0.915])
    assert r.ci.contains(0.0) and not r.significant
    assert r.p_value > 0.05


def test_paired_test_drops_missing_pairs() -> None:
    nan = float("nan")
    r = paired_test([0.9, nan, 0.92, 0.93], [0.89, 0.9, nan, 0.91])
    assert r.n == 2
    assert r.mean_diff == pytest.approx(0.015)


def test_bootstrap_two_pairs_matches_exact_enumeration() -> None:
    # n=2 differences d0=0.01, d1=0.05: the 4 equally likely resamples have means
    # 0.01, 0.03, 0.03, 0.05, so the 2.5% and 97.5% percentiles are exactly 0.01 and 0.05.
    r = paired_test([0.91, 0.95], [0.90, 0.90], method="bootstrap", n_resamples=4000, seed=7)
    assert r.ci.method == "bootstrap"
    assert r.ci.low == pytest.approx(0.01)
    assert r.ci.high == pytest.approx(0.05)


def _exact_bootstrap_quantiles(d: np.ndarray, level: float) -> tuple[float, float]:
    """Percentiles of the exact bootstrap distribution of the mean (all n^n resamples)."""
    means = np.array([d[list(ix)].mean() for ix in itertools.product(range(len(d)), repeat=len(d))])
    alpha = (1 - level) / 2
    return tuple(np.quantile(means, [alpha, 1 - alpha]))  # type: ignore[return-value]


def test_paired_bootstrap_fixed_seed_close_to_exact_and_reproducible() -> None:
    a = np.array([0.912, 0.925, 0.918, 0.931, 0.920])
    b = np.array([0.905, 0.921, 0.919, 0.920, 0.911])
    r1 = paired_test(a, b, method="bootstrap", n_resamples=20000, seed=123)
    r2 = paired_test(a, b, method="bootstrap", n_resamples=20000, seed=123)
    assert r1.ci == r2.ci  # a fixed seed reproduces the interval exactly
    lo, hi = _exact_bootstrap_quantiles(a - b, 0.95)
    # 20000 resamples vs the exact 5^5 distribution: quantiles agree to well under the spread (0.015).
    assert r1.ci.low == pytest.approx(lo, abs=6e-4)
    assert r1.ci.high == pytest.approx(hi, abs=6e-4)
    # and scipy's independent percentile bootstrap lands at the same place
    ref = sps.bootstrap(
        (a - b,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(0)
    ).confidence_interval
    assert r1.ci.low == pytest.approx(ref.low, abs=6e-4)
    assert r1.ci.high == pytest.approx(ref.high, abs=6e-4)


def test_bootstrap_keeps_pairs_together() -> None:
    # b = a + 1 exactly: any resample that keeps pairs gives a mean difference of exactly -1.
    a = np.array([3.0, 9.0, 1.0, 7.0])
    iv = bootstrap_interval([a, a + 1], lambda x, y: (x - y).mean(axis=1), n_resamples=500, seed=1)
    assert iv.low == pytest.approx(-1.0) and iv.high == pytest.approx(-1.0)


def test_ratio_interval_is_geometric_mean_with_t_on_logs() -> None:
    # per-seed speed-ups 2 and 8: geometric mean 4; logs ln2, ln8 -> s = (ln8 - ln2)/sqrt2
    iv = ratio_interval([20.0, 80.0], [10.0, 10.0])
    assert iv.estimate == pytest.approx(4.0)
    half = T975[1] * (math.log(8) - math.log(2)) / 2
    assert iv.low == pytest.approx(math.exp(math.log(4) - half), rel=1e-5)
    assert iv.high == pytest.approx(math.exp(math.log(4) + half), rel=1e-5)


def test_ratio_interval_skips_unreached_pairs() -> None:
    iv = ratio_interval([10.0, math.inf, 30.0], [5.0, 5.0, 15.0])
    assert iv.estimate == pytest.approx(2.0) and iv.low == pytest.approx(2.0)


def test_censored_median() -> None:
    assert censored_median([3.0, 2.0, math.inf]) == 3.0
    assert censored_median([3.0, math.inf, math.inf]) == math.inf
    assert censored_median([1.0, 3.0]) == 2.0


def test_curve_auc_is_mean_accuracy_per_epoch() -> None:
    assert curve_auc([0.5, 0.7, 0.9]) == pytest.approx(0.7)
    assert math.isnan(curve_auc([]))


def test_undefined_interval_never_claims_a_difference() -> None:
    assert Interval(0.1, float("nan"), float("nan")).contains(0.0)
    r = paired_test([0.9], [0.8])
    assert r.n == 1 and not r.significant


def test_prob_improvement_is_an_exact_binomial_interval() -> None:
    from scipy.stats import binomtest

    from reslab.study.stats import prob_improvement

    for diffs in ([0.1, 0.2, 0.3], [-0.1, 0.2, 0.3, 0.05, -0.02], [-0.1, -0.2, -0.3]):
        k = sum(d > 0 for d in diffs)
        iv = prob_improvement(diffs)
        ref = binomtest(k, len(diffs)).proportion_ci(0.95, method="exact")
        assert iv.estimate == k / len(diffs)
        assert iv.low == pytest.approx(ref.low) and iv.high == pytest.approx(ref.high)
    tie = prob_improvement([0.0, 0.1, -0.1, 0.2])  # a tie counts half: 2.5 of 4
    assert tie.estimate == 0.625
    lo = binomtest(2, 4).proportion_ci(0.95, method="exact").low
    hi = binomtest(3, 4).proportion_ci(0.95, method="exact").high
    assert tie.low == pytest.approx(lo) and tie.high == pytest.approx(hi)


def test_iqm_trims_a_quarter_at_each_end() -> None:
    from reslab.study.stats import iqm

    assert iqm([1, 2, 3, 100]) == 2.5
    assert iqm([0, 1, 2, 3, 4, 5, 6, 1000]) == 3.5
    assert math.isnan(iqm([1, 2, 3]))


def test_interval_coverage_at_three_seeds() -> None:
    """At n = 3 the t interval holds its 95% level; the percentile bootstrap cannot (its widest
    interval is [min, max], which covers the mean of 3 normal values 75% of the time): why
    reslab refuses --interval bootstrap below BOOTSTRAP_MIN_N seeds."""
    from reslab.study.stats import bootstrap_interval, t_interval

    rng = np.random.default_rng(11)
    sims = 3000
    cover_t = cover_b = 0
    for i in range(sims):
        x = rng.normal(1.0, 2.0, 3)
        iv = t_interval(x)
        cover_t += iv.low <= 1.0 <= iv.high
        b = bootstrap_interval([x], lambda a: a.mean(axis=1), n_resamples=1000, seed=i)
        cover_b += b.low <= 1.0 <= b.high
    se = math.sqrt(0.05 * 0.95 / sims)
    assert abs(cover_t / sims - 0.95) < 3 * se
    assert cover_b / sims < 0.80


def test_bootstrap_draws_the_documented_resamples() -> None:
    """The paired percentile bootstrap written out: row r of ``default_rng(seed).integers(0, n,
    (n_resamples, n))`` picks the seeds of resample r for every sample, and the interval is the
    linear-interpolated quantiles of the statistic over the rows. A seed therefore pins the interval."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.9, 0.02, 25), rng.normal(0.88, 0.02, 25)
    for seed, level, resamples in ((0, 0.95, 4000), (7, 0.90, 999)):
        iv = bootstrap_interval([a, b], lambda x, y: (x - y).mean(axis=1), level, resamples, seed)
        idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
        dist = (a[idx] - b[idx]).mean(axis=1)
        lo, hi = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2])
        assert iv.estimate == pytest.approx(float((a - b).mean()), abs=1e-15)
        assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)
        assert iv.method == "bootstrap" and iv.level == level


@pytest.mark.parametrize("n", [1, 3, 6, 20])
def test_prob_improvement_closed_form_when_every_or_no_seed_wins(n: int) -> None:
    # P(k = n | p) = p**n, so the exact two-sided bound at level 0.95 solves p**n = 0.025 when every
    # seed wins, and (1 - p)**n = 0.025 when none does.
    from reslab.study.stats import prob_improvement

    edge = 0.025 ** (1 / n)
    every = prob_improvement([0.1] * n)
    assert every.estimate == 1.0 and every.high == 1.0
    assert every.low == pytest.approx(edge, rel=1e-9)
    none = prob_improvement([-0.1] * n)
    assert none.estimate == 0.0 and none.low == 0.0
    assert none.high == pytest.approx(1 - edge, rel=1e-9)
