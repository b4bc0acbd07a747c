"""The rule on many simulated comparisons, or whole tables, at once: how the tests measure its error
rates and power (docs/decision-rule.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from reslab.study.calibration import standard_noise
from reslab.study.plan import Plan
from reslab.study.rule import CODES, decide_paths
from reslab.study.stepdown import decide_table_paths


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
    base_acc: float = 0.9,
    fail_at_chance: bool = False,
) -> dict[str, float]:
    """Outcome rates of the rule on ``sims`` simulated comparisons of ``plan.max_seeds`` seeds:
    baseline accuracy ``base_acc`` + N(0, 0.5 pp), technique = baseline + true_diff + sd * noise;
    each run fails independently (technique with ``p_div``, baseline with ``p_div_base``): it
    diverges, or with ``fail_at_chance`` finishes at chance accuracy. Keys: the four decisions,
    ``mean_seeds``, ``any_div`` (some technique-only failure exists), ``eq_or_better_div``
    (equivalent or better although the technique failed where baseline did not),
    ``worse_given_div`` (the fraction of comparisons with such a failure that end ``worse``),
    ``nothing`` (not decided because baseline did not clearly learn) and ``bound_missed``
    (equivalent or better with a stated failure-rate bound below the true rate ``p_div``)."""
    rng = np.random.default_rng(seed)
    shape = (sims, plan.max_seeds)
    base = base_acc + 0.005 * rng.standard_normal(shape)
    tech = base + true_diff + sd * standard_noise(noise, rng, shape, skew)
    tdiv, bdiv = rng.random(shape) < p_div, rng.random(shape) < p_div_base
    if fail_at_chance:  # finished, at chance accuracy: failed by the rule's reading, not by a flag
        ok = np.ones(shape, bool)
        r = decide_paths(np.where(bdiv, chance, base), np.where(tdiv, chance, tech), ~ok, ~ok, plan, chance, level)
    else:
        r = decide_paths(np.where(bdiv, np.nan, base), np.where(tdiv, np.nan, tech), bdiv, tdiv, plan, chance, level)
    out = {name: float(np.mean(r["code"] == c)) for c, name in CODES.items()}
    out["nothing"] = float(np.mean(r["nothing"]))
    out["bound_missed"] = float(np.mean(((r["code"] == 1) | (r["code"] == 2)) & (r["fail_bound"] < p_div)))
    out["mean_seeds"] = float(np.mean(np.where(r["code"] > 0, r["n"], plan.max_seeds)))
    out["any_div"] = float(np.mean(r["fail_tech"] > 0))
    out["eq_or_better_div"] = float(np.mean((r["fail_tech"] > 0) & ((r["code"] == 1) | (r["code"] == 2))))
    div = r["fail_tech"] > 0
    out["worse_given_div"] = float(np.mean(r["code"][div] == 3)) if div.any() else math.nan
    out["sims"] = float(sims)
    return out


def wrong_calls(code: np.ndarray, diffs: np.ndarray, margin: float, tech_fails_more: np.ndarray) -> np.ndarray:
    """Which decisions are wrong for true differences ``diffs`` (per row, broadcast): better when the
    difference is at most 0, worse when at least 0, equivalent when at least the margin away. Where
    the technique fails more often than baseline, worse is right and better is wrong; an equivalent
    stays a statement about the finished runs' accuracy (it cannot exclude a failure rate its seeds
    never showed, so it is wrong there only by its accuracy)."""
    better, worse, equiv = code == 2, code == 3, code == 1
    far = np.abs(diffs) >= margin
    by_acc = (better & (diffs <= 0)) | (worse & (diffs >= 0)) | (equiv & far)
    return np.where(tech_fails_more, better | (equiv & far), by_acc)


def simulate_table(
    plan: Plan,
    diffs: Sequence[float],
    sims: int,
    seed: int,
    sd: float | Sequence[float] = 0.004,
    rows_per_model: int | None = None,
    base_sd: float = 0.004,
    noise: str = "normal",
    skew: float = 1.0,
    error_rate: str = "table",
    p_div: float | Sequence[float] = 0.0,
    p_div_base: float = 0.0,
    ties: Sequence[bool] = (),
    chance: float = 0.1,
    alpha: float | None = None,
    base_acc: float | Sequence[float] = 0.9,
) -> dict[str, Any]:
    """Rates of the rule on ``sims`` simulated tables, one row per entry of ``diffs`` (true
    differences technique - baseline, accuracy fractions). Per seed, baseline is ``0.9 + base_sd *
    noise``, shared by the ``rows_per_model`` rows of a model (default: all rows share one baseline);
    each technique is ``0.9 + diff + sd * noise`` (so the rows of a model are correlated through
    baseline). A row marked in ``ties`` has no spread (every seed's difference equal). Runs diverge
    independently (the technique with ``p_div``, per row or one for all; baseline with
    ``p_div_base``). ``alpha``: the table's error rate (default the plan's). ``base_acc``:
    baseline's mean accuracy instead of 0.9, one for all or one per model. Keys: ``any_wrong``
    (some row wrong), ``row_wrong``, ``decided`` (rows decided, mean per table), ``rates`` (per row:
    fractions equivalent, better, worse), ``decided_rows`` (per row, the fraction decided), ``mean_seeds``."""
    rng = np.random.default_rng(seed)
    r, n = len(diffs), plan.max_seeds
    per = rows_per_model or r
    models = -(-r // per)
    sds = np.broadcast_to(np.asarray(sd, float), (r,))
    dv = np.asarray(diffs, float)
    level = np.broadcast_to(np.asarray(base_acc, float), (models,))
    base_m = level[None, :, None] + base_sd * standard_noise(noise, rng, (sims, models, n), skew)
    base = np.repeat(base_m, per, axis=1)[:, :r, :]
    row_level = np.repeat(level, per)[:r]
    eps = standard_noise(noise, rng, (sims, r, n), skew)
    tie = np.zeros(r, bool)
    tie[: len(ties)] = np.asarray(ties, bool)
    eps[:, tie, :] = 0.0
    tech = np.where(
        tie[None, :, None],
        base + dv[None, :, None],
        row_level[None, :, None] + dv[None, :, None] + sds[None, :, None] * eps,
    )
    pdiv = np.broadcast_to(np.asarray(p_div, float), (r,))
    tdiv = rng.random((sims, r, n)) < pdiv[None, :, None]
    bdiv = np.repeat(rng.random((sims, models, n)) < p_div_base, per, axis=1)[:, :r, :]
    out = decide_table_paths(
        np.where(bdiv, np.nan, base), np.where(tdiv, np.nan, tech), bdiv, tdiv, plan, chance, alpha, error_rate
    )
    code = out["code"]
    wrong = wrong_calls(code, dv[None, :], plan.margin, (pdiv > p_div_base)[None, :])
    return {
        "any_wrong": float(wrong.any(axis=1).mean()),
        "row_wrong": float(wrong.mean()),
        "decided": float((code > 0).sum(axis=1).mean()),
        "decided_rows": (code > 0).mean(axis=0),
        "rates": {k: (code == c).mean(axis=0) for c, k in ((1, "equivalent"), (2, "better"), (3, "worse"))},
        "mean_seeds": float(np.where(code > 0, out["n"], n).mean()),
        "sims": sims,
    }


__all__ = ["simulate", "simulate_table", "wrong_calls"]
