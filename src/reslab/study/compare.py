"""Technique x seed (x model) grids over the training engine, resumable and shardable.

A grid trains every ``(model, technique, seed)`` cell with :func:`reslab.engine.train.train` into
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
* **Claimed, not assigned.** Any number of processes (here, on other machines sharing the
  folder, or started by :mod:`reslab.launch`) may work on one results folder: a cell is
  claimed (:mod:`reslab.claims`) before it is trained, so each is trained once, and the cell
  of a dead worker is taken over and resumed. The last process to finish writes the report.
* ``shard=(i, n)`` restricts a process to the i-th of n parts of the grid, balanced by each
  cell's estimated time; ``reslab report`` reads the whole folder at any time.
"""

from __future__ import annotations

import _thread
import copy
import hashlib
import json
import math
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.engine.config import RESUMABLE_CHANGES, TrainConfig, default_threads
from reslab.engine.runs import read_summary
from reslab.engine.timing import measure_step_times, step_seconds
from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.pool import STOP_GRACE_S, WorkerDied, WorkerPool, WorkerStopped
from reslab.progress import Progress
from reslab.signals import Terminated
from reslab.study.claims import DEFAULT_LEASE_S, Claims, describe
from reslab.study.decisions import open_cells, paired_diffs
from reslab.study.results import (
    BASELINE,
    CLAIMS_DIR,
    FAILED_DIR,
    FINISHED,
    GRID_FILE,
    PROBE_FILE,
    RUNS_DIR,
    STARTS_FILE,
    TIMING_FILE,
    Cell,
    RunData,
    read_run,
    summary_value,
)
from reslab.study.sequential import Look, Plan, run_to_decision

#: Presets, sized by measurement (benchmarks/README.md, "The quick preset").
#:
#: ``quick`` (what ``reslab compare`` runs with no options) asks the article's question where
#: it can be answered on a 2-core CPU within 6 minutes (4 min 6 s to 4 min 55 s measured): a shallow ResNet-8 and a deep
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

    With ``sequential`` (a :class:`reslab.study.sequential.Plan` as a dict), ``seeds`` is the most the
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
        values = {**self.train, "model": self.models[0], "technique": self.techniques[0], "seed": self.seeds[0]}
        key = json.dumps(values, sort_keys=True, default=repr)
        if key not in _SHARED_SETTINGS:
            full = TrainConfig.from_dict(values, source="compare options").to_dict()
            _SHARED_SETTINGS[key] = {k: v for k, v in full.items() if k not in CELL_FIELDS and k not in FREE_FIELDS}
        return copy.deepcopy(_SHARED_SETTINGS[key])

    def to_json(self) -> dict[str, Any]:
        from reslab.version import __version__

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


#: Grid.shared_settings per grid (a grid's settings are built and validated once)
_SHARED_SETTINGS: dict[str, dict[str, Any]] = {}


def resolve_techniques(names: Sequence[str]) -> list[str]:
    """The grid's techniques (:func:`reslab.nn.techniques.parse_techniques`), baseline first: it is
    what every other technique is compared against, so it is always trained."""
    from reslab.nn.techniques import parse_techniques

    try:
        out = parse_techniques(names)
    except ValueError as e:
        raise UsageError(str(e)) from None
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


def shard_cells(
    cells: Sequence[Cell], shard: tuple[int, int] | None, cost: Callable[[Cell], float] | None = None
) -> list[Cell]:
    """The ``i``-th of ``n`` parts of ``cells`` (in cell order), for ``shard=(i, n)``.

    With ``cost`` (estimated seconds per cell) the parts are balanced: cells are dealt
    largest first, each to the part with the least estimated time so far (the LPT rule,
    within 4/3 of the best possible longest part). Ties go to the lower part and costs come
    from the shared ``timing.json``, so every process computes the same parts. Without it,
    every n-th cell (round robin).
    """
    if shard is None:
        return list(cells)
    i, n = shard
    if cost is None:
        return [c for k, c in enumerate(cells) if k % n == i - 1]
    loads = [0.0] * n
    part: dict[Cell, int] = {}
    for _, c in sorted(enumerate(cells), key=lambda kc: (-cost(kc[1]), kc[0])):
        j = min(range(n), key=lambda j: (loads[j], j))
        loads[j] += cost(c)
        part[c] = j
    return [c for c in cells if part[c] == i - 1]


def prepare_results(out: Path, grid: Grid) -> Grid:
    """Create or check ``out`` for ``grid``; returns the grid to record (old cells kept)."""
    merged = check_results(out, grid)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / GRID_FILE, json.dumps(merged.to_json(), indent=2) + "\n")
    return merged


def check_results(out: Path, grid: Grid) -> Grid:
    """Check, writing nothing, that ``out`` may hold ``grid``; returns the grid to record there.

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
        # names starting with a dot are other processes' atomic writes in flight (grid.json's)
        if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UsageError(
                f"{out} exists and is not a 'reslab compare' results folder (no {GRID_FILE}); choose another --out"
            )
        merged = grid
    return merged


def run_state(run_dir: Path) -> str | None:
    """The status in ``run_dir/summary.json`` (``unknown`` when unreadable); None when no
    run started there. Read as :mod:`reslab.runs` reads it, like the engine and the report."""
    from reslab.engine.runs import recorded_status

    return recorded_status(run_dir)


def run_cell(
    grid: Grid,
    cell: Cell,
    results: Path,
    threads: int | None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one cell (fresh, or resumed from its checkpoint); returns its summary."""
    from reslab.engine.train import train

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


# -- one cell, claimed ---------------------------------------------------------------------


@dataclass
class CellRun:
    """What became of one attempt at a cell.

    ``kind``: ``trained`` (by this worker; ``summary`` is its result), ``finished`` (found
    finished by another worker; its summary), ``held`` (another live worker holds it), or
    ``lost`` (this worker's claim was taken over while it trained: it had stalled for longer
    than the lease, and the taker resumes the run).
    """

    kind: str
    summary: dict[str, Any] | None = None


def _append_start(run_dir: Path, resumed: bool) -> None:
    """One line per training start in ``RUN/starts.jsonl``, written under the cell's claim: the
    record that proves no two workers trained the cell at once."""
    row = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "resumed": resumed,
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # the GPU(s) this worker was pinned to
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STARTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def claim_and_run(
    grid: Grid,
    cell: Cell,
    results: Path,
    threads: int | None,
    lease_s: float = DEFAULT_LEASE_S,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> CellRun:
    """Claim ``cell`` in ``results/claims`` and train it (fresh, or resumed from its checkpoint,
    also after taking over from a dead worker); the claim is renewed while it trains."""
    lease = Claims(results / CLAIMS_DIR, lease_s).try_claim(cell.name)
    if lease is None:
        return CellRun("held")
    run_dir = results / RUNS_DIR / cell.name
    lost = threading.Event()

    def on_lost() -> None:
        lost.set()
        # stop at the next step boundary, like Ctrl-C (through SIGTERM when it is handled:
        # a worker started from a non-interactive shell may ignore SIGINT)
        term = callable(signal.getsignal(signal.SIGTERM))
        _thread.interrupt_main(signal.SIGTERM if term else signal.SIGINT)

    try:
        with lease.renewed(on_lost):
            if run_state(run_dir) in FINISHED:
                return CellRun("finished", read_summary(run_dir))
            _append_start(run_dir, (run_dir / "checkpoint" / "latest.json").is_file())
            return CellRun("trained", run_cell(grid, cell, results, threads, on_epoch))
    except KeyboardInterrupt:
        if lost.is_set():
            return CellRun("lost")
        raise


# -- worker processes --------------------------------------------------------------------


def _worker_init(threads: int) -> None:
    import torch

    from reslab.nn.plugins import import_from_env

    torch.set_num_threads(threads)
    # A spawned worker is a fresh interpreter: import the modules given with --import too.
    import_from_env()


def _gpu_env(grid: Grid, jobs: int) -> Callable[[int], dict[str, str]] | None:
    """Pin worker i to one GPU (``CUDA_VISIBLE_DEVICES``), round robin over the visible ones,
    when the grid trains on CUDA (``device`` auto or cuda) and this machine has GPUs."""
    device = str(grid.train.get("device", "auto"))
    if device not in ("auto", "cuda") or jobs < 2:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        return None
    return lambda i: {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}


# -- what to train next ------------------------------------------------------------------


@dataclass
class Outcomes:
    """Every cell's outcome value so far (:func:`reslab.study.results.run_value`) and status."""

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
    #: why no report was written by this process (another worker writes it, or wrote it)
    report_note: str | None = None


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
#: seconds between looks at the results folder while other workers hold the cells left
POLL_S = 2.0


class _Scheduler:
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
        prog: _GridProgress,
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
                    self.est.observe(c, float(run.summary["elapsed_s"]))

    def status(self) -> str:
        plan = self.grid.plan()
        n = len(self.ran) + len(self.failed)
        if plan is None:
            return f"{n} runs done"
        looks = [
            comparison_looks(self.grid, self.outcomes, m, t)
            for m in self.grid.models
            for t in self.grid.techniques
            if t != BASELINE
        ]
        decided = sum(1 for lk in looks if lk and lk[-1].decision != "continue")
        return f"{n} runs done, {decided}/{len(looks)} comparisons decided"

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

    def held_elsewhere(self, busy: set[Cell]) -> list[Cell]:
        """Needed cells that other live workers are training (wait for them, unless out of budget)."""
        if self.budget_spent:
            return []
        held = set(self.claims.active(c.name for c in self.cells))
        return [c for c in self.needed() if c not in busy and c.name in held]

    def finished(self, cell: Cell, run: CellRun | None, error: BaseException | None) -> None:
        if error is not None:
            self.done_s += self.est.seconds(cell) / self.jobs
            self.failed.append(cell)
            self.outcomes.status[cell] = "failed"
            _record_failure(self.results, cell, error)
            self.prog.line(f"{cell.name}: FAILED ({type(error).__name__}: {error}); the grid goes on")
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
            self.est.observe(cell, float(summary["elapsed_s"]))
        if summary.get("status") == "diverged":
            self.diverged.append(cell)
        self.prog.line(f"[{len(self.ran) + len(self.failed)}] " + _describe(cell, summary))

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


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    jobs: int = 1,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    report: Callable[[Path], Any] | None = None,
    probe_init: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    threads: int | None = None,
) -> CompareResult:
    """Train the cells ``grid`` needs (all of them, or seeds until decided) into ``out``, then
    call ``report(out)`` (the report writer the caller chose, e.g. :func:`reslab.report.build.build_report`).

    Any number of processes (``jobs`` workers each, on one machine or several sharing the
    folder) may run this on one ``out`` at once: each cell is claimed before it is trained
    (:mod:`reslab.claims`), so every cell is trained once; a cell whose worker died is taken
    over and resumed. ``threads`` per job defaults to the cores this process may use shared by
    the jobs; a launcher passes what its engine allotted (Ray does not narrow the affinity).
    The report is written by the process that finds the grid finished
    with no other worker still training.

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
    claims = Claims(results / CLAIMS_DIR, lease_s)
    prog = _GridProgress(progress)
    if probe_init:
        _probe_if_needed(grid, results, prog, claims)
    # threads set in the grid's settings (--set threads=N, --config) win over a launcher's
    # allotment, so every run of every launcher trains with them (threads change CPU results)
    threads = grid.train.get("threads") or threads or max(1, default_threads() // jobs)
    timing = _timing_if_needed(grid, results, ds, threads, prog, claims)
    settings = grid.shared_settings()
    n_train, n_eval = _image_counts(settings, ds)
    est = Estimator(grid, timing, n_train, n_eval, jobs)
    sched = _Scheduler(grid, results, claims, est, jobs, shard, prog, t0)
    total_s, words = estimate_lines(grid, est, sched.outcomes, jobs)
    prog.line(
        f"compare: {len(sched.cells)} cells at most, {len(sched.skipped)} already finished"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
        + f"; {jobs} job(s) x {threads} thread(s); {words}; results in {results}"
    )
    if total_s > LONG_RUN_S and not str(settings.get("device", "cpu")).startswith("cuda") and not _has_cuda():
        prog.line(
            f"compare: note: this grid is estimated at {fmt_duration(total_s)} on this CPU (over 30 minutes); "
            "Ctrl-C stops it at any time and the same command resumes it; '--preset quick' asks the same "
            "question in 4 to 5 minutes"
        )
    try:
        if jobs == 1:
            _run_serial(sched, threads, lease_s)
        else:
            _run_parallel(sched, threads, lease_s)
    finally:
        prog.close()
    res = CompareResult(
        results,
        sched.ran,
        sched.skipped,
        sched.failed,
        sched.diverged,
        time.perf_counter() - t0,
        budget_spent=sched.budget_spent,
    )
    if report is not None:
        res.report, res.report_note = report_if_last(results, claims, [c.name for c in sched.cells], t0, report)
    res.wall_s = time.perf_counter() - t0
    return res


def _run_serial(sched: _Scheduler, threads: int, lease_s: float) -> None:
    """One cell at a time in this process."""
    while True:
        sched.sync()  # other workers' results change what is needed (sequential grids)
        cand = sched.next_cells(set())
        if not cand:
            if sched.wait_for_others(set()):
                continue
            return
        cell = cand[0]
        sched.refresh()
        try:
            run = claim_and_run(sched.grid, cell, sched.results, threads, lease_s, lambda _row: sched.refresh())
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the grid
            sched.finished(cell, None, e)
        else:
            sched.finished(cell, run, None)
            if run.kind == "held":
                sched.sync()


def _run_parallel(sched: _Scheduler, threads: int, lease_s: float) -> None:
    """Keep ``jobs`` worker processes busy with the cells the scheduler asks for, until it asks
    for none and none is running here or elsewhere. One pool serves every round of a
    sequential grid; a worker that dies fails only its cell, which is then taken over."""
    pool = WorkerPool(sched.jobs, _worker_init, (threads,), env_for=_gpu_env(sched.grid, sched.jobs))
    stopping: KeyboardInterrupt | None = None
    try:
        last, synced = 0.0, 0
        while True:
            busy = set(pool.running())
            # Hand out only as many cells as there are free workers: nothing waits in a queue,
            # so after Ctrl-C no new run starts, and each hand-out sees the latest decisions.
            if pool.free():
                for cell in sched.next_cells(busy)[: pool.free()]:
                    pool.submit(cell, claim_and_run, sched.grid, cell, sched.results, threads, lease_s)
            if not pool.running():
                if sched.wait_for_others(set()):
                    continue
                return
            for done in pool.wait(timeout=0.5):
                if isinstance(done.error, WorkerDied | WorkerStopped):
                    # killed, or stopped by a signal sent to it alone: its claim ends with it, and
                    # the cell is claimed again, and resumed from its checkpoint, next round
                    why = done.error if isinstance(done.error, WorkerDied) else f"worker {done.error}"
                    sched.prog.line(f"{done.tag.name}: {why}; its run is resumed from its checkpoint")
                    continue
                sched.finished(done.tag, done.value, done.error)
                if done.value is not None and done.value.kind == "held":
                    sched.sync()
            if time.perf_counter() - last > 1.0:
                last = time.perf_counter()
                synced += 1
                if synced % 5 == 0:
                    sched.sync()  # other workers' results change what is needed (sequential grids)
                sched.refresh()
    except KeyboardInterrupt as e:
        stopping = e
        # A terminal's Ctrl-C reaches the workers too; a signal sent to this process alone
        # does not, so pass it on: each run then records "interrupted" after its last
        # complete checkpoint and releases its claim, and the next invocation resumes it.
        pool.signal_busy(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        raise
    finally:
        pool.close(STOP_GRACE_S if stopping is not None else 5.0)


def report_if_last(
    results: Path, claims: Claims, cells: list[str], t0: float, write: Callable[[Path], Any]
) -> tuple[Any, str | None]:
    """Write the report (``write(results)``) unless other workers are still training, or another process already
    wrote it for the same results after this one started: then say so instead."""
    active = claims.active(cells)
    if active:
        who = ", ".join(sorted({describe(h) for h in active.values()})[:3])
        return None, (
            f"{len(active)} cells are still being trained by other workers ({who}); the last to finish writes "
            f"the report ('reslab report {results}' shows the state now)"
        )
    lease = claims.try_claim("report")
    if lease is None:
        return None, "another worker is writing the report"
    with lease.renewed():
        state = _results_state(results)
        stamp_path = claims.root / "report.stamp"
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        if stamp.get("state") == state and float(stamp.get("time", 0)) > time.time() - (time.perf_counter() - t0):
            return None, f"the report for these results was written by {stamp.get('by', 'another worker')}"
        rep = write(results)
        atomic_write_text(
            stamp_path,
            json.dumps({"state": state, "time": time.time(), "by": f"pid {os.getpid()} on {socket.gethostname()}"}),
        )
    return rep, None


def _results_state(results: Path) -> str:
    """A fingerprint of every run's recorded status (what the report is computed from)."""
    h = hashlib.sha256()
    runs = results / RUNS_DIR
    for d in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            h.update(d.name.encode() + (d / "summary.json").read_bytes())
        except OSError:
            h.update(d.name.encode())
    return h.hexdigest()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    from reslab.nn.models import model_family

    try:
        if model_family(model) != "cifar":
            return None
    except ValueError:
        return None
    return int(model.removeprefix("resnet"))


def probe_at_init(grid: Grid, results: Path, batches: int = 1, batch_size: int = 64) -> Path:
    """Gradient flow at initialisation of every technique at the grid's models and at depths
    56 and 110 (at the grid's width), by :func:`reslab.probe.measure.run_probe`, into ``PROBE_FILE`` in
    the probe's own format (``{"config", "results"}``, each result with its ``width``).

    It costs a forward and backward pass per batch and model. Errors are recorded in the
    file rather than stopping the grid, since the training results do not depend on it.
    """
    from reslab.engine.data import ArrayDataset, open_dataset
    from reslab.probe import measure as probe

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


def _probe_done(grid: Grid, results: Path) -> bool:
    """Does ``PROBE_FILE`` cover every technique at every target (a failed probe does not)?"""
    have: set[tuple[str, int, float]] = set()
    try:
        old = json.loads((results / PROBE_FILE).read_text())
        if "error" not in old.get("config", {}):  # a failed probe is tried again
            have = {(e["technique"], int(e["depth"]), float(e["width"])) for e in old["results"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {(t, d, w) for d, w in probe_targets(grid) for t in grid.techniques} <= have


def _once(claims: Claims, name: str, done: Callable[[], bool], prog: _GridProgress, what: str) -> Any:
    """The claim on one-off work every worker needs (``what``), or None when it is done; while
    another live worker does it, wait for its result (and take over if that worker dies)."""
    return claims.claim_or_wait(
        name, done, on_wait=lambda h: prog.line(f"compare: waiting for {describe(h)}, which is {what}")
    )


def _probe_if_needed(grid: Grid, results: Path, prog: _GridProgress, claims: Claims) -> None:
    """Probe at init unless ``PROBE_FILE`` already covers every technique at every target."""
    targets = probe_targets(grid)
    what = f"measuring gradient flow at initialisation at depths {', '.join(str(d) for d, _ in targets)}"
    lease = _once(claims, "probe-init", lambda: _probe_done(grid, results), prog, what)
    if lease is None:
        return
    with lease.renewed():
        prog.line(f"compare: {what}, width {targets[0][1]:g}")
        probe_at_init(grid, results)


def _read_timing(grid: Grid, results: Path) -> dict[str, Any] | None:
    """The stored step-time pass when it covers every model x technique of ``grid``."""
    try:
        old = json.loads((results / TIMING_FILE).read_text())
        if {f"{m}/{t}" for m in grid.models for t in grid.techniques} <= set(old.get("steps", {})):
            return old
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _timing_if_needed(
    grid: Grid, results: Path, ds: Any, threads: int, prog: _GridProgress, claims: Claims
) -> dict[str, Any]:
    """The dedicated step-time pass (:mod:`reslab.timing`), once per results folder."""
    what = "timing a few training steps of every model x technique, side by side"
    lease = _once(claims, "timing", lambda: _read_timing(grid, results) is not None, prog, what)
    if lease is None:
        timing = _read_timing(grid, results)
        assert timing is not None
        return timing
    settings = grid.shared_settings()
    with lease.renewed():
        prog.line(f"compare: {what}")
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
        atomic_write_text(results / TIMING_FILE, json.dumps(timing, indent=1) + "\n")
    return timing


def _image_counts(settings: dict[str, Any], ds: Any) -> tuple[int, int]:
    """(training images, images evaluated per run) under ``settings``."""
    n_all = len(ds.train_x) if hasattr(ds, "train_x") else len(ds.train_files)
    n_test = len(ds.test_x) if hasattr(ds, "test_x") else len(ds.test_files)
    from reslab.engine.train import DEFAULT_VAL_SIZE

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
    from reslab.engine.data import open_dataset

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
