"""One cell of a grid: claimed in the results folder, then trained (fresh, or resumed from
its checkpoint) into ``RESULTS/runs/MODEL-TECHNIQUE-sSEED``."""

from __future__ import annotations

import _thread
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.engine.runs import read_summary
from reslab.files import atomic_write_text
from reslab.study.claims import DEFAULT_LEASE_S, Claims
from reslab.study.grid import Grid
from reslab.study.results import (
    CLAIMS_DIR,
    FAILED_DIR,
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
            append_start(run_dir, (run_dir / "checkpoint" / "latest.json").is_file())
            return CellRun("trained", run_cell(grid, cell, results, threads, on_epoch))
    except KeyboardInterrupt:
        if lost.is_set():
            return CellRun("lost")
        raise


def record_failure(results: Path, cell: Cell, error: BaseException) -> None:
    msg = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    payload = {"model": cell.model, "technique": cell.technique, "seed": cell.seed, "error": msg}
    atomic_write_text(results / FAILED_DIR / f"{cell.name}.json", json.dumps(payload) + "\n")
