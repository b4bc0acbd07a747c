"""Start concurrent ``reslab compare`` processes of a test together, whatever the load.

A test passes ``--import grid_barrier`` and ``RESLAB_TEST_BARRIER=DIR:N`` to N processes
sharing one results folder. Each process's first training start then waits, already holding
its cell's claim, until all N processes hold one. So each of them trains at least one cell
however slowly the machine starts them, and nothing the test asserts is loosened: without
it, on a busy 2-core machine the first process could train every cell of a tiny grid before
the others had finished importing torch. Only ``reslab.study.cells.run_cell`` is wrapped;
the grid, the claims and the training are the real ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import reslab.study.cells as cells

#: give up waiting after this long (the test's assertion then reports what happened)
TIMEOUT_S = 300.0


def _install(spec: str) -> None:
    folder, count = spec.rsplit(":", 1)
    arrived = Path(folder)
    real = cells.run_cell
    waited = False

    def run_cell(*args: Any, **kwargs: Any) -> Any:
        nonlocal waited
        if not waited:
            waited = True
            arrived.mkdir(parents=True, exist_ok=True)
            (arrived / str(os.getpid())).touch()
            deadline = time.monotonic() + TIMEOUT_S
            while len(list(arrived.iterdir())) < int(count) and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args, **kwargs)

    cells.run_cell = run_cell


if os.environ.get("RESLAB_TEST_BARRIER") and not getattr(cells.run_cell, "__wrapped_by_barrier__", False):
    _install(os.environ["RESLAB_TEST_BARRIER"])
    cells.run_cell.__wrapped_by_barrier__ = True  # type: ignore[attr-defined]
