"""The decision rule for a technique against baseline, robust to skew, divergence, ties and many rows.

API
---
* :class:`Pair` ``(base, tech, base_diverged, tech_diverged)``: one seed's two runs (accuracy as a
  fraction; ``None`` with ``*_diverged=False`` means the run does not exist yet).
* :func:`decide_comparison` ``(pairs, plan, chance, level=None) -> Outcome``: replays the looks of a
  :class:`reslab.study.plan.Plan` over the pairs in seed order and returns the first decision, or
  ``undecided`` (``next_look`` says which look comes next, ``None`` when the plan is spent).
  :func:`decide_differences` is the same for bare differences (no divergence, no chance level).
* :func:`decide_table` decides every row of a table together, sharing alpha by the step-down of
  :mod:`reslab.study.stepdown` (table-wide), or each row at alpha (``error_rate="row"``).
* :func:`decide_paths`: one comparison's rule on many simulated comparisons at once, vectorised;
  :func:`reslab.study.stepdown.decide_table_paths` is the same for whole tables
  (:mod:`reslab.study.simulation` uses both to measure the rule's error rates).

The parts live beside it: the plan (:mod:`reslab.study.plan`), the table's step-down
(:mod:`reslab.study.stepdown`), the calibrated per-look levels (:mod:`reslab.study.calibration`),
the divergence test (:mod:`reslab.study.divergence`) and the planning figures
(:mod:`reslab.study.planning`).

Method (docs/decision-rule.md has the measurements)
---------------------------------------------------
A seed where either run *failed* (diverged, i.e. a non-finite loss, or finished at chance level
while the model can learn) gives no accuracy difference. On the seeds where both runs finished, the
differences ``d = tech - base`` give at every look a repeated confidence interval
``mean +- t_{1 - a/2, n - 1} sd / sqrt(n)`` with one nominal level ``a`` for all looks (Pocock's
constant level on the t scale). ``a`` is calibrated by simulation so that the smallest two-sided
p-value over the looks falls below ``a`` with probability at most the row's share of alpha under
normal differences and differences with skewness 1 and 2 (standardised gammas, the least favourable
shapes measured); heavy symmetric tails (t(3)) and unequal spreads only make the t interval
conservative. Equivalence reads two one-sided bounds, calibrated the same way on each tail.

* ``better``: interval above 0; ``worse``: below 0; ``equivalent``: both one-sided bounds inside
  ``(-margin, +margin)`` (the rows of a table share alpha as :mod:`reslab.study.stepdown` says).
* A technique that failed on a seed where baseline did not (on any seed that exists, also beyond
  the deciding look) is never ``equivalent`` or ``better``. It is ``worse`` when the imbalance of
  failures (seeds where only it failed minus seeds where only baseline failed) crosses an exact
  sequential bound (:func:`reslab.study.divergence.divergence_bounds`), which gets :data:`DIVERGENCE_SHARE` of the row's
  error rate; the accuracy interval gets the rest.
* Zero spread (all differences equal, e.g. all runs predict one class) decides nothing, and so do
  fewer than :data:`MIN_PAIRS` finished pairs.
* Nothing learned, nothing decided: when baseline's mean accuracy over its finished runs of a look
  ends within :data:`reslab.study.stepdown.LEARNED_MIN` (5 pp) of chance, or every baseline run
  failed, the row is not decided, at that look or later: "nothing was learned".
* Every row carries the exact one-sided 95% Clopper-Pearson bound on the technique's failure rate
  (``fail_bound``): an ``equivalent`` row with 0 failures in 6 seeds still allows a failure rate up
  to 39%, and says so.

A wrong accuracy decision needs an interval that misses the truth at some look, and a wrong
``worse`` from the divergence test needs its bound crossed under its null, so a row errs with
probability at most its level under the shapes above, however the looks end; the tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from reslab.study.divergence import imbalance_p
from reslab.study.plan import DECISIONS, DIVERGENCE_SHARE, PAPER, QUICK, Plan
from reslab.study.stepdown import CHANCE_TOL, LEARNED_MIN, MIN_PAIRS, decide_table_paths

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
    nominal: float  # two-sided level of the interval read
    level: float  # the share of alpha this row was judged at
    basis: str = "accuracy"  # "accuracy" (finished pairs) or "divergence" (the imbalance of failures)
    tech_failed: int = 0  # the technique's failed runs (diverged or at chance), of all `seeds`
    fail_bound: float = math.nan  # one-sided 95% Clopper-Pearson bound on its failure rate from them
    base_mean: float | None = None  # baseline's mean accuracy over its finished runs of the look


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
    """The rule on ``S`` single comparisons at once, each at error rate ``level`` (default
    ``plan.alpha``): arrays ``(S, N)`` of accuracies and divergence flags for the ``N`` seeds that
    exist (in seed order). Returns arrays of length ``S`` with the keys of
    :func:`reslab.study.stepdown.decide_table_paths`."""

    def rows(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a.reshape(a.shape[0], 1, a.shape[1])

    out = decide_table_paths(
        rows(base), rows(tech), rows(base_div), rows(tech_div), plan, chance, level, "table", None, chance_tol
    )
    return {k: v[:, 0] for k, v in out.items()}


# --- one comparison ------------------------------------------------------------------------------


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _prefix(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs up to the first seed with a run that neither exists nor diverged."""
    used: list[Pair] = []
    for p in pairs:
        if (p.base is None and not p.base_diverged) or (p.tech is None and not p.tech_diverged):
            break
        used.append(p)
    return used


def _arrays(tables: Sequence[Sequence[Pair]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One table of rows of pairs as ``(1, R, N)`` arrays (nan-padded) and the seeds per row."""
    n = max([len(t) for t in tables] + [1])
    shape = (1, len(tables), n)
    base, tech = np.full(shape, np.nan), np.full(shape, np.nan)
    bdiv, tdiv = np.zeros(shape, bool), np.zeros(shape, bool)
    for i, pairs in enumerate(tables):
        for j, p in enumerate(pairs):
            base[0, i, j] = np.nan if p.base is None else p.base
            tech[0, i, j] = np.nan if p.tech is None else p.tech
            bdiv[0, i, j], tdiv[0, i, j] = p.base_diverged, p.tech_diverged
    return base, tech, bdiv, tdiv, np.array([[len(t) for t in tables]])


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
    ``level``: this row's error rate (default ``plan.alpha``)."""
    used = _prefix(pairs)
    base, tech, bdiv, tdiv, avail = _arrays([used])
    r = decide_table_paths(base, tech, bdiv, tdiv, plan, chance, level, "table", avail, chance_tol)
    return _outcome({k: v[0, 0] for k, v in r.items()}, used, plan, chance)


def _outcome(r: Mapping[str, np.generic], used: Sequence[Pair], plan: Plan, chance: float | None) -> Outcome:
    """The :class:`Outcome` of one row of :func:`reslab.study.stepdown.decide_table_paths`, in words."""
    n_avail = len(used)
    code, n, nominal, level = int(r["code"]), int(r["n"]), float(r["nominal"]), float(r["level"])
    fail_t, fail_b = int(r["fail_tech"]), int(r["fail_base"])
    decision = CODES[code]
    est = None if not math.isfinite(r["estimate"]) else float(r["estimate"])
    iv = None if not math.isfinite(r["low"]) else (float(r["low"]), float(r["high"]))
    look = plan.looks.index(n) + 1 if n in plan.looks else 0
    next_look = None
    if decision == "undecided" and not r["nothing"]:
        next_look = plan.next_look(n) if n else plan.looks[0]
    true_div = sum(p.tech_diverged and not p.base_diverged for p in used)
    failed = "diverged" if true_div == fail_t else "diverged or stayed at chance level"
    notes = [f"baseline failed in {fail_b} of {n_avail} seeds where the technique did not"] if fail_b else []
    where = f"at {n} seeds" if n else f"with {n_avail} seeds"
    base_mean = None if not math.isfinite(r["base_mean"]) else float(r["base_mean"])
    if r["nothing"] and base_mean is None:
        what = "diverged" if chance is None else "diverged or stayed at chance level"
        reason = f"nothing was learned: every baseline run {what}; no decision"
    elif r["nothing"]:
        reason = (
            f"nothing was learned: baseline's mean accuracy {100 * base_mean:.1f}% ended within "
            f"{100 * LEARNED_MIN:.0f} pp of chance ({100 * (chance or 0):.1f}%), so no row of this model is decided"
        )
    elif r["basis"]:
        bt, bb = int(r["fail_tech_look"]), int(r["fail_base_look"])
        p_imb = imbalance_p(bt - bb, n)
        reason = (
            f"worse {where}: {failed} in {bt} of {n} seeds where baseline did not (baseline in {bb} where the "
            f"technique did not); when both fail equally often an imbalance this large has probability at most "
            f"{p_imb:.2g} (exact test, {DIVERGENCE_SHARE:.0%} of the row's share)"
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
        what = "bounds" if decision == "equivalent" else "interval"
        reason = (
            f"{decision} {where}: difference {_pp(est)} pp, {what} [{_pp(iv[0])}, {_pp(iv[1])}] pp "
            f"(two-sided level {nominal:.2g}, judged at {level:.2g} of the error rate)"
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
    return Outcome(
        decision,
        n,
        est,
        iv,
        fail_t,
        fail_b,
        n_avail,
        reason,
        look,
        next_look,
        nominal,
        level,
        basis,
        tech_failed=int(r["tech_failed"]),
        fail_bound=float(r["fail_bound"]),
        base_mean=base_mean,
    )


def decide_differences(diffs: Sequence[float], plan: Plan, level: float | None = None) -> Outcome:
    """:func:`decide_comparison` for bare differences technique - baseline (nothing diverged)."""
    return decide_comparison([Pair(0.0, float(x)) for x in diffs], plan, None, level)


def decide_table(
    rows: Mapping[Hashable, tuple[Sequence[Pair], float | None]], plan: Plan, error_rate: str = "table"
) -> dict[Hashable, Outcome]:
    """Every comparison of a table (``key -> (pairs, chance)``), deciding the rows together so that
    the chance of any wrong row is at most ``plan.alpha`` (``"table"``, the step-down of
    :mod:`reslab.study.stepdown`), or each row's at most alpha (``"row"``)."""
    if not rows:
        return {}
    keys = list(rows)
    used = [_prefix(rows[k][0]) for k in keys]
    chances = [rows[k][1] for k in keys]
    base, tech, bdiv, tdiv, avail = _arrays(used)
    r = decide_table_paths(base, tech, bdiv, tdiv, plan, chances, None, error_rate, avail)
    return {k: _outcome({n: v[0, i] for n, v in r.items()}, used[i], plan, chances[i]) for i, k in enumerate(keys)}


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
