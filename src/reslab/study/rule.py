"""The decision rule for a technique against baseline, robust to skew, divergence, ties and many rows.

API
---
* :class:`Plan` ``(min_seeds, max_seeds, step, alpha, margin)``: the looks, fixed before training
  (``Plan(4, 6)``: looks at 4, 5 and 6 seeds). :data:`QUICK` and :data:`PAPER` are the presets'.
* :class:`Pair` ``(base, tech, base_diverged, tech_diverged)``: one seed's two runs (accuracy as a
  fraction; ``None`` with ``*_diverged=False`` means the run does not exist yet).
* :func:`decide_comparison` ``(pairs, plan, chance, level=None) -> Outcome``: replays the looks
  over the pairs in seed order and returns the first decision, or ``undecided`` (``next_look``
  says which look comes next, ``None`` when the plan is spent). :func:`decide_differences` is the
  same for bare differences (no divergence information, no chance level).
* :func:`table_levels` ``(m, plan, error_rate)``: the error rate each of ``m`` rows is run at
  (``"table"``: ``alpha / m``, so that P(any wrong row) <= alpha; ``"row"``: ``alpha``).
  :func:`decide_table` applies it to a whole table.
* :func:`nominal_level` ``(looks, alpha)``: the calibrated two-sided per-look level;
  :func:`accuracy_nominal` ``(plan, level)`` is the one a row's accuracy interval uses, and
  :func:`divergence_bounds` the bounds of its divergence test.
* :func:`seeds_to_decide` and :func:`detectable_difference`: planning figures at that level, from
  the exact noncentral t.
* :func:`decide_paths`, :func:`simulate` and :func:`simulate_table`: the same rule on many
  simulated comparisons (or whole tables) at once, vectorised; the tests use them.

Method (docs/decision-rule.md has the measurements)
---------------------------------------------------
A seed where either run *failed* (diverged, i.e. a non-finite loss, or finished at chance level
while the model can learn) gives no accuracy difference. On the seeds where both runs finished, the
differences ``d = tech - base`` give at every look a repeated confidence interval
``mean +- t_{1 - a/2, n - 1} sd / sqrt(n)`` with one nominal level ``a`` for all looks (Pocock's
constant level on the t scale). ``a`` is calibrated by simulation so that the smallest two-sided
p-value over the looks falls below ``a`` with probability at most ``alpha`` under BOTH normal
differences and differences with skewness 1 (a standardised gamma, the least favourable shape we
measured); heavy symmetric tails (t(3)) and unequal spreads only make the t interval conservative.

* ``equivalent``: interval inside ``(-margin, +margin)``; ``better``: above 0; ``worse``: below 0.
* A technique that failed on a seed where baseline did not (on any seed that exists, also beyond
  the deciding look) is never ``equivalent`` or ``better``. It is ``worse`` when the imbalance of
  failures (seeds where only it failed minus seeds where only baseline failed) crosses an exact
  sequential bound (:func:`divergence_bounds`), which gets :data:`DIVERGENCE_SHARE` of the row's
  error rate; the accuracy interval gets the rest.
* Zero spread (all differences equal, e.g. all runs predict one class) decides nothing, and so do
  fewer than :data:`MIN_PAIRS` finished pairs. If no baseline run learned anything (all at chance
  level or diverged), nothing is decided: "nothing was learned".

A wrong accuracy decision needs an interval that misses the truth at some look, and a wrong
``worse`` from the divergence test needs its bound crossed under its null, so a row errs with
probability at most its level under the shapes above, however the looks end; the tests check it.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps
from scipy.integrate import quad
from scipy.optimize import brentq

DECISIONS = ("better", "worse", "equivalent", "undecided")
#: simulated null paths per calibration shape, and their seed (a fixed seed: reproducible levels)
CALIBRATION_PATHS = 400_000
CALIBRATION_SEED = 18_2026
#: the shapes the nominal level must hold under: (noise kind, skewness)
CALIBRATION_SHAPES: tuple[tuple[str, float], ...] = (("normal", 0.0), ("gamma", 1.0))
#: share of a row's error rate spent on the divergence test (the rest goes to the accuracy interval)
DIVERGENCE_SHARE = 0.2
#: fewest finished pairs an interval is formed from
MIN_PAIRS = 3
#: a run within this of chance accuracy has learned nothing (accuracy as a fraction)
CHANCE_TOL = 0.01
#: a spread below this (accuracy fraction) is zero: ties decide nothing
ZERO_SPREAD = 1e-9
ERROR_RATES = ("table", "row")
_CODES = {0: "undecided", 1: "equivalent", 2: "better", 3: "worse"}


@dataclass(frozen=True)
class Plan:
    """Looks at ``min_seeds, min_seeds + step, ..., max_seeds`` seeds; ``margin`` in accuracy fraction."""

    min_seeds: int = 4
    max_seeds: int = 6
    step: int = 1
    alpha: float = 0.05
    margin: float = 0.005

    def __post_init__(self) -> None:
        if self.min_seeds < 2:
            raise ValueError(f"the first look needs at least 2 seeds, got {self.min_seeds}")
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

    def next_look(self, n: int) -> int | None:
        return next((k for k in self.looks if k > n), None)


QUICK = Plan(4, 6, 1, 0.05, 0.005)
PAPER = Plan(3, 10, 1, 0.05, 0.005)


@dataclass(frozen=True)
class Pair:
    """One seed: baseline's and the technique's accuracy, and whether each run diverged."""

    base: float | None
    tech: float | None
    base_diverged: bool = False
    tech_diverged: bool = False


@dataclass(frozen=True)
class Outcome:
    """The result of one comparison."""

    decision: str  # better | worse | equivalent | undecided
    n_used: int  # seeds of the look that decided (or of the last look taken)
    estimate: float | None  # mean difference of that look's interval
    interval: tuple[float, float] | None
    diverged_tech: int  # seeds (of all that exist) where only the technique failed
    diverged_base: int  # seeds where only baseline failed
    seeds: int  # seeds that exist (paired, in order)
    reason: str
    look: int  # 1-based index of that look in plan.looks (0: no look taken)
    next_look: int | None  # the look an undecided comparison needs next (None: plan spent, or decided)
    nominal: float  # two-sided level of every look's interval
    level: float  # error rate this row is controlled at
    basis: str = "accuracy"  # "accuracy" (finished pairs) or "divergence" (the imbalance of failures)


# --- calibration ---------------------------------------------------------------------------------


def standard_noise(kind: str, rng: np.random.Generator, shape: tuple[int, ...], skew: float = 1.0) -> np.ndarray:
    """Draws with mean 0 and sd 1: ``normal``, ``t3``, ``gamma`` / ``lognormal`` of skewness ``skew``
    (positive: a long upper tail), ``hetero`` (normal times a per-draw spread exp(N(0, 0.75)))."""
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


@functools.lru_cache(maxsize=16)
def _min_p(looks: tuple[int, ...], kind: str, skew: float) -> np.ndarray:
    """Smallest two-sided t p-value over the looks on null paths of one shape (sorted)."""
    rng = np.random.default_rng([CALIBRATION_SEED, zlib.crc32(f"{kind}:{skew}".encode()), *looks])
    out, chunk = [], 100_000
    for lo in range(0, CALIBRATION_PATHS, chunk):
        x = standard_noise(kind, rng, (min(chunk, CALIBRATION_PATHS - lo), looks[-1]), skew)
        cs, best = np.cumsum(x, axis=1), np.ones(len(x))
        for n in looks:
            mean = cs[:, n - 1] / n
            sd = np.sqrt(((x[:, :n] - mean[:, None]) ** 2).sum(axis=1) / (n - 1))
            best = np.minimum(best, 2 * sps.t.sf(np.abs(mean) * math.sqrt(n) / sd, n - 1))
        out.append(best)
    return np.sort(np.concatenate(out))


@functools.lru_cache(maxsize=256)
def nominal_level(looks: tuple[int, ...], alpha: float) -> float:
    """Two-sided level ``a`` of every look's interval: the smallest, over :data:`CALIBRATION_SHAPES`,
    of the ``alpha``-quantile of the smallest p-value over the looks (so P(any look errs) <= alpha)."""
    if not 0 < alpha < 1 or not looks or looks[0] < 2:
        raise ValueError(f"need 0 < alpha < 1 and looks of at least 2 seeds, got {alpha}, {looks}")
    return min(float(np.quantile(_min_p(tuple(looks), k, s), alpha)) for k, s in CALIBRATION_SHAPES)


def accuracy_nominal(plan: Plan, level: float | None = None) -> float:
    """The per-look level of the accuracy interval of a row run at error rate ``level`` (default
    ``plan.alpha``): the rule spends ``1 - DIVERGENCE_SHARE`` of it there."""
    return nominal_level(plan.looks, (1 - DIVERGENCE_SHARE) * (plan.alpha if level is None else level))


def table_levels(m: int, plan: Plan, error_rate: str = "table") -> float:
    """The error rate each of ``m`` rows is run at: ``alpha / m`` (Bonferroni: the chance of any
    wrong row in the table is at most ``alpha``) or, with ``error_rate="row"``, ``alpha``."""
    if error_rate not in ERROR_RATES:
        raise ValueError(f"error_rate is 'table' or 'row', got {error_rate!r}")
    if m < 1:
        raise ValueError(f"a table has at least one comparison, got {m}")
    return plan.alpha / m if error_rate == "table" else plan.alpha


def _crit_table(n_max: int, nominal: float) -> np.ndarray:
    """t quantile ``1 - a/2`` for n = 0..n_max pairs (nan below 2)."""
    out = np.full(n_max + 1, np.nan)
    out[2:] = sps.t.ppf(1 - nominal / 2, np.arange(1, n_max))
    return out


def _imbalance_tails(n_max: int) -> np.ndarray:
    """``tails[i, n, s]``: P(S_n >= s - n_max) for the imbalance S_n = (seeds where only the technique
    failed) - (seeds where only baseline failed) after n seeds, at the i-th point of a grid of
    ``pi`` = P(only the technique fails) = P(only baseline fails) in [0, 1/4]."""
    pis = np.linspace(0.0, 0.25, 251)
    dist = np.zeros((len(pis), 2 * n_max + 1))
    dist[:, n_max] = 1.0
    tails = np.zeros((len(pis), n_max + 1, 2 * n_max + 2))
    for n in range(n_max + 1):
        if n:
            up, down = np.roll(dist, 1, axis=1), np.roll(dist, -1, axis=1)
            dist = pis[:, None] * (up + down) + (1 - 2 * pis[:, None]) * dist
        tails[:, n, :-1] = np.cumsum(dist[:, ::-1], axis=1)[:, ::-1]
    return tails


@functools.lru_cache(maxsize=256)
def divergence_bounds(looks: tuple[int, ...], alpha: float) -> tuple[int | None, ...]:
    """Per look, the imbalance S (seeds where only the technique failed minus seeds where only
    baseline failed) at which the technique is called ``worse`` (None: no imbalance suffices).

    Under the null that both fail equally often, independently within a seed (or positively
    dependent), a seed adds +1 or -1 with the same probability ``pi <= 1/4``; the bounds are the
    loosest with one tail probability ``a`` for every look such that, for every ``pi``, the chance
    of crossing at any look is at most ``alpha`` (computed exactly over a grid of ``pi``)."""
    n_max = looks[-1]
    tails = _imbalance_tails(n_max)
    sup = tails.max(axis=0)  # (n, s): largest tail probability over the null

    def bounds(a: float) -> tuple[int | None, ...]:
        out: list[int | None] = []
        for n in looks:
            ok = [v for v in range(1, n + 1) if sup[n, v + n_max] <= a]
            out.append(ok[0] if ok else None)
        return tuple(out)

    def crossing(bs: tuple[int | None, ...]) -> float:
        pis = np.linspace(0.0, 0.25, 251)[:, None]
        dist = np.zeros((pis.shape[0], 2 * n_max + 1))
        dist[:, n_max] = 1.0
        crossed, at = np.zeros(pis.shape[0]), dict(zip(looks, bs, strict=True))
        for n in range(1, n_max + 1):
            dist = pis * (np.roll(dist, 1, axis=1) + np.roll(dist, -1, axis=1)) + (1 - 2 * pis) * dist
            if at.get(n) is not None:
                crossed += dist[:, at[n] + n_max :].sum(axis=1)
                dist[:, at[n] + n_max :] = 0.0
        return float(crossed.max())

    best: tuple[int | None, ...] = tuple(None for _ in looks)
    for a in sorted({float(v) for v in sup[looks[0] :, n_max + 1 :].ravel() if 0 < v <= alpha}):
        bs = bounds(a)
        if crossing(bs) <= alpha:
            best = bs
    return best


def imbalance_p(imbalance: int, n: int) -> float:
    """The largest chance, when both fail equally often, of an imbalance at least this large at n seeds."""
    if imbalance <= 0:
        return 1.0
    return float(_imbalance_tails(n)[:, n, imbalance + n].max())


# --- the rule on many grids at once --------------------------------------------------------------


def _mean_sd(d: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and sample sd of the entries of each row of ``d`` where ``w`` holds."""
    k = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(w, d, 0.0).sum(axis=1) / k
        var = np.where(w, (d - mean[:, None]) ** 2, 0.0).sum(axis=1) / (k - 1)
    return k, mean, np.sqrt(var)


def decide_paths(
    base: np.ndarray,
    tech: np.ndarray,
    base_div: np.ndarray,
    tech_div: np.ndarray,
    plan: Plan,
    chance: float | None,
    level: float | None = None,
    chance_tol: float = CHANCE_TOL,
) -> dict[str, np.ndarray]:
    """The rule on ``S`` comparisons at once: arrays ``(S, N)`` of accuracies and divergence flags
    for the ``N`` seeds that exist (in seed order). Returns arrays of length ``S``: ``code``
    (0 undecided, 1 equivalent, 2 better, 3 worse), ``n`` (seeds of the deciding/last look),
    ``estimate``, ``low``, ``high`` (of the finished pairs), ``basis`` (1: decided by the failures),
    ``fail_tech``, ``fail_base``
    (failures of one side only, over all N seeds), ``nothing`` (no baseline run learned),
    ``zero`` (the last look taken had zero spread)."""
    base, tech = np.asarray(base, dtype=float), np.asarray(tech, dtype=float)
    s, n_avail = base.shape
    fb = np.asarray(base_div, bool) | ~np.isfinite(base)
    ft = np.asarray(tech_div, bool) | ~np.isfinite(tech)
    if chance is not None:
        with np.errstate(invalid="ignore"):
            fb |= base <= chance + chance_tol
            ft |= tech <= chance + chance_tol
    ok = ~fb & ~ft
    only_t, only_b = ft & ~fb, fb & ~ft
    fail_t, fail_b = only_t.sum(axis=1), only_b.sum(axis=1)
    nothing = fb.all(axis=1) & (n_avail > 0)
    level = plan.alpha if level is None else level
    nominal = accuracy_nominal(plan, level)
    bounds = dict(zip(plan.looks, divergence_bounds(plan.looks, DIVERGENCE_SHARE * level), strict=True))
    crit = _crit_table(max(n_avail, 2), nominal)
    d = np.where(ok, tech - base, 0.0)
    code, basis = np.zeros(s, int), np.zeros(s, int)
    n_at = np.zeros(s, int)
    est, low, high = np.full(s, np.nan), np.full(s, np.nan), np.full(s, np.nan)
    zero = np.zeros(s, bool)
    m = plan.margin
    for n in (k for k in plan.looks if k <= n_avail):
        open_ = (code == 0) & ~nothing
        k, mean, sd = _mean_sd(d[:, :n], ok[:, :n])
        half = crit[k] * sd / np.sqrt(np.maximum(k, 1))
        valid = (k >= MIN_PAIRS) & (sd > ZERO_SPREAD)
        lo, hi = mean - half, mean + half
        clean = fail_t == 0
        with np.errstate(invalid="ignore"):
            hits = [
                (1, 0, valid & clean & (lo > -m) & (hi < m)),
                (2, 0, valid & clean & (lo > 0)),
                (3, 0, valid & (hi < 0)),
            ]
        b_n = bounds[n]
        if b_n is not None:
            hits.append((3, 1, (only_t[:, :n].sum(axis=1) - only_b[:, :n].sum(axis=1)) >= b_n))
        # the state of the look: accuracy interval where it exists
        n_at[open_] = n
        est[open_], low[open_], high[open_] = (
            mean[open_],
            np.where(valid, lo, np.nan)[open_],
            np.where(valid, hi, np.nan)[open_],
        )
        zero[open_] = (k >= 2)[open_] & (sd <= ZERO_SPREAD)[open_]
        for c, b, hit in hits:
            take = open_ & hit
            code[take], basis[take] = c, b
            open_ &= ~hit
    rows, last = np.arange(s), np.maximum(n_at - 1, 0)
    cut_t = np.where(n_at > 0, np.cumsum(only_t, axis=1)[rows, last] if n_avail else 0, 0)
    cut_b = np.where(n_at > 0, np.cumsum(only_b, axis=1)[rows, last] if n_avail else 0, 0)
    return {
        "code": code,
        "n": n_at,
        "fail_tech_look": cut_t,
        "fail_base_look": cut_b,
        "estimate": est,
        "low": low,
        "high": high,
        "basis": basis,
        "fail_tech": fail_t,
        "fail_base": fail_b,
        "nothing": nothing,
        "zero": zero,
        "nominal": np.full(s, nominal),
    }


# --- one comparison ------------------------------------------------------------------------------


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def decide_comparison(
    pairs: Sequence[Pair],
    plan: Plan,
    chance: float | None,
    level: float | None = None,
    chance_tol: float = CHANCE_TOL,
) -> Outcome:
    """Decide one comparison from its pairs in seed order (only the prefix up to the first pair with
    a run that neither exists nor diverged is used). ``chance``: the model's chance accuracy
    (1/classes), or None when unknown (then only diverged or non-finite runs count as failed).
    ``level``: this row's error rate (from :func:`table_levels`; default ``plan.alpha``)."""
    level = plan.alpha if level is None else level
    used: list[Pair] = []
    for p in pairs:
        if (p.base is None and not p.base_diverged) or (p.tech is None and not p.tech_diverged):
            break
        used.append(p)
    n_avail = len(used)

    def arr(get: str) -> np.ndarray:
        return np.array([[getattr(p, get) if getattr(p, get) is not None else np.nan for p in used]], dtype=float)

    base, tech = arr("base").reshape(1, n_avail), arr("tech").reshape(1, n_avail)
    bdiv = np.array([[p.base_diverged for p in used]], bool).reshape(1, n_avail)
    tdiv = np.array([[p.tech_diverged for p in used]], bool).reshape(1, n_avail)
    r = {k: v[0] for k, v in decide_paths(base, tech, bdiv, tdiv, plan, chance, level, chance_tol).items()}
    code, n, nominal = int(r["code"]), int(r["n"]), float(r["nominal"])
    fail_t, fail_b = int(r["fail_tech"]), int(r["fail_base"])
    decision = _CODES[code]
    est = None if not math.isfinite(r["estimate"]) else float(r["estimate"])
    iv = None if not math.isfinite(r["low"]) else (float(r["low"]), float(r["high"]))
    look = plan.looks.index(n) + 1 if n in plan.looks else 0
    next_look = None
    if decision == "undecided" and not r["nothing"]:
        nl = plan.next_look(n) if n else plan.looks[0]
        next_look = nl
    true_div = sum(p.tech_diverged and not p.base_diverged for p in used)
    failed = "diverged" if true_div == fail_t else "diverged or stayed at chance level"
    notes = [f"baseline failed in {fail_b} of {n_avail} seeds where the technique did not"] if fail_b else []
    where = f"at {n} seeds" if n else f"with {n_avail} seeds"
    if r["nothing"]:
        what = "diverged" if chance is None else "diverged or stayed at chance level"
        reason = f"nothing was learned: every baseline run {what}; no decision"
    elif r["basis"]:
        bt, bb = int(r["fail_tech_look"]), int(r["fail_base_look"])
        p_imb = imbalance_p(bt - bb, n)
        reason = (
            f"worse {where}: {failed} in {bt} of {n} seeds where baseline did not (baseline in {bb} where the "
            f"technique did not); when both fail equally often an imbalance this large has probability at most "
            f"{p_imb:.2g} (exact test, {DIVERGENCE_SHARE:.0%} of the row error rate {level:.2g})"
        )
        if n_avail > n:
            notes.insert(0, f"{failed} in {fail_t} of all {n_avail} seeds")
        if iv is not None and est is not None:
            notes.append(f"finished pairs: difference {_pp(est)} pp, interval [{_pp(iv[0])}, {_pp(iv[1])}] pp")
        reason = "; ".join([reason, *notes])
    elif code:
        if fail_t:
            notes.insert(0, f"{failed} in {fail_t} of {n_avail} seeds where baseline did not")
        assert iv is not None and est is not None
        reason = (
            f"{decision} {where}: difference {_pp(est)} pp, interval [{_pp(iv[0])}, {_pp(iv[1])}] pp "
            f"(each look at level {nominal:.2g}, row error rate {level:.2g})"
        )
        reason = "; ".join([reason, *notes])
    else:
        if not n:
            why = f"too few seeds: the first look needs {plan.looks[0]}"
        elif r["zero"]:
            why = "no spread between seeds (all differences equal): ties decide nothing"
        elif iv is None:
            why = f"fewer than {MIN_PAIRS} seeds where both runs finished"
        elif fail_t and (iv[0] > 0 or (-plan.margin < iv[0] and iv[1] < plan.margin)):
            why = f"interval [{_pp(iv[0])}, {_pp(iv[1])}] pp of the finished pairs, not read as a verdict"
        else:
            why = f"interval [{_pp(iv[0])}, {_pp(iv[1])}] pp clears neither 0 nor the margin"
        parts = [f"undecided {where}"]
        if fail_t:
            parts.append(f"{failed} in {fail_t} of {n_avail} seeds where baseline did not: never equivalent or better")
        parts += [why, *notes, f"next look at {next_look} seeds" if next_look else "the plan is spent"]
        reason = parts[0] + ": " + "; ".join(parts[1:])
    basis = "divergence" if r["basis"] else "accuracy"
    return Outcome(decision, n, est, iv, fail_t, fail_b, n_avail, reason, look, next_look, nominal, level, basis)


def decide_differences(diffs: Sequence[float], plan: Plan, level: float | None = None) -> Outcome:
    """:func:`decide_comparison` for bare differences technique - baseline (nothing diverged)."""
    return decide_comparison([Pair(0.0, float(x)) for x in diffs], plan, None, level)


def decide_table(
    rows: Mapping[Hashable, tuple[Sequence[Pair], float | None]], plan: Plan, error_rate: str = "table"
) -> dict[Hashable, Outcome]:
    """Every comparison of a table (``key -> (pairs, chance)``) at the level that keeps the chance
    of any wrong row at most ``plan.alpha`` (``"table"``), or each row's at most alpha (``"row"``)."""
    level = table_levels(len(rows), plan, error_rate)
    return {key: decide_comparison(pairs, plan, chance, level) for key, (pairs, chance) in rows.items()}


# --- planning ------------------------------------------------------------------------------------


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


def sign_flip_floor(n: int) -> float:
    """The smallest two-sided p-value an exact sign-flip (permutation) test can give at n pairs."""
    return 2.0 ** (1 - n)


# --- simulation ----------------------------------------------------------------------------------


def simulate(
    plan: Plan,
    true_diff: float,
    sd: float,
    sims: int,
    seed: int,
    noise: str = "normal",
    skew: float = 1.0,
    p_div: float = 0.0,
    p_div_base: float = 0.0,
    level: float | None = None,
    chance: float = 0.1,
) -> dict[str, float]:
    """Outcome rates of the rule on ``sims`` simulated comparisons of ``plan.max_seeds`` seeds:
    baseline accuracy 0.9 + N(0, 0.5 pp), technique = baseline + true_diff + sd * noise; each run
    diverges independently (technique with ``p_div``, baseline with ``p_div_base``). Keys: the four
    decisions, ``mean_seeds``, ``any_div`` (some technique-only failure exists) and
    ``eq_or_better_div`` (equivalent or better although the technique failed where baseline did not),
    ``worse_given_div`` (the fraction of comparisons with such a failure that end ``worse``)."""
    rng = np.random.default_rng(seed)
    shape = (sims, plan.max_seeds)
    base = 0.9 + 0.005 * rng.standard_normal(shape)
    tech = base + true_diff + sd * standard_noise(noise, rng, shape, skew)
    tdiv, bdiv = rng.random(shape) < p_div, rng.random(shape) < p_div_base
    r = decide_paths(np.where(bdiv, np.nan, base), np.where(tdiv, np.nan, tech), bdiv, tdiv, plan, chance, level)
    out = {name: float(np.mean(r["code"] == c)) for c, name in _CODES.items()}
    out["mean_seeds"] = float(np.mean(np.where(r["code"] > 0, r["n"], plan.max_seeds)))
    out["any_div"] = float(np.mean(r["fail_tech"] > 0))
    out["eq_or_better_div"] = float(np.mean((r["fail_tech"] > 0) & ((r["code"] == 1) | (r["code"] == 2))))
    div = r["fail_tech"] > 0
    out["worse_given_div"] = float(np.mean(r["code"][div] == 3)) if div.any() else math.nan
    out["sims"] = float(sims)
    return out


def simulate_table(
    plan: Plan,
    models: int,
    techniques: int,
    sims: int,
    seed: int,
    noise: str = "normal",
    skew: float = 1.0,
    error_rate: str = "table",
    shared_baseline: bool = True,
    sd: float = 0.004,
) -> dict[str, float]:
    """P(some row of a ``models x techniques`` table is wrong) when no technique has any effect
    (every ``better`` or ``worse`` is then wrong).
    ``shared_baseline``: each model's techniques are compared with the same baseline runs (every run
    has spread ``sd``; the rows of a model are then correlated); otherwise every row's differences
    are independent draws of spread ``sd`` and shape ``noise``. Keys: ``any_wrong``, ``row_wrong``,
    ``level`` (each row's error rate)."""
    rng = np.random.default_rng(seed)
    m, n = models * techniques, plan.max_seeds
    level = table_levels(m, plan, error_rate)
    if shared_baseline:
        base = 0.9 + sd * standard_noise(noise, rng, (sims, models, 1, n), skew)
        tech = 0.9 + sd * standard_noise(noise, rng, (sims, models, techniques, n), skew)
        base = np.broadcast_to(base, tech.shape)
    else:
        base = 0.9 + np.zeros((sims, models, techniques, n))
        tech = base + sd * standard_noise(noise, rng, base.shape, skew)
    flat = (sims * m, n)
    no = np.zeros(flat, bool)
    r = decide_paths(base.reshape(flat), tech.reshape(flat), no, no, plan, 0.1, level)
    wrong = ((r["code"] == 2) | (r["code"] == 3)).reshape(sims, m)
    return {"any_wrong": float(wrong.any(axis=1).mean()), "row_wrong": float(wrong.mean()), "level": level}


__all__ = [
    "CALIBRATION_SHAPES",
    "DECISIONS",
    "DIVERGENCE_SHARE",
    "PAPER",
    "QUICK",
    "Outcome",
    "Pair",
    "Plan",
    "accuracy_nominal",
    "decide_comparison",
    "decide_differences",
    "decide_paths",
    "decide_table",
    "detectable_difference",
    "divergence_bounds",
    "imbalance_p",
    "nominal_level",
    "seeds_to_decide",
    "sign_flip_floor",
    "simulate",
    "simulate_table",
    "standard_noise",
    "table_levels",
]
