"""Technique x seed (x model) grids over the training engine, resumable and shardable.

A grid trains every ``(model, technique, seed)`` cell with :func:`reslab.train.train` into
``RESULTS/runs/MODEL-TECHNIQUE-sSEED`` and then writes the report (:mod:`reslab.report`).

* **Paired seeds.** The engine derives every random choice of an epoch (data order, crop
  offsets, flips, DropPath) from ``(seed, epoch)`` only, and the train/validation split from
  a fixed seed, so seed k sees the same images in the same order with the same augmentation
  in every technique; only the model's own initialisation differs.
* **Resumable.** A finished cell (completed or diverged) is never run again or touched; an
  interrupted one resumes from its last checkpoint; one killed before its first checkpoint
  restarts. Re-running the same command therefore continues where the last one stopped.
* **Diverged runs** are results: they are recorded (``status: diverged``) and the grid goes on.
  A run that fails with an unexpected error is written to ``failed/NAME.json`` and the grid goes
  on; the command then exits with status 1.
* ``jobs`` runs cells in that many processes, each with ``cores // jobs`` threads.
* ``shard=(i, n)`` takes every n-th cell of the fixed cell order starting at the i-th, so n
  machines sharing one results folder split the grid without talking to each other;
  ``reslab report`` then reads all of it.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.checkpoint import atomic_write_text
from reslab.config import RESUMABLE_CHANGES, TrainConfig, default_threads
from reslab.decisions import open_cells, paired_diffs
from reslab.errors import UsageError
from reslab.progress import Progress
from reslab.report import build_report
from reslab.results import (
    BASELINE,
    FAILED_DIR,
    FINISHED,
    GRID_FILE,
    PROBE_FILE,
    RUNS_DIR,
    TIMING_FILE,
    Cell,
    RunData,
    read_run,
    summary_value,
)
from reslab.sequential import Look, Plan, run_to_decision
from reslab.timing import measure_step_times, step_seconds

#: Presets, sized by measurement (benchmarks/README.md, "The quick preset").
#:
#: ``quick`` (what ``reslab compare`` runs with no options) asks the article's question where
#: it can be answered on a 2-core CPU within 6 minutes (4 min 6 s measured): a shallow ResNet-8 and a deep
#: ResNet-56, both at quarter width (4/8/16 channels), on a fixed 2,000-image Fashion-MNIST
#: subset for 2 epochs, validated twice per epoch on 500 held-out images, tested on a fixed
#: 2,000 test images. Seeds are added until each technique is decided (4 to 6 seeds: at 3 the
#: t quantile of a 2-degree-of-freedom interval is too wide for these noisy short runs) within
#: a 5-minute budget.
#: ``paper`` is the full study, for a GPU machine.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "models": ["resnet8", "resnet56"],
        "techniques": ["baseline", "scale", "norm", "fusion"],
        "seeds": [0, 1, 2, 3, 4, 5],
        "sequential": {"min_seeds": 4, "max_seeds": 6, "step": 1, "alpha": 0.05, "margin": 0.005},
        "budget_s": 300.0,
        "target_acc": "auto",
        "train": {
            "dataset": "fashion-mnist",
            "epochs": 2,
            "width": 0.25,
            "train_subset": 2000,
            "val_size": 500,
            "test_subset": 2000,
            "batch_size": 64,
            "evals_per_epoch": 2,
        },
        "jobs": 2,
    },
    "paper": {
        "models": ["resnet20", "resnet56", "resnet110"],
        "techniques": ["all"],
        "seeds": list(range(10)),
        "sequential": {"min_seeds": 3, "max_seeds": 10, "step": 1, "alpha": 0.05, "margin": 0.005},
        "budget_s": None,
        "target_acc": "auto",
        "train": {"dataset": "fashion-mnist", "epochs": 30, "probe_every": 100, "evals_per_epoch": 4},
        "jobs": 1,
    },
}

#: TrainConfig fields that identify a cell (set per cell, not shared by the grid)
CELL_FIELDS = ("model", "technique", "seed")
#: fields that may differ between invocations of one grid (where and how fast, not what)
FREE_FIELDS = RESUMABLE_CHANGES | {"threads"}


@dataclass
class Grid:
    """What a comparison trains: cells = models x techniques x seeds, sharing ``train`` settings.

    With ``sequential`` (a :class:`reslab.sequential.Plan` as a dict), ``seeds`` is the most the
    plan may use; seeds are added in rounds and each technique stops when it is decided.
    ``target_acc`` is a validation accuracy, or ``"auto"`` (per model: 95% of baseline's mean
    final validation accuracy, set when the report is drawn).
    """

    models: list[str]
    techniques: list[str]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    target_acc: float | str = 0.9
    interval: str = "t"
    preset: str | None = None
    sequential: dict[str, Any] | None = None
    budget_s: float | None = None

    def cells(self) -> list[Cell]:
        """Seed-major order: a grid stopped half-way still has complete, paired seeds."""
        return [Cell(m, t, s) for s in self.seeds for m in self.models for t in self.techniques]

    def plan(self) -> Plan | None:
        return Plan(**self.sequential) if self.sequential else None

    def config(self, cell: Cell, **extra: Any) -> TrainConfig:
        values = {**self.train, "model": cell.model, "technique": cell.technique, "seed": cell.seed, **extra}
        return TrainConfig.from_dict(values, source=f"grid cell {cell.name}")

    def shared_settings(self) -> dict[str, Any]:
        """The settings every cell trains with (all TrainConfig fields, validated, defaults filled)."""
        full = TrainConfig.from_dict(
            {**self.train, "model": self.models[0], "technique": self.techniques[0], "seed": self.seeds[0]},
            source="compare options",
        ).to_dict()
        return {k: v for k, v in full.items() if k not in CELL_FIELDS and k not in FREE_FIELDS}

    def to_json(self) -> dict[str, Any]:
        from reslab import __version__

        return {
            "version": 2,
            "reslab": __version__,
            "preset": self.preset,
            "models": self.models,
            "techniques": self.techniques,
            "seeds": self.seeds,
            "sequential": self.sequential,
            "target_acc": self.target_acc,
            "interval": self.interval,
            "train": self.shared_settings(),
        }


def resolve_techniques(names: Sequence[str]) -> list[str]:
    from reslab.techniques import list_techniques, technique_class

    out: list[str] = []
    for n in names:
        if n == "all":
            out += list_techniques()
            continue
        try:
            technique_class(n)
        except ValueError as e:
            raise UsageError(str(e)) from None
        out.append(n)
    out = list(dict.fromkeys(out))
    # baseline is what every other technique is compared against: always train it, first
    return ["baseline", *(t for t in out if t != "baseline")]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1-based i) -> ``(i, n)``."""
    if text is None:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        i = n = 0
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard must be i/n with 1 <= i <= n, e.g. 1/2, got {text!r}")
    return i, n


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    if shard is None:
        return list(cells)
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i - 1]


def prepare_results(out: Path, grid: Grid) -> Grid:
    """Create or check ``out`` for ``grid``; returns the grid to record (old cells kept).

    An existing grid may be extended (more seeds, techniques, models) but not retrained with
    other settings: that would mix incomparable runs, so it is refused before anything runs.
    """
    path = out / GRID_FILE
    new = grid.to_json()
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not all(isinstance(old.get(k), list) for k in ("models", "techniques", "seeds")):
                raise ValueError("missing the grid's lists")
            if not isinstance(old.get("train"), dict):
                raise ValueError("missing the training settings")
        except (OSError, ValueError, AttributeError):
            raise UsageError(f"{path} is unreadable or not a reslab grid; restore it, or use a new --out") from None
        diffs = [
            f"{k}={new['train'].get(k)!r} (stored: {old['train'].get(k)!r})"
            for k in sorted(set(old["train"]) | set(new["train"]))
            if old["train"].get(k) != new["train"].get(k)
        ]
        if old.get("sequential") != new["sequential"]:
            diffs.append(f"sequential plan {new['sequential']} (stored: {old.get('sequential')})")
        if diffs:
            raise UsageError(
                f"{out} holds a grid trained with other settings: {'; '.join(diffs)}; "
                "re-run with the stored settings to resume it, or choose a new --out"
            )
        merged = Grid(
            models=list(dict.fromkeys([*old["models"], *grid.models])),
            techniques=list(dict.fromkeys([*old["techniques"], *grid.techniques])),
            seeds=list(dict.fromkeys([*old["seeds"], *grid.seeds])),
            train=grid.train,
            target_acc=grid.target_acc,
            interval=grid.interval,
            preset=grid.preset if grid.preset == old.get("preset") else None,
            sequential=grid.sequential,
            budget_s=grid.budget_s,
        )
    else:
        if out.exists() and any(out.iterdir()):
            raise UsageError(
                f"{out} exists and is not a 'reslab compare' results folder (no {GRID_FILE}); choose another --out"
            )
        merged = grid
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(merged.to_json(), indent=2) + "\n")
    return merged


def run_state(run_dir: Path) -> str | None:
    """The status in ``run_dir/summary.json`` (``unknown`` when unreadable); None when no
    run started there. Read as :mod:`reslab.runs` reads it, like the engine and the report."""
    from reslab.runs import recorded_status

    return recorded_status(run_dir)


def run_cell(
    grid: Grid,
    cell: Cell,
    results: Path,
    threads: int | None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one cell (fresh, or resumed from its checkpoint); returns its summary."""
    from reslab.train import train

    run_dir = results / RUNS_DIR / cell.name
    extra = {"threads": threads} if threads else {}
    cfg = grid.config(cell, **extra)
    resume = (run_dir / "checkpoint" / "latest.json").is_file()
    # Only an unfinished run reaches here (finished ones are skipped by the caller); one
    # killed before its first checkpoint has nothing to resume and is started again.
    state = run_state(run_dir)
    if state in FINISHED:
        raise RuntimeError(f"refusing to retrain finished run {run_dir}")
    overwrite = not resume and state is not None
    return train(cfg, run_dir, resume=resume, overwrite=overwrite, progress=False, on_epoch=on_epoch)


# -- worker processes --------------------------------------------------------------------

_EVENTS: Any = None


def _worker_init(threads: int, events: Any) -> None:
    global _EVENTS
    _EVENTS = events
    import torch

    from reslab.plugins import import_from_env

    torch.set_num_threads(threads)
    # A spawned worker is a fresh interpreter: import the modules given with --import too.
    import_from_env()


def _worker(grid: Grid, cell: Cell, results: str, threads: int) -> dict[str, Any]:
    if _EVENTS is not None:
        _EVENTS.put(("pid", os.getpid()))

    def on_epoch(row: dict[str, Any]) -> None:
        if _EVENTS is not None:
            _EVENTS.put(("epoch", int(row["epoch"])))

    return run_cell(grid, cell, Path(results), threads, on_epoch)


# -- what to train next ------------------------------------------------------------------


@dataclass
class Outcomes:
    """Every cell's outcome value so far (:func:`reslab.results.run_value`) and status."""

    values: dict[Cell, float] = field(default_factory=dict)
    status: dict[Cell, str] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: dict[Cell, RunData]) -> Outcomes:
        out = cls()
        for c, run in runs.items():
            out.add(c, run.status, run.summary)
        return out

    def add(self, cell: Cell, status: str | None, summary: dict[str, Any]) -> None:
        self.status[cell] = str(status)
        v = summary_value(status, summary)
        if v is not None:
            self.values[cell] = v

    def finished(self, cell: Cell) -> bool:
        return self.status.get(cell) in FINISHED


def comparison_looks(grid: Grid, outcomes: Outcomes, model: str, technique: str) -> list[Look]:
    """The looks a sequential comparison has taken so far (the last one is its state)."""
    plan = grid.plan()
    assert plan is not None
    return run_to_decision(paired_diffs(outcomes.values, model, technique, grid.seeds), plan)


def needed_cells(grid: Grid, outcomes: Outcomes) -> list[Cell]:
    """Cells the grid needs now and has no outcome for: every cell of a fixed grid; for a
    sequential one, the seeds of the next look of every undecided technique (and baseline's)."""
    plan = grid.plan()
    if plan is None:
        return [c for c in grid.cells() if not outcomes.finished(c)]
    need: set[Cell] = set()
    for m in grid.models:
        need |= open_cells(plan, grid.seeds, outcomes.values, m, grid.techniques)
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


# -- progress ----------------------------------------------------------------------------


class _GridProgress(Progress):
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


def _describe(cell: Cell, summary: dict[str, Any]) -> str:
    st = summary.get("status")
    if st == "completed":
        return (
            f"{cell.name}: completed, test_acc {summary['test_acc']:.4f}, best val_acc "
            f"{summary['best_val_acc']:.4f}, {summary['elapsed_s']:.0f}s"
        )
    if st == "diverged":
        return f"{cell.name}: diverged in epoch {summary.get('diverged_epoch')} (recorded; the grid goes on)"
    return f"{cell.name}: {st}"


def _record_failure(results: Path, cell: Cell, error: BaseException) -> None:
    msg = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    payload = {"model": cell.model, "technique": cell.technique, "seed": cell.seed, "error": msg}
    atomic_write_text(results / FAILED_DIR / f"{cell.name}.json", json.dumps(payload) + "\n")


# -- time estimate -----------------------------------------------------------------------


class Estimator:
    """Seconds one cell takes in a worker: from the timing pass (step time x steps, plus the
    evaluations at the cost of a forward pass, a third of a step per image), corrected by the
    ratio measured on the runs that have finished."""

    #: how much slower each of several CPU workers runs than one alone: two 1-thread workers on
    #: the 2-vCPU reference machine trained resnet56 at 173 img/s each against 360 img/s alone
    #: (benchmarks/README.md); refined by the runs that finish
    PARALLEL_CPU_SLOWDOWN = 2.0

    def __init__(self, grid: Grid, timing: dict[str, Any], n_train: int, n_eval: int, jobs: int = 1) -> None:
        st = grid.shared_settings()
        self.batch = int(st["batch_size"])
        self.epochs = int(st["epochs"])
        self.steps = max(1, n_train // self.batch) * self.epochs
        self.eval_images = n_eval
        self.timing = timing
        self.measured: list[float] = []  # actual / predicted of finished runs
        self.prior = (
            self.PARALLEL_CPU_SLOWDOWN if jobs > 1 and not str(grid.train.get("device", "")).startswith("cuda") else 1.0
        )

    def predicted(self, cell: Cell) -> float:
        step = step_seconds(self.timing, cell.model, cell.technique) or step_seconds(self.timing, cell.model, BASELINE)
        if step is None:
            return 60.0
        return step * (self.steps + self.eval_images / (3 * self.batch))

    def seconds(self, cell: Cell) -> float:
        factor = statistics.median(self.measured) if self.measured else self.prior
        return self.predicted(cell) * factor

    def observe(self, cell: Cell, elapsed_s: float) -> None:
        p = self.predicted(cell)
        if p > 0 and elapsed_s > 0:
            self.measured.append(elapsed_s / p)


def estimate_lines(grid: Grid, est: Estimator, outcomes: Outcomes, jobs: int) -> tuple[float, str]:
    """(upper estimate in seconds, one-line description) of what is left to train."""
    low = sum(est.seconds(c) for c in planned_cells(grid, outcomes, upper=False)) / jobs
    high = sum(est.seconds(c) for c in planned_cells(grid, outcomes, upper=True)) / jobs
    if grid.budget_s is not None:
        high = min(high, grid.budget_s)
        low = min(low, high)
    if grid.plan() is None or abs(high - low) < 1:
        return high, f"estimated time {fmt_duration(high)}"
    return high, (
        f"estimated time {fmt_duration(low)} if every technique is decided at the next look, "
        f"at most {fmt_duration(high)}" + (f" (budget {fmt_duration(grid.budget_s)})" if grid.budget_s else "")
    )


# -- the grid ----------------------------------------------------------------------------

#: estimates above this many seconds on a CPU are announced before training starts
LONG_RUN_S = 30 * 60


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    report: bool = True,
    probe_init: bool = True,
) -> CompareResult:
    """Train the cells ``grid`` needs (all of them, or seeds until decided) into ``out``, then report.

    Settings errors (unknown technique, missing dataset, a results folder made with other
    settings) raise :class:`UsageError` before any training starts.
    """
    t0 = time.perf_counter()
    results = Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    for cell in grid.cells():  # validate every cell before the first one trains
        grid.config(cell)
    ds = _check_data(grid)
    grid = prepare_results(results, grid)
    prog = _GridProgress(progress)
    if probe_init:
        _probe_if_needed(grid, results, prog)
    threads = max(1, default_threads() // jobs)
    timing = _timing_if_needed(grid, results, ds, threads, prog)
    settings = grid.shared_settings()
    n_train, n_eval = _image_counts(settings, ds)
    est = Estimator(grid, timing, n_train, n_eval, jobs)
    all_cells = grid.cells()
    stored = {c: run for c in all_cells if (run := read_run(results / RUNS_DIR / c.name)) is not None}
    outcomes = Outcomes.of(stored)
    for c, run in stored.items():
        if run.finished and run.summary.get("elapsed_s"):
            est.observe(c, float(run.summary["elapsed_s"]))
    order = {c: i for i, c in enumerate(all_cells)}
    mine = set(shard_cells(all_cells, shard))
    skipped = [c for c in all_cells if outcomes.finished(c) and c in mine]
    total_s, words = estimate_lines(grid, est, outcomes, jobs)
    prog.line(
        f"compare: {len(grid.cells())} cells at most, {len(skipped)} already finished"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
        + f"; {jobs} job(s) x {threads} thread(s); {words}; results in {results}"
    )
    if total_s > LONG_RUN_S and not str(settings.get("device", "cpu")).startswith("cuda") and not _has_cuda():
        prog.line(
            f"compare: note: this grid is estimated at {fmt_duration(total_s)} on this CPU (over 30 minutes); "
            "Ctrl-C stops it at any time and the same command resumes it; '--preset quick' asks the same "
            "question in about 4 minutes"
        )
    ran: list[Cell] = []
    failed: list[Cell] = []
    diverged: list[Cell] = []
    budget_spent = False
    done_s = 0.0

    def status() -> str:
        plan = grid.plan()
        if plan is None:
            return f"{len(ran) + len(failed)} runs done"
        looks = [comparison_looks(grid, outcomes, m, t) for m in grid.models for t in grid.techniques if t != BASELINE]
        decided = sum(1 for lk in looks if lk and lk[-1].decision != "continue")
        return f"{len(ran) + len(failed)} runs done, {decided}/{len(looks)} comparisons decided"

    def finished(cell: Cell, summary: dict[str, Any] | None, error: BaseException | None) -> None:
        nonlocal done_s
        done_s += est.seconds(cell) / jobs
        if error is not None:
            failed.append(cell)
            outcomes.status[cell] = "failed"
            _record_failure(results, cell, error)
            prog.line(f"{cell.name}: FAILED ({type(error).__name__}: {error}); the grid goes on")
            return
        assert summary is not None
        (results / FAILED_DIR / f"{cell.name}.json").unlink(missing_ok=True)
        ran.append(cell)
        outcomes.add(cell, summary.get("status"), summary)
        if summary.get("elapsed_s"):
            est.observe(cell, float(summary["elapsed_s"]))
        if summary.get("status") == "diverged":
            diverged.append(cell)
        prog.line(f"[{len(ran) + len(failed)}] " + _describe(cell, summary))

    def next_cells(busy: set[Cell]) -> list[Cell]:
        nonlocal budget_spent
        tried = set(failed)
        cand = [c for c in needed_cells(grid, outcomes) if c in mine and c not in busy and c not in tried]
        # seed-major (a grid stopped half-way keeps complete, paired seeds); within a seed the
        # costliest model first, so the last runs to finish are short ones
        cand.sort(key=lambda c: (c.seed, -est.seconds(Cell(c.model, BASELINE, c.seed)), order[c]))
        if grid.budget_s is not None and cand:
            left = grid.budget_s - (time.perf_counter() - t0)
            fits = [c for c in cand if est.seconds(c) <= left]
            if len(fits) < len(cand):
                budget_spent = True
            cand = fits
        return cand

    def refresh() -> None:
        total, _ = estimate_lines(grid, est, outcomes, jobs)
        prog.update(done_s, done_s + total, status())

    try:
        if jobs == 1:
            while cand := next_cells(set()):
                cell = cand[0]
                refresh()
                try:
                    summary = run_cell(grid, cell, results, threads, lambda _row: refresh())
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one broken run must not stop the grid
                    finished(cell, None, e)
                else:
                    finished(cell, summary, None)
        else:
            _run_parallel(grid, results, jobs, threads, next_cells, finished, refresh)
    finally:
        prog.close()
    res = CompareResult(results, ran, skipped, failed, diverged, time.perf_counter() - t0, budget_spent=budget_spent)
    if report:
        res.report = build_report(results)
    res.wall_s = time.perf_counter() - t0
    return res


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_parallel(
    grid: Grid,
    results: Path,
    jobs: int,
    threads: int,
    next_cells: Callable[[set[Cell]], list[Cell]],
    finished: Callable[[Cell, dict[str, Any] | None, BaseException | None], None],
    refresh: Callable[[], None],
) -> None:
    """Keep ``jobs`` worker processes busy with the cells ``next_cells`` asks for, until it
    asks for none and none is running. One pool serves every round of a sequential grid."""
    # spawn, not fork: forking a process that has started OpenMP/torch threads can deadlock
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, events))
    pending: dict[Future[dict[str, Any]], Cell] = {}
    pids: set[int] = set()

    def drain() -> None:
        while True:
            try:
                kind, value = events.get_nowait()
            except (queue_mod.Empty, OSError, ValueError):
                return
            if kind == "pid":
                pids.add(int(value))
            else:
                refresh()

    try:
        while True:
            # Submit only as many runs as there are workers: nothing waits in the pool's
            # queue, so after Ctrl-C no new run starts, and each submission sees the latest decisions.
            if len(pending) < jobs:
                for cell in next_cells(set(pending.values()))[: jobs - len(pending)]:
                    pending[pool.submit(_worker, grid, cell, str(results), threads)] = cell
            if not pending:
                return
            done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                cell = pending.pop(fut)
                try:
                    summary = fut.result()
                except BrokenProcessPool as e:
                    finished(cell, None, RuntimeError(f"worker process died ({e}); re-run to resume"))
                except Exception as e:  # noqa: BLE001 - one broken run must not stop the grid
                    finished(cell, None, e)
                else:
                    finished(cell, summary, None)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches the workers too; a SIGINT sent to this process alone
        # does not, so pass it on: each run then records "interrupted" after its last
        # complete checkpoint, and the next invocation resumes it.
        drain()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except OSError:
                pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()


# -- measurements before training --------------------------------------------------------

#: depths the init probe always covers besides the grid's models: where the article's claims
#: about depth are decided, however shallow the grid's own models are
PROBE_DEPTHS = (56, 110)


def probe_targets(grid: Grid) -> list[tuple[int, float]]:
    """(depth, width) pairs the init probe covers: the grid's CIFAR-style models and
    :data:`PROBE_DEPTHS`, all at the grid's width (gradient growth with depth shows at any width;
    at width 0.25 a depth-110 probe costs a sixteenth of width 1's)."""
    width = float(grid.shared_settings()["width"])
    depths = [d for m in grid.models if (d := _cifar_depth(m)) is not None]
    return [(d, width) for d in sorted({*depths, *PROBE_DEPTHS})]


def _cifar_depth(model: str) -> int | None:
    from reslab.models import model_family

    try:
        if model_family(model) != "cifar":
            return None
    except ValueError:
        return None
    return int(model.removeprefix("resnet"))


def probe_at_init(grid: Grid, results: Path, batches: int = 1, batch_size: int = 64) -> Path:
    """Gradient flow at initialisation of every technique at the grid's models and at depths
    56 and 110 (at the grid's width), by :func:`reslab.probe.run_probe`, into ``PROBE_FILE`` in
    the probe's own format (``{"config", "results"}``, each result with its ``width``).

    It costs a forward and backward pass per batch and model. Errors are recorded in the
    file rather than stopping the grid, since the training results do not depend on it.
    """
    from reslab import probe
    from reslab.data import ArrayDataset, open_dataset

    settings = grid.shared_settings()
    results_out: list[dict[str, Any]] = []
    config: dict[str, Any] = {"batches": batches, "batch_size": batch_size, "source": "at initialisation"}
    try:
        ds = open_dataset(settings["dataset"], grid.train.get("data_dir"))
        if not isinstance(ds, ArrayDataset):
            config["error"] = "streamed (folder) datasets are not probed"
        else:
            data = probe.make_batches(ds.train_x, ds.train_y, ds.mean, ds.std, batches, batch_size, seed=0)
            by_width: dict[float, list[int]] = {}
            for d, w in probe_targets(grid):
                by_width.setdefault(w, []).append(d)
            for w, depths in by_width.items():
                entries = probe.run_probe(grid.techniques, depths, data, ds.num_classes, width=w, workers=1)
                results_out += [{**probe.entry_to_dict(e), "width": w} for e in entries]
    except Exception as e:  # noqa: BLE001 - a failed measurement must not stop the training grid
        config["error"] = f"{type(e).__name__}: {e}"
    path = results / PROBE_FILE
    atomic_write_text(path, json.dumps({"config": config, "results": results_out}, indent=1) + "\n")
    return path


def _probe_if_needed(grid: Grid, results: Path, prog: _GridProgress) -> None:
    """Probe at init unless ``PROBE_FILE`` already covers every technique at every target."""
    have: set[tuple[str, int, float]] = set()
    try:
        old = json.loads((results / PROBE_FILE).read_text())
        if "error" not in old.get("config", {}):  # a failed probe is tried again
            have = {(e["technique"], int(e["depth"]), float(e["width"])) for e in old["results"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    want = {(t, d, w) for d, w in probe_targets(grid) for t in grid.techniques}
    if want <= have:
        return
    targets = probe_targets(grid)
    depths = ", ".join(str(d) for d, _ in targets)
    prog.line(f"compare: measuring gradient flow at initialisation at depths {depths}, width {targets[0][1]:g}")
    probe_at_init(grid, results)


def _timing_if_needed(grid: Grid, results: Path, ds: Any, threads: int, prog: _GridProgress) -> dict[str, Any]:
    """The dedicated step-time pass (:mod:`reslab.timing`), once per results folder."""
    path = results / TIMING_FILE
    try:
        old = json.loads(path.read_text())
        if {f"{m}/{t}" for m in grid.models for t in grid.techniques} <= set(old.get("steps", {})):
            return old
    except (OSError, ValueError, AttributeError):
        pass
    settings = grid.shared_settings()
    prog.line("compare: timing a few training steps of every model x technique, side by side")
    timing = measure_step_times(
        grid.models,
        grid.techniques,
        tuple(ds.input_size),
        ds.num_classes,
        batch_size=int(settings["batch_size"]),
        width=float(settings["width"]),
        technique_args=dict(settings["technique_args"]),
        threads=threads,
    )
    atomic_write_text(path, json.dumps(timing, indent=1) + "\n")
    return timing


def _image_counts(settings: dict[str, Any], ds: Any) -> tuple[int, int]:
    """(training images, images evaluated per run) under ``settings``."""
    n_all = len(ds.train_x) if hasattr(ds, "train_x") else len(ds.train_files)
    n_test = len(ds.test_x) if hasattr(ds, "test_x") else len(ds.test_files)
    from reslab.train import DEFAULT_VAL_SIZE

    val = settings.get("val_size")
    val = val if val is not None else DEFAULT_VAL_SIZE.get(ds.name, n_all // 10)  # as the engine resolves it
    n_train = n_all - val
    if settings.get("train_subset"):
        n_train = min(n_train, int(settings["train_subset"]))
    test = min(n_test, int(settings["test_subset"])) if settings.get("test_subset") else n_test
    evals = (val or n_test) * int(settings.get("evals_per_epoch") or 1) * int(settings["epochs"]) + test
    return n_train, evals


def _check_data(grid: Grid) -> Any:
    """Open the dataset before training (one message, with the fix, when it cannot be found)."""
    from reslab.data import open_dataset

    try:
        return open_dataset(grid.shared_settings()["dataset"], grid.train.get("data_dir"))
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
