"""The decision rule for a technique against baseline, robust to skew, divergence, ties and many rows.

API
---
* :class:`Pair` ``(base, tech, base_diverged, tech_diverged)``: one seed's two runs (accuracy as a
  fraction; ``None`` with ``*_diverged=False`` means the run does not exist yet).
* :func:`decide_comparison` ``(pairs, plan, chance, level=None) -> Outcome``: replays the looks of a
  :class:`reslab.study.plan.Plan` over the pairs in seed order and returns the first decision, or
  ``undecided`` (``next_look`` says which look comes next, ``None`` when the plan is spent).
  :func:`decide_differences` is the same for bare differences (no divergence, no chance level).
* :func:`decide_table` applies :func:`reslab.study.plan.table_levels` to a whole table.
* :func:`decide_paths`: the same rule on many comparisons at once, vectorised
  (:mod:`reslab.study.simulation` uses it to measure the rule's error rates).

The parts live beside it: the plan and the table's error rate (:mod:`reslab.study.plan`), the
calibrated per-look level (:mod:`reslab.study.calibration`), the divergence test
(:mod:`reslab.study.divergence`) and the planning figures (:mod:`reslab.study.planning`).

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
  sequential bound (:func:`reslab.study.divergence.divergence_bounds`), which gets :data:`DIVERGENCE_SHARE` of the row's
  error rate; the accuracy interval gets the rest.
* Zero spread (all differences equal, e.g. all runs predict one class) decides nothing, and so do
  fewer than :data:`MIN_PAIRS` finished pairs. If no baseline run learned anything (all at chance
  level or diverged), nothing is decided: "nothing was learned".

A wrong accuracy decision needs an interval that misses the truth at some look, and a wrong
``worse`` from the divergence test needs its bound crossed under its null, so a row errs with
probability at most its level under the shapes above, however the looks end; the tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from reslab.study.calibration import accuracy_nominal
from reslab.study.divergence import divergence_bounds, imbalance_p
from reslab.study.plan import DECISIONS, DIVERGENCE_SHARE, PAPER, QUICK, Plan, table_levels

#: fewest finished pairs an interval is formed from
MIN_PAIRS = 3
#: a run within this of chance accuracy has learned nothing (accuracy as a fraction)
CHANCE_TOL = 0.01
#: a spread below this (accuracy fraction) is zero: ties decide nothing
ZERO_SPREAD = 1e-9
#: decide_paths' codes
CODES = {0: "undecided", 1: "equivalent", 2: "better", 3: "worse"}


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


def _crit_table(n_max: int, nominal: float) -> np.ndarray:
    """t quantile ``1 - a/2`` for n = 0..n_max pairs (nan below 2)."""
    out = np.full(n_max + 1, np.nan)
    out[2:] = sps.t.ppf(1 - nominal / 2, np.arange(1, n_max))
    return out


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
    decision = CODES[code]
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


__all__ = [
    "CHANCE_TOL",
    "CODES",
    "DECISIONS",
    "PAPER",
    "QUICK",
    "Outcome",
    "Pair",
    "Plan",
    "decide_comparison",
    "decide_differences",
    "decide_paths",
    "decide_table",
]
