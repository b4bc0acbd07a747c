"""What a comparison trains: the :class:`Grid` of model x technique x seed cells, its shards,
and its results folder's ``grid.json`` (the presets and the rules that turn options into a
grid: :mod:`reslab.study.presets`).

``shard=(i, n)`` restricts a process to the i-th of n parts of the grid, balanced by each
cell's estimated time; ``reslab report`` reads the whole folder at any time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.caches import cache_key, new_cache
from reslab.engine.config import RESUMABLE_CHANGES, TrainConfig
from reslab.errors import UsageError
from reslab.study.gridfile import read_grid_file, write_grid_file
from reslab.study.plan import Plan
from reslab.study.results import (
    GRID_FILE,
    Cell,
)

#: TrainConfig fields that identify a cell (set per cell, not shared by the grid)
CELL_FIELDS = ("model", "technique", "seed")


#: fields that may differ between invocations of one grid (where and how fast, not what)
FREE_FIELDS = RESUMABLE_CHANGES | {"threads"}


@dataclass
class Grid:
    """What a comparison trains: cells = models x techniques x seeds, sharing ``train`` settings.

    With ``sequential`` (a :class:`reslab.study.plan.Plan` as a dict), ``seeds`` is the most the
    plan may use; seeds are added in rounds and each technique stops when it is decided.
    ``target_acc`` is a validation accuracy, or ``"auto"`` (per model: 95% of baseline's mean
    final validation accuracy, set when the report is drawn). ``error_rate``: ``"table"`` (the
    chance of any wrong row of the decision table is at most alpha) or ``"row"`` (per comparison).
    """

    models: list[str]
    techniques: list[str]
    seeds: list[int]
    train: dict[str, Any] = field(default_factory=dict)
    target_acc: float | str = 0.9
    interval: str = "t"
    preset: str | None = None
    sequential: dict[str, Any] | None = None
    budget_s: float | None = None
    error_rate: str = "table"

    def cells(self) -> list[Cell]:
        """Seed-major order: a grid stopped half-way still has complete, paired seeds."""
        return [Cell(m, t, s) for s in self.seeds for m in self.models for t in self.techniques]

    def plan(self) -> Plan | None:
        return Plan(**self.sequential) if self.sequential else None

    def config(self, cell: Cell, **extra: Any) -> TrainConfig:
        values = {**self.train, "model": cell.model, "technique": cell.technique, "seed": cell.seed, **extra}
        return TrainConfig.from_dict(values, source=f"grid cell {cell.name}")

    def shared_settings(self) -> dict[str, Any]:
        """The settings every cell trains with (all TrainConfig fields, validated, defaults filled)."""
        values = {**self.train, "model": self.models[0], "technique": self.techniques[0], "seed": self.seeds[0]}
        key = cache_key(values)
        if key not in _SHARED_SETTINGS:
            full = TrainConfig.from_dict(values, source="compare options").to_dict()
            _SHARED_SETTINGS[key] = {k: v for k, v in full.items() if k not in CELL_FIELDS and k not in FREE_FIELDS}
        return copy.deepcopy(_SHARED_SETTINGS[key])

    def to_json(self) -> dict[str, Any]:
        from reslab.version import __version__

        return {
            "version": 2,
            "reslab": __version__,
            "preset": self.preset,
            "models": self.models,
            "techniques": self.techniques,
            "seeds": self.seeds,
            "sequential": self.sequential,
            "error_rate": self.error_rate,
            "target_acc": self.target_acc,
            "interval": self.interval,
            "train": self.shared_settings(),
        }


#: Grid.shared_settings per grid (a grid's settings are built and validated once)
_SHARED_SETTINGS: dict[str, dict[str, Any]] = new_cache("grid.shared_settings")


def resolve_techniques(names: Sequence[str]) -> list[str]:
    """The grid's techniques (:func:`reslab.nn.techniques.parse_techniques`), baseline first: it is
    what every other technique is compared against, so it is always trained."""
    from reslab.nn.techniques import parse_techniques

    try:
        out = parse_techniques(names)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return ["baseline", *(t for t in out if t != "baseline")]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1-based i) -> ``(i, n)``."""
    if text is None:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        i = n = 0
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard must be i/n with 1 <= i <= n, e.g. 1/2, got {text!r}")
    return i, n


def shard_cells(
    cells: Sequence[Cell], shard: tuple[int, int] | None, cost: Callable[[Cell], float] | None = None
) -> list[Cell]:
    """The ``i``-th of ``n`` parts of ``cells`` (in cell order), for ``shard=(i, n)``.

    With ``cost`` (estimated seconds per cell) the parts are balanced: cells are dealt
    largest first, each to the part with the least estimated time so far (the LPT rule,
    within 4/3 of the best possible longest part). Ties go to the lower part and costs come
    from the shared ``timing.json``, so every process computes the same parts. Without it,
    every n-th cell (round robin).
    """
    if shard is None:
        return list(cells)
    i, n = shard
    if cost is None:
        return [c for k, c in enumerate(cells) if k % n == i - 1]
    loads = [0.0] * n
    part: dict[Cell, int] = {}
    for _, c in sorted(enumerate(cells), key=lambda kc: (-cost(kc[1]), kc[0])):
        j = min(range(n), key=lambda j: (loads[j], j))
        loads[j] += cost(c)
        part[c] = j
    return [c for c in cells if part[c] == i - 1]


def prepare_results(out: Path, grid: Grid) -> Grid:
    """Create or check ``out`` for ``grid``; returns the grid to record (old cells kept)."""
    merged = check_results(out, grid)
    out.mkdir(parents=True, exist_ok=True)
    write_grid_file(out, merged.to_json())
    return merged


def check_results(out: Path, grid: Grid) -> Grid:
    """Check, writing nothing, that ``out`` may hold ``grid``; returns the grid to record there.

    An existing grid may be extended (more seeds, techniques, models) but not retrained with
    other settings: that would mix incomparable runs, so it is refused before anything runs.
    """
    path = out / GRID_FILE
    new = grid.to_json()
    if path.exists():
        old = read_grid_file(path)  # every stored value checked before anything is written
        if not isinstance(old.get("train"), dict):
            raise UsageError(f"{path}: train is missing; restore the file, or use a new --out")
        diffs = [
            f"{k}={new['train'].get(k)!r} (stored: {old['train'].get(k)!r})"
            for k in sorted(set(old["train"]) | set(new["train"]))
            if old["train"].get(k) != new["train"].get(k)
        ]
        if old.get("sequential") != new["sequential"]:
            diffs.append(f"sequential plan {new['sequential']} (stored: {old.get('sequential')})")
        if (old.get("error_rate") or "table") != new["error_rate"]:
            diffs.append(f"--error-rate {new['error_rate']} (stored: {old.get('error_rate') or 'table'})")
        if diffs:
            raise UsageError(
                f"{out} holds a grid trained with other settings: {'; '.join(diffs)}; "
                "re-run with the stored settings to resume it, or choose a new --out"
            )
        merged = Grid(
            models=list(dict.fromkeys([*old["models"], *grid.models])),
            techniques=list(dict.fromkeys([*old["techniques"], *grid.techniques])),
            seeds=list(dict.fromkeys([*old["seeds"], *grid.seeds])),
            train=grid.train,
            target_acc=grid.target_acc,
            interval=grid.interval,
            preset=grid.preset if grid.preset == old.get("preset") else None,
            sequential=grid.sequential,
            budget_s=grid.budget_s,
            error_rate=grid.error_rate,
        )
    else:
        # names starting with a dot are other processes' atomic writes in flight (grid.json's)
        if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise UsageError(
                f"{out} exists and is not a 'reslab compare' results folder (no {GRID_FILE}); choose another --out"
            )
        merged = grid
    return merged
