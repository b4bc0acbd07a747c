"""What a comparison trains: the presets, the :class:`Grid` of model x technique x seed
cells, its shards, and its results folder's ``grid.json``.

``shard=(i, n)`` restricts a process to the i-th of n parts of the grid, balanced by each
cell's estimated time; ``reslab report`` reads the whole folder at any time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.engine.config import RESUMABLE_CHANGES, TrainConfig
from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.study.plan import PAPER, QUICK, Plan
from reslab.study.results import (
    GRID_FILE,
    Cell,
)

#: Presets, sized by measurement (benchmarks/README.md, "The quick preset").
#:
#: ``quick`` (what ``reslab compare`` runs with no options) asks the article's question where
#: it can be answered on a 2-core CPU within 6 minutes (4 min 6 s to 4 min 55 s measured): a shallow ResNet-8 and a deep
#: ResNet-56, both at quarter width (4/8/16 channels), on a fixed 2,000-image Fashion-MNIST
#: subset for 2 epochs, validated twice per epoch on 500 held-out images, tested on a fixed
#: 2,000 test images. Seeds are added until each technique is decided (4 to 6 seeds: at 3 the
#: t quantile of a 2-degree-of-freedom interval is too wide for these noisy short runs) within
#: a 5-minute budget.
#: ``paper`` is the article's study at a realistic length, for a GPU: ResNet-20, -56 and -110 at
#: full width on all 55,000 training images, batch 512, with the article's three techniques,
#: for :data:`PAPER_EPOCHS` epochs. Each look adds one pack of 3 seeds per technique (looks
#: at 3, 6 and 9 seeds), so a GPU trains every look as packed models; the gradient-norm probe
#: during training is off (a pack does not record it), the probe at initialisation stays.
#: The paper preset's epochs, set by issue 19's bound of 45 minutes on one GPU, not by where
#: baseline levels off. On one H100 the preset at 10 epochs is estimated at most 27m30s; 20
#: epochs would be about 55 minutes (15, about 41, were not measured), and 20 gained 1.1-1.3 pp
#: of test accuracy over 10 for resnet20 and resnet56 (benchmarks/README.md, "GPU"), so the
#: report calls these rows early training.
PAPER_EPOCHS = 10

#: ``--preset paper --dataset cifar10``: the setting the literature reports (He et al. 2016,
#: section 4.2, whose CIFAR-10 ResNets ReZero and Fixup also train), in reslab's options.
#: 64k iterations of batch 128 on 45,000 training images (5,000 held out, the split He et
#: al. chose the schedule on) are 182 epochs; lr 0.1 divided by 10 at half and three
#: quarters of training; momentum 0.9; weight decay 1e-4; no label smoothing; 4-pixel
#: padded random crops and horizontal flips. Where it differs from the paper, and the
#: published figures beside it: docs/cifar10-recipe.md.
CIFAR10_RECIPE: dict[str, Any] = {
    "dataset": "cifar10",
    "epochs": 182,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "label_smoothing": 0.0,
    "schedule": "step",
    "warmup": 0.01,
    "flip": True,
    "crop_padding": 4,
    "val_size": 5000,
    "evals_per_epoch": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "models": ["resnet8", "resnet56"],
        "techniques": ["baseline", "scale", "norm", "fusion"],
        "seeds": [0, 1, 2, 3, 4, 5],
        "sequential": dataclasses.asdict(QUICK),
        "budget_s": 300.0,
        "target_acc": "auto",
        "train": {
            "dataset": "fashion-mnist",
            "epochs": 2,
            "width": 0.25,
            "train_subset": 2000,
            "val_size": 500,
            "test_subset": 2000,
            "batch_size": 64,
            "evals_per_epoch": 2,
        },
        "jobs": 2,
    },
    "paper": {
        "models": ["resnet20", "resnet56", "resnet110"],
        "techniques": ["baseline", "scale", "norm", "fusion"],
        "seeds": list(range(PAPER.max_seeds)),
        "sequential": dataclasses.asdict(PAPER),
        "budget_s": None,
        "target_acc": "auto",
        "train": {"dataset": "fashion-mnist", "epochs": PAPER_EPOCHS, "batch_size": 512, "evals_per_epoch": 2},
        # the training settings that replace "train" when the grid's dataset is named here
        "recipes": {"cifar10": CIFAR10_RECIPE},
        "jobs": 1,
    },
}


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
        key = json.dumps(values, sort_keys=True, default=repr)
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
_SHARED_SETTINGS: dict[str, dict[str, Any]] = {}


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
    atomic_write_text(out / GRID_FILE, json.dumps(merged.to_json(), indent=2) + "\n")
    return merged


def check_results(out: Path, grid: Grid) -> Grid:
    """Check, writing nothing, that ``out`` may hold ``grid``; returns the grid to record there.

    An existing grid may be extended (more seeds, techniques, models) but not retrained with
    other settings: that would mix incomparable runs, so it is refused before anything runs.
    """
    path = out / GRID_FILE
    new = grid.to_json()
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not all(isinstance(old.get(k), list) for k in ("models", "techniques", "seeds")):
                raise ValueError("missing the grid's lists")
            if not isinstance(old.get("train"), dict):
                raise ValueError("missing the training settings")
        except (OSError, ValueError, AttributeError):
            raise UsageError(f"{path} is unreadable or not a reslab grid; restore it, or use a new --out") from None
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
