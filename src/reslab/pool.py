"""Worker processes for ``compare`` and ``probe``: spawned, persistent, and never orphaned.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``multiprocessing.Pool``: when one of
their workers is killed, the executor breaks and takes every running task with it, and
when the parent is killed their workers train on, unseen, for minutes (both measured, issue
12). Here each worker is a process with its own pipe:

* a worker that dies (``kill -9``, out of memory) fails only its own task, with
  :class:`WorkerDied`, and is replaced; the caller decides what to do with the task;
* a worker dies with its parent (:func:`reslab.signals.die_with_parent`) and stops on
  SIGTERM like on Ctrl-C, so its run records ``interrupted`` instead of disappearing;
* worker ``i`` keeps its index across replacements, so the caller can give it a fixed
  resource (a GPU) through ``env_for(i)``, applied to the environment the worker starts with.

Processes are spawned, not forked: forking a process that has started OpenMP or torch
threads can deadlock.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from reslab.signals import Terminated, die_with_parent, handle_sigterm, stop_word

#: seconds a worker gets to record its interrupted run before it is terminated, then killed
STOP_GRACE_S = 30.0


class WorkerDied(RuntimeError):
    """The worker process running a task ended without answering (killed, or crashed)."""


class RemoteError(RuntimeError):
    """A task raised in its worker; carries the original type name and traceback text."""

    def __init__(self, type_name: str, message: str, tb: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback = tb

    def __str__(self) -> str:
        return f"{self.type_name}: {self.args[0]}" if self.args[0] else self.type_name


class WorkerStopped(KeyboardInterrupt):
    """The worker stopped its task on Ctrl-C or SIGTERM (the task recorded it as interrupted)."""


@dataclass
class Done:
    tag: Any
    value: Any = None
    error: BaseException | None = None


def _stop_once(stop: Callable[[], BaseException]) -> Callable[[int, Any], None]:
    """A handler that raises ``stop()`` on the first signal and ignores the ones after it: a
    worker that is recording its interrupted run must not be interrupted again (a terminal's
    Ctrl-C and the parent's forwarded one arrive one after the other)."""
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise stop()

    return handler


def _serve(conn: Connection, parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    try:
        handle_sigterm()
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, _stop_once(KeyboardInterrupt))
        signal.signal(signal.SIGTERM, _stop_once(Terminated))
        die_with_parent(parent)
        if initializer is not None:
            initializer(*initargs)
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            fn, args = msg
            stopped = False
            try:
                answer: tuple[str, Any] = ("ok", fn(*args))
            except KeyboardInterrupt as e:
                answer, stopped = ("stopped", stop_word(e)), True
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
                answer = ("error", (type(e).__name__, str(e), traceback.format_exc()))
            try:
                conn.send(answer)
            except (OSError, ValueError):
                return  # the parent is gone
            except Exception as e:  # noqa: BLE001 - a result that cannot be pickled
                conn.send(("error", (type(e).__name__, f"the result could not be sent back: {e}", "")))
            if stopped:
                return
    except KeyboardInterrupt:
        return  # stopped while starting or idle: nothing to record


@contextmanager
def _sigint_ignored(enabled: bool) -> Iterator[None]:
    """SIG_IGN around a spawn: a disposition of SIG_IGN survives exec and Python keeps it, so
    the worker ignores Ctrl-C from its first instruction (while it imports torch, say)."""
    if not enabled:
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerPool:
    """``jobs`` worker processes, each running one task at a time.

    ``submit(tag, fn, *args)`` hands a task to a free worker; ``wait(timeout)`` returns the
    tasks that ended, each a :class:`Done` with its value or its error (:class:`RemoteError`,
    :class:`WorkerDied`, :class:`WorkerStopped`). ``fn`` must be importable by name.

    ``ignore_sigint``: workers ignore Ctrl-C and only the parent handles it (probe, whose
    cells are worth nothing half-done); otherwise a worker stops its task on Ctrl-C
    (compare, whose runs record ``interrupted`` and resume).
    """

    def __init__(
        self,
        jobs: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        env_for: Callable[[int], dict[str, str]] | None = None,
        ignore_sigint: bool = False,
    ) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self._ctx = mp.get_context("spawn")
        self._init = (initializer, initargs)
        self._env_for = env_for
        self._ignore_sigint = ignore_sigint
        self._procs: list[Any] = [None] * jobs
        self._conns: list[Connection | None] = [None] * jobs
        self._tags: list[Any] = [None] * jobs
        self._busy = [False] * jobs
        for i in range(jobs):
            self._start(i)

    def _start(self, i: int) -> None:
        parent_end, child_end = self._ctx.Pipe()
        env = self._env_for(i) if self._env_for else {}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with _sigint_ignored(self._ignore_sigint):
                p = self._ctx.Process(
                    target=_serve, args=(child_end, os.getpid(), *self._init), name=f"reslab-worker-{i}", daemon=True
                )
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child_end.close()
        self._procs[i], self._conns[i], self._busy[i] = p, parent_end, False

    @property
    def jobs(self) -> int:
        return len(self._procs)

    def free(self) -> int:
        return self._busy.count(False)

    def running(self) -> list[Any]:
        return [t for t, b in zip(self._tags, self._busy, strict=True) if b]

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any) -> None:
        i = self._busy.index(False)  # ValueError when none is free: a caller's mistake
        conn = self._conns[i]
        assert conn is not None
        try:
            conn.send((fn, args))
        except (OSError, ValueError):  # died while idle: replace it and hand over the task
            self._replace(i)
            conn = self._conns[i]
            assert conn is not None
            conn.send((fn, args))
        self._tags[i], self._busy[i] = tag, True

    def _replace(self, i: int) -> None:
        p, conn = self._procs[i], self._conns[i]
        if conn is not None:
            conn.close()
        if p is not None:
            p.join(timeout=5)
        self._start(i)

    def wait(self, timeout: float | None = None) -> list[Done]:
        """Tasks that ended within ``timeout`` seconds (an empty list when none did)."""
        busy = [i for i, b in enumerate(self._busy) if b]
        if not busy:
            return []
        handles: dict[Any, int] = {}
        for i in busy:
            handles[self._conns[i]] = i
            handles[self._procs[i].sentinel] = i
        ready = {handles[h] for h in wait(list(handles), timeout)}
        out = []
        for i in sorted(ready):
            conn = self._conns[i]
            assert conn is not None
            done = Done(self._tags[i])
            try:
                kind, value = conn.recv() if conn.poll() else ("died", None)
            except (EOFError, OSError):
                kind, value = "died", None
            if kind == "ok":
                done.value = value
            elif kind == "error":
                done.error = RemoteError(*value)
            elif kind == "stopped":
                done.error = WorkerStopped(value)
            else:
                self._procs[i].join(timeout=5)
                code = self._procs[i].exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                done.error = WorkerDied(f"worker process {self._procs[i].pid} died ({how})")
            self._busy[i], self._tags[i] = False, None
            if kind in ("stopped", "died"):
                self._replace(i)
            out.append(done)
        return out

    def signal_busy(self, signum: int) -> None:
        """Send ``signum`` to the workers running a task (a Ctrl-C sent to the parent alone)."""
        for i, b in enumerate(self._busy):
            if b and self._procs[i] is not None:
                try:
                    os.kill(self._procs[i].pid, signum)
                except OSError:
                    pass

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every worker: idle ones at once, busy ones after ``grace_s`` seconds to finish
        recording their state (SIGTERM, then SIGKILL)."""
        for conn in self._conns:
            try:
                if conn is not None:
                    conn.send(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            if p is not None:
                p.join(timeout=grace_s)
        for p in self._procs:
            if p is not None and p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p is not None and p.is_alive():
                p.kill()
                p.join()
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._busy = [False] * len(self._busy)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_unordered(self, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn(item)`` for every item, results as they finish; the first error is raised."""
        todo = list(items)
        todo.reverse()
        while todo or self.running():
            while todo and self.free():
                item = todo.pop()
                self.submit(item, fn, item)
            for done in self.wait(timeout=1.0):
                if done.error is not None:
                    raise done.error
                yield done.value
