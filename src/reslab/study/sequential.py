"""Sequential seeds: add seeds in rounds and stop each comparison when it is decided.

A comparison of a technique with baseline looks at its paired seed differences
``d_k = acc(technique, seed k) - acc(baseline, seed k)`` after ``n_1 < n_2 < ... < n_K``
seeds (the *looks*, fixed before anything runs). At every look it forms a *repeated
confidence interval* (Jennison & Turnbull 1989, "Interim analyses: the repeated confidence
interval approach", JRSS B 51) for the mean difference:

    mean(d) +- t_{1 - a/2, n - 1} * sd(d) / sqrt(n)

with one nominal level ``a`` for every look, chosen so that the intervals of all looks
cover the true difference *simultaneously* with probability ``1 - alpha`` (Pocock's 1977
constant-nominal-level boundary, here on the t scale). Because the t statistic of normal
differences is pivotal, ``a`` is the ``alpha``-quantile of the smallest two-sided p-value
along a path of looks, which :func:`nominal_level` finds by simulating that path (a fixed
seed makes it reproducible; 400,000 paths give ``a`` to about 1% of its value).

Every decision is read off the interval of the look that makes it:

* ``better``: the interval lies above 0; ``worse``: below 0;
* ``equivalent``: the interval lies inside ``(-margin, +margin)`` (an equivalence test;
  it takes precedence, since a difference smaller than the margin is what the user called
  negligible, even when it is a significant one);
* otherwise the comparison continues to the next look; after the last one, or when the
  time budget runs out, it is ``undecided``.

A wrong decision (``better`` or ``worse`` when the true difference is 0 or of the other
sign, ``equivalent`` when it is at least the margin) needs an interval that misses the
true difference at some look, so the chance of any wrong decision is at most ``alpha``,
however many looks are taken. Stopping earlier than planned (a budget, a decision) only
removes looks and keeps the guarantee. The guarantee assumes normal differences, as the
t interval does; the tests check it by simulation, together with the power.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DECISIONS = ("better", "worse", "equivalent", "undecided")
#: simulated paths for the nominal level (its Monte Carlo error is ~1% of its value)
CALIBRATION_PATHS = 400_000
CALIBRATION_SEED = 20211206


@dataclass(frozen=True)
class Plan:
    """When to look and how strict to be: seeds ``min_seeds, min_seeds + step, ..., max_seeds``."""

    min_seeds: int = 3
    max_seeds: int = 6
    step: int = 1
    alpha: float = 0.05
    #: equivalence margin, in the unit of the differences (accuracy as a fraction: 0.005 = 0.5 pp)
    margin: float = 0.005

    def __post_init__(self) -> None:
        if self.min_seeds < 2:
            raise ValueError(f"the first look needs at least 2 seeds for an interval, got {self.min_seeds}")
        if self.max_seeds < self.min_seeds:
            raise ValueError(f"max seeds ({self.max_seeds}) must be at least the first look's ({self.min_seeds})")
        if self.step < 1:
            raise ValueError(f"seeds are added at least one at a time, got step {self.step}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not self.margin > 0:
            raise ValueError(f"the equivalence margin must be positive, got {self.margin}")

    @property
    def looks(self) -> tuple[int, ...]:
        out = list(range(self.min_seeds, self.max_seeds + 1, self.step))
        if out[-1] != self.max_seeds:
            out.append(self.max_seeds)
        return tuple(out)

    @property
    def nominal(self) -> float:
        """The two-sided level each look's interval is built at (smaller than ``alpha``)."""
        return nominal_level(self.looks, self.alpha)

    def next_look(self, n: int) -> int | None:
        """The first look with more than ``n`` seeds (None after the last)."""
        return next((k for k in self.looks if k > n), None)


class _PrefixStats:
    """Mean and sample sd of the first n columns of every row, for any n, from running sums."""

    def __init__(self, x: np.ndarray) -> None:
        self.csum, self.csq = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)

    def mean_sd(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        mean = self.csum[:, n - 1] / n
        var = np.maximum(self.csq[:, n - 1] - n * mean * mean, 0.0) / (n - 1)
        return mean, np.sqrt(var)


@functools.lru_cache(maxsize=64)
def nominal_level(looks: tuple[int, ...], alpha: float, paths: int = CALIBRATION_PATHS) -> float:
    """Per-look two-sided level ``a`` such that P(some look's |t| exceeds its t quantile) = alpha.

    Simulated under the null on standard normal differences; one look gives ``alpha`` itself.
    """
    if len(looks) == 1:
        return alpha
    from scipy import stats as sps

    rng = np.random.default_rng(CALIBRATION_SEED)
    n_max = looks[-1]
    min_p = np.ones(paths)
    chunk = 100_000
    for lo in range(0, paths, chunk):
        x = rng.standard_normal((min(chunk, paths - lo), n_max))
        prefix = _PrefixStats(x)
        p_min = np.ones(len(x))
        for n in looks:
            mean, sd = prefix.mean_sd(n)
            t = mean / (sd / math.sqrt(n))
            p_min = np.minimum(p_min, 2 * sps.t.sf(np.abs(t), n - 1))
        min_p[lo : lo + len(x)] = p_min
    return float(np.quantile(min_p, alpha))


@dataclass(frozen=True)
class Look:
    """The state of one comparison at one look."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    decision: str
    #: the smallest true difference this look detects with 80% power (same interval rule)
    mdd: float


def critical_t(n: int, nominal: float) -> float:
    from scipy import stats as sps

    return float(sps.t.ppf(1 - nominal / 2, n - 1))


def look(diffs: Sequence[float], plan: Plan, final: bool = False) -> Look:
    """Decide on the paired differences of one look (all of them; ``len(diffs)`` is its n).

    ``final``: no look follows (the last planned one, or the budget is spent), so a
    comparison that is not decided here is ``undecided``; otherwise it is ``continue``.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2 or not np.all(np.isfinite(d)):
        raise ValueError(f"a look needs at least 2 finite differences, got {list(diffs)}")
    nominal = plan.nominal
    c = critical_t(n, nominal)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = c * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    from scipy import stats as sps

    mdd = (c + float(sps.t.ppf(0.8, n - 1))) * sd / math.sqrt(n)
    if -plan.margin < low and high < plan.margin:
        decision = "equivalent"
    elif low > 0:
        decision = "better"
    elif high < 0:
        decision = "worse"
    else:
        decision = "undecided" if final else "continue"
    return Look(n, mean, sd, low, high, decision, mdd)


def run_to_decision(diffs: Sequence[float], plan: Plan, available: int | None = None) -> list[Look]:
    """Replay the looks over ``diffs`` (seed order) until decided; the last entry is the outcome.

    ``available``: how many differences exist (default all). Looks beyond it are not taken;
    if the plan had more looks, the last one taken ends in ``continue`` (more seeds needed).
    """
    have = len(diffs) if available is None else available
    out: list[Look] = []
    for n in plan.looks:
        if n > have:
            break
        lk = look(diffs[:n], plan, final=n == plan.looks[-1])
        out.append(lk)
        if lk.decision != "continue":
            break
    return out


def seeds_to_decide(sd: float, mean: float, plan: Plan, n_max: int = 200) -> int | None:
    """Seeds a comparison with this spread would need, planned anew, for its interval to clear
    0 or fit in the margin at its observed mean (a planning figure, not a promise)."""
    if not (math.isfinite(sd) and sd > 0):
        return None
    for n in range(plan.min_seeds, n_max + 1):
        c = critical_t(n, plan.alpha)  # a single planned look at n seeds
        half = c * sd / math.sqrt(n)
        if abs(mean) > half or abs(mean) + half < plan.margin:
            return n
    return None


def decide_paths(paths: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """:func:`run_to_decision` for many grids at once: ``paths`` is (grids, max_seeds) of paired
    differences; returns each grid's decision and the seeds it used."""
    from scipy import stats as sps

    prefix = _PrefixStats(paths)
    outcome = np.full(len(paths), "", dtype=object)
    used = np.full(len(paths), plan.max_seeds)
    for n in plan.looks:
        open_ = outcome == ""
        mean, sdev = prefix.mean_sd(n)
        half = float(sps.t.ppf(1 - plan.nominal / 2, n - 1)) * sdev / math.sqrt(n)
        low, high = mean - half, mean + half
        for label, hit in (
            ("equivalent", (low > -plan.margin) & (high < plan.margin)),
            ("better", low > 0),
            ("worse", high < 0),
        ):
            take = open_ & hit
            outcome[take] = label
            used[take] = n
            open_ &= ~hit
    outcome[outcome == ""] = "undecided"
    return outcome, used


def simulate(plan: Plan, true_diff: float, sd: float, sims: int, seed: int = 0) -> dict[str, float]:
    """Outcome frequencies of the procedure on ``sims`` grids of normal paired differences (mean
    ``true_diff``, spread ``sd``) and the mean number of seeds used: its error rate and power."""
    paths = np.random.default_rng(seed).normal(true_diff, sd, (sims, plan.max_seeds))
    outcome, used = decide_paths(paths, plan)
    res = {k: float(np.mean(outcome == k)) for k in DECISIONS}
    res["mean_seeds"] = float(used.mean())
    return res


__all__ = [
    "DECISIONS",
    "Look",
    "Plan",
    "critical_t",
    "decide_paths",
    "look",
    "nominal_level",
    "run_to_decision",
    "seeds_to_decide",
    "simulate",
]
