"""The bottom line of a comparison: per model and technique, a decision a user can act on.

Reads nothing from disk itself: :mod:`reslab.report` hands it the runs of a results folder
(:mod:`reslab.study.results`), the timing pass and the init probe, and renders what comes back.
Every figure here carries its interval, the number of seeds and the method that made it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reslab.engine.timing import step_ratio
from reslab.study import stats
from reslab.study.results import BASELINE, Cell, RunData, run_value
from reslab.study.sequential import Look, Plan, critical_t, run_to_decision, seeds_to_decide

#: default plan for a grid run with fixed seeds: one look at whatever seeds it has
FIXED_ALPHA = 0.05
FIXED_MARGIN = 0.005
#: "auto" target: this fraction of baseline's mean final validation accuracy, per model (low
#: enough that baseline reaches it before its last evaluation in most seeds)
AUTO_TARGET_FRACTION = 0.95


@dataclass
class Decision:
    """One row of the decision table."""

    model: str
    technique: str
    decision: str  # better | worse | equivalent | undecided
    why_open: str  # for undecided: "max seeds", "budget or interrupted", "too few seeds", ""
    look: Look | None
    seeds: int
    max_seeds: int
    nominal: float
    margin: float
    alpha: float
    sequential: bool
    diverged: int
    p_better: stats.Interval | None
    seeds_needed: int | None
    params_ratio: float
    flops_ratio: float
    step: tuple[float, float, float] | None
    convergence: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""


def paired_diffs(values: dict[Cell, float], model: str, technique: str, seeds: Sequence[int]) -> list[float]:
    """Differences technique - baseline, seed by seed in ``seeds`` order, up to the first seed
    missing on either side (a look uses a prefix of the seeds, never a selection)."""
    out = []
    for s in seeds:
        a, b = values.get(Cell(model, technique, s)), values.get(Cell(model, BASELINE, s))
        if a is None or b is None:
            break
        out.append(a - b)
    return out


def open_cells(
    plan: Plan, seeds: Sequence[int], values: dict[Cell, float], model: str, techniques: Sequence[str]
) -> set[Cell]:
    """The cells the next look of every still-open comparison on ``model`` needs: its seeds up to
    that look, and baseline's. Decided comparisons (and those undecided after the last look)
    need nothing more. Used by compare (what to train) and report (what is missing)."""
    need: set[Cell] = set()
    for t in techniques:
        if t == BASELINE:
            continue
        looks = run_to_decision(paired_diffs(values, model, t, seeds), plan)
        if looks and looks[-1].decision != "continue":
            continue
        n = plan.next_look(looks[-1].n) if looks else plan.looks[0]
        need |= {Cell(model, tt, s) for s in seeds[: n or 0] for tt in (t, BASELINE)}
    return need


def auto_target(runs: dict[Cell, RunData], model: str) -> float:
    """95% of baseline's mean final validation accuracy on ``model`` (nan without baseline runs)."""
    finals = [
        float(r.metrics[-1]["val_acc"])
        for c, r in runs.items()
        if c.model == model and c.technique == BASELINE and r.status == "completed" and r.metrics
    ]
    return AUTO_TARGET_FRACTION * float(np.mean(finals)) if finals else math.nan


def epochs_to_target(run: RunData, target: float) -> float:
    """Epoch at which validation accuracy first reaches ``target``, interpolated linearly between
    the evaluations around the crossing (the curve starts at chance level at epoch 0), so the
    figure is continuous rather than a multiple of the evaluation interval; inf when never
    reached or the run did not complete."""
    if run.status != "completed":
        return math.inf
    curve = run.evals or [{"epoch": m.get("epoch"), "val_acc": m.get("val_acc")} for m in run.metrics]
    chance = run.summary.get("chance_acc")
    prev_e, prev_a = 0.0, float(chance) if isinstance(chance, (int, float)) else 0.0
    for row in curve:
        try:
            e, acc = float(row["epoch"]), float(row["val_acc"])
        except (KeyError, TypeError, ValueError):
            continue
        if acc >= target:
            if prev_a >= target or acc == prev_a:
                return e
            return prev_e + (target - prev_a) / (acc - prev_a) * (e - prev_e)
        prev_e, prev_a = e, acc
    return math.inf


def _plan(grid: dict[str, Any] | None, n: int) -> tuple[Plan | None, bool]:
    seq = (grid or {}).get("sequential")
    if seq:
        return Plan(**seq), True
    if n < 2:
        return None, False
    return Plan(min_seeds=n, max_seeds=n, alpha=FIXED_ALPHA, margin=FIXED_MARGIN), False


def decide(
    grid: dict[str, Any] | None,
    runs: dict[Cell, RunData],
    timing: dict[str, Any],
    targets: dict[str, float],
) -> list[Decision]:
    """A decision for every model x technique (baseline excluded) found in ``grid``/``runs``."""
    models = list(dict.fromkeys([*((grid or {}).get("models") or []), *(c.model for c in runs)]))
    techs = list(dict.fromkeys([*((grid or {}).get("techniques") or []), *(c.technique for c in runs)]))
    seeds = [int(s) for s in ((grid or {}).get("seeds") or sorted({c.seed for c in runs}))]
    values = {c: v for c, r in runs.items() if (v := run_value(r)) is not None}
    out = []
    for m in models:
        for t in techs:
            if t == BASELINE:
                continue
            out.append(_decide_one(grid, runs, timing, values, seeds, m, t, targets.get(m, math.nan)))
    return out


def _decide_one(
    grid: dict[str, Any] | None,
    runs: dict[Cell, RunData],
    timing: dict[str, Any],
    values: dict[Cell, float],
    seeds: list[int],
    model: str,
    tech: str,
    target: float,
) -> Decision:
    diffs = paired_diffs(values, model, tech, seeds)
    plan, sequential = _plan(grid, len(diffs))
    looks = run_to_decision(diffs, plan) if plan else []
    last = looks[-1] if looks else None
    if last is None:
        decision, why = "undecided", "too few seeds"
    elif last.decision == "continue":
        decision, why = "undecided", "budget or interrupted"
    elif last.decision == "undecided":
        decision, why = "undecided", "max seeds"
    else:
        decision, why = last.decision, ""
    n = last.n if last else len(diffs)
    used = diffs[:n]
    mine = [runs[Cell(model, tech, s)] for s in seeds[:n] if Cell(model, tech, s) in runs]
    base = [runs[Cell(model, BASELINE, s)] for s in seeds[:n] if Cell(model, BASELINE, s) in runs]
    p_better = stats.prob_improvement(used) if len(used) >= 1 else None
    d = Decision(
        model=model,
        technique=tech,
        decision=decision,
        why_open=why,
        look=last,
        seeds=n,
        max_seeds=plan.max_seeds if plan else n,
        nominal=plan.nominal if plan else math.nan,
        margin=plan.margin if plan else FIXED_MARGIN,
        alpha=plan.alpha if plan else FIXED_ALPHA,
        sequential=sequential,
        diverged=sum(r.status == "diverged" for r in mine),
        p_better=p_better,
        seeds_needed=seeds_to_decide(last.sd, last.mean, plan) if (last and plan and decision == "undecided") else None,
        params_ratio=_ratio(mine, base, "params"),
        flops_ratio=_ratio(mine, base, "flops"),
        step=step_ratio(timing, model, tech),
    )
    d.convergence = convergence(mine, base, target, d)
    d.recommendation = recommend(d)
    return d


def _ratio(mine: Sequence[RunData], base: Sequence[RunData], key: str) -> float:
    a = next((r.summary.get(key) for r in mine if r.summary.get(key)), None)
    b = next((r.summary.get(key) for r in base if r.summary.get(key)), None)
    return float(a) / float(b) if a and b else math.nan


def convergence(mine: Sequence[RunData], base: Sequence[RunData], target: float, d: Decision) -> dict[str, Any]:
    """Epochs to the target, paired by seed: baseline / technique as a geometric mean with an
    interval at the decision's per-look level (the same rule as the accuracy decision), over
    the seeds where both reached the target; time-to-target divides it by the step-time ratio."""
    by_seed_m = {r.cell.seed: epochs_to_target(r, target) for r in mine}
    by_seed_b = {r.cell.seed: epochs_to_target(r, target) for r in base}
    common = [s for s in by_seed_m if s in by_seed_b]
    both = [s for s in common if math.isfinite(by_seed_m[s]) and math.isfinite(by_seed_b[s])]
    out: dict[str, Any] = {
        "target": target,
        "reached": sum(math.isfinite(by_seed_m[s]) for s in common),
        "base_reached": sum(math.isfinite(by_seed_b[s]) for s in common),
        "of": len(common),
        "pairs": len(both),
        "epochs_median": _median([by_seed_m[s] for s in common]),
        "base_epochs_median": _median([by_seed_b[s] for s in common]),
        "speedup": math.nan,
        "low": math.nan,
        "high": math.nan,
        "label": "not measured",
    }
    if len(both) >= 2 and math.isfinite(d.nominal):
        logs = np.log([by_seed_b[s] / by_seed_m[s] for s in both])
        mean, sd = float(logs.mean()), float(logs.std(ddof=1))
        half = critical_t(len(both), d.nominal) * sd / math.sqrt(len(both))
        out.update(speedup=math.exp(mean), low=math.exp(mean - half), high=math.exp(mean + half))
        out["label"] = "faster" if out["low"] > 1 else "slower" if out["high"] < 1 else "no difference shown"
    elif out["reached"] == 0 and out["base_reached"] > 0:
        out["label"] = "never reached the target"
    elif len(both) < 2:
        out["label"] = "too few seeds reached the target"
    return out


def _median(values: Sequence[float]) -> float:
    return stats.censored_median(values) if values else math.nan


def pp(x: float, sign: bool = True) -> str:
    return "n/a" if not math.isfinite(x) else (f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}")


def recommend(d: Decision) -> str:
    """One line a user can act on, claiming no more than the interval supports."""
    lk = d.look
    cost = ""
    if d.step is not None:
        cost = f"{100 * (d.step[0] - 1):+.0f}% time per training step"
    if d.decision == "better" and lk:
        return (
            f"Adopt at this depth if {cost or 'its cost'} is worth it: final accuracy gains "
            f"{pp(lk.low)} to {pp(lk.high)} pp."
        )
    if d.decision == "worse" and lk:
        return f"Avoid at this depth: final accuracy drops by {pp(-lk.high, False)} to {pp(-lk.low, False)} pp."
    if d.decision == "equivalent":
        m = f"{100 * d.margin:.2g}"
        if d.step is not None and d.step[0] > 1.02:
            return f"Keep baseline: accuracy equal within +-{m} pp, and the technique costs {cost}."
        return f"Either: accuracy equal within +-{m} pp at about the same training cost."
    if lk is None:
        return "No answer yet: fewer than 2 paired seeds have finished."
    more = (
        f"; at this spread about {d.seeds_needed} seeds would settle it"
        if d.seeds_needed
        else "; its spread is too large to settle with a practical number of seeds"
    )
    if d.why_open == "budget or interrupted":
        return (
            f"No answer yet after {d.seeds} seeds (difference between {pp(lk.low)} and {pp(lk.high)} pp): "
            f"re-run the same command to continue up to {d.max_seeds} seeds."
        )
    return f"No answer at {d.seeds} seeds: the difference lies between {pp(lk.low)} and {pp(lk.high)} pp{more}."


# -- gradient health at depth ------------------------------------------------------------


def gradient_verdict(entries: Sequence[dict[str, Any]], technique: str) -> str:
    """Depth-qualified words from probe entries (``depth``, ``width``, ``verdict``, ``grad_ratio``):
    never 'healthy' without the depths it holds for."""
    mine = sorted(
        (e for e in entries if e.get("technique") == technique),
        key=lambda e: (int(e.get("depth", 0)), float(e.get("width", 1.0))),
    )
    if not mine:
        return "not measured"
    groups: dict[str, list[str]] = {}
    for e in mine:
        w = float(e.get("width", 1.0))
        where = f"{int(e['depth'])} layers" + (f" at width {w:g}" if w != 1.0 else "")
        groups.setdefault(str(e.get("verdict")), []).append(f"{where} ({_ratio_text(e.get('grad_ratio'))})")
    return "; ".join(f"{label} at {', '.join(v)}" for label, v in groups.items())


def _ratio_text(v: Any) -> str:
    if v in ("inf", None):
        return "ratio inf" if v == "inf" else "ratio n/a"
    try:
        return f"ratio {float(v):.3g}"
    except (TypeError, ValueError):
        return "ratio n/a"


__all__ = [
    "Decision",
    "auto_target",
    "convergence",
    "decide",
    "epochs_to_target",
    "gradient_verdict",
    "open_cells",
    "paired_diffs",
    "recommend",
]
