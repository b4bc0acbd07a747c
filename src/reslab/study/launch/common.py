"""What every launcher shares: the worker's task and reply (plain data, pickled to wherever an
engine runs it), the driver's view of the results folder while workers run, and how the
driver tells the user what happened."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import UsageError

#: most workers started when --workers is not given (more wait in the engine's queue for nothing)
MAX_DEFAULT_WORKERS = 16
#: Slurm time limit per worker when --time is not given; a worker that reaches it requeues itself
DEFAULT_TIME_MIN = 240
#: seconds between the driver's looks at the workers and the results folder
POLL_S = 2.0
#: seconds between the driver's looks at the results folder for its progress lines
WATCH_S = 10.0
#: seconds between the driver's progress lines when nothing changes
PROGRESS_EVERY_S = 60.0
#: seconds the driver gives an engine to answer before it names the problem (--connect-timeout)
DEFAULT_CONNECT_TIMEOUT_S = 15.0
#: seconds the driver waits, after losing the cluster, for its workers on this machine to die
LOCAL_WORKERS_GRACE_S = 8.0
#: exit status of a grid stopped because its cluster was lost (EX_TEMPFAIL of sysexits.h: the
#: same command later resumes it), distinct from 1, "some run failed"
LOST_STATUS = 75


@dataclass
class Resources:
    """How many workers to start, what each one gets, and the engine's own settings."""

    #: None: :func:`default_workers`, and on Ray at most what the cluster can run at once
    workers: int | None = None
    jobs: int = 1
    #: runs per packed model in each worker (an integer, or "auto")
    pack: int | str = "auto"
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    retries: int = 3
    # slurm
    partition: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    mem: str | None = None
    slurm_args: dict[str, str | bool] = field(default_factory=dict)
    submitit_cluster: str = "slurm"
    # ray
    ray_address: str | None = None

    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    def threads(self, grid_threads: int | None = None) -> int:
        """CPU threads per run, by one rule for every launcher, so that a grid gives the same
        results whichever launcher trains it (threads change the arithmetic on the CPU):
        ``threads`` in the grid's settings (``--set threads=N``) when given; else the CPUs per
        worker (``--cpus-per-task``) shared by its jobs; else what a local run of this command
        uses, this machine's cores shared by the jobs."""
        from reslab.engine.config import default_threads

        if grid_threads:
            return int(grid_threads)
        return max(1, (self.cpus_per_task or default_threads()) // self.jobs)

    def cpus(self, threads: int) -> int:
        """CPUs asked of the engine per worker: ``--cpus-per-task``, else what its jobs use."""
        return self.cpus_per_task or threads * self.jobs


# -- the worker --------------------------------------------------------------------------


@dataclass
class WorkerTask:
    """Everything a worker needs, as plain data: it is pickled to wherever the engine runs it.

    ``grid`` is :class:`reslab.study.compare.Grid` as ``dataclasses.asdict`` gives it (not
    ``Grid.to_json``, which records only the settings that define the results and drops
    per-invocation ones such as ``device`` and the budget).
    """

    grid: dict[str, Any]
    out: str
    jobs: int = 1
    pack: int | str = "auto"
    shard: tuple[int, int] | None = None
    #: the report writer (a module-level function: engines pickle it by reference), or None
    report: Callable[[Path], Any] | None = None
    probe_init: bool = True
    threads: int | None = None
    imports: list[str] = field(default_factory=list)

    def run(self) -> WorkerReply:
        """Run the grid here as one worker.

        A :class:`UsageError` (e.g. the dataset missing on this machine) comes back as text, so
        that the driver reports it as one line whatever the engine does with exceptions.
        """
        from reslab.nn import plugins
        from reslab.study.compare import run_grid
        from reslab.study.grid import Grid

        print(f"reslab worker: pid {os.getpid()} on {socket.gethostname()}, results in {self.out}", file=sys.stderr)
        if problem := folder_problem(self.out):
            return WorkerReply(usage_error=problem)
        try:
            # imported here and listed in RESLAB_IMPORT for this worker's own job processes
            with plugins.imported(self.imports):
                res = run_grid(
                    Grid(**self.grid),
                    self.out,
                    jobs=self.jobs,
                    pack=self.pack,
                    shard=self.shard,
                    progress=False,
                    report=self.report,
                    probe_init=self.probe_init,
                    threads=self.threads,
                )
        except UsageError as e:
            return WorkerReply(usage_error=str(e))
        print(
            f"reslab worker: {len(res.ran)} runs trained, {len(res.failed)} failed"
            + (f"; report {res.report.report_md}" if res.report is not None else ""),
            file=sys.stderr,
        )
        return WorkerReply(res)


@dataclass
class WorkerReply:
    """What a worker sends back: its :class:`reslab.study.compare.CompareResult`, or a usage error."""

    result: Any = None
    usage_error: str | None = None


def folder_problem(out: str) -> str | None:
    """Why a worker here cannot write the results folder ``out`` (a one-line usage error naming
    this host), or None. Checked by each worker before it trains, and on Ray by a probe task
    before the driver writes anything."""
    from reslab.paths import check_writable_dir

    try:
        check_writable_dir(out)
    except UsageError as e:
        return (
            f"{e} (seen by a worker on {socket.gethostname()}: --out must be a folder every worker can write, "
            "on a file system they share)"
        )
    return None


def stop_handler(received: list[int]) -> Callable[[int, Any], None]:
    """A handler that records the signal and raises :class:`reslab.signals.Terminated`, so that
    training stops at the next step boundary as after Ctrl-C (run recorded ``interrupted``,
    claim released). It raises on every signal, like :func:`reslab.signals.handle_sigterm`: a
    claim found taken over also interrupts the main thread through SIGTERM's handler
    (:func:`reslab.study.compare.claim_and_run`), and that stop must not swallow a later real one."""
    from reslab.signals import Terminated

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated()

    return handler


# -- the driver --------------------------------------------------------------------------


@dataclass
class WorkerOutcome:
    """One worker as the driver saw it end: its reply, or why it has none."""

    name: str
    reply: WorkerReply | None = None
    error: str | None = None
    #: ended without a result and without an error of its own (cancelled, killed with its node)
    vanished: bool = False


def first_round(grid: Any, results: Path, shard: tuple[int, int] | None) -> list[Any]:
    """Cells the grid needs now, given what ``results`` already holds (a sequential grid's first
    look; every unfinished cell of a fixed grid)."""
    from reslab.study.grid import shard_cells
    from reslab.study.outcomes import Outcomes, needed_cells
    from reslab.study.results import RUNS_DIR, read_run

    outcomes = Outcomes()
    for c in grid.cells():
        run = read_run(results / RUNS_DIR / c.name)
        if run is not None and run.finished:
            outcomes.add(c, run.status, run.summary)
    return shard_cells(needed_cells(grid, outcomes), shard)


def default_workers(grid: Any, results: Path, shard: tuple[int, int] | None) -> int:
    """The cells the first round needs, at most :data:`MAX_DEFAULT_WORKERS`, at least 1 (a
    finished grid still gets one worker, which writes the report)."""
    return max(1, min(len(first_round(grid, results, shard)), MAX_DEFAULT_WORKERS))


def finished_cells(grid: Any, results: Path) -> dict[Any, str]:
    """Every finished cell and its status, from the runs' summary.json files alone (cheap
    enough to read a few hundred on a shared file system every few seconds)."""
    from reslab.study.cells import run_state
    from reslab.study.results import FINISHED, RUNS_DIR

    out = {}
    for c in grid.cells():
        state = run_state(results / RUNS_DIR / c.name)
        if state in FINISHED:
            out[c] = state
    return out


class Watch:
    """The driver's view while workers run: a line when runs finish, and one a minute otherwise."""

    def __init__(self, grid: Any, results: Path, enabled: bool) -> None:
        from reslab.study.claims import Claims
        from reslab.study.results import CLAIMS_DIR

        self.grid, self.results, self.enabled = grid, results, enabled
        self.claims = Claims(results / CLAIMS_DIR)
        self.seen = len(finished_cells(grid, results))
        self.last = self.looked = time.monotonic()

    def tick(self, running: int) -> None:
        if not self.enabled or time.monotonic() - self.looked < WATCH_S:
            return
        self.looked = time.monotonic()
        done = len(finished_cells(self.grid, self.results))
        if done == self.seen and time.monotonic() - self.last < PROGRESS_EVERY_S:
            return
        self.seen, self.last = done, time.monotonic()
        training = len(self.claims.active(c.name for c in self.grid.cells()))
        print(
            f"compare: {done} runs finished, {training} training now; {running} workers running",
            file=sys.stderr,
            flush=True,
        )


class ClusterLost(Exception):
    """The engine's cluster (Ray's head, every Slurm task) went away while the grid ran; the
    message names what was lost. The command ends with :data:`LOST_STATUS`."""


def lost_line(what: str, grid: Any, results: Path, cells: list[Any]) -> str:
    """The one line that names a lost cluster: what was lost, the runs finished and those
    interrupted, what became of the lost workers' claims, and how to go on.

    A claim whose holder was a process of this machine that is gone now is released here (Ray's
    workers die with their node); one held on another machine expires :data:`reslab.study.claims.DEFAULT_LEASE_S`
    seconds after its last renewal, and the next invocation takes it over then."""
    from reslab.study.cells import run_state
    from reslab.study.claims import Claims
    from reslab.study.results import CLAIMS_DIR, FINISHED, RUNS_DIR

    claims = Claims(results / CLAIMS_DIR)
    names = [c.name for c in cells]
    # Ray's workers on this machine die a few seconds after their raylet: give them that long
    deadline = time.monotonic() + LOCAL_WORKERS_GRACE_S
    while claims.local_holders(names) and time.monotonic() < deadline:
        time.sleep(0.2)
    released = claims.release_dead(names)
    held = claims.active(names)
    states = {c.name: run_state(results / RUNS_DIR / c.name) for c in cells}
    done = sum(s in FINISHED for s in states.values())
    stopped = [n for n, s in states.items() if s is not None and s not in FINISHED]
    shown = ", ".join(stopped[:4]) + (f" and {len(stopped) - 4} more" if len(stopped) > 4 else "")
    leases = f"{_n(len(released), 'claim')} of lost workers released" if released else ""
    if held:
        minutes = f"{claims.lease_s / 60:g}"
        leases += ("; " if leases else "") + (
            f"{_n(len(held), 'claim')} of workers still alive or on other machines expire {minutes} minutes after "
            "their last renewal"
        )
    return (
        f"lost {what}; {_n(done, 'run')} finished, {len(stopped)} interrupted"
        + (f" ({shown})" if stopped else "")
        + (f"; {leases}" if leases else "")
        + f"; re-run the same command to resume ({results})"
    )


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
