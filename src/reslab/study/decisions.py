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
from scipy import stats as sps

from reslab.engine.timing import step_ratio
from reslab.errors import UsageError
from reslab.study import stats
from reslab.study.curve import epochs_to_target
from reslab.study.plan import ERROR_RATES, Plan
from reslab.study.planning import detectable_difference, seeds_to_decide
from reslab.study.regime import Regime
from reslab.study.results import BASELINE, Cell, RunData
from reslab.study.rule import CHANCE_TOL, Outcome, Pair, decide_table
from reslab.study.stepdown import LEARNED_MIN, failure_bound, seeds_for_failure_bound

#: default plan for a grid run with fixed seeds: one look at whatever seeds it has
FIXED_ALPHA = 0.05
FIXED_MARGIN = 0.005
#: the failure-rate bound a report names the seeds for ("29 seeds bring it to 10%")
FAILURE_TARGET = 0.10
#: "auto" target: this fraction of baseline's mean final validation accuracy, per model (low
#: enough that baseline reaches it before its last evaluation in most seeds)
AUTO_TARGET_FRACTION = 0.95


@dataclass
class Decision:
    """One row of the decision table: the rule's :class:`reslab.study.rule.Outcome` and what the
    report shows beside it. Every section of the report reads a technique's accuracy from here."""

    model: str
    technique: str
    decision: str  # better | worse | equivalent | undecided
    why_open: str  # for undecided: "max seeds", "budget or interrupted", "too few seeds", "nothing learned", ""
    outcome: Outcome | None
    seeds: int  # seeds of the look that decided (or of the last look taken)
    trained: int  # paired seeds that exist (runs beyond a decided look included)
    max_seeds: int
    nominal: float  # two-sided level of each look's accuracy interval
    margin: float
    alpha: float
    level: float  # the share of alpha this row was judged at (a table's rows share alpha by the step-down)
    error_rate: str  # "table" or "row"
    sequential: bool
    diverged: int  # seeds where the technique failed and baseline did not (all that exist)
    base_diverged: int  # seeds where baseline failed and the technique did not
    estimate: float  # mean difference technique - baseline over the finished pairs of the look
    low: float
    high: float
    pairs: int  # finished pairs (both runs learned) of the look
    sd: float  # their spread
    detectable: float  # smallest difference one look at these pairs detects with 80% power
    p_better: stats.Interval | None
    seeds_needed: int | None
    params_ratio: float
    flops_ratio: float
    step: tuple[float, float, float] | None
    convergence: dict[str, Any] = field(default_factory=dict)
    recommendation: str = ""
    #: how its failures are named: "diverged", or "diverged or stayed at chance level" when some did not diverge
    failure_word: str = "diverged"
    #: how far the model's training went (None when the report measured no regime)
    regime: Regime | None = None
    #: the looks of the plan (1: the seeds are read once)
    looks: int = 1
    #: the technique's failed runs (diverged or at chance) of the `trained` seeds, and the one-sided
    #: 95% Clopper-Pearson bound on its failure rate from them (what "equivalent" does not exclude)
    tech_failed: int = 0
    fail_bound: float = math.nan
    #: baseline's mean accuracy over its finished runs of the look, and the model's chance accuracy
    base_acc: float = math.nan
    chance: float | None = None

    @property
    def seeds_for_bound(self) -> int | None:
        """Seeds that bring the failure-rate bound to 10% if no further run fails (None when it is there)."""
        if not math.isfinite(self.fail_bound) or self.fail_bound <= FAILURE_TARGET or not self.trained:
            return None
        return seeds_for_failure_bound(self.tech_failed, self.trained, FAILURE_TARGET)

    @property
    def reason(self) -> str:
        return self.outcome.reason if self.outcome else f"too few paired seeds ({self.trained}) for a decision"

    @property
    def divergence_words(self) -> str:
        """'diverged in k of n seeds' (where baseline did not), or '' when it never did."""
        if not self.diverged:
            return ""
        return f"{self.failure_word} in {self.diverged} of {self.trained} seeds where baseline did not"


def seed_pairs(
    status: dict[Cell, str], values: dict[Cell, float], model: str, technique: str, seeds: Sequence[int]
) -> list[Pair]:
    """One :class:`Pair` per seed, in ``seeds`` order: a completed run's outcome, a diverged run as
    diverged, anything else as not there yet (the rule reads the prefix of seeds before it)."""

    def side(c: Cell) -> tuple[float | None, bool]:
        st = status.get(c)
        if st == "diverged":
            return None, True
        if st == "completed" and c in values:
            return values[c], False
        return None, False

    out = []
    for s in seeds:
        (b, bd), (t, td) = side(Cell(model, BASELINE, s)), side(Cell(model, technique, s))
        out.append(Pair(b, t, bd, td))
    return out


def error_rate_of(grid: dict[str, Any] | None) -> str:
    """The grid's error rate ("table" unless it recorded "row"; grids older than the field: "table")."""
    er = (grid or {}).get("error_rate") or "table"
    if er not in ERROR_RATES:
        raise UsageError(f"grid.json has error_rate {er!r}; it must be one of {', '.join(ERROR_RATES)}")
    return str(er)


def chance_of(summaries: Sequence[dict[str, Any]]) -> float | None:
    """The model's chance accuracy as its runs recorded it (None when none did)."""
    vals = [float(v) for s in summaries if isinstance(v := s.get("chance_acc"), (int, float)) and math.isfinite(v)]
    return float(np.median(vals)) if vals else None


def table_outcomes(
    plan: Plan,
    error_rate: str,
    seeds: Sequence[int],
    status: dict[Cell, str],
    values: dict[Cell, float],
    models: Sequence[str],
    techniques: Sequence[str],
    chances: dict[str, float | None],
) -> dict[tuple[str, str], Outcome]:
    """Where every comparison of a table stands, decided together (:func:`reslab.study.rule.decide_table`:
    the rows share alpha by the step-down when ``error_rate`` is "table")."""
    rows = {
        (m, t): (seed_pairs(status, values, m, t, seeds), chances.get(m))
        for m in models
        for t in techniques
        if t != BASELINE
    }
    return decide_table(rows, plan, error_rate)  # type: ignore[return-value]


def open_cells(outs: dict[tuple[str, str], Outcome], seeds: Sequence[int]) -> set[Cell]:
    """The cells the next look of every still-open comparison of :func:`table_outcomes` needs: its
    seeds up to that look, and baseline's. Decided comparisons (and those undecided after the last
    look, or where nothing was learned) need nothing more. Used by compare (what to train) and
    report (what is missing)."""
    need: set[Cell] = set()
    for (m, t), out in outs.items():
        if out.next_look is None:
            continue
        need |= {Cell(m, tt, s) for s in seeds[: out.next_look] for tt in (t, BASELINE)}
    return need


def margin_of(grid: dict[str, Any] | None) -> float:
    """The equivalence margin of a grid's decisions (its sequential plan's, else the fixed one)."""
    seq = (grid or {}).get("sequential")
    return float(seq["margin"]) if isinstance(seq, dict) and "margin" in seq else FIXED_MARGIN


def auto_target(runs: dict[Cell, RunData], model: str) -> float:
    """95% of baseline's mean validation accuracy at the end of training on ``model`` (nan
    without baseline runs)."""
    finals = [
        float(r.metrics[-1]["val_acc"])
        for c, r in runs.items()
        if c.model == model and c.technique == BASELINE and r.status == "completed" and r.metrics
    ]
    return AUTO_TARGET_FRACTION * float(np.mean(finals)) if finals else math.nan


def _plan(grid: dict[str, Any] | None, n: int) -> tuple[Plan | None, bool]:
    seq = (grid or {}).get("sequential")
    if seq:
        return Plan(**seq), True
    if n < 2:
        return None, False
    return Plan(min_seeds=n, max_seeds=n, alpha=FIXED_ALPHA, margin=FIXED_MARGIN), False


def _available(pairs: Sequence[Pair]) -> int:
    """Seeds before the first one where either run has no outcome yet."""
    n = 0
    for p in pairs:
        if (p.base is None and not p.base_diverged) or (p.tech is None and not p.tech_diverged):
            break
        n += 1
    return n


def _failed(acc: float | None, diverged: bool, chance: float | None) -> bool:
    """A run that diverged, has no finite accuracy, or ended within CHANCE_TOL of chance."""
    return diverged or acc is None or not math.isfinite(acc) or (chance is not None and acc <= chance + CHANCE_TOL)


def finished_diffs(pairs: Sequence[Pair], chance: float | None) -> list[float]:
    """Differences technique - baseline on the seeds where both runs finished and learned (the
    seeds the rule's accuracy interval is built from)."""
    return [
        float(p.tech) - float(p.base)  # type: ignore[arg-type]
        for p in pairs
        if not _failed(p.base, p.base_diverged, chance) and not _failed(p.tech, p.tech_diverged, chance)
    ]


def decide(
    grid: dict[str, Any] | None,
    runs: dict[Cell, RunData],
    timing: dict[str, Any],
    targets: dict[str, float],
    regimes: dict[str, Regime] | None = None,
) -> list[Decision]:
    """A decision for every model x technique (baseline excluded) found in ``grid``/``runs``, each at
    the error rate the grid asks for (table-wide by default: the rows share alpha by the step-down). With
    ``regimes`` (:func:`reslab.study.regime.regimes`), each row and its recommendation say how far
    training went."""
    models = list(dict.fromkeys([*((grid or {}).get("models") or []), *(c.model for c in runs)]))
    techs = list(dict.fromkeys([*((grid or {}).get("techniques") or []), *(c.technique for c in runs)]))
    seeds = [int(s) for s in ((grid or {}).get("seeds") or sorted({c.seed for c in runs}))]
    values = {c: v for c, r in runs.items() if r.status == "completed" and (v := _test_acc(r)) is not None}
    status = {c: r.status for c, r in runs.items()}
    error_rate = error_rate_of(grid)
    chances = {m: chance_of([r.summary for c, r in runs.items() if c.model == m]) for m in models}
    pairs = {(m, t): seed_pairs(status, values, m, t, seeds) for m in models for t in techs if t != BASELINE}
    plan, sequential = _plan(grid, max([_available(p) for p in pairs.values()] + [0]))
    outs = table_outcomes(plan, error_rate, seeds, status, values, models, techs, chances) if plan else {}
    out = []
    for (m, t), ps in pairs.items():
        target, regime = targets.get(m, math.nan), (regimes or {}).get(m)
        row = (m, t, target, regime)
        out.append(
            _decide_one(runs, timing, ps, chances[m], error_rate, plan, sequential, outs.get((m, t)), seeds, row)
        )
    return out


def _test_acc(run: RunData) -> float | None:
    try:
        v = float(run.summary.get("test_acc"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _decide_one(
    runs: dict[Cell, RunData],
    timing: dict[str, Any],
    pairs: list[Pair],
    chance: float | None,
    error_rate: str,
    plan: Plan | None,
    sequential: bool,
    out: Outcome | None,
    seeds: list[int],
    row: tuple[str, str, float, Regime | None],
) -> Decision:
    """The :class:`Decision` of one row from its :class:`Outcome` (decided with the whole table)."""
    model, tech, target, regime = row
    avail = _available(pairs)
    level = out.level if out else math.nan
    if out is not None and out.reason.startswith("nothing was learned"):
        decision, why = "undecided", "nothing learned"
    elif out is None or (out.decision == "undecided" and out.n_used == 0):
        decision, why = "undecided", "too few seeds"
    elif out.decision != "undecided":
        decision, why = out.decision, ""
    elif out.next_look is not None:
        decision, why = "undecided", "budget or interrupted"
    else:
        decision, why = "undecided", "max seeds"
    n = out.n_used if out and out.n_used else avail
    diffs = finished_diffs(pairs[:n], chance)
    tech_failed = sum(_failed(p.tech, p.tech_diverged, chance) for p in pairs[:avail])
    sd = float(np.std(diffs, ddof=1)) if len(diffs) >= 2 else math.nan
    low, high = out.interval if out and out.interval else (math.nan, math.nan)
    estimate = out.estimate if out and out.estimate is not None else (float(np.mean(diffs)) if diffs else math.nan)
    mine = [runs[Cell(model, tech, s)] for s in seeds[:avail] if Cell(model, tech, s) in runs]
    base = [runs[Cell(model, BASELINE, s)] for s in seeds[:avail] if Cell(model, BASELINE, s) in runs]
    open_ = decision == "undecided" and why in ("max seeds", "budget or interrupted")
    d = Decision(
        model=model,
        technique=tech,
        decision=decision,
        why_open=why,
        outcome=out,
        seeds=n,
        trained=avail,
        max_seeds=plan.max_seeds if plan else avail,
        nominal=out.nominal if out else math.nan,
        margin=plan.margin if plan else FIXED_MARGIN,
        alpha=plan.alpha if plan else FIXED_ALPHA,
        level=level,
        error_rate=error_rate,
        sequential=sequential,
        diverged=out.diverged_tech if out else 0,
        base_diverged=out.diverged_base if out else 0,
        estimate=estimate,
        low=low,
        high=high,
        pairs=len(diffs),
        sd=sd,
        detectable=detectable_difference(sd, len(diffs), plan, level) if plan and len(diffs) >= 2 else math.nan,
        p_better=stats.prob_improvement(diffs) if diffs else None,
        seeds_needed=seeds_to_decide(estimate, sd, plan, avail, level) if (plan and open_) else None,
        params_ratio=_ratio(mine, base, "params"),
        flops_ratio=_ratio(mine, base, "flops"),
        step=step_ratio(timing, model, tech),
        regime=regime,
        looks=len(plan.looks) if plan else 1,
        tech_failed=tech_failed,
        fail_bound=float(failure_bound(tech_failed, avail)),
        base_acc=out.base_mean if out and out.base_mean is not None else math.nan,
        chance=chance,
    )
    true_div = sum(p.tech_diverged and not p.base_diverged for p in pairs[:avail])
    d.failure_word = "diverged" if true_div == d.diverged else "diverged or stayed at chance level"
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
        half = float(sps.t.ppf(1 - d.nominal / 2, len(both) - 1)) * sd / math.sqrt(len(both))
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


def interval_pp(low: float, high: float) -> str:
    """``[low, high]`` in pp; an interval wider than any accuracy difference can be says so instead."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "(no interval)"
    if low < -1.0 or high > 1.0:
        return "(interval wider than the possible range: it says nothing yet)"
    return f"[{pp(low)}, {pp(high)}]"


def interval_ratio(low: float, high: float) -> str:
    """``[low, high]`` of a speed-up; one spanning more than a factor of 1000 either way says so instead."""
    if not (math.isfinite(low) and math.isfinite(high)) or low < 1e-3 or high > 1e3:
        return "(interval unbounded: it says nothing yet)"
    return f"[{low:.2f}, {high:.2f}]"


def situation(d: Decision) -> str:
    """What a row calls for, as one of :data:`SITUATIONS`: the one place that reads a decision for
    advice, so the report's short advice (:func:`reslab.report.sections.advice`) and
    decisions.json's recommendation (:func:`recommend`) cannot disagree."""
    early = d.regime is not None and d.regime.early
    if d.why_open == "nothing learned":
        return "nothing learned"
    if d.decision == "worse" and d.outcome is not None and d.outcome.basis == "divergence":
        return "fails"
    if d.decision == "better":
        return "faster" if early else "better"
    if d.decision == "worse":
        return "slower" if early else "worse"
    if d.decision == "equivalent":
        return "keep baseline" if d.step is not None and d.step[0] > 1.02 else "either"
    if d.why_open == "too few seeds":
        return "too few seeds"
    if d.why_open == "budget or interrupted":
        return "stopped"
    if d.outcome is not None and "ties decide nothing" in d.outcome.reason:
        return "ties"
    return "more seeds" if d.seeds_needed else "unsettled"


#: every value :func:`situation` returns
SITUATIONS = (
    "nothing learned", "fails", "faster", "better", "slower", "worse", "keep baseline", "either",
    "too few seeds", "stopped", "ties", "more seeds", "unsettled",
)  # fmt: skip


def recommend(d: Decision) -> str:
    """One line a user can act on, claiming no more than the decision supports, with its numbers."""
    cost = f"{100 * (d.step[0] - 1):+.0f}% time per training step" if d.step is not None else ""
    div = d.divergence_words
    bounded = math.isfinite(d.low) and -1.0 <= d.low and d.high <= 1.0
    span = f"lies between {pp(d.low)} and {pp(d.high)} pp" if bounded else "is not bounded yet"
    r = d.regime
    early = r is not None and r.early
    after = f"after {r.length}" if r is not None else "at the end of training"
    m = f"{100 * d.margin:.2g}"
    when = f" {after}" + (" (early training: says nothing yet about full training)" if early else "")
    lead = f"Not equivalent or better: it {div}. " if div else ""
    what = situation(d)
    if what == "nothing learned":
        return nothing_learned_words(d) + "; train longer or with a working learning rate before comparing."
    if what == "fails":
        return f"Avoid at this depth: it {div}."
    if what == "faster":
        return (
            f"Faster to learn at this depth: {after} accuracy is {pp(d.low)} to {pp(d.high)} pp higher, "
            "while baseline was still rising; confirm with longer training before adopting "
            f"({cost or 'its cost'})."
        )
    if what == "better":
        return (
            f"Adopt at this depth if {cost or 'its cost'} is worth it: accuracy {after} (flat by then) gains "
            f"{pp(d.low)} to {pp(d.high)} pp."
        )
    also = f"; it also {div}" if div else ""
    if what == "slower":
        return (
            f"Slower to learn at this depth: {after} accuracy is {pp(-d.high, False)} to {pp(-d.low, False)} pp "
            f"lower, while baseline was still rising (convergence speed, not accuracy after full training){also}."
        )
    if what == "worse":
        return (
            f"Avoid at this depth: accuracy {after} (flat by then) drops by {pp(-d.high, False)} to "
            f"{pp(-d.low, False)} pp{also}."
        )
    if what == "keep baseline":
        return f"Keep baseline: accuracy{when} equal within +-{m} pp, and the technique costs {cost}."
    if what == "either":
        return f"Either: accuracy{when} equal within +-{m} pp at about the same training cost."
    if what == "too few seeds":
        return f"{lead}No answer yet: {d.trained} paired seeds have finished, too few for a first look."
    if what == "stopped":
        return (
            f"{lead}No answer yet after {d.trained} seeds (the difference {span}): re-run the same command to "
            f"continue up to {d.max_seeds} seeds."
        )
    if what == "ties":
        return f"{lead}No answer: every paired seed gave the same difference, and ties decide nothing."
    more = (
        f"; at this spread about {d.seeds_needed} seeds would settle it"
        if d.seeds_needed
        else "; its spread is too large to settle with a practical number of seeds"
        if math.isfinite(d.sd)
        else ""
    )
    return f"{lead}No answer at {d.trained} seeds: the difference {span}{more}."


def nothing_learned_words(d: Decision) -> str:
    """Why a model's rows are not decided when its baseline did not clearly learn."""
    if not math.isfinite(d.base_acc):
        return "Nothing learned: every baseline run diverged or stayed at chance level"
    chance = f"chance {100 * d.chance:.1f}%" if d.chance is not None else "chance level"
    return (
        f"Nothing learned: baseline ended at {100 * d.base_acc:.1f}% against {chance}, within "
        f"{100 * LEARNED_MIN:.0f} pp of it, so no row of this model is decided"
    )


__all__ = [
    "Decision",
    "auto_target",
    "chance_of",
    "convergence",
    "decide",
    "error_rate_of",
    "finished_diffs",
    "interval_pp",
    "interval_ratio",
    "margin_of",
    "nothing_learned_words",
    "open_cells",
    "recommend",
    "seed_pairs",
    "table_outcomes",
]
