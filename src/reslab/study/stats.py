"""Statistics over seeds: confidence intervals, paired tests, convergence figures.

A comparison has few seeds (often 3 to 5), so every interval here is exact for small
samples where a closed form exists (Student's t) and the bootstrap is offered as an
alternative, never as a silent replacement. Intervals carry the name of their method so
that reports can say which one produced each number.

Conventions:

* ``level`` is the two-sided confidence level (0.95 -> a 95% interval).
* A statistic that cannot be computed (one seed, no seed reached the target) is ``nan``,
  never a made-up number; callers print it as "n/a".
* Paired statistics pair values by position: ``a[k]`` and ``b[k]`` come from seed ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NAN = float("nan")
METHODS = ("t", "bootstrap")
#: the fewest seeds at which the percentile bootstrap is offered. Measured coverage of a
#: nominal 95% percentile-bootstrap interval for a mean of normal values (tests/study/test_stats.py):
#: about 74% at n = 3, 83% at n = 5, 90% at n = 10, 93% at n = 20; it cannot exceed 75% at
#: n = 3, where its widest interval is [min, max]. Below this n reslab refuses it.
BOOTSTRAP_MIN_N = 20
DEFAULT_RESAMPLES = 10_000
DEFAULT_BOOT_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = "t"

    def contains(self, value: float) -> bool:
        """True when ``value`` lies inside the interval (or the interval is undefined)."""
        if math.isnan(self.low) or math.isnan(self.high):
            return True  # no evidence either way: never read an undefined interval as a difference
        return self.low <= value <= self.high

    @property
    def defined(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and confidence interval of the mean."""

    n: int
    mean: float
    std: float
    ci: Interval


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison ``a - b``: mean difference, its interval, paired-t statistic and p-value."""

    n: int
    mean_diff: float
    std_diff: float
    ci: Interval
    t: float
    p_value: float

    @property
    def significant(self) -> bool:
        """A difference is claimed only when the interval is defined and excludes zero."""
        return self.ci.defined and not self.ci.contains(0.0)


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student-t interval for the mean of ``values``: mean +- t_{(1+level)/2, n-1} * s / sqrt(n).

    Non-finite values are dropped. Fewer than two values give an undefined (nan) interval.
    """
    _check_level(level)
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(NAN, NAN, NAN, level, "t")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, NAN, NAN, level, "t")
    from scipy import stats as _sps  # a 0.6 s import: only when an interval is computed

    half = float(_sps.t.ppf((1 + level) / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, level, "t")


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1) and t interval of the finite ``values``."""
    x = _finite(values)
    std = float(x.std(ddof=1)) if len(x) >= 2 else NAN
    ci = t_interval(x, level)
    return Summary(len(x), ci.estimate, std, ci)


def bootstrap_interval(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray],
    level: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOT_SEED,
) -> Interval:
    """Paired percentile bootstrap.

    ``samples`` are equal-length arrays whose k-th entries belong together (seed k); each
    resample draws the same seed indices for all of them, which is what keeps the pairing.
    ``statistic(*arrays)`` takes arrays of shape ``(n_resamples, n)`` and returns one value
    per row; the estimate is the statistic of the original sample. A fixed ``seed`` makes
    the interval reproducible.
    """
    _check_level(level)
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("paired bootstrap needs samples of equal length")
    if n == 0:
        return Interval(NAN, NAN, NAN, level, "bootstrap")
    estimate = float(statistic(*(a[None, :] for a in arrays))[0])
    if n < 2:
        return Interval(estimate, NAN, NAN, level, "bootstrap")
    from scipy import stats as _sps

    # scipy's paired bootstrap resamples seed indices as (n_resamples, n) rows of one
    # rng.integers call, so a seed gives the same resamples (and interval) as before.
    res = _sps.bootstrap(
        arrays,
        lambda *rows, axis=-1: statistic(*rows),
        n_resamples=n_resamples,
        method="percentile",
        paired=True,
        vectorized=True,
        confidence_level=level,
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), level, "bootstrap")


def _mean_rows(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def paired_pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite (a seed missing on either side drops out)."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError("paired values need equal lengths")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    method: str = "t",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOT_SEED,
) -> PairedTest:
    """Paired difference ``a - b`` over seeds.

    The p-value is always the two-sided paired t-test's; the interval comes from ``method``
    (``"t"``: Student's t on the differences; ``"bootstrap"``: paired percentile bootstrap
    of the mean difference). Pairs with a missing side are dropped.
    """
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {METHODS}, got {method!r}")
    x, y = paired_pairs(a, b)
    d = x - y
    n = len(d)
    if n == 0:
        return PairedTest(0, NAN, NAN, Interval(NAN, NAN, NAN, level, method), NAN, NAN)
    mean = float(d.mean())
    if n < 2:
        return PairedTest(1, mean, NAN, Interval(mean, NAN, NAN, level, method), NAN, NAN)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        # Every seed moved by exactly the same amount: t is infinite unless the shift is 0.
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        from scipy import stats as _sps

        p = float(2 * _sps.t.sf(abs(t), n - 1))
    ci = t_interval(d, level) if method == "t" else bootstrap_interval([d], _mean_rows, level, n_resamples, seed)
    return PairedTest(n, mean, sd, ci, t, p)


def ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    level: float = 0.95,
    method: str = "t",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_BOOT_SEED,
) -> Interval:
    """Paired ratio ``numerator / denominator`` as a geometric mean over seeds, with an interval.

    Ratios are averaged on the log scale, where a 2x speed-up and a 2x slow-down are
    symmetric; the interval on the mean log-ratio (t or paired bootstrap) is exponentiated.
    Pairs with a missing or non-positive side are dropped.
    """
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {METHODS}, got {method!r}")
    x, y = paired_pairs(numerator, denominator)
    keep = (x > 0) & (y > 0)
    logs = np.log(x[keep]) - np.log(y[keep])
    if method == "t":
        iv = t_interval(logs, level)
    else:
        iv = bootstrap_interval([logs], _mean_rows, level, n_resamples, seed)
    return Interval(math.exp(iv.estimate), math.exp(iv.low), math.exp(iv.high), level, method)


def censored_median(values: Sequence[float]) -> float:
    """Median where ``inf`` means "never happened" (a seed that did not reach the target).

    Unreached seeds count as later than every reached one, so the median is finite only when
    more than half of the seeds reached (with an even count, when both middle values are finite).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return NAN
    return float(np.median(np.sort(x)))


def curve_auc(val_acc: Sequence[float]) -> float:
    """Area under the validation-accuracy curve per epoch, normalised to [0, 1].

    Each epoch's accuracy holds for one epoch (a step curve), so this is the mean validation
    accuracy over the run: it rewards reaching high accuracy early, not only ending high.
    """
    x = np.asarray([v for v in val_acc if v is not None], dtype=float)
    if len(x) == 0 or not np.all(np.isfinite(x)):
        return NAN
    return float(x.mean())


def fmt_pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage, or "n/a"."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def prob_improvement(diffs: Sequence[float], level: float = 0.95) -> Interval:
    """P(technique beats baseline in a seed): the share of paired seeds with a positive
    difference (a tie counts half), with an exact Clopper-Pearson interval (conservative at
    every n, unlike a bootstrap; ties widen it to cover both roundings)."""
    _check_level(level)
    d = _finite(diffs)
    n = len(d)
    if n == 0:
        return Interval(NAN, NAN, NAN, level, "clopper-pearson")
    wins = float(np.sum(d > 0) + 0.5 * np.sum(d == 0))
    from scipy import stats as _sps

    # the closed form of binomtest(k, n).proportion_ci(method="exact"), which root-finds it per k
    a = (1 - level) / 2
    k_lo, k_hi = math.floor(wins), math.ceil(wins)
    low = 0.0 if k_lo == 0 else float(_sps.beta.ppf(a, k_lo, n - k_lo + 1))
    high = 1.0 if k_hi == n else float(_sps.beta.ppf(1 - a, k_hi + 1, n - k_hi))
    return Interval(wins / n, low, high, level, "clopper-pearson")


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean (the mean of the middle half, Agarwal et al. 2021); nan below 4 values,
    where it would trim nothing."""
    x = np.sort(_finite(values))
    n = len(x)
    if n < 4:
        return NAN
    k = n // 4
    return float(x[k : n - k].mean())
