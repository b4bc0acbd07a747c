"""The Slurm launcher, through submitit: one job array of N workers, logs in ``RESULTS/slurm``.

Before the time limit (and on preemption where the cluster sends the job's signal) submitit's
signal, ``SIGUSR2``, reaches the worker: training stops at a step boundary and records
``interrupted``, the claim is released, and only then is submitit's own handler run, which
requeues the task (:class:`SlurmWorker` is checkpointable: the requeued task is the same
worker and calls ``run_grid`` again, which resumes). ``SIGTERM`` (a preemption or
``scancel``) stops the same clean way but requeues nothing: Slurm decides. For tests without
Slurm, the hidden option ``--submitit-cluster local`` runs the same code through submitit's
local executor (one process per worker on this machine).
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.study.launch.common import POLL_S, ClusterLost, Resources, Watch, WorkerOutcome, WorkerTask, stop_handler


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
        handler = stop_handler(received)
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


def preflight(res: Resources) -> None:
    """Before anything is written: ``sbatch`` is here, and Slurm answers and knows the partition
    (``sinfo``, where installed, within ``--connect-timeout``); else one line saying what to do."""
    if res.submitit_cluster != "slurm":
        return  # submitit's local executors (tests) need no Slurm
    if shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm submits with sbatch, which is not on PATH; run it on a Slurm login node")
    if shutil.which("sinfo") is None:
        return  # sbatch alone will say whether it takes the options
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--format=%R"],
            capture_output=True,
            text=True,
            timeout=res.connect_timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"Slurm did not answer within {res.connect_timeout_s:g} s ('sinfo' hung): check that its controller is "
            "up ('scontrol ping'), or give a longer --connect-timeout"
        ) from None
    if proc.returncode != 0:
        said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise UsageError(f"cannot reach Slurm: 'sinfo' said: {said}; run on a login node of the cluster")
    partitions = sorted({ln.strip() for ln in proc.stdout.splitlines() if ln.strip()})
    if res.partition and partitions and res.partition not in partitions:
        raise UsageError(
            f"Slurm has no partition {res.partition!r} (sinfo lists {', '.join(partitions)}); pick one with --partition"
        )


def run_slurm(
    submitit: Any, task: WorkerTask, res: Resources, workers: int, cpus: int, results: Path, watch: Watch
) -> list[WorkerOutcome]:
    """Submit ``workers`` tasks of ``cpus`` CPUs each as one job array and wait for them;
    :class:`ClusterLost` when every one ended without finishing (cancelled, node lost)."""
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
    params["cpus_per_task"] = cpus
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
            f"compare: {len(jobs)} workers submitted as {where} {array} ({cpus} CPU(s) each; each run trains with "
            f"{task.threads} thread(s)); logs in {folder}",
            file=sys.stderr,
            flush=True,
        )
    if res.submitit_cluster == "debug":
        # submitit's debug jobs run in this process, one after the other, when asked for a result
        return [slurm_outcome(job, folder) for job in jobs]
    out: list[WorkerOutcome] = []
    try:
        pending = list(jobs)
        while pending:
            still = []
            for job in pending:
                if job.done():
                    out.append(slurm_outcome(job, folder))
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
    if out and all(o.vanished for o in out):
        states = ", ".join(sorted({o.error.split(" (log:")[0] for o in out if o.error}))[:200]
        raise ClusterLost(f"every worker of {where} {array} ({states})")
    return out


def slurm_outcome(job: Any, folder: Path) -> WorkerOutcome:
    name = f"worker {job.job_id}"
    try:
        return WorkerOutcome(name, job.result())
    except Exception as e:  # noqa: BLE001 - a worker's failure is reported, the others' results kept
        from submitit.core.utils import FailedJobError, UncompletedJobError

        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__
        # ended without a result and without an error of its own: cancelled, killed, node lost
        vanished = isinstance(e, UncompletedJobError) and not isinstance(e, FailedJobError)
        return WorkerOutcome(name, error=f"{why} (log: {folder}/{job.job_id}_0_log.err)", vanished=vanished)
