"""The per-look levels of the accuracy interval, calibrated by simulation to hold up to skewness 2.

:func:`nominal_level` ``(looks, alpha)`` is the two-sided level ``a`` every look's t interval is
built at: the smallest, over :data:`CALIBRATION_SHAPES` (normal differences and standardised gammas
of skewness 1 and 2, the least favourable shapes measured), of the ``alpha``-quantile of the
smallest p-value over the looks on null paths. :func:`one_sided_level` is the same for a one-sided
bound, over both tails of each shape (a skewed mean misses more often on one side than the other,
so a one-sided bound cannot take half of the two-sided level). Heavy symmetric tails and unequal
spreads only make the t interval conservative, so they do not bind. docs/decision-rule.md has the
measurements.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import stats as sps
from scipy.optimize import brentq

from reslab.caches import memoize
from reslab.study.plan import DIVERGENCE_SHARE, Plan

#: simulated null paths per calibration shape, and their seed (a fixed seed: reproducible levels)
CALIBRATION_PATHS = 400_000
CALIBRATION_SEED = 18_2026
#: the shapes the nominal level must hold under: (noise kind, skewness)
CALIBRATION_SHAPES: tuple[tuple[str, float], ...] = (("normal", 0.0), ("gamma", 1.0), ("gamma", 2.0))
#: the sides a p-value is read on: both (an interval), or one tail of a bound
TAILS = ("two", "upper", "lower")


def standard_noise(kind: str, rng: np.random.Generator, shape: tuple[int, ...], skew: float = 1.0) -> np.ndarray:
    """Draws with mean 0 and sd 1: ``normal``, ``t3``, ``gamma`` / ``lognormal`` of skewness ``skew``
    (positive: a long upper tail; negative: a long lower tail), ``hetero`` (normal times a per-draw
    spread exp(N(0, 0.75)))."""
    if kind in ("gamma", "lognormal") and skew < 0:  # a long lower tail: the mirror image
        return -standard_noise(kind, rng, shape, -skew)
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "t3":
        return rng.standard_t(3, shape) / math.sqrt(3.0)
    if kind == "gamma":
        k = 4.0 / skew**2
        return (rng.gamma(k, 1.0, shape) - k) / math.sqrt(k)
    if kind == "lognormal":
        s2 = brentq(lambda v: (math.exp(v) + 2) * math.sqrt(math.expm1(v)) - skew, 1e-9, 10.0)
        x = rng.lognormal(0.0, math.sqrt(s2), shape)
        return (x - math.exp(s2 / 2)) / math.sqrt(math.expm1(s2) * math.exp(s2))
    if kind == "hetero":
        scale = np.exp(rng.normal(0.0, 0.75, shape))
        return rng.standard_normal(shape) * scale / math.sqrt(math.exp(2 * 0.75**2))
    raise ValueError(f"unknown noise kind {kind!r}")


@memoize("calibration.min_p", maxsize=64)
def _min_p(looks: tuple[int, ...], kind: str, skew: float, tail: str = "two") -> np.ndarray:
    """Smallest t p-value over the looks on null paths of one shape (sorted): two-sided, or of the
    upper (mean too high) or lower tail. Every tail of a shape reads the same paths."""
    rng = np.random.default_rng([CALIBRATION_SEED, zlib.crc32(f"{kind}:{skew}".encode()), *looks])
    out, chunk = [], 100_000
    for lo in range(0, CALIBRATION_PATHS, chunk):
        x = standard_noise(kind, rng, (min(chunk, CALIBRATION_PATHS - lo), looks[-1]), skew)
        cs, best = np.cumsum(x, axis=1), np.ones(len(x))
        for n in looks:
            mean = cs[:, n - 1] / n
            sd = np.sqrt(((x[:, :n] - mean[:, None]) ** 2).sum(axis=1) / (n - 1))
            t = mean * math.sqrt(n) / sd
            if tail == "two":
                p = 2 * sps.t.sf(np.abs(t), n - 1)
            else:
                p = sps.t.sf(t, n - 1) if tail == "upper" else sps.t.cdf(t, n - 1)
            best = np.minimum(best, p)
        out.append(best)
    return np.sort(np.concatenate(out))


def _check(looks: tuple[int, ...], alpha: float) -> None:
    if not 0 < alpha < 1 or not looks or looks[0] < 2:
        raise ValueError(f"need 0 < alpha < 1 and looks of at least 2 seeds, got {alpha}, {looks}")


@memoize("calibration.nominal_level", maxsize=1024)
def nominal_level(looks: tuple[int, ...], alpha: float) -> float:
    """Two-sided level ``a`` of every look's interval: the smallest, over :data:`CALIBRATION_SHAPES`,
    of the ``alpha``-quantile of the smallest p-value over the looks (so P(any look errs) <= alpha)."""
    _check(looks, alpha)
    return min(float(np.quantile(_min_p(tuple(looks), k, s), alpha)) for k, s in CALIBRATION_SHAPES)


@memoize("calibration.one_sided_level", maxsize=1024)
def one_sided_level(looks: tuple[int, ...], alpha: float) -> float:
    """Level ``a`` of every look's one-sided bound (``mean - t_{1-a} se`` or ``mean + t_{1-a} se``):
    P(the bound misses at any look) <= alpha on either side, under every calibration shape."""
    _check(looks, alpha)
    return min(
        float(np.quantile(_min_p(tuple(looks), k, s, tail), alpha))
        for k, s in CALIBRATION_SHAPES
        for tail in (("upper", "lower") if s else ("upper",))
    )


def accuracy_nominal(plan: Plan, level: float | None = None) -> float:
    """The per-look level of the accuracy interval of a row run at error rate ``level`` (default
    ``plan.alpha``): the rule spends ``1 - DIVERGENCE_SHARE`` of it there."""
    return nominal_level(plan.looks, (1 - DIVERGENCE_SHARE) * (plan.alpha if level is None else level))


def sign_flip_floor(n: int) -> float:
    """The smallest two-sided p-value an exact sign-flip (permutation) test can give at n pairs."""
    return 2.0 ** (1 - n)


__all__ = [
    "CALIBRATION_PATHS",
    "CALIBRATION_SEED",
    "CALIBRATION_SHAPES",
    "TAILS",
    "accuracy_nominal",
    "nominal_level",
    "one_sided_level",
    "sign_flip_floor",
    "standard_noise",
]
