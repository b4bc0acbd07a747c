"""Running a grid: :func:`run_grid` trains the cells a grid needs, in this process or in
worker processes, then has the report written by the last process to finish.

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
* ``pack`` trains up to that many seeds of one model and technique in a process as one packed
  model (:mod:`reslab.study.packing`); each run keeps its own folder, claim and result.
* **Claimed, not assigned.** Any number of processes (here, on other machines sharing the
  folder, or started by :mod:`reslab.study.launch`) may work on one results folder: a cell is
  claimed (:mod:`reslab.study.claims`) before it is trained, so each is trained once, and the
  cell of a dead worker is taken over and resumed. The last process to finish writes the report.

The parts: the grid and its folder (:mod:`reslab.study.grid`), one cell claimed and trained
(:mod:`reslab.study.cells`), what the outcomes call for next (:mod:`reslab.study.outcomes`),
time estimates (:mod:`reslab.study.estimate`), the measurements before training
(:mod:`reslab.study.prework`) and one process's bookkeeping (:mod:`reslab.study.scheduler`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.engine.config import default_threads
from reslab.engine.devices import pick_device
from reslab.errors import UsageError
from reslab.pool import STOP_GRACE_S, WorkerDied, WorkerPool, WorkerStopped
from reslab.signals import Terminated
from reslab.study.cells import claim_and_run_pack
from reslab.study.claims import DEFAULT_LEASE_S, Claims, describe, read_report_stamp, write_report_stamp
from reslab.study.estimate import LONG_RUN_S, Estimator, estimate_lines, fmt_duration, image_counts, timing_device
from reslab.study.grid import Grid, prepare_results
from reslab.study.packing import gain_words, resolve_pack
from reslab.study.prework import check_data, probe_if_needed, timing_if_needed
from reslab.study.results import (
    CLAIMS_DIR,
    RUNS_DIR,
)
from reslab.study.scheduler import CompareResult, GridProgress, Scheduler


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


@dataclass
class Setup:
    """What the steps before training establish, and the steps after it read."""

    grid: Grid
    results: Path
    claims: Claims
    prog: GridProgress
    jobs: int
    threads: int
    pack_size: int
    pack_gain: float | None
    sched: Scheduler
    total_s: float
    #: the time estimate in words, e.g. "estimated time 4m30s ... on Intel Xeon (training and evaluation; ...)"
    estimate: str
    t0: float


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
    pack: int | str = "auto",
) -> CompareResult:
    """Train the cells ``grid`` needs (all of them, or seeds until decided) into ``out``, then
    call ``report(out)`` (the report writer the caller chose, e.g. :func:`reslab.report.build.build_report`).

    Any number of processes (``jobs`` workers each, on one machine or several sharing the
    folder) may run this on one ``out`` at once: each cell is claimed before it is trained
    (:mod:`reslab.study.claims`), so every cell is trained once; a cell whose worker died is taken
    over and resumed. ``threads`` per job defaults to the cores this process may use shared by
    the jobs; a launcher passes what its engine allotted (Ray does not narrow the affinity).
    The report is written by the process that finds the grid finished
    with no other worker still training. ``pack``: runs per packed model (an integer, or
    ``"auto"``: :func:`reslab.study.packing.resolve_pack`).

    The steps, in order: :func:`set_up` (check, open the folder, probe at initialisation, time
    the steps, plan packs and the estimate), :func:`announce`, :func:`train`, :func:`finish`
    (the result, and the report when this process is the last). Settings errors (unknown
    technique, missing dataset, a results folder made with other settings) raise
    :class:`UsageError` in the first step, before any training starts.
    """
    setup = set_up(grid, out, jobs, shard, progress, lease_s, threads, pack, probe_init=probe_init)
    announce(setup, shard)
    train(setup, lease_s)
    return finish(setup, report)


def estimate_grid(
    grid: Grid,
    out: str | Path,
    *,
    jobs: int = 1,
    progress: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    threads: int | None = None,
    pack: int | str = "auto",
) -> str:
    """How long ``grid`` would take, in words, after the measurements the estimate needs (the
    timing pass and the pack probe, kept in ``out`` for the real run); nothing is trained."""
    setup = set_up(grid, out, jobs, None, progress, lease_s, threads, pack, probe_init=False)
    setup.prog.close()
    size, gain = setup.pack_size, setup.pack_gain
    packs = f", packs of up to {size} runs" + (f" ({gain_words(gain)})" if gain else "") if size > 1 else ""
    return f"{setup.estimate}{packs}"


def set_up(
    grid: Grid,
    out: str | Path,
    jobs: int,
    shard: tuple[int, int] | None,
    progress: bool,
    lease_s: float,
    threads: int | None,
    pack: int | str,
    *,
    probe_init: bool,
) -> Setup:
    """Everything before the first run trains: the settings checked, the results folder
    opened, gradient flow probed at initialisation (``probe_init``), the step times measured,
    packs sized and the time estimated."""
    t0 = time.perf_counter()
    results = Path(out)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    for cell in grid.cells():  # validate every cell before the first one trains
        grid.config(cell)
    ds = check_data(grid)
    grid = prepare_results(results, grid)
    claims = Claims(results / CLAIMS_DIR, lease_s)
    prog = GridProgress(progress)
    if probe_init:
        probe_if_needed(grid, results, prog, claims)
    # threads set in the grid's settings (--set threads=N, --config) win over a launcher's
    # allotment, so every run of every launcher trains with them (threads change CPU results)
    threads = grid.train.get("threads") or threads or max(1, default_threads() // jobs)
    timing = timing_if_needed(grid, results, ds, threads, prog, claims)
    n_train, n_eval = image_counts(grid.shared_settings(), ds)
    size, note, gain = resolve_pack(grid, pack, pick_device(str(grid.train.get("device") or "auto")), ds)
    if note:
        prog.line(note)
    est = Estimator(grid, timing, n_train, n_eval, jobs, pack_gain=gain)
    sched = Scheduler(grid, results, claims, est, jobs, shard, prog, t0)
    total_s, words = estimate_lines(grid, est, sched.outcomes, jobs)
    # what the timing pass can see: the steps and evaluations, not a worker's start-up (loading
    # the data; on a GPU, checking and timing the pack routes with cuDNN's autotuner, which
    # took minutes on an H100 shared with other work, benchmarks/README.md "GPU")
    words += f" on {timing_device(timing)} (training and evaluation; start-up not counted)"
    return Setup(grid, results, claims, prog, jobs, threads, size, gain, sched, total_s, words, t0)


def announce(setup: Setup, shard: tuple[int, int] | None) -> None:
    """Say what this process will do, and how long the grid should take."""
    sched, prog = setup.sched, setup.prog
    prog.line(
        f"compare: {len(sched.cells)} runs at most, {len(sched.skipped)} already finished"
        + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
        + f"; {setup.jobs} job(s) x {setup.threads} thread(s)"
        + (f", packs of up to {setup.pack_size} runs" if setup.pack_size > 1 else "")
        + f"; {setup.estimate}; results in {setup.results}"
    )
    if len(setup.grid.seeds) < 2:
        prog.line(
            "compare: note: one seed gives no interval, so no row can be decided; it trains the runs, and "
            "--seeds 3 (or more) makes it a comparison"
        )
    device = str(setup.grid.shared_settings().get("device", "cpu"))
    if setup.total_s > LONG_RUN_S and not device.startswith("cuda") and not _has_cuda():
        prog.line(
            f"compare: note: this grid is estimated at {fmt_duration(setup.total_s)} on this CPU (over 30 minutes); "
            "Ctrl-C stops it at any time and the same command resumes it; '--preset quick' asks the "
            "question at 125 steps in about 5 minutes"
        )


def train(setup: Setup, lease_s: float) -> None:
    """Train what the scheduler asks for, in this process or in ``jobs`` workers."""
    try:
        if setup.jobs == 1:
            _run_serial(setup.sched, setup.threads, lease_s, setup.pack_size)
        else:
            _run_parallel(setup.sched, setup.threads, lease_s, setup.pack_size)
    finally:
        setup.prog.close()


def finish(setup: Setup, report: Callable[[Path], Any] | None) -> CompareResult:
    """This process's result; the report too, when no other worker is still training."""
    sched, t0 = setup.sched, setup.t0
    res = CompareResult(
        setup.results,
        sched.ran,
        sched.skipped,
        sched.failed,
        sched.diverged,
        time.perf_counter() - t0,
        budget_spent=sched.budget_spent,
    )
    if report is not None:
        cells = [c.name for c in sched.cells]
        res.report, res.report_note = report_if_last(setup.results, setup.claims, cells, t0, report)
    res.wall_s = time.perf_counter() - t0
    return res


def _run_serial(sched: Scheduler, threads: int, lease_s: float, pack: int = 1) -> None:
    """One cell, or one pack of cells, at a time in this process."""
    while True:
        sched.sync()  # other workers' results change what is needed (sequential grids)
        packs = sched.next_packs(set(), pack)
        if not packs:
            if sched.wait_for_others(set()):
                continue
            return
        cells = packs[0]
        sched.refresh()
        try:
            done = claim_and_run_pack(sched.grid, cells, sched.results, threads, lease_s, lambda _row: sched.refresh())
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one broken run (or pack) must not stop the grid
            for cell in cells:
                sched.finished(cell, None, e)
        else:
            _record(sched, done)


def _record(sched: Scheduler, done: list[tuple[Any, Any]]) -> None:
    for cell, run in done:
        sched.finished(cell, run, None)
    if any(run.kind == "held" for _, run in done):
        sched.sync()


def _run_parallel(sched: Scheduler, threads: int, lease_s: float, pack: int = 1) -> None:
    """Keep ``jobs`` worker processes busy with the cells (or packs of cells) the scheduler asks
    for, until it asks for none and none is running here or elsewhere. One pool serves every
    round of a sequential grid; a worker that dies fails only its cells, which are then taken
    over."""
    pool = WorkerPool(sched.jobs, _worker_init, (threads,), env_for=_gpu_env(sched.grid, sched.jobs))
    stopping: KeyboardInterrupt | None = None
    try:
        last, synced = 0.0, 0
        while True:
            busy = {c for cells in pool.running() for c in cells}
            # Hand out only as many packs as there are free workers: nothing waits in a queue,
            # so after Ctrl-C no new run starts, and each hand-out sees the latest decisions.
            if pool.free():
                for cells in sched.next_packs(busy, pack)[: pool.free()]:
                    tag = tuple(cells)
                    pool.submit(tag, claim_and_run_pack, sched.grid, cells, sched.results, threads, lease_s)
            if not pool.running():
                if sched.wait_for_others(set()):
                    continue
                return
            for done in pool.wait(timeout=0.5):
                if isinstance(done.error, WorkerDied | WorkerStopped):
                    # killed, or stopped by a signal sent to it alone: its claims end with it, and
                    # its cells are claimed again, and resumed from their checkpoints, next round
                    why = done.error if isinstance(done.error, WorkerDied) else f"worker {done.error}"
                    names = ", ".join(c.name for c in done.tag)
                    what = (
                        "its run is resumed from its checkpoint"
                        if len(done.tag) == 1
                        else "their runs are resumed from their checkpoints"
                    )
                    sched.prog.line(f"{names}: {why}; {what}")
                    continue
                if done.error is not None:
                    for cell in done.tag:
                        sched.finished(cell, None, done.error)
                else:
                    _record(sched, done.value)
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
        stamp = read_report_stamp(claims)
        if stamp.get("state") == state and float(stamp.get("time", 0)) > time.time() - (time.perf_counter() - t0):
            return None, f"the report for these results was written by {stamp.get('by', 'another worker')}"
        rep = write(results)
        write_report_stamp(claims, state)
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
