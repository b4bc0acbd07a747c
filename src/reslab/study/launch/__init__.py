"""Launchers: start N workers of one grid on an existing engine (Slurm, Ray) and wait for them.

A worker is exactly what a plain ``reslab compare`` process is: :func:`reslab.study.compare.run_grid`
on the shared results folder. The claims in ``RESULTS/claims`` (:mod:`reslab.study.claims`) make any
number of workers cooperate, wherever they run: each cell is trained once, a dead worker's
cell is taken over and resumed from its checkpoint, and the last worker to finish writes the
report. A launcher therefore only has to start workers, get them stopped cleanly, and wait;
it never assigns cells. The results folder must be one file system that every worker sees
(a shared one for several machines).

The package, one job per module:

* ``__init__``: :class:`Session` (every check, and the connection, before anything is written
  to the results folder; then the run and the merged result) and :func:`launch`;
* :mod:`.common`: what every launcher shares: :class:`Resources` (and the one rule for threads
  per run), the worker's task and reply, the driver's progress view, :class:`ClusterLost` and
  the line that names a lost cluster;
* :mod:`.slurm`: the Slurm launcher through submitit (job array, signals, requeue), its checks;
* :mod:`.ray`: the Ray launcher (tasks, retries, cancelling);
* :mod:`.reach`: is the Ray cluster there, before (bounded connect, the cause of a failure)
  and during the grid (its GCS watched, lost within seconds).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.study.launch import ray, reach, slurm
from reslab.study.launch.common import (
    LOST_STATUS,
    MAX_DEFAULT_WORKERS,
    ClusterLost,
    Resources,
    Watch,
    WorkerOutcome,
    WorkerTask,
    default_workers,
    finished_cells,
    first_round,
    lost_line,
)
from reslab.study.launch.ray import ray_capacity
from reslab.study.launch.slurm import parse_mem, parse_slurm_args, parse_time

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


class Session:
    """One launch of a grid: created, it has checked everything a user could get wrong and
    connected to the engine, and written nothing; :meth:`run` then trains; :meth:`close`
    disconnects. Every problem found at creation is a one-line :class:`UsageError`."""

    def __init__(self, launcher: str, grid: Any, out: str | Path, res: Resources) -> None:
        from reslab.paths import check_writable_dir
        from reslab.study.grid import check_results

        self.launcher, self.grid, self.res = launcher, grid, res
        self.engine = require(launcher)  # a missing extra is a usage error
        self.results = Path(out).absolute()  # workers may start in another directory
        for cell in grid.cells():
            grid.config(cell)
        check_writable_dir(self.results)
        check_results(self.results, grid)  # a folder of other settings is refused here, not in N jobs
        self.threads = res.threads(grid.train.get("threads"))
        self.cpus = res.cpus(self.threads)
        self.started = False
        if launcher == "slurm":
            slurm.preflight(res)
        else:
            self.started = reach.connect(self.engine, res.ray_address, res.connect_timeout_s)
            try:
                ray.check_folder(self.engine, str(self.results), res.connect_timeout_s)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self.started:
            self.started = False
            self.engine.shutdown()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        *,
        shard: tuple[int, int] | None = None,
        progress: bool = True,
        report: Callable[[Path], Any] | None = None,
        probe_init: bool = True,
    ) -> tuple[Any, list[WorkerOutcome]]:
        """Start ``res.workers`` workers and wait for all of them (see :func:`launch`)."""
        from reslab.nn import plugins
        from reslab.study.claims import Claims
        from reslab.study.compare import report_if_last
        from reslab.study.grid import prepare_results, shard_cells
        from reslab.study.results import CLAIMS_DIR
        from reslab.study.scheduler import CompareResult

        grid, res, results = self.grid, self.res, self.results
        t0 = time.perf_counter()
        prepare_results(results, grid)
        mine = shard_cells(grid.cells(), shard)
        before = finished_cells(grid, results)
        task = WorkerTask(
            grid=dataclasses.asdict(grid),
            out=str(results),
            jobs=res.jobs,
            pack=res.pack,
            shard=shard,
            report=report,
            probe_init=probe_init,
            threads=self.threads,
            imports=plugins.env_modules(),
        )
        watch = Watch(grid, results, progress)
        wanted = res.workers or default_workers(grid, results, shard)
        try:
            if self.launcher == "slurm":
                outcomes = slurm.run_slurm(self.engine, task, res, wanted, self.cpus, results, watch)
            else:
                gcs = reach.GcsWatch(self.engine, res.ray_address)
                outcomes = ray.run_ray(self.engine, task, res, wanted, self.cpus, watch, gcs)
        except ClusterLost as e:
            raise ClusterLost(lost_line(str(e), grid, results, mine)) from None
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
    errors, and an engine that cannot be reached, are raised before anything is written or
    submitted (:class:`UsageError`); a cluster lost meanwhile raises :class:`ClusterLost`.
    """
    with Session(launcher, grid, out, res) as session:
        return session.run(shard=shard, progress=progress, report=report, probe_init=probe_init)


__all__ = [
    "LAUNCHERS",
    "LOST_STATUS",
    "MAX_DEFAULT_WORKERS",
    "ClusterLost",
    "Resources",
    "Session",
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
