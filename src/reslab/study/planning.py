"""Planning figures at the level the rule's intervals are built at, from the exact noncentral t.

:func:`detectable_difference` is the smallest true difference one look at ``n`` finished pairs detects
with probability 0.8; :func:`seeds_to_decide` the seeds at which one look would decide with that
probability, always more than the seeds already spent (None when more than ``n_max``).
"""

from __future__ import annotations

import math

from scipy import stats as sps
from scipy.integrate import quad
from scipy.optimize import brentq

from reslab.study.calibration import accuracy_nominal
from reslab.study.plan import Plan


def _nct_sf(c: float, df: int, nc: float) -> float:
    """P(T > c) for T noncentral t (scipy.stats.nct); where scipy returns no number in the far
    tails, the same probability integrated over the chi-square of the spread."""
    p = float(sps.nct.sf(c, df, nc))
    if math.isfinite(p) and 0.0 <= p <= 1.0:
        return p
    f = lambda v: float(sps.norm.sf(c * math.sqrt(v / df) - nc) * sps.chi2.pdf(v, df))  # noqa: E731
    return float(quad(f, 0.0, math.inf)[0])


def _power(delta: float, sd: float, n: int, nominal: float) -> float:
    """P(a two-sided t interval at level ``nominal`` over n pairs excludes 0) at true difference delta."""
    c = float(sps.t.ppf(1 - nominal / 2, n - 1))
    nc = delta * math.sqrt(n) / sd
    return _nct_sf(c, n - 1, nc) + _nct_sf(c, n - 1, -nc)


def detectable_difference(sd: float, n: int, plan: Plan, level: float | None = None, power: float = 0.8) -> float:
    """Smallest true difference one look at ``n`` finished pairs detects (interval clears 0) with
    probability ``power``, at the per-look level in force (exact noncentral t)."""
    if not (math.isfinite(sd) and sd > 0) or n < 2:
        return math.nan
    nominal = accuracy_nominal(plan, level)
    hi = sd
    while _power(hi, sd, n, nominal) < power:
        hi *= 2
    return float(brentq(lambda x: _power(x, sd, n, nominal) - power, 0.0, hi, xtol=1e-12 * sd))


def seeds_to_decide(
    mean: float, sd: float, plan: Plan, spent: int, level: float | None = None, power: float = 0.8, n_max: int = 100
) -> int | None:
    """Seeds at which one look, at the per-look level in force, would clear 0 (for ``|mean| >= margin``)
    or fit in the margin (otherwise) with probability ``power`` if the true difference were ``mean``
    and the spread ``sd``. Always more than ``spent``; None when more than ``n_max`` would be needed."""
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(mean)):
        return None
    nominal = accuracy_nominal(plan, level)
    m = plan.margin
    for n in range(max(spent + 1, 2), n_max + 1):
        if abs(mean) >= m:
            p = _power(abs(mean), sd, n, nominal)
        else:  # both one-sided bounds inside the margin (a lower bound on the exact probability)
            c, r = float(sps.t.ppf(1 - nominal / 2, n - 1)), math.sqrt(n) / sd
            p = _nct_sf(c, n - 1, (m - mean) * r) + _nct_sf(c, n - 1, (mean + m) * r) - 1.0
        if p >= power:
            return n
    return None


__all__ = ["detectable_difference", "seeds_to_decide"]
