"""Launchers: start N workers of one grid on an existing engine (Slurm, Ray) and wait for them.

A worker is exactly what a plain ``reslab compare`` process is: :func:`reslab.study.compare.run_grid`
on the shared results folder. The claims in ``RESULTS/claims`` (:mod:`reslab.claims`) make any
number of workers cooperate, wherever they run: each cell is trained once, a dead worker's
cell is taken over and resumed from its checkpoint, and the last worker to finish writes the
report. A launcher therefore only has to start workers, get them stopped cleanly, and wait;
it never assigns cells. The results folder must be one file system that every worker sees
(a shared one for several machines).

* ``slurm`` (through submitit, ``pip install 'reslab[slurm]'``): one job array of N tasks, logs
  in ``RESULTS/slurm``. Before the time limit (and on preemption where the cluster sends the
  job's signal) submitit's signal, ``SIGUSR2``, reaches the worker: training stops at a step
  boundary and records ``interrupted``, the claim is released, and only then is submitit's own
  handler run, which requeues the task (:class:`SlurmWorker` is checkpointable: the requeued
  task is the same worker and calls ``run_grid`` again, which resumes). ``SIGTERM`` (a
  preemption or ``scancel``) stops the same clean way but requeues nothing: Slurm decides.
  For tests without Slurm, the hidden option ``--submitit-cluster local`` runs the same code
  through submitit's local executor (one process per worker on this machine).
* ``ray`` (``pip install 'reslab[ray]'``): N Ray tasks, each with ``--cpus-per-task`` CPUs and
  ``--gpus-per-task`` GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``); a task whose process died is
  started again up to ``--retries`` times and resumes through the claims. On the driver,
  Ctrl-C or SIGTERM cancels the tasks, which stop cleanly like after Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.study.launch.common import (
    MAX_DEFAULT_WORKERS,
    Resources,
    Watch,
    WorkerOutcome,
    WorkerTask,
    default_workers,
    finished_cells,
    first_round,
)
from reslab.study.launch.ray import ray_capacity, run_ray
from reslab.study.launch.slurm import parse_mem, parse_slurm_args, parse_time, run_slurm

LAUNCHERS = ("local", "slurm", "ray")

_EXTRA = {"slurm": ("submitit", "slurm"), "ray": ("ray", "ray")}


def require(launcher: str) -> Any:
    """Import the engine of ``launcher`` (submitit or ray), or a one-line UsageError naming the extra."""
    module, extra = _EXTRA[launcher]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"--launcher {launcher} needs the package '{module}', which is not installed: pip install 'reslab[{extra}]'"
        ) from None


def launch(
    launcher: str,
    grid: Any,
    out: str | Path,
    res: Resources,
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    report: Callable[[Path], Any] | None = None,
    probe_init: bool = True,
) -> tuple[Any, list[WorkerOutcome]]:
    """Start ``res.workers`` workers of ``grid`` on ``launcher``'s engine and wait for all of them.

    Without ``res.workers``: as many as the first round has runs, at most
    :data:`MAX_DEFAULT_WORKERS`, and on Ray at most what the cluster can run at once (a queued
    task would start only once the grid is done, to find nothing left).

    Returns the grid's :class:`reslab.study.compare.CompareResult` as this launch changed it (runs
    trained = cells finished now that were not before), and each worker's outcome. Settings
    errors are raised here, before anything is submitted.
    """
    from reslab.nn import plugins
    from reslab.study.claims import Claims
    from reslab.study.compare import CompareResult, prepare_results, report_if_last, shard_cells
    from reslab.study.results import CLAIMS_DIR

    engine = require(launcher)  # before any work: a missing extra is a usage error
    if launcher == "slurm" and res.submitit_cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm submits with sbatch, which is not on PATH; run it on a Slurm login node")
    t0 = time.perf_counter()
    results = Path(out).absolute()  # workers may start in another directory
    for cell in grid.cells():
        grid.config(cell)
    prepare_results(results, grid)  # a folder of other settings is refused here, not in N jobs
    mine = shard_cells(grid.cells(), shard)
    before = finished_cells(grid, results)
    task = WorkerTask(
        grid=dataclasses.asdict(grid),
        out=str(results),
        jobs=res.jobs,
        shard=shard,
        report=report,
        probe_init=probe_init,
        threads=res.threads(launcher),
        imports=plugins.env_modules(),
    )
    watch = Watch(grid, results, progress)
    wanted = res.workers or default_workers(grid, results, shard)
    if launcher == "slurm":
        outcomes = run_slurm(engine, task, res, wanted, results, watch)
    else:
        outcomes = run_ray(engine, task, res, wanted, watch)
    for o in outcomes:
        if o.reply is not None and o.reply.usage_error:
            raise UsageError(o.reply.usage_error)

    now = finished_cells(grid, results)
    parts = [o.reply.result for o in outcomes if o.reply is not None and o.reply.result is not None]
    ran = [c for c in mine if c in now and c not in before]
    merged = CompareResult(
        results,
        ran=ran,
        skipped=[c for c in mine if c in before],
        failed=sorted({c for p in parts for c in p.failed if c not in now}, key=mine.index),
        diverged=[c for c in ran if now[c] == "diverged"],
        wall_s=time.perf_counter() - t0,
        budget_spent=any(p.budget_spent for p in parts),
    )
    reports = [p.report for p in parts if p.report is not None]
    if reports:
        merged.report = reports[-1]
    elif report is not None:
        # no worker came back with one (each saw another still at work, or died): the workers
        # are all done now, so write it here unless someone else did or still trains
        merged.report, merged.report_note = report_if_last(
            results, Claims(results / CLAIMS_DIR), [c.name for c in grid.cells()], t0, report
        )
    return merged, outcomes


__all__ = [
    "LAUNCHERS",
    "MAX_DEFAULT_WORKERS",
    "Resources",
    "WorkerOutcome",
    "WorkerTask",
    "default_workers",
    "first_round",
    "launch",
    "parse_mem",
    "parse_slurm_args",
    "parse_time",
    "ray_capacity",
    "require",
]
