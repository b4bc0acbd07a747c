"""How long what is left of a grid will take: per cell from the timing pass, corrected by
the runs that finish."""

from __future__ import annotations

import math
import statistics
from typing import Any

from reslab.engine.timing import step_seconds
from reslab.study.grid import Grid
from reslab.study.outcomes import Outcomes, planned_cells
from reslab.study.results import (
    BASELINE,
    Cell,
)


class Estimator:
    """Seconds one cell takes in a worker: from the timing pass (step time x steps, plus the
    evaluations at the cost of a forward pass, a third of a step per image), divided by the
    measured gain of the packs its model trains in, then corrected by the ratio measured on the
    runs that have finished (a packed run counts its share of its pack's time)."""

    #: how much slower each of several CPU workers runs than one alone: two 1-thread workers on
    #: the 2-vCPU reference machine trained resnet56 at 173 img/s each against 360 img/s alone
    #: (benchmarks/README.md); refined by the runs that finish
    PARALLEL_CPU_SLOWDOWN = 2.0

    def __init__(
        self,
        grid: Grid,
        timing: dict[str, Any],
        n_train: int,
        n_eval: int,
        jobs: int = 1,
        pack_gain: dict[str, float] | None = None,
    ) -> None:
        st = grid.shared_settings()
        self.batch = int(st["batch_size"])
        self.epochs = int(st["epochs"])
        self.steps = max(1, n_train // self.batch) * self.epochs
        self.eval_images = n_eval
        self.timing = timing
        self.measured: list[float] = []  # actual / predicted of finished runs
        self.prior = (
            self.PARALLEL_CPU_SLOWDOWN if jobs > 1 and not str(grid.train.get("device", "")).startswith("cuda") else 1.0
        )
        #: per model: throughput of its packs over one run alone (measured on a GPU; 1 where not)
        self.pack_gain = dict(pack_gain or {})

    def predicted(self, cell: Cell) -> float:
        step = step_seconds(self.timing, cell.model, cell.technique) or step_seconds(self.timing, cell.model, BASELINE)
        if step is None:
            return 60.0
        return step * (self.steps + self.eval_images / (3 * self.batch)) / max(self.pack_gain.get(cell.model, 1.0), 1.0)

    def seconds(self, cell: Cell) -> float:
        factor = statistics.median(self.measured) if self.measured else self.prior
        return self.predicted(cell) * factor

    def observe(self, cell: Cell, elapsed_s: float, pack_size: int = 1) -> None:
        """A finished run took ``elapsed_s`` (its pack's time when it trained in a pack of ``pack_size``)."""
        p = self.predicted(cell)
        if p > 0 and elapsed_s > 0:
            self.measured.append(elapsed_s / max(pack_size, 1) / p)


def estimate_lines(grid: Grid, est: Estimator, outcomes: Outcomes, jobs: int) -> tuple[float, str]:
    """(upper estimate in seconds, one-line description) of what is left to train."""
    low = sum(est.seconds(c) for c in planned_cells(grid, outcomes, upper=False)) / jobs
    high = sum(est.seconds(c) for c in planned_cells(grid, outcomes, upper=True)) / jobs
    if grid.budget_s is not None:
        high = min(high, grid.budget_s)
        low = min(low, high)
    if grid.plan() is None or abs(high - low) < 1:
        return high, f"estimated time {fmt_duration(high)}"
    return high, (
        f"estimated time {fmt_duration(low)} if every technique is decided at the next look, "
        f"at most {fmt_duration(high)}" + (f" (budget {fmt_duration(grid.budget_s)})" if grid.budget_s else "")
    )


def timing_device(timing: dict[str, Any] | None) -> str:
    """The machine an estimate's step times were measured on, in a few words: the card's name
    ("NVIDIA H100 80GB HBM3") or "this CPU (N threads)"."""
    dev = timing.get("device") if isinstance(timing, dict) else None
    if not isinstance(dev, dict) or not dev.get("type"):
        return "a machine not recorded"
    if dev["type"] == "cpu":
        return f"this CPU ({dev.get('threads', '?')} threads)"
    return str(dev.get("name") or dev["type"])


#: estimates above this many seconds on a CPU are announced before training starts
LONG_RUN_S = 30 * 60


def image_counts(settings: dict[str, Any], ds: Any) -> tuple[int, int]:
    """(training images, images evaluated per run) under ``settings``."""
    n_all = len(ds.train_x) if hasattr(ds, "train_x") else len(ds.train_files)
    n_test = len(ds.test_x) if hasattr(ds, "test_x") else len(ds.test_files)
    from reslab.engine.sources import DEFAULT_VAL_SIZE

    val = settings.get("val_size")
    val = val if val is not None else DEFAULT_VAL_SIZE.get(ds.name, n_all // 10)  # as the engine resolves it
    n_train = n_all - val
    if settings.get("train_subset"):
        n_train = min(n_train, int(settings["train_subset"]))
    test = min(n_test, int(settings["test_subset"])) if settings.get("test_subset") else n_test
    evals = (val or n_test) * int(settings.get("evals_per_epoch") or 1) * int(settings["epochs"]) + test
    return n_train, evals


def fmt_duration(seconds: float | None) -> str:
    """A duration in the units a person reads: 45s, 4m05s, 2h07m, 6d23h."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        m, s = divmod(total, 60)
        return f"{m}m{s:02d}s"
    total_m = round(total / 60)  # past an hour, seconds are noise: round to the minute
    if total_m < 24 * 60:
        h, m = divmod(total_m, 60)
        return f"{h}h{m:02d}m"
    d, h = divmod(round(total / 3600), 24)
    return f"{d}d{h:02d}h"
