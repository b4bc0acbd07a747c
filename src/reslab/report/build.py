"""The report of a technique x seed grid: ``build_report`` reads the stored runs
(:mod:`reslab.results`), computes the numbers (:mod:`reslab.aggregate`), words the verdicts
(:mod:`reslab.verdicts`) and the decisions (:mod:`reslab.decisions`), and lays them out
here as report.md, report.html and figures, beside the derived results.jsonl, summary.csv
and decisions.json.

It never trains, so a report regenerates at any time, from an incomplete grid, or from the
merged shards of several machines. Layout of a results folder: :mod:`reslab.results`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.report.aggregate import (
    SUMMARY_COLUMNS,
    add_plan_and_init_probe,
    as_float,
    check_interval_method,
    curves,
    expected_cells,
    gradient_series,
    run_record,
    runs_by_technique,
    summarize_all,
    targets_for,
)
from reslab.report.verdicts import fmt_bounds, verdict
from reslab.study import stats
from reslab.study.decisions import Decision, decide, gradient_verdict, pp
from reslab.study.results import (
    BASELINE,
    FIGURES_DIR,
    RUNS_DIR,
    TIMING_FILE,
    Cell,
    RunData,
    _read_json,
    collect,
    grid_cells,
    read_init_probe,
    read_jsonl,
    read_probe_entries,
)
from reslab.version import __version__

# ---------------------------------------------------------------------------------------
# Document model: one list of blocks rendered both to Markdown and to HTML.


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def img(self, path: Path, rel: str, alt: str) -> None:
        self.blocks.append(("img", (path, rel, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in v))
            elif kind == "table":
                header, rows = v
                lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{v[2]}]({v[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        body: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                body.append(f"<h{v[0]}>{e(v[1])}</h{v[0]}>")
            elif kind == "p":
                body.append(f"<p>{e(v)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in v) + "</ul>")
            elif kind == "table":
                header, rows = v
                head = "".join(f"<th>{e(c)}</th>" for c in header)
                trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(Path(v[0]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(v[2])}" src="data:image/png;base64,{data}"></figure>')
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
            "img{max-width:100%}figure{margin:1em 0}"
            "@media print{body{max-width:none}figure{break-inside:avoid}}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


# ---------------------------------------------------------------------------------------
# Building the report


@dataclass
class ReportFiles:
    results_jsonl: Path
    summary_csv: Path
    report_md: Path
    report_html: Path
    figures: list[Path]
    missing: list[str]


def _fmt(x: Any, spec: str = ".2f") -> str:
    v = as_float(x) if not isinstance(x, str) else math.nan
    return "n/a" if not math.isfinite(v) else format(v, spec)


def _fmt_ci(row: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    # differences are judged against 0, ratios against 1: keep the side of those visible
    ref = 0.0 if key.endswith("_diff") else 1.0 if key.startswith(("speedup", "throughput")) else math.nan
    return fmt_bounds(
        as_float(row[f"{key}_ci_low"]), as_float(row[f"{key}_ci_high"]), ref, scale, sign=spec.startswith("+")
    )


def _describe_missing(cells: Sequence[Cell], runs: dict[Cell, RunData]) -> list[str]:
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


def _settings(grid: dict[str, Any] | None, runs: dict[Cell, RunData]) -> list[str]:
    cfg = dict(grid.get("train", {})) if grid else {}
    if not cfg and runs:
        cfg = next(iter(runs.values())).config
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
    if threads := _threads(runs):
        items.append(threads)
    return items


def _threads(runs: dict[Cell, RunData]) -> str | None:
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


def build_report(
    results_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    target_acc: float | None = None,
    method: str | None = None,
    level: float = 0.95,
) -> ReportFiles:
    """Read every run under ``results_dir`` (and ``extra_dirs``), write records, summary and report.

    ``target_acc`` and ``method`` default to what the grid was run with (grid.json), else
    0.9 and ``"t"``.
    """
    out = Path(results_dir)
    dirs = [out, *(Path(d) for d in extra_dirs)]
    grid, runs = collect(dirs)
    if not runs and read_jsonl(out / "results.jsonl"):
        # e.g. a copied report without its run folders: regenerating would replace the stored
        # figures with an empty report, so refuse rather than destroy them
        raise UsageError(
            f"{out} has results.jsonl but no run folders under {out / RUNS_DIR}; a report regenerates from the "
            "run folders, so copy them back or point at the original results folder"
        )
    cells = sorted(set(grid_cells(grid)) | set(runs)) if grid else sorted(runs)
    models = list(dict.fromkeys([*((grid or {}).get("models") or []), *(c.model for c in cells)]))
    targets = targets_for(target_acc, grid, runs, models)
    method = check_interval_method(method or (grid or {}).get("interval", "t"), runs, models)
    records = [run_record(runs[c], targets[c.model], out) for c in cells if c in runs]
    rows = summarize_all(records, grid, targets, method, level)
    expected = expected_cells(grid, cells, runs)
    init_probe = read_init_probe(dirs)
    add_plan_and_init_probe(rows, grid, expected, runs, init_probe)
    missing = _describe_missing(expected, runs)
    timing = _read_json(out / TIMING_FILE)
    decisions = decide(grid, runs, timing, targets)
    # Derived files first: they are the machine-readable truth the report is drawn from.
    results_jsonl, summary_csv = _write_derived_files(out, records, rows, decisions)

    from reslab.report import figures as plots  # matplotlib only when drawing

    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    doc, title = Doc(), f"reslab comparison: {out.name}"
    doc.h(1, title)
    _decision_section(doc, decisions, grid, read_probe_entries(dirs), timing)
    _settings_section(doc, grid, runs, targets, method, level, len(cells), expected, missing)
    figures: list[Path] = []
    shown = list(dict.fromkeys(r["model"] for r in rows))
    for model in shown:
        view = _ModelView(model, [r for r in rows if r["model"] == model], len(shown) > 1, targets, level)
        _verdict_section(doc, view)
        _summary_section(doc, view)
        _convergence_section(doc, view)
        by_tech = runs_by_technique(runs, model)
        figures += _curves_section(doc, view, by_tech, fig_dir, plots)
        _cost_section(doc, view, timing)
        figures += _gradient_section(doc, view, by_tech, init_probe, fig_dir, plots)
    _files_section(doc, out)
    report_md, report_html = out / "report.md", out / "report.html"
    atomic_write_text(report_md, doc.markdown())
    atomic_write_text(report_html, doc.html(title))
    return ReportFiles(results_jsonl, summary_csv, report_md, report_html, figures, missing)


def _write_derived_files(
    out: Path, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], decisions: Sequence[Decision]
) -> tuple[Path, Path]:
    """results.jsonl, summary.csv and decisions.json; returns the first two."""
    results_jsonl = out / "results.jsonl"
    atomic_write_text(results_jsonl, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))
    summary_csv = out / "summary.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in SUMMARY_COLUMNS})
    atomic_write_text(summary_csv, buf.getvalue())
    atomic_write_text(out / DECISIONS_FILE, json.dumps([decision_record(d) for d in decisions], indent=1) + "\n")
    return results_jsonl, summary_csv


def _settings_section(
    doc: Doc,
    grid: dict[str, Any] | None,
    runs: dict[Cell, RunData],
    targets: dict[str, float],
    method: str,
    level: float,
    n_cells: int,
    expected: Sequence[Cell],
    missing: Sequence[str],
) -> None:
    """Settings, how the intervals are made, and which runs are finished."""
    doc.h(2, "Settings")
    doc.ul(_settings(grid, runs))
    method_words = (
        "Student's t distribution over seeds"
        if method == "t"
        else "paired percentile bootstrap over seeds (10,000 resamples, fixed seed)"
    )
    doc.p(
        f"Intervals are {round(100 * level)}% confidence intervals from the {method_words}. Differences and "
        f"speed-ups are paired by seed (seed k sees the same data order and augmentation in every technique). "
        f"Speed-ups are geometric means of baseline time / technique time over the seeds where both reached the "
        f"target. p-values are two-sided paired t-tests; 'p (Holm)' adjusts them for comparing several techniques "
        f"with one baseline (Holm-Bonferroni). Target validation accuracy: "
        + ", ".join(f"{m} {stats.fmt_pct(t, 1)}" for m, t in targets.items())
        + "."
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
class _ModelView:
    """One model's part of the report: its summary rows and how its headings are named."""

    model: str
    rows: list[dict[str, Any]]
    several_models: bool
    targets: dict[str, float]
    level: float

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


def _verdict_section(doc: Doc, v: _ModelView) -> None:
    doc.h(2, f"Verdict{v.suffix}")
    if not any(r["technique"] == BASELINE for r in v.rows):
        doc.p("No baseline runs found, so no technique is compared against baseline.")
    for r in v.rows:
        doc.p(f"{r['technique']}: " + " ".join(verdict(r, v.level) or ["no finished runs yet."]))


def _summary_section(doc: Doc, v: _ModelView) -> None:
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
            "diff vs baseline (pp)",
            f"{v.lvl} CI (pp)",
            "p",
            "p (Holm)",
        ],
        [
            [
                r["technique"],
                f"{r['completed']}/{r['diverged']}/{r['unfinished']}",
                f"{_fmt(as_float(r['test_acc_mean']) * 100)} ± {_fmt(as_float(r['test_acc_std']) * 100)}",
                _fmt_ci(r, "test_acc", 100),
                _fmt(as_float(r["test_acc_iqm"]) * 100)
                if math.isfinite(as_float(r["test_acc_iqm"]))
                else "n/a (n < 4)",
                _fmt(as_float(r["best_val_acc_mean"]) * 100),
                _fmt(as_float(r["auc_mean"]) * 100),
                "-" if r["technique"] == BASELINE else _fmt(as_float(r["test_acc_diff"]) * 100, "+.2f"),
                "-" if r["technique"] == BASELINE else _fmt_ci(r, "test_acc_diff", 100, "+.2f"),
                "-" if r["technique"] == BASELINE else _fmt(r["test_acc_diff_p"], ".3g"),
                "-" if r["technique"] == BASELINE else _fmt(r.get("test_acc_diff_p_holm"), ".3g"),
            ]
            for r in v.rows
        ],
    )


def _convergence_section(doc: Doc, v: _ModelView) -> None:
    doc.h(2, f"Convergence{v.suffix}")
    doc.table(
        [
            "technique",
            f"reached {100 * v.target:.1f}%",
            "median epochs",
            "median seconds",
            "speed-up (epochs)",
            f"{v.lvl} CI",
            "speed-up (seconds)",
            f"{v.lvl} CI",
        ],
        [
            [
                r["technique"],
                f"{r['reached']}/{r['reached_of']}",
                _fmt(r["epochs_to_target_median"], ".0f")
                if math.isfinite(as_float(r["epochs_to_target_median"]))
                else "not reached",
                _fmt(r["seconds_to_target_median"], ".1f")
                if math.isfinite(as_float(r["seconds_to_target_median"]))
                else "not reached",
                "-" if r["technique"] == BASELINE else _fmt(r["speedup_epochs"]),
                "-" if r["technique"] == BASELINE else _fmt_ci(r, "speedup_epochs"),
                "-" if r["technique"] == BASELINE else _fmt(r["speedup_seconds"]),
                "-" if r["technique"] == BASELINE else _fmt_ci(r, "speedup_seconds"),
            ]
            for r in v.rows
        ],
    )
    doc.p(
        "Medians count a seed that never reached the target (or diverged) as slower than every other seed; "
        "'not reached' means fewer than half of the seeds reached it. Seconds are the cumulative time of the "
        "epochs (training and the per-epoch validation) as measured while the grid ran, so they include any "
        "sharing of the CPU between parallel runs."
    )


def _curves_section(
    doc: Doc, v: _ModelView, by_tech: dict[str, list[RunData]], fig_dir: Path, plots: Any
) -> list[Path]:
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


def _cost_section(doc: Doc, v: _ModelView, timing: dict[str, Any]) -> None:
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
                "-" if r["technique"] == BASELINE else _fmt(r["params_ratio"], ".3f") + "x",
                f"{int(r['flops']):,}" if r["flops"] else "n/a",
                "-" if r["technique"] == BASELINE else _fmt(r["flops_ratio"], ".3f") + "x",
                _step_ms(timing, v.model, r["technique"]),
                "-" if r["technique"] == BASELINE else _step_ratio_text(timing, v.model, r["technique"]),
            ]
            for r in v.rows
        ],
    )
    doc.p(
        "FLOPs count convolutions and matrix products for one image (a multiply-add is 2). Step times come from "
        "the dedicated timing pass (reslab.timing: every technique's training steps interleaved, nothing else "
        "running, the workers' thread count); the grid's own runs shared the CPU, so their throughput "
        "(summary.csv, images_per_s) is not a cost figure."
    )


def _gradient_section(
    doc: Doc,
    v: _ModelView,
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
                    _fmt(r["init_grad_ratio"], ".3g"),
                    str(r["init_grad_verdict"] or "n/a"),
                    _fmt(r["worst_grad_ratio"], ".3g"),
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


def _files_section(doc: Doc, out: Path) -> None:
    doc.h(2, "Files")
    doc.p(
        "results.jsonl holds one record per run, summary.csv one row per technique with every figure above "
        "(and more); each run folder under runs/ holds its config.yaml, metrics.jsonl and summary.json. "
        "Regenerate this report with: reslab report " + str(out)
    )


def _step_ms(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.engine.timing import step_seconds

    v = step_seconds(timing, model, technique)
    return "n/a" if v is None else f"{1000 * v:.1f} ms"


def _step_ratio_text(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.engine.timing import step_ratio

    r = step_ratio(timing, model, technique)
    return "n/a" if r is None else f"{r[0]:.3f}x [{r[1]:.3f}, {r[2]:.3f}]"


def _git_commit() -> str | None:
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


_LABEL = {"better": "**better**", "worse": "**worse**", "equivalent": "**equivalent**", "undecided": "undecided"}


def _decision_section(
    doc: Doc,
    decisions: Sequence[Decision],
    grid: dict[str, Any] | None,
    probe_entries: Sequence[dict[str, Any]],
    timing: dict[str, Any],
) -> None:
    """The report's first section: what to do, per model and technique, and how sure it is."""
    commit = _git_commit()
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
    d0 = decisions[0]
    doc.table(
        [
            "model",
            "technique",
            "decision",
            "test acc. difference, pp [interval]",
            "seeds",
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
                _LABEL[d.decision] + (f" ({d.why_open})" if d.why_open else ""),
                (f"{pp(d.look.mean)} [{pp(d.look.low)}, {pp(d.look.high)}]" if d.look else "n/a"),
                f"{d.seeds}"
                + (f" of {d.max_seeds}" if d.sequential else "")
                + (f" ({d.diverged} diverged)" if d.diverged else ""),
                (
                    f"{d.p_better.estimate:.2f} [{d.p_better.low:.2f}, {d.p_better.high:.2f}]"
                    if d.p_better and d.p_better.defined
                    else "n/a"
                ),
                pp(d.look.mdd, sign=False) if d.look else "n/a",
                f"{_fmt(d.params_ratio, '.3f')}x / {_fmt(d.flops_ratio, '.3f')}x",
                (f"{d.step[0]:.2f}x [{d.step[1]:.2f}, {d.step[2]:.2f}]" if d.step else "n/a"),
                gradient_verdict(probe_entries, d.technique),
                d.recommendation,
            ]
            for d in decisions
        ],
    )
    plan_words = (
        f"seeds were added one round at a time ({d0.max_seeds} at most) and a technique stopped as soon as it was "
        f"decided; each look's interval is built at a two-sided level of {d0.nominal:.4f} (Pocock-type constant "
        f"level, found by simulating the paired t statistic over the planned looks), so that the intervals of "
        f"all looks hold together with probability {1 - d0.alpha:.0%} (repeated confidence intervals, Jennison & "
        f"Turnbull 1989)"
        if d0.sequential
        else f"every seed was trained (no sequential stopping), so the interval is a plain paired t interval at "
        f"{1 - d0.alpha:.0%}"
    )
    doc.p(
        "How to read this: the difference is technique minus baseline in final test accuracy, paired by seed "
        f"(seed k sees the same data order and augmentation in every technique); {plan_words}. Decisions: "
        f"better / worse when the whole interval lies above / below 0, equivalent when it lies within "
        f"+-{100 * d0.margin:.2g} pp (the margin), otherwise undecided. The chance of any wrong decision per row "
        f"is at most {d0.alpha:g} (for normally distributed differences; checked by simulation in reslab's tests). "
        "A diverged run counts at chance level (a constant prediction of the most frequent test class). "
        "'Detectable diff.' is the smallest true difference these seeds would detect with 80% power at the "
        "observed spread. P(beats baseline in a seed) is the share of paired seeds the technique won, with an "
        "exact Clopper-Pearson 95% interval. Params / FLOPs are ratios to baseline; time per step is the "
        "median ratio to baseline in a dedicated interleaved timing pass (reslab.timing; range over rounds), not "
        "the grid's own runs, which shared the CPU. Gradients at init: reslab.probe's verdict and max/min "
        "block-output gradient ratio at each depth measured (the grid's models and 56 and 110 layers, at the grid's "
        "width)."
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
                    f"{_fmt(d.convergence['epochs_median'])} / {_fmt(d.convergence['base_epochs_median'])}",
                    (
                        f"{d.convergence['speedup']:.2f}x [{d.convergence['low']:.2f}, {d.convergence['high']:.2f}]: "
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


#: the decision table, machine-readable (one object per model x technique)
DECISIONS_FILE = "decisions.json"


def decision_record(d: Decision) -> dict[str, Any]:
    """One decisions.json object (JSON has no NaN: missing numbers are null)."""
    lk = d.look
    rec = {
        "model": d.model,
        "technique": d.technique,
        "decision": d.decision,
        "open_because": d.why_open or None,
        "seeds": d.seeds,
        "max_seeds": d.max_seeds,
        "sequential": d.sequential,
        "alpha": d.alpha,
        "margin": d.margin,
        "per_look_level": d.nominal,
        "diff_mean": lk.mean if lk else None,
        "diff_low": lk.low if lk else None,
        "diff_high": lk.high if lk else None,
        "detectable_diff": lk.mdd if lk else None,
        "p_better": d.p_better.estimate if d.p_better else None,
        "p_better_low": d.p_better.low if d.p_better else None,
        "p_better_high": d.p_better.high if d.p_better else None,
        "diverged": d.diverged,
        "params_ratio": d.params_ratio,
        "flops_ratio": d.flops_ratio,
        "step_time_ratio": d.step[0] if d.step else None,
        "convergence": d.convergence,
        "recommendation": d.recommendation,
    }
    return _json_safe(rec)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return "" if v is None else v
