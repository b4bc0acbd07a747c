"""The report's first section: the decision table, one row per model and technique."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.report.aggregate import (
    as_float,
)
from reslab.report.document import Doc
from reslab.study.decisions import Decision, gradient_verdict, interval_pp, interval_ratio, pp
from reslab.study.regime import Regime
from reslab.version import __version__


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


def error_rate_words(decisions: Sequence[Decision]) -> str:
    """The report's statement of the error rate in force (its first lines)."""
    d0 = decisions[0]
    rows = len(decisions)
    if d0.error_rate == "row":
        return (
            f"Error rate in force: per row. Each row on its own is wrong with probability at most {d0.alpha:g}; "
            f"with {rows} rows, some row may well be wrong (compare --error-rate table bounds the whole table)."
        )
    return (
        f"Error rate in force: table-wide. The chance that any of these {rows} rows is wrong is at most "
        f"{d0.alpha:g}: the rows share it, each starting at {d0.alpha / rows:.2g}, and a row whose interval "
        f"clears the whole margin hands its share on to the rows still open (a step-down; docs/decision-rule.md)."
    )


def decision_words(d: Decision) -> str:
    """The decision cell: the label, why it is open, and the divergence it must not hide."""
    text = _LABEL[d.decision] + (f" ({d.why_open})" if d.why_open else "")
    if d.diverged:
        text += f"; {d.divergence_words}"
    if d.decision == "undecided" and d.outcome and "ties decide nothing" in d.outcome.reason:
        text += "; ties decide nothing"
    if d.regime is not None and d.regime.early:
        text += f"; early training ({d.regime.length})"
    return text


def difference_words(d: Decision) -> str:
    return f"{pp(d.estimate)} {interval_pp(d.low, d.high)}" if math.isfinite(d.estimate) else "n/a"


def seeds_words(d: Decision) -> str:
    text = f"{d.seeds}" + (f" of {d.max_seeds}" if d.sequential else "")
    if d.trained > d.seeds:
        text += f" ({d.trained} trained)"
    return text


def decision_section(
    doc: Doc,
    decisions: Sequence[Decision],
    grid: dict[str, Any] | None,
    probe_entries: Sequence[dict[str, Any]],
    timing: dict[str, Any],
    regimes: dict[str, Regime] | None = None,
) -> None:
    """The report's first section: what to do, per model and technique, and how sure it is, and
    how far training went (``regimes``, per model)."""
    commit = git_commit()
    doc.p(
        f"Written by reslab {__version__}"
        + (f" (git {commit})" if commit else "")
        + (f"; grid trained by reslab {grid.get('reslab')}" if grid and grid.get("reslab") else "")
        + "."
    )
    doc.h(2, "Decision")
    if not decisions:
        doc.p("No technique has paired runs with baseline yet, so nothing is decided.")
        return
    doc.p(error_rate_words(decisions))
    if regimes:
        doc.p("How far training went, per model (a decision about runs still rising is about early training):")
        doc.ul([r.words() for r in regimes.values()])
    doc.table(
        [
            "model",
            "technique",
            "decision",
            "test acc. difference, pp [interval]",
            "seeds",
            "diverged (technique only / baseline only)",
            "P(beats baseline in a seed)",
            "detectable diff., pp",
            "params / FLOPs",
            "time per step",
            "gradients at init",
            "recommendation",
        ],
        [
            [
                d.model,
                d.technique,
                decision_words(d),
                difference_words(d),
                seeds_words(d),
                f"{d.diverged} / {d.base_diverged} of {d.trained}",
                (
                    f"{d.p_better.estimate:.2f} [{d.p_better.low:.2f}, {d.p_better.high:.2f}]"
                    if d.p_better and d.p_better.defined
                    else "n/a"
                ),
                pp(d.detectable, sign=False),
                f"{fmt_value(d.params_ratio, '.3f')}x / {fmt_value(d.flops_ratio, '.3f')}x",
                (f"{d.step[0]:.2f}x [{d.step[1]:.2f}, {d.step[2]:.2f}]" if d.step else "n/a"),
                gradient_verdict(probe_entries, d.technique),
                d.recommendation,
            ]
            for d in decisions
        ],
    )
    d0 = decisions[0]
    nominal = ", ".join(sorted({f"{d.nominal:.2g}" for d in decisions if math.isfinite(d.nominal)})) or "n/a"
    calibrated = (
        "calibrated by simulation so that the row errs with at most its share of the error rate when the "
        "differences are normal or skewed up to skewness 2"
    )
    if d0.sequential and d0.looks > 1:
        plan_words = (
            f"seeds were added one round at a time ({d0.max_seeds} at most) and a technique stopped as soon as it "
            f"was decided; every look's interval is built at the same two-sided level (here {nominal}), "
            f"{calibrated}, over all looks together (a repeated confidence interval)"
        )
    elif d0.sequential:
        plan_words = f"the {d0.max_seeds} seeds were read once, at a two-sided level of {nominal}, {calibrated}"
    else:
        plan_words = (
            f"every seed was trained (no sequential stopping), so there is one look, at a two-sided level of {nominal}"
        )
    doc.p(
        "How to read this: the difference is technique minus baseline in test accuracy at the end of each run's "
        "training (the regime above says whether that was a plateau), paired by seed "
        "(seed k sees the same data order and augmentation in every technique), over the seeds where both runs "
        f"finished and learned; {plan_words}. Decisions: better / worse when the whole interval lies above / "
        f"below 0, equivalent when both one-sided bounds lie within +-{100 * d0.margin:.2g} pp (the margin, "
        "two one-sided tests), otherwise undecided. "
        "A run that diverged (non-finite loss) or ended within 1 pp of chance level failed: it gives no accuracy "
        "difference, and a technique that failed where baseline did not is never equivalent or better; it is "
        "worse when an exact sequential test of the imbalance of failures decides (20% of the row's error rate). "
        "Ties (no spread between seeds) decide nothing, and a model whose baseline never learned says so. "
        "'Seeds' counts the seeds of the look that decided; runs trained beyond it are listed and their "
        "divergences counted. 'Detectable diff.' is the smallest true difference one look at these seeds "
        "detects with 80% power at the observed spread and the per-look level in force (exact noncentral t). "
        "P(beats baseline in a seed) is the share of paired seeds the technique won, with an exact "
        "Clopper-Pearson 95% interval. Params / FLOPs are ratios to baseline; time per step is the median ratio "
        "to baseline in a dedicated interleaved timing pass (reslab.engine.timing; range over rounds), not the "
        f"grid's own runs, which shared the machine; measured on {timing_device_words(timing)}. "
        "Gradients at init: reslab.probe's verdict and max/min block-output gradient ratio at each depth "
        "measured (the grid's models and 56 and 110 layers, at the grid's width). The rule and its measured "
        "error rates: docs/decision-rule.md."
    )
    conv = [d for d in decisions if d.convergence]
    if conv:
        doc.h(3, "Convergence")
        doc.table(
            [
                "model",
                "technique",
                "target (val acc)",
                "reached (technique / baseline)",
                "median epochs to target (technique / baseline)",
                "speed-up in epochs [interval]",
                "speed-up in time",
            ],
            [
                [
                    d.model,
                    d.technique,
                    f"{100 * d.convergence['target']:.1f}%" if math.isfinite(d.convergence["target"]) else "n/a",
                    f"{d.convergence['reached']}/{d.convergence['of']} / {d.convergence['base_reached']}/"
                    f"{d.convergence['of']}",
                    f"{fmt_value(d.convergence['epochs_median'])} / {fmt_value(d.convergence['base_epochs_median'])}",
                    (
                        f"{d.convergence['speedup']:.2f}x "
                        f"{interval_ratio(d.convergence['low'], d.convergence['high'])}: "
                        f"{d.convergence['label']}"
                        if math.isfinite(d.convergence["speedup"])
                        else d.convergence["label"]
                    ),
                    (
                        f"{d.convergence['speedup'] / d.step[0]:.2f}x"
                        if d.step and math.isfinite(d.convergence["speedup"])
                        else "n/a"
                    ),
                ]
                for d in conv
            ],
        )
        doc.p(
            "Epochs to target are read off the validation evaluations (several per epoch when the grid sets "
            "evals_per_epoch), interpolated linearly between the two around the crossing (from chance level at epoch "
            "0), so they are not multiples of the evaluation interval. The speed-up is baseline's epochs over the "
            "technique's, a geometric mean over the seeds where both reached the target, with an interval at the "
            "same per-look level as the decision; 'speed-up in time' divides it by the step-time ratio."
        )


def git_commit() -> str | None:
    """The commit of the reslab source tree, when it is a git checkout (None otherwise)."""
    import subprocess

    src = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
