"""The report of a technique x seed grid: :func:`build_report` reads the stored runs
(:mod:`reslab.study.results`), has the numbers computed (:mod:`reslab.report.aggregate`) and
the decisions taken (:mod:`reslab.study.decisions`), then lays out report.md, report.html
and figures, the answer first (:mod:`reslab.report.decision_table`: regime, decision plot,
verdict table), then the details per model (:mod:`reslab.report.sections`), beside the
derived results.jsonl, summary.csv and decisions.json (:mod:`reslab.report.derived`).

It never trains, so a report regenerates at any time, from an incomplete grid, or from the
merged shards of several machines. Layout of a results folder: :mod:`reslab.study.results`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.report.aggregate import (
    add_plan_and_init_probe,
    apply_decisions,
    check_interval_method,
    expected_cells,
    is_auto_target,
    run_record,
    runs_by_technique,
    summarize_all,
    targets_for,
)
from reslab.report.decision_table import answer_section, methods_section, provenance_words, verdict_line
from reslab.report.derived import has_records, write_derived_files
from reslab.report.document import Doc
from reslab.report.sections import (
    ModelView,
    accuracy_section,
    convergence_section,
    cost_section,
    curves_section,
    describe_missing,
    details_heading,
    files_section,
    init_gradient_section,
    report_title,
    settings_section,
    training_gradient_section,
)
from reslab.study.decisions import decide, margin_of
from reslab.study.gridfile import read_timing_file
from reslab.study.regime import read_reference
from reslab.study.regime import regimes as regime_of
from reslab.study.results import (
    FIGURES_DIR,
    RUNS_DIR,
    collect,
    grid_cells,
    read_init_probe,
    read_probe_entries,
)


@dataclass
class ReportFiles:
    results_jsonl: Path
    summary_csv: Path
    report_md: Path
    report_html: Path
    figures: list[Path]
    missing: list[str]
    #: the verdict table, a line per row (:func:`reslab.report.decision_table.verdict_line`)
    verdicts: list[str] = field(default_factory=list)


@dataclass
class Gathered:
    """What a report is drawn from: the runs read, their numbers and the decisions taken."""

    out: Path
    dirs: list[Path]
    grid: dict[str, Any] | None
    runs: dict[Any, Any]
    cells: list[Any]
    models: list[str]
    targets: dict[str, float]
    method: str
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    expected: list[Any]
    init_probe: dict[tuple[str, str], dict[str, Any]]
    missing: list[str]
    timing: dict[str, Any]
    regimes: dict[str, Any]
    decisions: list[Any]


def gather(
    results_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    target_acc: float | None = None,
    method: str | None = None,
    level: float = 0.95,
    references: Sequence[str | Path] = (),
) -> Gathered:
    """Read every run under ``results_dir`` (and ``extra_dirs``) and take the decisions, writing
    nothing: what :func:`build_report` lays out, and what ``reslab.read_results`` returns."""
    out = Path(results_dir)
    dirs = [out, *(Path(d) for d in extra_dirs)]
    grid, runs = collect(dirs, strict=True)  # a corrupt summary.json is an error, not a guess
    if not runs and has_records(out):
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
    missing = describe_missing(expected, runs)
    timing = read_timing_file(out)
    regimes = regime_of(runs, models, margin_of(grid), [read_reference(r) for r in references])
    decisions = decide(grid, runs, timing, targets, regimes)
    apply_decisions(rows, decisions)
    return Gathered(
        out,
        dirs,
        grid,
        runs,
        cells,
        models,
        targets,
        method,
        records,
        rows,
        expected,
        init_probe,
        missing,
        timing,
        regimes,
        decisions,
    )


def build_report(
    results_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    target_acc: float | None = None,
    method: str | None = None,
    level: float = 0.95,
    references: Sequence[str | Path] = (),
) -> ReportFiles:
    """Read every run under ``results_dir`` (and ``extra_dirs``), write records, summary and report.

    ``target_acc`` and ``method`` default to what the grid was run with (grid.json), else
    0.9 and ``"t"``. ``references``: run folders of the grid's models trained long, against
    which the report measures how far baseline was from its plateau.
    """
    g = gather(
        results_dir, extra_dirs=extra_dirs, target_acc=target_acc, method=method, level=level, references=references
    )
    # Derived files first: they are the machine-readable truth the report is drawn from.
    results_jsonl, summary_csv = write_derived_files(g.out, g.records, g.rows, g.decisions)

    from reslab.report import figures as plots  # matplotlib only when drawing

    fig_dir = g.out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    probe_entries = read_probe_entries(g.dirs)
    doc, title = Doc(), report_title(g.grid, g.models)
    doc.h(1, title)
    doc.p(provenance_words(g.grid))
    # the answer first: regime, decision plot, verdict table; then the details that back it
    figures = answer_section(doc, g.decisions, g.regimes, g.init_probe, g.timing, fig_dir, plots)
    shown = list(dict.fromkeys(r["model"] for r in g.rows))
    for model in shown:
        mine = {d.technique: d for d in g.decisions if d.model == model}
        rows = [r for r in g.rows if r["model"] == model]
        view = ModelView(model, rows, len(shown) > 1, g.targets, level, mine, g.regimes.get(model))
        details_heading(doc, view)
        accuracy_section(doc, view)
        convergence_section(doc, view)
        by_tech = runs_by_technique(g.runs, model)
        figures += curves_section(doc, view, by_tech, fig_dir, plots)
        cost_section(doc, view, g.timing)
        figures += training_gradient_section(doc, view, by_tech, fig_dir, plots)
    init_gradient_section(doc, g.rows, probe_entries)
    settings_section(
        doc,
        g.grid,
        g.runs,
        g.targets,
        g.method,
        level,
        len(g.cells),
        g.expected,
        g.missing,
        auto_target=is_auto_target(target_acc, g.grid),
    )
    methods_section(doc, g.decisions)
    files_section(doc, g.out)
    report_md, report_html = g.out / "report.md", g.out / "report.html"
    atomic_write_text(report_md, doc.markdown())
    atomic_write_text(report_html, doc.html(title))
    verdicts = [verdict_line(d) for d in g.decisions]
    return ReportFiles(results_jsonl, summary_csv, report_md, report_html, figures, g.missing, verdicts)
