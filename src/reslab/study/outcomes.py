"""What the stored outcomes call for next: every cell of a fixed grid, or for a sequential
one the seeds of the next look of every undecided comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reslab.study.decisions import chance_of, error_rate_of, open_cells, table_outcomes
from reslab.study.grid import Grid
from reslab.study.results import (
    BASELINE,
    FINISHED,
    Cell,
    RunData,
    summary_value,
)
from reslab.study.rule import Outcome


@dataclass
class Outcomes:
    """Every cell's outcome value so far (:func:`reslab.study.results.run_value`) and status."""

    values: dict[Cell, float] = field(default_factory=dict)
    status: dict[Cell, str] = field(default_factory=dict)
    #: per model, the chance accuracy its runs recorded (summary.json's chance_acc)
    chance: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: dict[Cell, RunData]) -> Outcomes:
        out = cls()
        for c, run in runs.items():
            out.add(c, run.status, run.summary)
        return out

    def add(self, cell: Cell, status: str | None, summary: dict[str, Any]) -> None:
        self.status[cell] = str(status)
        if isinstance(c := summary.get("chance_acc"), (int, float)):
            self.chance.setdefault(cell.model, []).append(float(c))
        v = summary_value(status, summary)
        if v is not None:
            self.values[cell] = v

    def finished(self, cell: Cell) -> bool:
        return self.status.get(cell) in FINISHED

    def chance_of(self, model: str) -> float | None:
        return chance_of([{"chance_acc": c} for c in self.chance.get(model, [])])


def grid_outcomes(grid: Grid, outcomes: Outcomes) -> dict[tuple[str, str], Outcome]:
    """Where every comparison of a sequential grid stands now, by the rule the report decides with."""
    plan = grid.plan()
    assert plan is not None
    chances = {m: outcomes.chance_of(m) for m in grid.models}
    error_rate = error_rate_of({"error_rate": grid.error_rate})
    return table_outcomes(
        plan, error_rate, grid.seeds, outcomes.status, outcomes.values, grid.models, grid.techniques, chances
    )


def comparison_outcome(grid: Grid, outcomes: Outcomes, model: str, technique: str) -> Outcome:
    """Where one sequential comparison stands now (decided with the rest of its table)."""
    return grid_outcomes(grid, outcomes)[(model, technique)]


def needed_cells(grid: Grid, outcomes: Outcomes) -> list[Cell]:
    """Cells the grid needs now and has no outcome for: every cell of a fixed grid; for a
    sequential one, the seeds of the next look of every undecided technique (and baseline's)."""
    plan = grid.plan()
    if plan is None:
        return [c for c in grid.cells() if not outcomes.finished(c)]
    need = open_cells(grid_outcomes(grid, outcomes), grid.seeds)
    order = {c: i for i, c in enumerate(grid.cells())}
    return sorted((c for c in need if not outcomes.finished(c)), key=order.__getitem__)


def planned_cells(grid: Grid, outcomes: Outcomes, upper: bool) -> list[Cell]:
    """Cells still to train if every open comparison stops at its next look (``upper=False``)
    or runs to the plan's last look (``upper=True``): the bounds of the time estimate."""
    plan = grid.plan()
    if plan is None or not upper:
        return needed_cells(grid, outcomes)
    need = set(needed_cells(grid, outcomes))
    for m in grid.models:
        open_techs = [c.technique for c in need if c.model == m and c.technique != BASELINE]
        for t in {*open_techs, *([BASELINE] if open_techs else [])}:
            need |= {Cell(m, t, s) for s in grid.seeds[: plan.max_seeds] if not outcomes.finished(Cell(m, t, s))}
    return sorted(need)
