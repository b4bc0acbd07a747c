"""The report's sections below the decision table: the settings, then per model the
verdicts, statistics, convergence, curves, costs and gradients, and the list of files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.report.aggregate import (
    as_float,
    curves,
    gradient_series,
)
from reslab.report.decision_table import fmt_value, step_ms, step_ratio_text, timing_device_words
from reslab.report.document import Doc
from reslab.report.verdicts import fmt_acc_interval, verdict
from reslab.study import stats
from reslab.study.decisions import AUTO_TARGET_FRACTION, Decision, interval_pp, interval_ratio, pp
from reslab.study.regime import Regime
from reslab.study.results import (
    BASELINE,
    FIGURES_DIR,
    Cell,
    RunData,
)


def describe_missing(cells: Sequence[Cell], runs: dict[Cell, RunData]) -> list[str]:
    out = []
    for c in cells:
        run = runs.get(c)
        if run is None:
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: not started")
        elif run.status == "failed":
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: failed ({run.error})")
        elif not run.finished:
            done = run.metrics[-1].get("epoch", 0) if run.metrics else 0
            total = run.config.get("epochs", "?")
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: {run.status} after epoch {done} of {total}")
    return out


def report_title(grid: dict[str, Any] | None, models: Sequence[str]) -> str:
    """What was compared, not where it is stored: the preset (or a custom grid) and the models."""
    preset = (grid or {}).get("preset")
    what = f"{preset} preset" if preset else "custom grid" if grid else "runs"
    names = list(models)
    on = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + f" and {names[-1]}"
    return f"reslab comparison: {what}, {on}" if names else f"reslab comparison: {what}"


def target_line(targets: dict[str, float], auto: bool) -> str:
    """The epochs-to-target accuracy per model, and how it was derived."""
    values = ", ".join(
        f"{m} {stats.fmt_pct(t, 1) if math.isfinite(t) else 'n/a (no finished baseline)'}" for m, t in targets.items()
    )
    if auto:
        frac = round(100 * AUTO_TARGET_FRACTION)
        return (
            f"Target validation accuracy (for epochs to target): auto, {frac}% of baseline's mean validation "
            f"accuracy at the end of training = {values}."
        )
    return f"Target validation accuracy (for epochs to target): {values}."


def settings_lines(grid: dict[str, Any] | None, runs: dict[Cell, RunData]) -> list[str]:
    cfg = dict(grid.get("train", {})) if grid else {}
    if not cfg and runs:
        cfg = next(iter(runs.values())).config
    for k in [k for k, v in cfg.items() if v is None]:
        # a setting the grid left to the default: show what the runs used (config.yaml), or nothing
        used = {repr(r.config[k]): r.config[k] for r in runs.values() if r.config.get(k) is not None}
        if len(used) == 1:
            cfg[k] = next(iter(used.values()))
        else:
            del cfg[k]
    keys = (
        "dataset",
        "epochs",
        "batch_size",
        "lr",
        "train_subset",
        "train_size",
        "val_size",
        "width",
        "optimizer",
        "schedule",
        "augment",
        "label_smoothing",
        "weight_decay",
    )
    shown = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    items = []
    if grid:
        preset = f"; preset {grid['preset']}" if grid.get("preset") else ""
        seeds = ", ".join(str(s) for s in grid["seeds"])
        techs = ", ".join(grid["techniques"])
        items.append(f"Grid: models {', '.join(grid['models'])}; techniques {techs}; seeds {seeds}{preset}")
    if shown:
        items.append("Training settings: " + ", ".join(shown) + " (full settings: each run's config.yaml).")
    if threads := threads_line(runs):
        items.append(threads)
    return items


def threads_line(runs: dict[Cell, RunData]) -> str | None:
    """CPU threads per run, as each run's config.yaml records them: on the CPU they change the
    arithmetic, so results of two grids (or launchers) agree only with the same threads."""
    counts: dict[Any, int] = {}
    for run in runs.values():
        if run.config:
            t = run.config.get("threads")
            counts[t] = counts.get(t, 0) + 1
    if not counts:
        return None
    if len(counts) == 1:
        return f"CPU threads per run: {next(iter(counts))} (set with --set threads=N)."
    parts = ", ".join(f"{t} in {n} runs" for t, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
    return f"CPU threads per run differ: {parts} (CPU results depend on them; --set threads=N makes them one)."


def settings_section(
    doc: Doc,
    grid: dict[str, Any] | None,
    runs: dict[Cell, RunData],
    targets: dict[str, float],
    method: str,
    level: float,
    n_cells: int,
    expected: Sequence[Cell],
    missing: Sequence[str],
    auto_target: bool = False,
) -> None:
    """Settings, how the intervals are made, and which runs are finished. ``auto_target``: the
    targets were derived from baseline (``--target-acc auto``), which the line then says."""
    doc.h(2, "Settings")
    doc.ul(settings_lines(grid, runs))
    method_words = (
        "Student's t distribution over seeds"
        if method == "t"
        else "paired percentile bootstrap over seeds (10,000 resamples, fixed seed)"
    )
    doc.p(
        f"Descriptive intervals (a technique's own accuracy, AUC, throughput) are {round(100 * level)}% confidence "
        f"intervals from the {method_words}. Every difference from baseline in accuracy, and every speed-up in "
        "epochs to target, is the decision table's: the same interval at the same per-look level, paired by seed "
        "(seed k sees the same data order and augmentation in every technique), so no section below can "
        "disagree with it. " + target_line(targets, auto_target)
    )
    n_done = sum(1 for c in expected if c in runs and runs[c].finished)
    if (grid or {}).get("sequential"):
        doc.p(
            f"Sequential grid: {n_done} runs finished of the {n_cells} the plan allowed; a technique stops "
            "adding seeds once it is decided, so the rest were not needed."
        )
    if missing:
        doc.p(f"Incomplete grid: {n_done} of {len(expected)} runs finished. Missing or unfinished:")
        doc.ul(missing)
    else:
        doc.p(f"Complete grid: all {len(expected)} runs finished.")


@dataclass
class ModelView:
    """One model's part of the report: its summary rows and how its headings are named."""

    model: str
    rows: list[dict[str, Any]]
    several_models: bool
    targets: dict[str, float]
    level: float
    #: technique -> its decision (every figure about a technique against baseline comes from it)
    decisions: dict[str, Decision] = field(default_factory=dict)
    #: how far the model's training went
    regime: Regime | None = None

    @property
    def suffix(self) -> str:
        """Heading suffix: the model, when the report has several."""
        return f" ({self.model})" if self.several_models else ""

    @property
    def tag(self) -> str:
        """Figure-name suffix: the model, when the report has several."""
        return f"-{self.model}" if self.several_models else ""

    @property
    def target(self) -> float:
        return self.targets.get(self.model, math.nan)

    @property
    def lvl(self) -> str:
        return f"{round(100 * self.level)}%"

    @property
    def order(self) -> list[str]:
        return [r["technique"] for r in self.rows]


def verdict_section(doc: Doc, v: ModelView) -> None:
    doc.h(2, f"Verdict{v.suffix}")
    if not any(r["technique"] == BASELINE for r in v.rows):
        doc.p("No baseline runs found, so no technique is compared against baseline.")
    for r in v.rows:
        words = verdict(r, v.level, v.decisions.get(r["technique"]), v.regime)
        doc.p(f"{r['technique']}: " + " ".join(words or ["no finished runs yet."]))


def summary_section(doc: Doc, v: ModelView) -> None:
    doc.h(2, f"Summary{v.suffix}")
    doc.table(
        [
            "technique",
            "runs (ok/div/open)",
            "test acc % (mean ± sd)",
            f"{v.lvl} CI",
            "IQM %",
            "best val acc %",
            "AUC val acc %",
            "decision (the decision table's)",
            "diff vs baseline, pp [decision's interval]",
        ],
        [
            [
                r["technique"],
                f"{r['completed']}/{r['diverged']}/{r['unfinished']}",
                f"{fmt_value(as_float(r['test_acc_mean']) * 100)} ± {fmt_value(as_float(r['test_acc_std']) * 100)}",
                fmt_acc_interval(as_float(r["test_acc_ci_low"]), as_float(r["test_acc_ci_high"])),
                fmt_value(as_float(r["test_acc_iqm"]) * 100)
                if math.isfinite(as_float(r["test_acc_iqm"]))
                else "n/a (n < 4)",
                fmt_value(as_float(r["best_val_acc_mean"]) * 100),
                fmt_value(as_float(r["auc_mean"]) * 100),
                "-" if r["technique"] == BASELINE else (r.get("decision") or "none"),
                "-" if r["technique"] == BASELINE else _decision_diff(v.decisions.get(r["technique"])),
            ]
            for r in v.rows
        ],
    )


def convergence_section(doc: Doc, v: ModelView) -> None:
    doc.h(2, f"Convergence{v.suffix}")
    doc.table(
        [
            "technique",
            f"reached {100 * v.target:.1f}%",
            "median epochs",
            "median seconds",
            "speed-up in epochs [interval] (the decision's)",
        ],
        [
            [
                r["technique"],
                f"{r['reached']}/{r['reached_of']}",
                fmt_value(r["epochs_to_target_median"], ".2f")
                if math.isfinite(as_float(r["epochs_to_target_median"]))
                else "not reached",
                fmt_value(r["seconds_to_target_median"], ".1f")
                if math.isfinite(as_float(r["seconds_to_target_median"]))
                else "not reached",
                "-" if r["technique"] == BASELINE else _speedup_words(v.decisions.get(r["technique"])),
            ]
            for r in v.rows
        ],
    )
    doc.p(
        "Epochs to target are the decision table's: read off the validation evaluations, interpolated linearly "
        "between the two around the crossing. Medians count a seed that never reached the target (or diverged) "
        "as slower than every other seed; 'not reached' means fewer than half of the seeds reached it. Seconds "
        "are the run's cumulative training time at that epoch (interpolated within the epoch) as measured while "
        "the grid ran, so they include any sharing of the machine between parallel runs. The speed-up is the "
        "decision table's (paired by seed, at the decision's per-look level); a speed-up in time is the decision "
        "table's too (divided by the step-time ratio of the timing pass), since the grid's own seconds shared "
        "the machine."
    )


def _decision_diff(d: Decision | None) -> str:
    if d is None or not math.isfinite(d.estimate):
        return "n/a"
    return f"{pp(d.estimate)} {interval_pp(d.low, d.high)}"


def _speedup_words(d: Decision | None) -> str:
    c = d.convergence if d else {}
    if not c:
        return "n/a"
    if not math.isfinite(c["speedup"]):
        return str(c["label"])
    return f"{c['speedup']:.2f}x {interval_ratio(c['low'], c['high'])}: {c['label']}"


def curves_section(doc: Doc, v: ModelView, by_tech: dict[str, list[RunData]], fig_dir: Path, plots: Any) -> list[Path]:
    """Validation curves against epoch and time, and time to target (when any run has metrics)."""
    model, target = v.model, v.target
    series = {t: curves(by_tech[t]) for t in v.order if t in by_tech and any(x.metrics for x in by_tech[t])}
    if not series:
        return []
    p1 = fig_dir / f"curves-epoch{v.tag}.png"
    plots.plot_curves(series, p1, x_axis="epoch", title=f"{model}: against epoch")
    p2 = fig_dir / f"curves-time{v.tag}.png"
    plots.plot_curves(series, p2, x_axis="time", title=f"{model}: against training time")
    doc.h(2, f"Curves{v.suffix}")
    doc.img(p1, f"{FIGURES_DIR}/{p1.name}", f"{model}: validation accuracy and training loss against epoch")
    doc.img(p2, f"{FIGURES_DIR}/{p2.name}", f"{model}: validation accuracy and training loss against time")

    def mean_and_ci(r: dict[str, Any], key: str) -> tuple[float, float, float]:
        return as_float(r[f"{key}_mean"]), as_float(r[f"{key}_ci_low"]), as_float(r[f"{key}_ci_high"])

    ttt = [
        {
            "technique": r["technique"],
            "reached": r["reached"],
            "n": r["reached_of"],
            "epochs": mean_and_ci(r, "epochs_to_target"),
            "seconds": mean_and_ci(r, "seconds_to_target"),
        }
        for r in v.rows
    ]
    p3 = fig_dir / f"time-to-target{v.tag}.png"
    plots.plot_time_to_target(ttt, p3, target=target, title=f"{model}: time to target")
    doc.img(p3, f"{FIGURES_DIR}/{p3.name}", f"{model}: time to {100 * target:.1f}% validation accuracy")
    return [p1, p2, p3]


def cost_section(doc: Doc, v: ModelView, timing: dict[str, Any]) -> None:
    doc.h(2, f"Cost{v.suffix}")
    doc.table(
        [
            "technique",
            "parameters",
            "vs baseline",
            "FLOPs / image",
            "vs baseline",
            "time per training step (timing pass)",
            "vs baseline [range over rounds]",
        ],
        [
            [
                r["technique"],
                f"{int(r['params']):,}" if r["params"] else "n/a",
                "-" if r["technique"] == BASELINE else fmt_value(r["params_ratio"], ".3f") + "x",
                f"{int(r['flops']):,}" if r["flops"] else "n/a",
                "-" if r["technique"] == BASELINE else fmt_value(r["flops_ratio"], ".3f") + "x",
                step_ms(timing, v.model, r["technique"]),
                "-" if r["technique"] == BASELINE else step_ratio_text(timing, v.model, r["technique"]),
            ]
            for r in v.rows
        ],
    )
    doc.p(
        "FLOPs count convolutions and matrix products for one image (a multiply-add is 2). Step times come from "
        "the dedicated timing pass (reslab.engine.timing: every technique's training steps interleaved, nothing else "
        "running, on the grid's device with its precision and, on the CPU, the workers' thread count), measured on "
        f"{timing_device_words(timing)}; the grid's own runs shared the machine, so their throughput "
        "(summary.csv, images_per_s) is not a cost figure."
    )


def gradient_section(
    doc: Doc,
    v: ModelView,
    by_tech: dict[str, list[RunData]],
    init_probe: dict[tuple[str, str], dict[str, Any]],
    fig_dir: Path,
    plots: Any,
) -> list[Path]:
    """Gradient flow at initialisation (probe-init.json) and during training (gradients.jsonl)."""
    model = v.model
    grad_series = gradient_series(by_tech, v.order)
    doc.h(2, f"Gradient health{v.suffix}")
    have_init = any(math.isfinite(as_float(r["init_grad_ratio"])) or r["init_grad_verdict"] for r in v.rows)
    if have_init or grad_series:
        blocks = next((e["blocks"] for (m, _), e in init_probe.items() if m == model and "blocks" in e), None)
        doc.table(
            [
                "technique",
                "at init: max/min block-output gradient" + (f" ({blocks} blocks)" if blocks else ""),
                "at init: verdict",
                "during training: worst max/min block parameter-gradient norm",
            ],
            [
                [
                    r["technique"],
                    fmt_value(r["init_grad_ratio"], ".3g"),
                    str(r["init_grad_verdict"] or "n/a"),
                    fmt_value(r["worst_grad_ratio"], ".3g"),
                ]
                for r in v.rows
            ],
        )
        doc.p(
            "At init: reslab.probe on real training batches (train-mode BatchNorm, cross-entropy): the ratio of "
            "the largest to the smallest root-mean-square gradient of a block output across the network, and the "
            "probe's verdict (healthy up to max(L^2, 10) for L blocks). During training: the per-block norm of "
            "the parameter gradients recorded every K steps (--probe-every K), the worst ratio over the run. "
            "A shallow model cannot show an explosion with depth; 'reslab probe --depths 20,56,110,218' does."
        )
    figures = []
    if grad_series:
        p4 = fig_dir / f"gradients{v.tag}.png"
        plots.plot_gradients(grad_series, p4, model)
        doc.img(p4, f"{FIGURES_DIR}/{p4.name}", f"{model}: gradient-norm spread across blocks during training")
        figures.append(p4)
    elif not have_init:
        doc.p(
            "Not measured: no probe-init.json (written by 'reslab compare') and no gradients.jsonl in the runs "
            "(train with --probe-every K to record per-block gradient norms); 'reslab probe' measures gradient "
            "flow at initialisation across depths."
        )
    return figures


def files_section(doc: Doc, out: Path) -> None:
    doc.h(2, "Files")
    doc.p(
        "results.jsonl holds one record per run, summary.csv one row per technique with every figure above "
        "(and more); each run folder under runs/ holds its config.yaml, metrics.jsonl and summary.json. "
        "Regenerate this report with: reslab report " + str(out)
    )
