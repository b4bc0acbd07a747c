"""One cell of a grid, or a pack of them: claimed in the results folder, then trained (fresh,
or resumed from its checkpoint) into ``RESULTS/runs/MODEL-TECHNIQUE-sSEED``.

A pack (:func:`claim_and_run_pack`) is several cells that differ only in their seed, trained
in one process as one packed model (:func:`reslab.engine.packed.train_pack`). Each of its
cells is claimed on its own, exactly as a cell trained alone, and all the claims are renewed
while the pack trains: a cell held elsewhere simply stays out of the pack, and a worker that
dies releases every cell of its pack to be taken over and resumed (alone or packed: a run's
checkpoint is the same either way)."""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.engine.runs import append_jsonl, has_checkpoint, read_summary
from reslab.study.claims import DEFAULT_LEASE_S, Claims
from reslab.study.grid import Grid
from reslab.study.gridfile import write_failure
from reslab.study.results import (
    CLAIMS_DIR,
    FINISHED,
    RUNS_DIR,
    STARTS_FILE,
    Cell,
)


def run_state(run_dir: Path) -> str | None:
    """The status in ``run_dir/summary.json`` (``unknown`` when unreadable); None when no
    run started there. Read as :mod:`reslab.engine.runs` reads it, like the engine and the report."""
    from reslab.engine.runs import recorded_status

    return recorded_status(run_dir)


def _start_flags(run_dir: Path) -> tuple[bool, bool]:
    """``(resume, overwrite)`` for an unfinished cell: resume from its checkpoint when it has
    one; one killed before its first checkpoint has nothing to resume and is started again."""
    state = run_state(run_dir)
    if state in FINISHED:
        raise RuntimeError(f"refusing to retrain finished run {run_dir}")
    resume = has_checkpoint(run_dir)
    return resume, not resume and state is not None


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
    resume, overwrite = _start_flags(run_dir)
    return train(cfg, run_dir, resume=resume, overwrite=overwrite, progress=False, on_epoch=on_epoch)


def run_pack(grid: Grid, cells: list[Cell], results: Path, threads: int | None) -> list[dict[str, Any]]:
    """Train ``cells`` (one model and technique, distinct seeds, standing at one epoch) as one
    pack; returns their summaries in order."""
    from reslab.engine.packed import train_pack

    extra = {"threads": threads} if threads else {}
    dirs = [results / RUNS_DIR / c.name for c in cells]
    flags = [_start_flags(d) for d in dirs]
    return train_pack(
        [grid.config(c, **extra) for c in cells],
        dirs,
        resume=[r for r, _ in flags],
        overwrite=[w for _, w in flags],
        progress=False,
    )


@dataclass
class CellRun:
    """What became of one attempt at a cell.

    ``kind``: ``trained`` (by this worker; ``summary`` is its result), ``finished`` (found
    finished by another worker; its summary), ``held`` (another live worker holds it),
    ``lost`` (this worker's claim was taken over while it trained: it had stalled for longer
    than the lease, and the taker resumes the run), or ``failed`` (its pack's training raised
    ``error``; the pack's other cells keep their own outcomes).
    """

    kind: str
    summary: dict[str, Any] | None = None
    #: for ``failed`` (a cell of a pack whose training raised): the error, one line
    error: str | None = None


def append_start(run_dir: Path, resumed: bool) -> None:
    """One line per training start in ``RUN/starts.jsonl``, written under the cell's claim: the
    record that proves no two workers trained the cell at once."""
    row = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "time": time.time(),
        "resumed": resumed,
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # the GPU(s) this worker was pinned to
    }
    append_jsonl(run_dir / STARTS_FILE, row)


def _stop_when_lost(lost: threading.Event) -> Callable[[], None]:
    """What a lease calls when another worker took its claim over: set ``lost`` and stop the
    training at the next step boundary, like Ctrl-C (through SIGTERM when it is handled: a
    worker started from a non-interactive shell may ignore SIGINT)."""

    def on_lost() -> None:
        lost.set()
        term = callable(signal.getsignal(signal.SIGTERM))
        _thread.interrupt_main(signal.SIGTERM if term else signal.SIGINT)

    return on_lost


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
    try:
        with lease.renewed(_stop_when_lost(lost)):
            if run_state(run_dir) in FINISHED:
                return CellRun("finished", read_summary(run_dir))
            append_start(run_dir, has_checkpoint(run_dir))
            return CellRun("trained", run_cell(grid, cell, results, threads, on_epoch))
    except KeyboardInterrupt:
        if lost.is_set():
            return CellRun("lost")
        raise


def claim_and_run_pack(
    grid: Grid,
    cells: list[Cell],
    results: Path,
    threads: int | None,
    lease_s: float = DEFAULT_LEASE_S,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[tuple[Cell, CellRun]]:
    """Claim each of ``cells`` (one model and technique, distinct seeds) and train the claimed,
    unfinished ones as packs of the runs that stand at one epoch (a fresh cell stands at 0);
    one :class:`CellRun` per cell, in order. A single cell is :func:`claim_and_run`."""
    if len(cells) == 1:
        return [(cells[0], claim_and_run(grid, cells[0], results, threads, lease_s, on_epoch))]
    from reslab.engine.checkpoint import checkpoint_epoch  # torch: only where training starts

    claims = Claims(results / CLAIMS_DIR, lease_s)
    outcome: dict[Cell, CellRun] = {}
    leases = []
    for c in cells:
        lease = claims.try_claim(c.name)
        if lease is None:
            outcome[c] = CellRun("held")
        else:
            leases.append((c, lease))
    lost = threading.Event()
    on_lost = _stop_when_lost(lost)
    try:
        with contextlib.ExitStack() as stack:
            for _, lease in leases:
                stack.enter_context(lease.renewed(on_lost))
            by_epoch: dict[int, list[Cell]] = {}
            for c, _ in leases:
                run_dir = results / RUNS_DIR / c.name
                if run_state(run_dir) in FINISHED:
                    outcome[c] = CellRun("finished", read_summary(run_dir))
                else:
                    by_epoch.setdefault(checkpoint_epoch(run_dir), []).append(c)
            for group in by_epoch.values():
                for c in group:
                    run_dir = results / RUNS_DIR / c.name
                    append_start(run_dir, has_checkpoint(run_dir))
                try:
                    if len(group) == 1:
                        summaries = [run_cell(grid, group[0], results, threads, on_epoch)]
                    else:
                        summaries = run_pack(grid, group, results, threads)
                except Exception as e:  # noqa: BLE001 - fails the runs it trained, not the cells held elsewhere
                    for c in group:
                        outcome[c] = CellRun("failed", error=error_line(e))
                    continue
                for c, summary in zip(group, summaries, strict=True):
                    outcome[c] = CellRun("trained", summary)
    except KeyboardInterrupt:
        if not lost.is_set():
            raise
        # a claim of the pack was taken over (this worker had stalled): the takers resume
        # every run this pack had not finished
        for c in cells:
            outcome.setdefault(c, CellRun("lost"))
    return [(c, outcome[c]) for c in cells]


def error_line(error: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    return (f"{type(error).__name__}: {error}".strip().splitlines() or [type(error).__name__])[0]


def record_failure(results: Path, cell: Cell, error: BaseException | str) -> None:
    """``failed/NAME.json`` for a cell whose training raised ``error`` (or its :func:`error_line`)."""
    msg = error if isinstance(error, str) else error_line(error)
    write_failure(results, cell.model, cell.technique, cell.seed, msg)
