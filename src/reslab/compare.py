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
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.checkpoint import atomic_write_text
from reslab.config import RESUMABLE_CHANGES, TrainConfig, default_threads
from reslab.errors import UsageError
from reslab.report import FAILED_DIR, FINISHED, GRID_FILE, PROBE_FILE, RUNS_DIR, Cell, build_report

#: Presets. ``quick`` is sized for a 2-core CPU: the whole grid (12 runs) and its report in
#: under 5 minutes, still training on real Fashion-MNIST images (a fixed 10,000-image subset,
#: 2,000 held-out validation images, the full 10,000-image test set), with a ResNet-8 at half
#: width (8/16/32 channels, 20k parameters), batch 64, for 4 epochs and 3 paired seeds. Batch
#: 64 rather than 128 gives twice the steps for ~20% more compute and ends ~3 points higher
#: (82% vs 79% test accuracy for baseline seed 0). The target, 78% validation accuracy, is
#: reached by baseline in epoch 3, so techniques can be measured both faster and slower.
#: ``paper`` is the full study, for a GPU machine.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "models": ["resnet8"],
        "techniques": ["baseline", "scale", "norm", "fusion"],
        "seeds": [0, 1, 2],
        "target_acc": 0.78,
        "train": {
            "dataset": "fashion-mnist",
            "epochs": 4,
            "width": 0.5,
            "train_subset": 10000,
            "val_size": 2000,
            "batch_size": 64,
            "probe_every": 20,
        },
        "jobs": 2,
    },
    "paper": {
        "models": ["resnet20", "resnet56", "resnet110"],
        "techniques": ["all"],
        "seeds": [0, 1, 2, 3, 4],
        "target_acc": 0.93,
        "train": {"dataset": "fashion-mnist", "epochs": 30, "probe_every": 100},
        "jobs": 1,
    },
}

#: TrainConfig fields that identify a cell (set per cell, not shared by the grid)
CELL_FIELDS = ("model", "technique", "seed")
#: fields that may differ between invocations of one grid (where and how fast, not what)
FREE_FIELDS = RESUMABLE_CHANGES | {"threads"}


@dataclass
class Grid:
    """What a comparison trains: cells = models x techniques x seeds, sharing ``train`` settings."""

    models: list[str]
    techniques: list[str]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    target_acc: float = 0.9
    interval: str = "t"
    preset: str | None = None

    def cells(self) -> list[Cell]:
        """Seed-major order: a grid stopped half-way still has complete, paired seeds."""
        return [Cell(m, t, s) for s in self.seeds for m in self.models for t in self.techniques]

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
        return {
            "version": 1,
            "preset": self.preset,
            "models": self.models,
            "techniques": self.techniques,
            "seeds": self.seeds,
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
    """The status in ``run_dir/summary.json``; None when no run started there."""
    try:
        return str(json.loads((run_dir / "summary.json").read_text())["status"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown" if run_dir.exists() and any(run_dir.iterdir()) else None


def epochs_done(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoint" / "latest.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


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


# -- progress ----------------------------------------------------------------------------


class _GridProgress:
    """A tqdm bar over epochs of the grid (ETA) on a terminal; one line per run otherwise."""

    def __init__(self, total_epochs: int, done_epochs: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_epochs, initial=done_epochs, unit="epoch", desc="grid", file=sys.stderr)

    def epoch(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class CompareResult:
    results: Path
    ran: list[Cell]
    skipped: list[Cell]
    failed: list[Cell]
    diverged: list[Cell]
    wall_s: float
    report: Any = None


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
    """Train every unfinished cell of ``grid`` (or of its shard) into ``out``, then report.

    Settings errors (unknown technique, missing dataset, a results folder made with other
    settings) raise :class:`UsageError` before any training starts.
    """
    t0 = time.perf_counter()
    results = Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    for cell in grid.cells():  # validate every cell before the first one trains
        grid.config(cell)
    _check_data(grid)
    grid = prepare_results(results, grid)
    if probe_init:
        _probe_if_needed(grid, results, progress)
    mine = shard_cells(grid.cells(), shard)
    todo, skipped = [], []
    for c in mine:
        (skipped if run_state(results / RUNS_DIR / c.name) in FINISHED else todo).append(c)
    epochs = int(grid.shared_settings()["epochs"])
    done_epochs = sum(epochs_done(results / RUNS_DIR / c.name) for c in todo)
    prog = _GridProgress(len(todo) * epochs, done_epochs, progress)
    shard_txt = f" (shard {shard[0]}/{shard[1]}: {len(mine)} of {len(grid.cells())} runs)" if shard else ""
    jobs = max(1, min(jobs, len(todo) or 1))
    threads = max(1, default_threads() // jobs)
    prog.line(
        f"compare: {len(todo)} runs to train, {len(skipped)} already finished{shard_txt}; "
        f"{jobs} job(s) x {threads} thread(s); results in {results}"
    )
    ran: list[Cell] = []
    failed: list[Cell] = []
    diverged: list[Cell] = []

    def finished(cell: Cell, summary: dict[str, Any] | None, error: BaseException | None) -> None:
        if error is not None:
            failed.append(cell)
            _record_failure(results, cell, error)
            prog.line(f"{cell.name}: FAILED ({type(error).__name__}: {error}); the grid goes on")
            return
        assert summary is not None
        (results / FAILED_DIR / f"{cell.name}.json").unlink(missing_ok=True)
        ran.append(cell)
        if summary.get("status") == "diverged":
            diverged.append(cell)
            # the epochs it will never train still count towards the bar's total
            prog.epoch(max(0, epochs - int(summary.get("epochs_completed") or 0)))
        prog.line(f"[{len(ran) + len(failed)}/{len(todo)}] " + _describe(cell, summary))

    try:
        if jobs == 1:
            for cell in todo:
                prog.line(f"{cell.name}: training")
                try:
                    summary = run_cell(grid, cell, results, threads, lambda _row: prog.epoch())
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - one broken run must not stop the grid
                    finished(cell, None, e)
                else:
                    finished(cell, summary, None)
        else:
            _run_parallel(grid, todo, results, jobs, threads, prog, finished)
    finally:
        prog.close()
    wall = time.perf_counter() - t0
    res = CompareResult(results, ran, skipped, failed, diverged, wall)
    if report:
        res.report = build_report(results)
    res.wall_s = time.perf_counter() - t0
    return res


def _run_parallel(
    grid: Grid,
    todo: Sequence[Cell],
    results: Path,
    jobs: int,
    threads: int,
    prog: _GridProgress,
    finished: Callable[[Cell, dict[str, Any] | None, BaseException | None], None],
) -> None:
    # spawn, not fork: forking a process that has started OpenMP/torch threads can deadlock
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads, events))
    pending: dict[Future[dict[str, Any]], Cell] = {}
    queue = list(todo)
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
                prog.epoch()

    try:
        while queue or pending:
            # Submit only as many runs as there are workers: nothing waits in the pool's
            # queue, so after Ctrl-C no new run starts.
            while queue and len(pending) < jobs:
                cell = queue.pop(0)
                pending[pool.submit(_worker, grid, cell, str(results), threads)] = cell
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


def probe_at_init(grid: Grid, results: Path, batches: int = 2, batch_size: int = 128) -> Path | None:
    """Gradient flow of every model x technique at initialisation, into ``PROBE_FILE``.

    Uses :func:`reslab.probe.probe_model` on a few real training batches (the same for every
    technique): the ratio of the largest to the smallest block-output gradient across depth,
    and the probe's verdict. It costs a forward and backward pass per batch and model, so the
    grid always carries it. Skipped for streamed (folder) datasets; errors are recorded in the
    file rather than stopping the grid, since the training results do not depend on it.
    """
    import torch

    from reslab import probe
    from reslab.data import ArrayDataset, open_dataset
    from reslab.models import build_model

    settings = grid.shared_settings()
    entries: list[dict[str, Any]] = []
    try:
        ds = open_dataset(settings["dataset"], grid.train.get("data_dir"))
        if not isinstance(ds, ArrayDataset):
            return None
        data = probe.make_batches(ds.train_x, ds.train_y, ds.mean, ds.std, batches, batch_size, seed=0)
        for model_name in grid.models:
            for tech in grid.techniques:
                torch.manual_seed(0)
                model = build_model(
                    model_name,
                    tech,
                    ds.num_classes,
                    ds.input_size[0],
                    width=settings["width"],
                    drop_path_rate=settings["drop_path_rate"],
                    technique_args=dict(settings["technique_args"]),
                )
                pr = probe.probe_model(model, data)
                v = probe.verdict(pr)
                entries.append(
                    {
                        "model": model_name,
                        "technique": tech,
                        "blocks": pr.num_blocks,
                        "grad_ratio": pr.grad_ratio if math.isfinite(pr.grad_ratio) else None,
                        "grad_first_last": pr.grad_first_last if math.isfinite(pr.grad_first_last) else None,
                        "verdict": v.label,
                        "reason": v.reason,
                    }
                )
        payload: dict[str, Any] = {"batches": batches, "batch_size": batch_size, "entries": entries}
    except Exception as e:  # noqa: BLE001 - a failed measurement must not stop the training grid
        payload = {"error": f"{type(e).__name__}: {e}", "entries": entries}
    path = results / PROBE_FILE
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def _probe_if_needed(grid: Grid, results: Path, progress: bool) -> None:
    """Probe at init unless ``PROBE_FILE`` already covers every model x technique of the grid."""
    have: set[tuple[str, str]] = set()
    try:
        old = json.loads((results / PROBE_FILE).read_text())
        if "error" not in old:  # a failed probe is tried again
            have = {(e["model"], e["technique"]) for e in old["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if {(m, t) for m in grid.models for t in grid.techniques} <= have:
        return
    if progress:
        print("compare: measuring gradient flow at initialisation (reslab.probe)", file=sys.stderr, flush=True)
    probe_at_init(grid, results)


def _check_data(grid: Grid) -> None:
    """Fail before training when the dataset cannot be found (one message, with the fix)."""
    from reslab.data import open_dataset

    try:
        open_dataset(grid.shared_settings()["dataset"], grid.train.get("data_dir"))
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
