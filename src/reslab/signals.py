"""Stopping cleanly: SIGTERM handled like Ctrl-C, and child processes that die with their parent.

Slurm sends SIGTERM on preemption and at the time limit, and so do ``kill``, systemd and
most process managers. Handled like Ctrl-C, it stops a run at a step boundary: the run
records ``interrupted`` after its last complete checkpoint, its claim is released, and the
command exits with status 143 (128 + SIGTERM; Ctrl-C gives 130), so the same command
resumes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

#: exit status after Ctrl-C (SIGINT) and after SIGTERM, as a shell reports a process killed by them
INTERRUPTED_STATUS = 130
TERMINATED_STATUS = 143

_PR_SET_PDEATHSIG = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt so that every Ctrl-C path handles it too."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread (call from the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def exit_status(e: KeyboardInterrupt) -> int:
    return TERMINATED_STATUS if isinstance(e, Terminated) else INTERRUPTED_STATUS


def stop_word(e: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def die_with_parent(parent_pid: int) -> None:
    """Receive SIGTERM when the parent process dies, however it dies (``kill -9`` included).

    On Linux the kernel delivers it (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread
    notices the change of parent within a second. Either way the worker then stops like
    after Ctrl-C: its run records ``interrupted`` and its claim is released, instead of
    training on, unseen, beside the next invocation.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    # the parent may have died before prctl took effect; the thread covers that and other systems

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
