"""Results folders of ``reslab compare``: their layout, and reading the runs they hold.

Written by :mod:`reslab.study.compare` and read by :mod:`reslab.report`; both take the layout from
here, so the writer and the reader cannot disagree::

    RESULTS/
      grid.json          the grid: models, techniques, seeds, sequential plan, shared train settings
      runs/MODEL-TECHNIQUE-sSEED/   one run folder each (as ``reslab train`` writes it)
      failed/MODEL-TECHNIQUE-sSEED.json   a run that raised an unexpected error (message)
      claims/NAME.GEN.lease   who is training a cell right now (reslab.claims); report.stamp
      probe-init.json    gradient flow at initialisation (reslab.probe's format, plus each entry's width)
      timing.json        the dedicated step-time pass (seconds per training step, per round)
      results.jsonl, summary.csv, decisions.json, report.md, report.html, figures/*.png   derived
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reslab.engine.runs import SUMMARY_FILE, UNKNOWN, read_jsonl, read_summary, status_of, summary_problem
from reslab.errors import UsageError
from reslab.study.gridfile import FAILED_DIR as FAILED_DIR  # the layout, named here for its readers
from reslab.study.gridfile import GRID_FILE, peek_grid, read_failures, read_grid_file
from reslab.study.gridfile import TIMING_FILE as TIMING_FILE

RUNS_DIR = "runs"
FIGURES_DIR = "figures"
CLAIMS_DIR = "claims"
#: inside a run folder: one line per training start (pid, host, time, resumed), written under the claim
STARTS_FILE = "starts.jsonl"
PROBE_FILE = "probe-init.json"
BASELINE = "baseline"
FINISHED = ("completed", "diverged")


def run_name(model: str, technique: str, seed: int) -> str:
    return f"{model}-{technique}-s{seed}"


@dataclass(frozen=True, order=True)
class Cell:
    """One grid point: a model trained with a technique from a seed."""

    model: str
    technique: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.model, self.technique, self.seed)


@dataclass
class RunData:
    """What a run folder holds (any part may be missing for an unfinished run)."""

    cell: Cell
    path: Path
    status: str  # completed | diverged | interrupted | running | failed | missing
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    gradients: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    #: validation inside epochs (``evals.jsonl``; empty when the run evaluated once per epoch)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


# ---------------------------------------------------------------------------------------
# Reading


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return obj if isinstance(obj, dict) else {}


def read_run(path: Path, *, strict: bool = False) -> RunData | None:
    """Read one run folder; ``None`` when it does not say which model/technique/seed it is.

    A summary.json that exists but cannot be read is, by default, a run of unknown state (it
    may be being written by another worker). With ``strict`` (the report) it is a
    :class:`UsageError` naming the file and the fix.
    """
    config = _read_yaml(path / "config.yaml")
    recorded = read_summary(path)
    if strict and recorded is None:
        check_summary_file(path / SUMMARY_FILE)
    summary = recorded or {}
    ident = {**config, **{k: v for k, v in summary.items() if v is not None}}
    try:
        cell = Cell(str(ident["model"]), str(ident["technique"]), int(ident["seed"]))
    except (KeyError, TypeError, ValueError):
        return None
    metrics = sorted(read_jsonl(path / "metrics.jsonl"), key=lambda m: int(m.get("epoch", 0)))
    # A resumed run may have re-logged an epoch; keep the last record of each.
    by_epoch = {int(m.get("epoch", 0)): m for m in metrics}
    status = status_of(recorded)
    if status == UNKNOWN:
        # no readable summary: a run killed as it started, or written by hand; the report
        # has always called it by what its metrics show
        status = "interrupted" if metrics else "running"
    return RunData(
        cell=cell,
        path=path,
        status=status,
        config=config,
        summary=summary,
        metrics=[by_epoch[e] for e in sorted(by_epoch)],
        gradients=read_jsonl(path / "gradients.jsonl"),
        evals=read_jsonl(path / "evals.jsonl"),
    )


def check_summary_file(file: Path) -> None:
    """Raise :class:`UsageError` when ``file`` exists but is not a JSON object."""
    why = summary_problem(file)
    if why is None:
        return
    raise UsageError(
        f"{file} {why}, so this run's result is unknown; re-run the same compare command to retrain it, "
        f"or delete the run folder {file.parent}"
    )


def read_grid(results_dir: Path) -> dict[str, Any] | None:
    """The folder's grid.json, checked (:func:`reslab.study.gridfile.read_grid_file`); None without one."""
    path = results_dir / GRID_FILE
    return read_grid_file(path) if path.exists() else None


def grid_cells(grid: dict[str, Any]) -> list[Cell]:
    return [Cell(m, t, int(s)) for m in grid["models"] for t in grid["techniques"] for s in grid["seeds"]]


def collect(dirs: Sequence[Path], *, strict: bool = False) -> tuple[dict[str, Any] | None, dict[Cell, RunData]]:
    """The grid (from the first folder that has one) and every run found in ``dirs``.

    ``strict``: a run whose summary.json cannot be read is an error (see :func:`read_run`).

    Several folders (e.g. shards copied from several machines) merge: when the same run is
    found twice, a finished copy wins over an unfinished one, and the first finished copy
    over later ones.
    """
    grid: dict[str, Any] | None = None
    runs: dict[Cell, RunData] = {}
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"results folder {d} does not exist; pass the --out folder of 'reslab compare'")
        g = read_grid(d)
        if grid is None and g is not None:
            grid = g
        elif g is not None and grid is not None:
            for key in ("models", "techniques", "seeds"):
                grid[key] = list(dict.fromkeys([*grid[key], *g[key]]))
        root = d / RUNS_DIR if (d / RUNS_DIR).is_dir() else d
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            run = read_run(sub, strict=strict)
            if run is None:
                continue
            old = runs.get(run.cell)
            if old is None or (run.finished and not old.finished):
                runs[run.cell] = run
        for model, technique, seed, error in read_failures(d):
            cell = Cell(model, technique, seed)
            if cell not in runs or not runs[cell].finished:
                old = runs.get(cell)
                runs[cell] = RunData(
                    cell,
                    old.path if old else d / RUNS_DIR / cell.name,
                    "failed",
                    config=old.config if old else {},
                    summary=old.summary if old else {},
                    metrics=old.metrics if old else [],
                    error=error or "unknown error",
                )
    if not runs and grid is None:
        raise UsageError(
            f"no run folders found in {', '.join(map(str, dirs))}; run 'reslab compare --out FOLDER' first"
        )
    return grid, runs


def run_value(run: RunData) -> float | None:
    """The outcome a comparison uses for one run (see :func:`summary_value`)."""
    return summary_value(run.status, run.summary)


def summary_value(status: str | None, summary: dict[str, Any]) -> float | None:
    """The outcome a comparison uses for a run with this status and summary.json: its final
    test accuracy; a diverged run counts at chance level (a constant prediction of the most
    frequent test class), since its weights are lost; None while the run has no outcome."""
    if status == "completed":
        v = summary.get("test_acc")
    elif status == "diverged":
        v = summary.get("chance_acc")
    else:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_probe_entries(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Init-probe entries (technique, depth, width, verdict, grad_ratio) of the first folder that
    has them, in reslab.probe's format (results folders of reslab 0.1 have no depth: skipped)."""
    from reslab.probe.records import read_probe_data  # here: reading a results folder needs no torch

    for d in dirs:
        data = read_probe_data(d / PROBE_FILE)
        res = data.get("results")
        if isinstance(res, list) and res:
            return [e for e in res if isinstance(e, dict) and "technique" in e and "depth" in e]
    return []


def read_init_probe(dirs: Sequence[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, technique) -> init-probe entry at that model, from the first probe-init.json found
    (reslab.probe's format, or the ``entries`` list of results folders written by reslab 0.1)."""
    from reslab.probe.records import read_probe_data  # here: reading a results folder needs no torch

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for d in dirs:
        data = read_probe_data(d / PROBE_FILE)
        if isinstance(data.get("entries"), list):
            items = [e for e in data["entries"] if isinstance(e, dict) and "model" in e and "technique" in e]
        else:
            items = []
            widths = {float((peek_grid(d / GRID_FILE).get("train") or {}).get("width", 1.0))}
            for e in data.get("results", []) if isinstance(data.get("results"), list) else []:
                if isinstance(e, dict) and "depth" in e and float(e.get("width", 1.0)) in widths:
                    items.append({**e, "model": f"resnet{int(e['depth'])}", "blocks": e.get("num_blocks")})
        for e in items:
            out.setdefault((str(e["model"]), str(e["technique"])), e)
    return out
