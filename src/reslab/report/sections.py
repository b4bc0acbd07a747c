"""The report's sections below the decision table: the settings, then per model the
accuracy and advice, convergence, curves, costs and gradients, and the list of files."""

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
from reslab.report.decision_table import fmt_value, step_ms, step_ratio_text
from reslab.report.document import Doc
from reslab.study import stats
from reslab.study.decisions import AUTO_TARGET_FRACTION, Decision, interval_ratio, situation
from reslab.study.regime import Regime
from reslab.study.results import (
    BASELINE,
    FIGURES_DIR,
    Cell,
    RunData,
)


def fmt_acc_interval(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    """An interval of an accuracy (fractions, printed in %), never with impossible bounds: one
    spanning the whole 0-100% range or more says that it says nothing; one with a single bound
    past 0% or 100% is clipped there, with a note."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if high - low >= 1.0:
        return "too few seeds for an interval (it would be wider than 0-100%)"
    lo, hi = max(low, 0.0), min(high, 1.0)
    text = f"[{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]{unit}"
    if lo != low or hi != high:
        text += f" (clipped at {'0%' if lo != low else '100%'}: too few seeds for a tighter interval)"
    return text


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
        f"A technique's own accuracy carries a {round(100 * level)}% interval from the {method_words}; every "
        "difference from baseline is the verdict table's. " + target_line(targets, auto_target)
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


def details_heading(doc: Doc, v: ModelView) -> None:
    """The heading of one model's details (the answer section holds its verdicts)."""
    doc.h(2, f"Details: {v.model}" if v.several_models else "Details")


def accuracy_section(doc: Doc, v: ModelView) -> None:
    """Each technique's own accuracy (its difference from baseline is the verdict table's), then
    one line of advice per technique: what to do, without restating the table's figures."""
    doc.h(3, "Accuracy and advice")
    if not any(r["technique"] == BASELINE for r in v.rows):
        doc.p("No baseline runs found, so no technique is compared against baseline.")
    doc.table(
        [
            "technique",
            "runs (ok/failed/open)",
            f"test acc. % (mean ± sd) [{v.lvl} CI]",
            "IQM %",
            "best val acc. %",
            "AUC val acc. %",
        ],
        [
            [
                r["technique"],
                f"{r['completed']}/{r['diverged']}/{r['unfinished']}",
                _accuracy_words(r),
                fmt_value(as_float(r["test_acc_iqm"]) * 100) if math.isfinite(as_float(r["test_acc_iqm"])) else "n/a",
                fmt_value(as_float(r["best_val_acc_mean"]) * 100),
                fmt_value(as_float(r["auc_mean"]) * 100),
            ]
            for r in v.rows
        ],
    )
    doc.ul(f"{t}: {advice(d)}" for t, d in v.decisions.items())


def _accuracy_words(r: dict[str, Any]) -> str:
    """'80.75 ± 0.56 [80.16, 81.34]': mean ± sd over the completed seeds and the interval."""
    mean, sd = as_float(r["test_acc_mean"]), as_float(r["test_acc_std"])
    if not math.isfinite(mean):
        return "n/a"
    text = f"{100 * mean:.2f}" + (f" ± {100 * sd:.2f}" if math.isfinite(sd) else "")
    iv = fmt_acc_interval(as_float(r["test_acc_ci_low"]), as_float(r["test_acc_ci_high"]))
    return text + ("" if iv == "n/a" else f" {iv}")


def advice(d: Decision) -> str:
    """What to do about one row, in words that add to the verdict table rather than repeat it
    (the numbers are in the table; :func:`reslab.study.decisions.situation` reads the row)."""
    early = d.regime is not None and d.regime.early
    lead = "it fails where baseline does not, so it is never equivalent or better; " if d.diverged else ""
    what = situation(d)
    if what == "nothing learned":
        return "nothing to compare: train longer, or with a learning rate that learns, before comparing."
    if what == "fails":
        return "avoid at this depth: it fails where baseline does not."
    if what == "faster":
        return (
            "faster to learn at this depth; confirm with longer training before adopting, and weigh its time per step."
        )
    if what == "better":
        return "adopt at this depth if its time per step is worth the gain."
    if what == "slower":
        return "slower to learn at this depth (convergence speed, not accuracy after full training)."
    if what == "worse":
        return "avoid at this depth: it ends less accurate."
    if what in ("keep baseline", "either"):
        keep = "keep baseline, which is cheaper per step" if what == "keep baseline" else "either will do"
        return f"{keep}; the failure rate it does not exclude is in the table" + (
            ", and longer training may still separate them." if early else "."
        )
    if what == "too few seeds":
        return lead + "too few finished seeds for a first look."
    if what == "stopped":
        return lead + f"re-run the same command to continue up to {d.max_seeds} seeds."
    if what == "ties":
        return lead + "every seed gave the same difference, and ties decide nothing."
    if what == "more seeds":
        n = d.seeds_needed
        return lead + f"no answer yet: at this spread about {n} seeds would settle it (--seeds {n} --max-seeds {n})."
    return lead + "no answer, and its spread is too large to settle with a practical number of seeds."


def convergence_section(doc: Doc, v: ModelView) -> None:
    """Epochs to the target per technique, and the paired speed-up against baseline (read at each
    row's decision level, so it cannot disagree with the verdict table)."""
    doc.h(3, "Convergence")
    doc.table(
        [
            "technique",
            f"reached {100 * v.target:.1f}%",
            "median epochs",
            "median seconds",
            "speed-up in epochs [interval]",
            "speed-up in time",
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
                "-" if r["technique"] == BASELINE else _speedup_in_time(v.decisions.get(r["technique"])),
            ]
            for r in v.rows
        ],
    )


def _speedup_words(d: Decision | None) -> str:
    c = d.convergence if d else {}
    if not c:
        return "n/a"
    if not math.isfinite(c["speedup"]):
        return str(c["label"])
    return f"{c['speedup']:.2f}x {interval_ratio(c['low'], c['high'])}: {c['label']}"


def _speedup_in_time(d: Decision | None) -> str:
    c = d.convergence if d else {}
    if not c or not math.isfinite(c["speedup"]) or not (d and d.step):
        return "n/a"
    return f"{c['speedup'] / d.step[0]:.2f}x"


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
    doc.h(3, "Curves")
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
    """Parameters, FLOPs and time per step (the verdict table has the step-time ratio; here are the
    absolute figures and its range)."""
    doc.h(3, "Cost")
    doc.table(
        ["technique", "parameters (vs baseline)", "FLOPs / image (vs baseline)", "time per step", "ratio range"],
        [
            [
                r["technique"],
                _count_and_ratio(r, "params"),
                _count_and_ratio(r, "flops"),
                step_ms(timing, v.model, r["technique"]),
                "-" if r["technique"] == BASELINE else _ratio_range(step_ratio_text(timing, v.model, r["technique"])),
            ]
            for r in v.rows
        ],
    )


def _count_and_ratio(r: dict[str, Any], key: str) -> str:
    if not r[key]:
        return "n/a"
    text = f"{int(r[key]):,}"
    return text if r["technique"] == BASELINE else f"{text} ({fmt_value(r[f'{key}_ratio'], '.3f')}x)"


def _ratio_range(text: str) -> str:
    """'[1.00, 1.08]' from '1.07x [1.00, 1.08]' (the ratio itself is the verdict table's)."""
    return text[text.index("[") :] if "[" in text else text


def training_gradient_section(
    doc: Doc, v: ModelView, by_tech: dict[str, list[RunData]], fig_dir: Path, plots: Any
) -> list[Path]:
    """Gradient flow during training (gradients.jsonl, recorded with --probe-every K), when any run has it."""
    grad_series = gradient_series(by_tech, v.order)
    if not grad_series:
        return []
    doc.h(3, "Gradients in training")
    doc.table(
        ["technique", "worst max/min block parameter-gradient norm"],
        [[r["technique"], fmt_value(r["worst_grad_ratio"], ".3g")] for r in v.rows],
    )
    path = fig_dir / f"gradients{v.tag}.png"
    plots.plot_gradients(grad_series, path, v.model)
    doc.img(path, f"{FIGURES_DIR}/{path.name}", f"{v.model}: gradient-norm spread across blocks during training")
    return [path]


def init_gradient_section(
    doc: Doc,
    rows: Sequence[dict[str, Any]],
    probe_entries: Sequence[dict[str, Any]],
) -> None:
    """Gradient flow at initialisation, once for the report: per technique, reslab.probe's verdict and
    max/min block-output gradient ratio at every depth probed (the grid's models and deeper ones)."""
    doc.h(2, "Gradient health at initialisation")
    if probe_entries:
        techs = list(dict.fromkeys(str(e["technique"]) for e in probe_entries))
        depths = sorted({int(e["depth"]) for e in probe_entries})
        widths = {float(e.get("width", 1.0)) for e in probe_entries}
        at = {(str(e["technique"]), int(e["depth"])): e for e in probe_entries}
        doc.table(
            ["technique", *(f"{d} layers" for d in depths)],
            [[t, *(_probe_cell(at.get((t, d))) for d in depths)] for t in techs],
        )
        width = f" at width {next(iter(widths)):g}" if len(widths) == 1 and widths != {1.0} else ""
        doc.p(
            f"reslab.probe{width}, on training batches: the largest over the smallest RMS gradient of a block "
            "output across the network, healthy up to max(L^2, 10) for L blocks."
        )
        return
    old = [r for r in rows if r.get("init_grad_verdict")]
    if old:  # a results folder of reslab 0.1: one entry per model, no depths
        doc.table(
            ["model", "technique", "verdict (max/min)"],
            [
                [r["model"], r["technique"], f"{r['init_grad_verdict']} ({fmt_value(r['init_grad_ratio'], '.3g')})"]
                for r in old
            ],
        )
        return
    doc.p(
        "Not measured: no probe-init.json (written by 'reslab compare'); 'reslab probe' measures gradient flow at "
        "initialisation across depths."
    )


def _probe_cell(e: dict[str, Any] | None) -> str:
    if not e:
        return "-"
    r = as_float(e.get("grad_ratio")) if e.get("grad_ratio") not in ("inf", None) else math.inf
    return f"{e.get('verdict')} ({r:.3g})"


def files_section(doc: Doc, out: Path) -> None:
    doc.h(2, "Files")
    doc.p(
        "results.jsonl: one record per run; summary.csv: one row per technique; decisions.json: the verdict "
        "table with every figure behind it; runs/: each run's config.yaml, metrics.jsonl and summary.json. "
        "Regenerate with: reslab report " + str(out)
    )
