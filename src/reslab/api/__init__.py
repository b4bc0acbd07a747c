"""reslab from Python: run a comparison, read one back, load what it trained. The functions the
command line calls, with the same rules and checks (:mod:`reslab.study.presets` builds the grid,
:func:`reslab.study.compare.run_grid` trains it, :mod:`reslab.report` decides and writes):

>>> import reslab
>>> res = reslab.compare(models=["resnet8"], techniques=["scale"], seeds=6, out="results/mine",
...                      train={"width": 0.25, "train_subset": 2000, "epochs": 1})  # doctest: +SKIP
>>> res.rows[0]["decision"], res.rows[0]["diff_low"], res.rows[0]["diff_high"]  # doctest: +SKIP
>>> reslab.read_results("results/mine").to_dataframe()  # doctest: +SKIP
>>> model = reslab.load("results/mine/runs/resnet8-scale-s0")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import UsageError

__all__ = ["Results", "compare", "load", "read_results"]


@dataclass
class Results:
    """A results folder's decision table. ``rows``: one dict per model and technique, the same
    records as its decisions.json (``model``, ``technique``, ``decision``, ``diff_mean``,
    ``diff_low``, ``diff_high``, ``seeds``, ``technique_failed``, ``failure_rate_bound``, ...;
    accuracies as fractions, None where a number does not exist). ``missing``: runs the grid still
    lacks. ``failed``: runs of this call that raised (empty for :func:`read_results`)."""

    dir: Path
    rows: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def report(self) -> Path | None:
        """report.md, when one has been written."""
        p = self.dir / "report.md"
        return p if p.is_file() else None

    def row(self, model: str, technique: str) -> dict[str, Any]:
        for r in self.rows:
            if r["model"] == model and r["technique"] == technique:
                return r
        raise KeyError(f"no row for {model} / {technique} in {self.dir}")

    def to_dataframe(self) -> Any:
        """The rows as a pandas DataFrame (pandas is not a dependency of reslab)."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("to_dataframe needs pandas (pip install pandas); .rows has the same table") from None
        return pd.DataFrame(self.rows)

    def __repr__(self) -> str:
        decided = sum(r["decision"] != "undecided" for r in self.rows)
        state = "complete" if self.complete else f"{len(self.missing)} runs missing"
        return f"Results({str(self.dir)!r}: {len(self.rows)} rows, {decided} decided, {state})"


def read_results(path: str | Path) -> Results:
    """The decision table of a results folder, finished or half-finished, taken from its runs as
    ``reslab report`` takes it (nothing is written)."""
    from reslab.report.build import gather
    from reslab.report.derived import decision_rows

    out = Path(path)
    if not out.is_dir():
        raise UsageError(f"{out} is not a results folder (it does not exist)")
    g = gather(out)
    return Results(out, decision_rows(g.decisions), list(g.missing))


def compare(
    models: str | Sequence[str] | None = None,
    techniques: str | Sequence[str] | None = None,
    seeds: int | str | Sequence[int] | None = None,
    out: str | Path | None = None,
    train: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    until_decided: bool | None = None,
    max_seeds: int | None = None,
    margin_pp: float | None = None,
    alpha: float | None = None,
    error_rate: str | None = None,
    budget: str | float | None = None,
    target_acc: str | float | None = None,
    jobs: int | None = None,
    progress: bool = True,
    report: bool = True,
) -> Results:
    """Train a grid and return its decision table, as ``reslab compare`` does with the same
    options (``train``: training options by name, e.g. ``{"epochs": 3, "width": 0.25}``;
    ``margin_pp`` in percentage points). With no argument it is the ``quick`` preset. Re-running
    the same call resumes: finished runs are kept. ``report``: also write report.md/html."""
    from reslab.paths import check_writable_dir
    from reslab.report.build import build_report
    from reslab.study.compare import run_grid
    from reslab.study.presets import grid_from_options

    setup = grid_from_options(
        preset=preset,
        models=models,
        techniques=techniques,
        seeds=seeds,
        train=dict(train or {}),
        target_acc=target_acc,
        until_decided=until_decided,
        max_seeds=max_seeds,
        margin_pp=margin_pp,
        alpha=alpha,
        error_rate=error_rate,
        budget=budget,
        jobs=jobs,
        out=None if out is None else str(out),
    )
    grid, where = setup.grid, Path(setup.out)
    check_writable_dir(where)  # run_grid checks every cell and the folder before it writes
    res = run_grid(grid, where, jobs=setup.jobs, progress=progress, report=build_report if report else None)
    results = read_results(where)
    results.failed = [c.name for c in res.failed]
    return results


def load(path: str | Path, device: str = "cpu") -> Any:
    """The model stored at ``path``, in eval mode: a run folder (its final weights), a reslab
    weights file (a checkpoint's ``epoch-N.safetensors`` included) or a fused file."""
    from reslab.deploy.sources import load_source

    return load_source(path, device)[0]
