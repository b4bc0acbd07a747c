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
import functools
import importlib
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import UsageError

LAUNCHERS = ("local", "slurm", "ray")
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


@dataclass
class Resources:
    """How many workers to start, what each one gets, and the engine's own settings."""

    #: None: :func:`default_workers`, and on Ray at most what the cluster can run at once
    workers: int | None = None
    jobs: int = 1
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

    def threads(self, launcher: str) -> int | None:
        """Threads per training job: the CPUs the engine allots shared by the jobs. Without
        --cpus-per-task, Slurm's default allotment is what the task may use (None: run_grid
        counts the cores in its affinity, which Slurm narrows); Ray's is 1 CPU, and Ray does
        not narrow the affinity, so it is passed on."""
        cpus = self.cpus_per_task or (1 if launcher == "ray" else None)
        return max(1, cpus // self.jobs) if cpus else None


def parse_time(text: str) -> int:
    """Slurm's time forms -> whole minutes: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    m = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", text)
    if m is None:
        raise UsageError(f"--time takes minutes or HH:MM:SS (or D-HH:MM:SS), e.g. 240 or 4:00:00, got {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:
        seconds = a * 60
    if seconds <= 0:
        raise UsageError(f"--time must be positive, got {text!r}")
    return math.ceil(seconds / 60)


def parse_mem(text: str) -> str:
    """Memory per worker as sbatch takes it: a number with an optional K, M, G or T suffix."""
    if not re.fullmatch(r"\d+(?:[KMGT]B?)?", text.strip().upper()):
        raise UsageError(f"--mem takes a size like 32G or 16000M, got {text!r}")
    return text.strip().upper().removesuffix("B")


def parse_slurm_args(items: Sequence[str]) -> dict[str, str | bool]:
    """``--slurm-arg KEY=VALUE`` items -> sbatch options (``account=abc`` becomes ``--account=abc``;
    a KEY alone is a flag, e.g. ``exclusive``)."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key):
            raise UsageError(
                f"--slurm-arg takes KEY=VALUE with an sbatch option as KEY, e.g. account=myproj, got {item!r}"
            )
        out[key] = value.strip() if eq else True
    return out


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
        try:
            # imported here and listed in RESLAB_IMPORT for this worker's own job processes
            with plugins.imported(self.imports):
                res = run_grid(
                    Grid(**self.grid),
                    self.out,
                    jobs=self.jobs,
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


def _stop_handler(received: list[int]) -> Callable[[int, Any], None]:
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


def _submitit_signal() -> int:
    """The signal submitit's jobs get before the time limit (and on preemption where the
    cluster sends the job's signal then): SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise."""
    return int(getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")))


class _SlurmWorkerBase:
    """A Slurm task (submitit job) of one grid; the class :class:`SlurmWorker` adds submitit's
    ``Checkpointable`` base when submitit is imported.

    Signals. submitit installs its handlers before calling us: the job's signal (SIGUSR2) ->
    checkpoint and requeue, then exit at once, wherever the main thread is; SIGTERM and SIGCONT
    -> logged and ignored (it expects SIGUSR2 to have arrived first). Left alone, SIGUSR2 would
    exit in the middle of a training step, the run would not record ``interrupted``, and with
    SIGTERM ignored a preemption without SIGUSR2 would be killed after the grace time. So for
    the duration of ``run_grid`` both signals get our handler: training stops cleanly, and then
    submitit's handlers are put back and, for SIGUSR2 only, its handler is called to do what it
    would have done (``checkpoint()``, requeue, exit). After SIGTERM nothing is requeued by us:
    a preempting Slurm requeues the job itself, a cancelled one stays cancelled.
    """

    def __init__(self, task: WorkerTask) -> None:
        self.task = task

    def __call__(self, index: int) -> Any:
        usr = _submitit_signal()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, usr)}
        received: list[int] = []
        handler = _stop_handler(received)
        for s in previous:
            signal.signal(s, handler)
        try:
            return self.task.run()
        except KeyboardInterrupt:
            if not received:
                raise  # a real Ctrl-C (the local executor's cancel): nothing to hand over
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        # stopped cleanly by a signal: hand it to submitit (requeue) or end like reslab does
        sub = previous[usr]
        requeue = received[-1] == usr and callable(sub)
        print(
            f"reslab worker: stopped at a step boundary by {signal.Signals(received[-1]).name} (runs recorded "
            f"interrupted, claims released); {'submitit requeues this worker' if requeue else 'exiting'}",
            file=sys.stderr,
            flush=True,
        )
        if requeue:
            sub(usr, None)  # checkpoint() below, requeue, sys.exit
        from reslab.signals import TERMINATED_STATUS

        sys.exit(TERMINATED_STATUS)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues: this same worker with the same arguments. It needs no state of
        its own: on the next start ``run_grid`` finds the interrupted run and its checkpoint."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@functools.cache
def _slurm_worker_class() -> type:
    from submitit.helpers import Checkpointable

    # module and name as below so that pickle finds the class by reference (module __getattr__)
    return type("SlurmWorker", (_SlurmWorkerBase, Checkpointable), {"__module__": __name__})


def __getattr__(name: str) -> Any:
    # SlurmWorker subclasses submitit's Checkpointable, so it exists only once submitit is
    # imported; resolving it here keeps 'import reslab.study.launch' free of submitit.
    if name == "SlurmWorker":
        return _slurm_worker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ray_worker(task: WorkerTask, gpus: int) -> Any:
    """A Ray task of one grid.

    Ray's worker process turns SIGTERM into an exit at once (its own handler); while the grid
    trains, SIGTERM gets our handler so the run stops at a step boundary and records
    ``interrupted``, and then Ray's handler is called to exit as Ray intended. ``ray.cancel``
    (the driver's Ctrl-C) raises KeyboardInterrupt in this thread, which stops the run the
    same way. A task whose process dies (killed, out of memory, node lost) is run again by Ray
    (``max_retries``); the claims hand it the cells left, and resume the dead one's.
    """
    if gpus == 0 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        # Ray leaves every GPU visible to a task that asked for none: train on the CPU, as asked
        # (before this process first touches CUDA)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    previous = signal.getsignal(signal.SIGTERM)
    received: list[int] = []
    signal.signal(signal.SIGTERM, _stop_handler(received))
    try:
        return task.run()
    except KeyboardInterrupt:
        if not received:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if callable(previous):
        previous(signal.SIGTERM, None)
    from reslab.signals import TERMINATED_STATUS

    sys.exit(TERMINATED_STATUS)


# -- the driver --------------------------------------------------------------------------


@dataclass
class WorkerOutcome:
    """One worker as the driver saw it end: its reply, or why it has none."""

    name: str
    reply: WorkerReply | None = None
    error: str | None = None


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


def _finished(grid: Any, results: Path) -> dict[Any, str]:
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


class _Watch:
    """The driver's view while workers run: a line when runs finish, and one a minute otherwise."""

    def __init__(self, grid: Any, results: Path, enabled: bool) -> None:
        from reslab.study.claims import Claims
        from reslab.study.results import CLAIMS_DIR

        self.grid, self.results, self.enabled = grid, results, enabled
        self.claims = Claims(results / CLAIMS_DIR)
        self.seen = len(_finished(grid, results))
        self.last = self.looked = time.monotonic()

    def tick(self, running: int) -> None:
        if not self.enabled or time.monotonic() - self.looked < WATCH_S:
            return
        self.looked = time.monotonic()
        done = len(_finished(self.grid, self.results))
        if done == self.seen and time.monotonic() - self.last < PROGRESS_EVERY_S:
            return
        self.seen, self.last = done, time.monotonic()
        training = len(self.claims.active(c.name for c in self.grid.cells()))
        print(
            f"compare: {done} runs finished, {training} training now; {running} workers running",
            file=sys.stderr,
            flush=True,
        )


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
    from reslab.study.compare import report_if_last
    from reslab.study.grid import prepare_results, shard_cells
    from reslab.study.results import CLAIMS_DIR
    from reslab.study.scheduler import CompareResult

    engine = require(launcher)  # before any work: a missing extra is a usage error
    if launcher == "slurm" and res.submitit_cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm submits with sbatch, which is not on PATH; run it on a Slurm login node")
    t0 = time.perf_counter()
    results = Path(out).absolute()  # workers may start in another directory
    for cell in grid.cells():
        grid.config(cell)
    prepare_results(results, grid)  # a folder of other settings is refused here, not in N jobs
    mine = shard_cells(grid.cells(), shard)
    before = _finished(grid, results)
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
    watch = _Watch(grid, results, progress)
    wanted = res.workers or default_workers(grid, results, shard)
    if launcher == "slurm":
        outcomes = _run_slurm(engine, task, res, wanted, results, watch)
    else:
        outcomes = _run_ray(engine, task, res, wanted, watch)
    for o in outcomes:
        if o.reply is not None and o.reply.usage_error:
            raise UsageError(o.reply.usage_error)

    now = _finished(grid, results)
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


def _run_slurm(
    submitit: Any, task: WorkerTask, res: Resources, workers: int, results: Path, watch: _Watch
) -> list[WorkerOutcome]:
    folder = results / "slurm"
    # each requeue after a time limit makes progress (the runs resume from their checkpoints)
    timeouts = {"slurm_max_num_timeout": res.retries, "local_max_num_timeout": res.retries}
    ex = submitit.AutoExecutor(folder=folder, cluster=res.submitit_cluster, **timeouts)
    params: dict[str, Any] = {
        "name": "reslab-compare",
        "timeout_min": res.time_min,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": res.gpus_per_task or 0,
    }
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.submitit_cluster == "slurm":
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.mem:
            params["slurm_mem"] = res.mem
        if res.slurm_args:
            params["slurm_additional_parameters"] = dict(res.slurm_args)
    try:
        ex.update_parameters(**params)
    except (ValueError, TypeError, NameError) as e:
        raise UsageError(f"submitit refused the Slurm options: {str(e).splitlines()[0]}") from None
    worker = _slurm_worker_class()(task)
    try:
        jobs = ex.map_array(worker, range(workers))
    except Exception as e:  # noqa: BLE001 - sbatch's refusal (bad partition, account...) is the user's to fix
        raise UsageError(f"Slurm refused the job array: {str(e).strip().splitlines()[-1]}") from None
    array = jobs[0].job_id.split("_")[0] if jobs else "?"
    where = "Slurm job array" if res.submitit_cluster == "slurm" else f"submitit '{res.submitit_cluster}' jobs"
    if watch.enabled:
        print(
            f"compare: {len(jobs)} workers submitted as {where} {array}; logs in {folder}",
            file=sys.stderr,
            flush=True,
        )
    if res.submitit_cluster == "debug":
        # submitit's debug jobs run in this process, one after the other, when asked for a result
        return [_slurm_outcome(job, folder) for job in jobs]
    out: list[WorkerOutcome] = []
    try:
        pending = list(jobs)
        while pending:
            still = []
            for job in pending:
                if job.done():
                    out.append(_slurm_outcome(job, folder))
                else:
                    still.append(job)
            pending = still
            watch.tick(len(pending))
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        if res.submitit_cluster == "slurm":
            print(
                f"reslab compare: stopped waiting; the workers go on in Slurm job array {array} "
                f"('squeue -j {array}' lists them, 'scancel {array}' stops them, 'reslab report {results}' reports "
                "what has finished)",
                file=sys.stderr,
            )
        else:
            # submitit's local jobs are this machine's processes: stop them (their runs record
            # interrupted, as after Ctrl-C) and return once they have
            from reslab.pool import STOP_GRACE_S

            for job in jobs:
                job.cancel(check=False)
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and not all(job.done() for job in jobs):
                time.sleep(0.2)
        raise
    return out


def _ray_capacity(ray: Any, cpus: int, gpus: int) -> int:
    """How many tasks of ``cpus`` CPUs and ``gpus`` GPUs the cluster holds at once (at least 1:
    a cluster that is still growing may hold more later)."""
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(have.get("GPU", 0) // gpus))
    return max(1, fits)


def _slurm_outcome(job: Any, folder: Path) -> WorkerOutcome:
    name = f"worker {job.job_id}"
    try:
        return WorkerOutcome(name, job.result())
    except Exception as e:  # noqa: BLE001 - a worker's failure is reported, the others' results kept
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__
        return WorkerOutcome(name, error=f"{why} (log: {folder}/{job.job_id}_0_log.err)")


def _run_ray(ray: Any, task: WorkerTask, res: Resources, workers: int, watch: _Watch) -> list[WorkerOutcome]:
    from reslab.pool import STOP_GRACE_S
    from reslab.signals import Terminated

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=res.ray_address,
                include_dashboard=False,
                log_to_driver=False,  # the workers' output stays in Ray's session logs
                logging_level="WARNING",
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = res.ray_address or "a new local cluster"
            raise UsageError(f"cannot start or reach Ray at {where}: {str(e).strip().splitlines()[0]}") from None
    # ray.init replaced the SIGTERM handler with an exit at once, and ray.wait turns whatever a
    # handler raises into a plain KeyboardInterrupt: record the signal to stop as SIGTERM asks
    received: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_handler(received))
    try:
        remote = ray.remote(
            num_cpus=res.cpus_per_task or 1,
            num_gpus=res.gpus_per_task or 0,
            max_retries=res.retries,
        )(_ray_worker)
        if res.workers is None:
            workers = min(workers, _ray_capacity(ray, res.cpus_per_task or 1, res.gpus_per_task or 0))
        refs = [remote.remote(task, res.gpus_per_task or 0) for _ in range(workers)]
        names = {r: f"worker {i + 1}" for i, r in enumerate(refs)}
        if watch.enabled:
            print(f"compare: {len(refs)} workers started as Ray tasks", file=sys.stderr, flush=True)
        out: list[WorkerOutcome] = []
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in ready:
                    try:
                        out.append(WorkerOutcome(names[ref], ray.get(ref)))
                    except Exception as e:  # noqa: BLE001 - reported per worker, the others' results kept
                        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                        out.append(WorkerOutcome(names[ref], error=lines[-1] if lines else type(e).__name__))
                watch.tick(len(pending))
        except KeyboardInterrupt:
            # each task stops like after Ctrl-C (run interrupted, claim released) before Ray goes
            for ref in pending:
                ray.cancel(ref)
            ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S)
            if received:
                raise Terminated() from None
            raise
        return out
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()


__all__ = [
    "LAUNCHERS",
    "Resources",
    "WorkerOutcome",
    "WorkerTask",
    "default_workers",
    "first_round",
    "launch",
    "parse_mem",
    "parse_slurm_args",
    "parse_time",
    "require",
]
