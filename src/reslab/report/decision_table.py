"""The report's first section, the answer: a sentence per model on how far it trained, the
decision plot and the verdict table; and its last, how to read it. The cells are short by design:
the figures behind them (probe ratios at other depths, advice, convergence) are in the per-model
details (:mod:`reslab.report.sections`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.report.aggregate import (
    as_float,
)
from reslab.report.document import Doc
from reslab.study.calibration import CALIBRATION_SHAPES
from reslab.study.decisions import FAILURE_TARGET, Decision, interval_pp, nothing_learned_words, pp
from reslab.study.regime import Regime
from reslab.study.results import FIGURES_DIR
from reslab.study.stepdown import CHANCE_TOL, FAILURE_CONFIDENCE, LEARNED_MIN
from reslab.version import __version__, source_commit

#: the verdict table's columns, the answer's first table (at most 8, so it fits one screen)
VERDICT_COLUMNS = (
    *("model", "technique", "verdict", "difference, pp [interval]"),
    *("seeds", "failures", "time/step", "gradients at init"),
)


def fmt_value(x: Any, spec: str = ".2f") -> str:
    v = as_float(x) if not isinstance(x, str) else math.nan
    return "n/a" if not math.isfinite(v) else format(v, spec)


def step_ms(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.engine.timing import step_seconds

    v = step_seconds(timing, model, technique)
    return "n/a" if v is None else f"{1000 * v:.1f} ms"


def step_ratio_text(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.engine.timing import step_ratio

    r = step_ratio(timing, model, technique)
    return "n/a" if r is None else f"{r[0]:.3f}x [{r[1]:.3f}, {r[2]:.3f}]"


#: rounds of the timing pass further apart than this (slowest / fastest, one variant) make its
#: ratios rough: the machine was busy, or a first step paid for its set-up
TIMING_SPREAD_WARN = 1.5


def timing_spread(timing: dict[str, Any] | None) -> float:
    """The largest slowest-to-fastest ratio of one variant's rounds in the timing pass (nan without one)."""
    steps = timing.get("steps") if isinstance(timing, dict) else None
    spreads = [
        max(v) / min(v)
        for v in (steps.values() if isinstance(steps, dict) else ())
        if isinstance(v, list) and v and all(isinstance(x, int | float) and x > 0 for x in v)
    ]
    return max(spreads) if spreads else math.nan


def timing_device_words(timing: dict[str, Any] | None) -> str:
    """Which machine the timing pass measured, from its ``device`` record: e.g. "NVIDIA H100
    80GB HBM3 (CUDA, compute capability 9.0), bf16, torch 2.11" or "the CPU (AMD EPYC 7B13,
    2 threads), fp32, torch 2.14"; "device not recorded" for a timing.json written before
    the pass recorded it, and "no timing pass" when there is none."""
    if not isinstance(timing, dict) or not timing.get("steps"):
        return "no timing pass"
    dev = timing.get("device")
    if not isinstance(dev, dict) or not dev.get("type"):
        return "device not recorded"
    settings = timing.get("settings") if isinstance(timing.get("settings"), dict) else {}
    name = str(dev.get("name") or "unknown")
    if dev["type"] == "cuda":
        cap = f", compute capability {dev['capability']}" if dev.get("capability") else ""
        words = f"{name} (CUDA{cap})"
    elif dev["type"] == "cpu":
        threads = dev.get("threads", settings.get("threads"))
        words = f"the CPU ({name}" + (f", {threads} thread{'s' if threads != 1 else ''})" if threads else ")")
    else:
        words = f"{name} ({dev['type']})"
    extra = [str(settings["precision"])] if settings.get("precision") else []
    if settings.get("cuda_graphs"):
        extra.append("CUDA graphs")
    torch_version = dev.get("torch") or settings.get("torch")
    if torch_version:
        extra.append(f"torch {torch_version}")
    return words + "".join(f", {e}" for e in extra)


_LABEL = {"better": "**better**", "worse": "**worse**", "equivalent": "**equivalent**", "undecided": "undecided"}
_OPEN = {
    "max seeds": "max seeds",
    "budget or interrupted": "open: re-run to continue",
    "too few seeds": "too few seeds",
    "nothing learned": "nothing learned",
}


def verdict_words(d: Decision) -> str:
    """The verdict cell: the label and, for an open row, the one reason it is open."""
    text = _LABEL[d.decision]
    if d.decision == "worse" and d.outcome is not None and d.outcome.basis == "divergence":
        return text + " (failures)"
    if d.decision != "undecided":
        return text
    if d.outcome is not None and "ties decide nothing" in d.outcome.reason:
        return text + " (ties)"
    return text + (f" ({_OPEN.get(d.why_open, d.why_open)})" if d.why_open else "")


def difference_words(d: Decision) -> str:
    """'+0.46 [-2.86, +3.77]' in pp; an interval past +-100 pp says it bounds nothing yet."""
    if not math.isfinite(d.estimate):
        return "n/a"
    if not (math.isfinite(d.low) and math.isfinite(d.high)):
        return f"{pp(d.estimate)} (no interval)"
    if d.low < -1.0 or d.high > 1.0:
        return f"{pp(d.estimate)} [unbounded yet]"
    return f"{pp(d.estimate)} {interval_pp(d.low, d.high)}"


def seeds_words(d: Decision) -> str:
    text = f"{d.seeds}" + (f" of {d.max_seeds}" if d.sequential and d.max_seeds != d.seeds else "")
    if d.trained > d.seeds:
        text += f" ({d.trained} trained)"
    return text


def verdict_line(d: Decision) -> str:
    """A row of the verdict table as one terminal line, for the commands that write the report."""
    return f"{d.model} {d.technique}: {verdict_words(d)}, {difference_words(d)} pp, {seeds_words(d)} seeds"


def failures_cell(d: Decision) -> str:
    """The technique's failed runs, baseline's beside them, and for an equivalent or better row the
    failure rate its seeds do not exclude."""
    text = f"{d.tech_failed} of {d.trained}"
    if d.decision in ("equivalent", "better") and math.isfinite(d.fail_bound):
        text += f"; rate ≤ {100 * d.fail_bound:.0f}%"
    return text + (f" (baseline {d.base_diverged})" if d.base_diverged else "")


def gradient_word(init_probe: dict[tuple[str, str], dict[str, Any]], model: str, technique: str) -> str:
    """reslab.probe's verdict at this model's own depth and width, in one word."""
    e = init_probe.get((model, technique))
    return str(e.get("verdict") or "n/a") if e else "not measured"


def step_cell(d: Decision) -> str:
    return f"{d.step[0]:.2f}x" if d.step else "n/a"


def plot_label(d: Decision) -> str:
    """The words beside a row of the decision plot: the verdict, and what an equivalent or better
    row does not exclude."""
    text = verdict_words(d).replace("**", "")
    if d.decision in ("equivalent", "better") and math.isfinite(d.fail_bound):
        text += f"; failure rate ≤ {100 * d.fail_bound:.0f}%"
    return text


def error_rate_words(decisions: Sequence[Decision]) -> str:
    """One sentence on the error rate in force and the plan that read the seeds."""
    d0, rows = decisions[0], len(decisions)
    if d0.error_rate == "row":
        rate = f"each row is wrong with probability at most {d0.alpha:g} (per row: with {rows} rows, some may be)"
    else:
        what = f"any of the {rows} rows is" if rows > 1 else "the row is"
        rate = f"the chance that {what} wrong is at most {d0.alpha:g} (table-wide, a step-down)"
    if d0.sequential and d0.looks > 1:
        plan = f"seeds added a round at a time up to {d0.max_seeds}, each row stopping once decided"
    else:
        plan = f"{d0.max_seeds} seed{'s' if d0.max_seeds != 1 else ''} read once"
    return f"Error rate: {rate}; {plan}; equivalence margin +-{100 * d0.margin:.2g} pp."


def regime_line(regime: Regime, decisions: Sequence[Decision]) -> str:
    """A model's line in the answer: its regime, or, when its baseline learned nothing, that (a
    baseline flat at chance is not a plateau)."""
    nothing = next((d for d in decisions if d.model == regime.model and d.why_open == "nothing learned"), None)
    if nothing is None:
        return regime.sentence()
    return f"{regime.model}: {regime.length}; {nothing_learned_words(nothing)}."


def answer_section(
    doc: Doc,
    decisions: Sequence[Decision],
    regimes: dict[str, Regime] | None,
    init_probe: dict[tuple[str, str], dict[str, Any]],
    timing: dict[str, Any],
    fig_dir: Path,
    plots: Any,
) -> list[Path]:
    """The report's first section, the answer: how far each model trained (one sentence each), the
    decision plot, and the verdict table (8 columns). Details and methods follow further down."""
    doc.h(2, "Answer")
    if not decisions:
        doc.p("No technique has paired runs with baseline yet, so nothing is decided.")
        return []
    if regimes:
        doc.ul([regime_line(r, decisions) for r in regimes.values()])
    path = fig_dir / "decisions.png"
    plots.plot_decisions(
        [
            {
                "model": d.model,
                "technique": d.technique,
                "verdict": d.decision,
                "label": plot_label(d),
                "estimate": d.estimate,
                "low": d.low,
                "high": d.high,
            }
            for d in decisions
        ],
        path,
        margin=decisions[0].margin,
        title="Test accuracy against baseline",
    )
    alt = "decision plot: each technique's difference from baseline and its interval"
    doc.img(path, f"{FIGURES_DIR}/{path.name}", alt, anchor="decision-plot")
    doc.table(
        list(VERDICT_COLUMNS),
        [
            [
                d.model,
                d.technique,
                verdict_words(d),
                difference_words(d),
                seeds_words(d),
                failures_cell(d),
                step_cell(d),
                gradient_word(init_probe, d.model, d.technique),
            ]
            for d in decisions
        ],
        anchor="verdict-table",
    )
    notes = [error_rate_words(decisions)]
    claims = [d for d in decisions if d.decision in ("equivalent", "better")]
    if claims:
        need = max((d.seeds_for_bound or 0) for d in claims)
        example = f"{100 * claims[0].fail_bound:.0f}%"
        notes.append(
            "Equivalent and better bound the accuracy of the runs that finished, not how often the technique "
            f"fails: 'rate ≤ {example}' is the failure rate (diverged or stuck at chance) its seeds do not exclude "
            f"(exact one-sided Clopper-Pearson, {100 * FAILURE_CONFIDENCE:g}%)"
            + (
                f"; {need} seeds without a failure bring it to {100 * FAILURE_TARGET:g}% "
                f"(--seeds {need} --max-seeds {need})."
                if need
                else "."
            )
        )
    notes.append(
        f"Time/step: ratio to baseline in a dedicated timing pass on {timing_device_words(timing)}; gradients at init: "
        "reslab.probe's verdict at initialisation at the model's own depth. Details per model follow; the method "
        "is at the end."
    )
    spread = timing_spread(timing)
    if spread > TIMING_SPREAD_WARN:
        notes.append(
            f"The timing pass's rounds of one variant differ by up to {spread:.1f}x, so its time/step ratios are "
            "rough (the machine was busy while it ran): delete timing.json and re-run the same command on a "
            "quiet machine to measure them again."
        )
    doc.p(" ".join(notes))
    return [path]


def methods_section(doc: Doc, decisions: Sequence[Decision]) -> None:
    """How to read the report, at its end: what the difference is, how the rows are decided, and
    where the rule and its measured error rates are written down."""
    doc.h(2, "How to read this")
    if not decisions:
        return
    d0 = decisions[0]
    max_skew = max(abs(skew) for _, skew in CALIBRATION_SHAPES)
    levels = ", ".join(sorted({f"{d.nominal:.2g}" for d in decisions if math.isfinite(d.nominal)})) or "n/a"
    doc.p(
        "The difference is technique minus baseline in test accuracy at the end of training, paired by seed "
        "(seed k sees the same data and augmentation in every technique), over the seeds where both runs "
        f"finished and learned. Its interval is read at the two-sided level the step-down gave the row ({levels}), "
        f"calibrated by simulation for differences skewed up to skewness {max_skew:g}. Better / worse: the interval "
        f"excludes 0; equivalent: both one-sided bounds within +-{100 * d0.margin:.2g} pp (TOST). A run failed "
        f"when it diverged or ended within {100 * CHANCE_TOL:.0f} pp of chance: a technique that failed where "
        "baseline did not is never equivalent or better, and is worse when the imbalance of failures decides. "
        f"A model whose baseline ended within {100 * LEARNED_MIN:.0f} pp of chance decides nothing; ties decide "
        "nothing. The rule, what 'equivalent' does and does not mean, and the simulated error rates: "
        "docs/decision-rule.md."
    )
    doc.p(
        "Convergence: epochs to target are read off the validation evaluations, interpolated between the two "
        "around the crossing; a median counts a seed that never got there as slowest; the speed-up is paired "
        "by seed at the row's level, and in time it is divided by the step-time ratio. Seconds are the grid's "
        "own, which shared the machine. Cost: FLOPs count convolutions and matrix products (a multiply-add is "
        "2); step times come from a timing pass with every technique's steps interleaved and nothing else "
        "running (ratio range over rounds)."
    )


def provenance_words(grid: dict[str, Any] | None) -> str:
    """Which reslab wrote the report (and its git commit) and which trained the grid."""
    commit = source_commit()
    return (
        f"Written by reslab {__version__}"
        + (f" (git {commit})" if commit else "")
        + (f"; grid trained by reslab {grid.get('reslab')}" if grid and grid.get("reslab") else "")
        + "."
    )
