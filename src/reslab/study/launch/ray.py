"""The Ray launcher: N Ray tasks, each with ``--cpus-per-task`` CPUs and ``--gpus-per-task`` GPUs
(Ray sets ``CUDA_VISIBLE_DEVICES``); a task whose process died is started again up to
``--retries`` times and resumes through the claims. On the driver, Ctrl-C or SIGTERM cancels
the tasks, which stop cleanly like after Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from reslab.errors import UsageError
from reslab.study.launch.common import (
    POLL_S,
    Resources,
    Watch,
    WorkerOutcome,
    WorkerTask,
    folder_problem,
    stop_handler,
)
from reslab.study.launch.reach import GcsWatch


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
    signal.signal(signal.SIGTERM, stop_handler(received))
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


def ray_capacity(ray: Any, cpus: int, gpus: int) -> int:
    """How many tasks of ``cpus`` CPUs and ``gpus`` GPUs the cluster holds at once (at least 1:
    a cluster that is still growing may hold more later)."""
    have = ray.cluster_resources()
    fits = int(have.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(have.get("GPU", 0) // gpus))
    return max(1, fits)


def check_folder(ray: Any, out: str, timeout: float) -> None:
    """Before anything is written: a probe task on the cluster checks that a worker there can
    write ``out`` (and import reslab). A cluster too busy to run it within ``timeout`` seconds
    is not held against it: each worker checks again before it trains."""
    from ray.exceptions import GetTimeoutError

    ref = ray.remote(num_cpus=0, max_retries=0)(folder_problem).remote(out)
    try:
        problem = ray.get(ref, timeout=timeout)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        return
    except Exception as e:  # noqa: BLE001 - the task could not even start reslab's code there
        text = str(e)
        if "No module named 'reslab" in text:
            raise UsageError(
                "the Ray workers cannot import reslab: install it on every node of the cluster "
                "(pip install 'reslab[ray]', the same version as here)"
            ) from None
        return
    if problem:
        raise UsageError(problem)


def run_ray(
    ray: Any, task: WorkerTask, res: Resources, workers: int, cpus: int, watch: Watch, gcs: GcsWatch
) -> list[WorkerOutcome]:
    """Start ``workers`` Ray tasks of ``cpus`` CPUs each and wait for them; :class:`ClusterLost`
    when the cluster stops answering meanwhile."""
    from reslab.pool import STOP_GRACE_S
    from reslab.signals import Terminated

    # ray.init replaced the SIGTERM handler with an exit at once, and ray.wait turns whatever a
    # handler raises into a plain KeyboardInterrupt: record the signal to stop as SIGTERM asks
    received: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_handler(received))
    try:
        remote = ray.remote(num_cpus=cpus, num_gpus=res.gpus_per_task or 0, max_retries=res.retries)(_ray_worker)
        if res.workers is None:
            workers = min(workers, ray_capacity(ray, cpus, res.gpus_per_task or 0))
        refs = [remote.remote(task, res.gpus_per_task or 0) for _ in range(workers)]
        names = {r: f"worker {i + 1}" for i, r in enumerate(refs)}
        if watch.enabled:
            print(
                f"compare: {len(refs)} workers started as Ray tasks of {cpus} CPU(s); each run trains with "
                f"{task.threads} thread(s)",
                file=sys.stderr,
                flush=True,
            )
        out: list[WorkerOutcome] = []
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in ready:
                    try:
                        out.append(WorkerOutcome(names[ref], ray.get(ref)))
                    except Exception as e:  # noqa: BLE001 - reported per worker, the others' results kept
                        gcs.check()  # a worker lost with its cluster is not a failed worker
                        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                        out.append(WorkerOutcome(names[ref], error=lines[-1] if lines else type(e).__name__))
                if pending:
                    gcs.check()
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
