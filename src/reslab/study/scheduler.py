"""One ``compare`` process's view of a grid: the outcomes so far (its own and other
workers'), which cells to claim next, the budget, the progress, and what it ran."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.progress import Progress
from reslab.study.cells import CellRun, error_line, record_failure
from reslab.study.claims import Claims, describe
from reslab.study.estimate import Estimator, estimate_lines, fmt_duration
from reslab.study.grid import Grid, shard_cells
from reslab.study.outcomes import Outcomes, grid_outcomes, needed_cells
from reslab.study.results import (
    BASELINE,
    FAILED_DIR,
    RUNS_DIR,
    Cell,
    read_run,
)


class GridProgress(Progress):
    """Work left as estimated seconds: a bar with ETA on a terminal, a line every
    ``every`` seconds (and one per finished run) otherwise."""

    def __init__(self, enabled: bool, every: float = 30.0) -> None:
        fmt = "{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}"
        super().__init__("compare", enabled=enabled, every=every, remaining=fmt_duration, bar_format=fmt)


@dataclass
class CompareResult:
    results: Path
    ran: list[Cell]
    skipped: list[Cell]
    failed: list[Cell]
    diverged: list[Cell]
    wall_s: float
    report: Any = None
    budget_spent: bool = False
    #: why no report was written by this process (another worker writes it, or wrote it)
    report_note: str | None = None


def describe_outcome(cell: Cell, summary: dict[str, Any]) -> str:
    st = summary.get("status")
    if st == "completed":
        return (
            f"{cell.name}: completed, test_acc {summary['test_acc']:.4f}, best val_acc "
            f"{summary['best_val_acc']:.4f}, {summary['elapsed_s']:.0f}s"
        )
    if st == "diverged":
        return f"{cell.name}: diverged in epoch {summary.get('diverged_epoch')} (recorded; the grid goes on)"
    return f"{cell.name}: {st}"


#: seconds between looks at the results folder while other workers hold the cells left
POLL_S = 2.0


class Scheduler:
    """What one ``compare`` process knows and decides: the outcomes so far (its own and, read
    from the folder, other workers'), which cells to claim next, the budget, the progress."""

    def __init__(
        self,
        grid: Grid,
        results: Path,
        claims: Claims,
        est: Estimator,
        jobs: int,
        shard: tuple[int, int] | None,
        prog: GridProgress,
        t0: float,
    ) -> None:
        self.grid, self.results, self.claims, self.est, self.jobs, self.prog, self.t0 = (
            grid,
            results,
            claims,
            est,
            jobs,
            prog,
            t0,
        )
        self.cells = grid.cells()
        self.order = {c: i for i, c in enumerate(self.cells)}
        self.mine = set(shard_cells(self.cells, shard, est.predicted))
        self.outcomes = Outcomes()
        self.ran: list[Cell] = []
        self.failed: list[Cell] = []
        self.diverged: list[Cell] = []
        self.lost: list[Cell] = []
        self.budget_spent = False
        self.done_s = 0.0
        self.sync()
        self.skipped = [c for c in self.cells if self.outcomes.finished(c) and c in self.mine]

    def sync(self) -> None:
        """Read the outcomes other workers have recorded since the last look."""
        for c in self.cells:
            if self.outcomes.finished(c):
                continue
            run = read_run(self.results / RUNS_DIR / c.name)
            if run is not None and run.finished:
                self.outcomes.add(c, run.status, run.summary)
                if run.summary.get("elapsed_s"):
                    self.est.observe(c, float(run.summary["elapsed_s"]), int(run.summary.get("pack_size") or 1))

    def status(self) -> str:
        plan = self.grid.plan()
        n = len(self.ran) + len(self.failed)
        if plan is None:
            return f"{n} runs done"
        states = list(grid_outcomes(self.grid, self.outcomes).values())
        decided = sum(1 for o in states if o.decision != "undecided")
        return f"{n} runs done, {decided}/{len(states)} comparisons decided"

    def refresh(self) -> None:
        total, _ = estimate_lines(self.grid, self.est, self.outcomes, self.jobs)
        self.prog.update(self.done_s, self.done_s + total, self.status())

    def needed(self) -> list[Cell]:
        """Cells of this shard the grid needs now, not failed here: claimable or held elsewhere."""
        return [c for c in needed_cells(self.grid, self.outcomes) if c in self.mine and c not in self.failed]

    def next_cells(self, busy: set[Cell]) -> list[Cell]:
        """Cells to claim next, best first: seed-major (a grid stopped half-way keeps complete,
        paired seeds), and within a seed the costliest model first, so that the last runs of
        every worker are short ones and the workers finish together."""
        held = set(self.claims.active(c.name for c in self.cells))
        cand = [c for c in self.needed() if c not in busy and c.name not in held]
        cand.sort(key=lambda c: (c.seed, -self.est.seconds(Cell(c.model, BASELINE, c.seed)), self.order[c]))
        if self.grid.budget_s is not None and cand:
            left = self.grid.budget_s - (time.perf_counter() - self.t0)
            fits = [c for c in cand if self.est.seconds(c) <= left]
            if len(fits) < len(cand):
                self.budget_spent = True
            cand = fits
        return cand

    def next_packs(self, busy: set[Cell], size: int) -> list[list[Cell]]:
        """:meth:`next_cells` gathered into packs of at most ``size`` cells of one model and
        technique (distinct seeds: what one packed model trains), best first; with ``size`` 1,
        one cell each."""
        packs: list[list[Cell]] = []
        open_pack: dict[tuple[str, str], list[Cell]] = {}
        for c in self.next_cells(busy):
            key = (c.model, c.technique)
            p = open_pack.get(key)
            if p is None or len(p) >= size:
                p = open_pack[key] = []
                packs.append(p)
            p.append(c)
        return packs

    def held_elsewhere(self, busy: set[Cell]) -> list[Cell]:
        """Needed cells that other live workers are training (wait for them, unless out of budget)."""
        if self.budget_spent:
            return []
        held = set(self.claims.active(c.name for c in self.cells))
        return [c for c in self.needed() if c not in busy and c.name in held]

    def finished(self, cell: Cell, run: CellRun | None, error: BaseException | None) -> None:
        if error is not None or (run is not None and run.kind == "failed"):
            msg = error_line(error) if error is not None else str(run.error if run else "")
            self.done_s += self.est.seconds(cell) / self.jobs
            self.failed.append(cell)
            self.outcomes.status[cell] = "failed"
            record_failure(self.results, cell, msg)
            self.prog.line(f"{cell.name}: FAILED ({msg}); the grid goes on")
            return
        assert run is not None
        if run.kind == "lost":
            self.lost.append(cell)
            self.prog.line(f"{cell.name}: taken over by another worker (this one had stalled); it resumes the run")
            return
        if run.kind != "trained":
            if run.kind == "finished" and run.summary is not None:
                self.outcomes.add(cell, run.summary.get("status"), run.summary)
            return
        summary = run.summary or {}
        self.done_s += self.est.seconds(cell) / self.jobs
        (self.results / FAILED_DIR / f"{cell.name}.json").unlink(missing_ok=True)
        self.ran.append(cell)
        self.outcomes.add(cell, summary.get("status"), summary)
        if summary.get("elapsed_s"):
            self.est.observe(cell, float(summary["elapsed_s"]), int(summary.get("pack_size") or 1))
        if summary.get("status") == "diverged":
            self.diverged.append(cell)
        self.prog.line(f"[{len(self.ran) + len(self.failed)}] " + describe_outcome(cell, summary))

    def wait_for_others(self, busy: set[Cell]) -> bool:
        """True (after a pause and a fresh look) when cells this process needs are held by
        other workers; False when there is nothing left to wait for."""
        others = self.held_elsewhere(busy)
        if not others:
            return False
        holders = {describe(h) for h in self.claims.active(c.name for c in others).values()}
        self.prog.update(
            self.done_s,
            self.done_s,
            f"{self.status()}; waiting for {len(others)} runs of other workers ({', '.join(sorted(holders)[:3])})",
        )
        time.sleep(POLL_S)
        self.sync()
        return True
