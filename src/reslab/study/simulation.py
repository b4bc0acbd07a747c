"""The rule on many simulated comparisons, or whole tables, at once: how the tests measure its error
rates and power (docs/decision-rule.md)."""

from __future__ import annotations

import math

import numpy as np

from reslab.study.calibration import standard_noise
from reslab.study.plan import Plan, table_levels
from reslab.study.rule import CODES, decide_paths


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
    out = {name: float(np.mean(r["code"] == c)) for c, name in CODES.items()}
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


__all__ = ["simulate", "simulate_table"]
