"""The presets of ``reslab compare`` and the rules that turn a request into a :class:`Grid`.

:func:`grid_from_options` is the one place those rules live: the command line parses its options
and calls it, and so does :func:`reslab.compare` from Python. The order in which settings win:
the preset's (or, without one, the engine's defaults) < a config file < named training options <
``KEY=VALUE`` assignments. Any grid or training option without a preset makes a custom grid,
which trains fixed seeds unless ``until_decided`` is asked for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reslab.errors import UsageError
from reslab.study.grid import FREE_FIELDS, Grid, resolve_techniques
from reslab.study.plan import PAPER, QUICK, Plan

#: Presets, sized by measurement (benchmarks/README.md, "The quick preset").
#:
#: ``quick`` (what ``reslab compare`` runs with no options) asks the article's question where it
#: can be asked on a 2-core CPU in about 5 minutes (4 min 30 s measured on an idle one): a shallow
#: ResNet-8 and a deep ResNet-56, both at quarter width (4/8/16 channels), on a fixed 4,000-image
#: Fashion-MNIST subset for one epoch of
#: 125 steps at batch 32 (learning rate 0.1, cosine after a 10% warm-up), validated twice on 500
#: held-out images, tested on a fixed 2,000 test images; one look at 6 seeds, a margin of 1 pp,
#: the table's error rate 0.05. That is early training: its verdicts are about how fast each
#: technique learns, and the report says so. Why these settings, what they decide, and what a
#: longer budget buys (``--preset quick --max-seeds 24 --budget 15m``): benchmarks/README.md, "The quick preset".
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
        "seeds": list(range(QUICK.max_seeds)),
        "sequential": dataclasses.asdict(QUICK),
        "budget_s": 300.0,
        "target_acc": "auto",
        "train": {
            "dataset": "fashion-mnist",
            "epochs": 1,
            "width": 0.25,
            "train_subset": 4000,
            "val_size": 500,
            "test_subset": 2000,
            "batch_size": 32,
            "lr": 0.1,
            "schedule": "cosine",
            "warmup": 0.1,
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


#: the sequential plan a custom grid gets with ``until_decided`` (first look at 3 seeds)
CUSTOM_SEQUENTIAL: dict[str, Any] = {"min_seeds": 3, "max_seeds": 6, "step": 1, "alpha": 0.05, "margin": 0.005}
#: what a custom grid starts from: the engine's training defaults on resnet20, the article's techniques
CUSTOM_BASE: dict[str, Any] = {
    "models": ["resnet20"],
    "techniques": ["baseline", "scale", "norm", "fusion"],
    "seeds": [0, 1, 2],
    "sequential": None,
    "budget_s": None,
    "target_acc": "auto",
    "train": {},
    "jobs": 1,
}


@dataclass
class GridSetup:
    """A grid ready to train: the :class:`Grid`, the runs trained at once, the results folder."""

    grid: Grid
    jobs: int
    out: str


def split_names(text: str | Sequence[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blanks dropped)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [p.strip() for p in parts if p.strip()]


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``N`` (seeds 0..N-1), ``"0,1,2"`` or a list of seeds."""
    try:
        if isinstance(text, int):
            seeds = list(range(text))
        elif not isinstance(text, str):
            seeds = [int(s) for s in text]
        elif "," in text:
            seeds = [int(p) for p in split_names(text)]
        else:
            seeds = list(range(int(text)))
    except (TypeError, ValueError):
        seeds = []
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds takes N >= 1 (seeds 0..N-1) or a list like 0,1,2, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def parse_duration(text: str | float) -> float:
    """``'90'``, ``'90s'``, ``'15m'``, ``'2h'``, ``'1h30m'`` (or a number of seconds) -> seconds."""
    if isinstance(text, (int, float)):
        total = float(text)
    else:
        m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
        if not text.strip() or m is None or not any(m.groups()):
            raise UsageError(f"--budget takes a duration like 90s, 15m, 2h or 1h30m, got {text!r}")
        h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
        total = 3600 * h + 60 * mi + sec
    if not total > 0:
        raise UsageError(f"--budget must be positive, got {text!r}")
    return total


def parse_target(text: str | float | None, default: float | str) -> float | str:
    """The validation accuracy of 'epochs to target': a fraction in (0, 1], or ``"auto"``."""
    if text is None:
        return default
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        target = float(text)
    except (TypeError, ValueError):
        target = -1.0
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target-acc is a fraction in (0, 1], e.g. 0.9, or 'auto', got {text!r}")
    return target


def _sequential(
    base: dict[str, Any] | None,
    seeds: str | int | Sequence[int] | None,
    max_seeds: int | None,
    margin_pp: float | None,
    alpha: float | None,
) -> dict[str, Any]:
    """The sequential plan: the preset's (or :data:`CUSTOM_SEQUENTIAL`), adjusted by the options."""
    seq = dict(base or CUSTOM_SEQUENTIAL)
    if seeds is not None:
        first = parse_seeds(seeds)
        if first != list(range(len(first))):
            raise UsageError("with --until-decided, --seeds is the number of seeds of the first look, e.g. --seeds 3")
        seq["min_seeds"] = len(first)
    if max_seeds is not None:
        seq["max_seeds"] = max_seeds
    if margin_pp is not None:
        seq["margin"] = margin_pp / 100
    if alpha is not None:
        seq["alpha"] = alpha
    seq["max_seeds"] = max(seq["max_seeds"], seq["min_seeds"])
    try:
        Plan(**seq)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return seq


def grid_from_options(
    *,
    preset: str | None = None,
    models: str | Sequence[str] | None = None,
    techniques: str | Sequence[str] | None = None,
    seeds: str | int | Sequence[int] | None = None,
    train: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    assignments: Sequence[str] = (),
    target_acc: str | float | None = None,
    until_decided: bool | None = None,
    max_seeds: int | None = None,
    margin_pp: float | None = None,
    alpha: float | None = None,
    error_rate: str | None = None,
    budget: str | float | None = None,
    interval: str = "t",
    jobs: int | None = None,
    out: str | None = None,
) -> GridSetup:
    """The grid a request asks for. ``train`` holds training options given by name (``None``
    values are left out), ``assignments`` ``KEY=VALUE`` strings; ``margin_pp`` is in percentage
    points. With no option at all this is the ``quick`` preset. Every value is checked here, and a
    bad one is a :class:`reslab.errors.UsageError` naming it."""
    from reslab.engine.config import TrainConfig, parse_assignments, read_config_file

    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; the presets are {', '.join(sorted(PRESETS))}")
    explicit_train = {k: v for k, v in (train or {}).items() if v is not None}
    grid_given = any(
        v is not None for v in (models, techniques, seeds, target_acc, until_decided, max_seeds, margin_pp, alpha)
    )
    custom = bool(explicit_train or config_file or assignments or grid_given or budget is not None)
    preset_name = preset or (None if custom else "quick")
    base = PRESETS[preset_name] if preset_name else CUSTOM_BASE
    train_values = dict(base["train"])
    given: dict[str, Any] = {}
    if config_file:
        from_file = read_config_file(config_file)
        TrainConfig.from_dict(from_file, source=f"config file {config_file}")  # its own errors name the file
        given.update(from_file)
    given.update(explicit_train)
    given.update(parse_assignments(list(assignments), "--set", "lr=0.05"))
    # a preset's recipe for the dataset asked for (paper on cifar10) replaces its training settings
    recipe = base.get("recipes", {}).get(given.get("dataset"))
    if recipe:
        train_values = dict(recipe)
    train_values.update(given)
    for k in ("model", "technique", "seed"):
        if k in train_values:
            raise UsageError(f"{k} is set per run by the grid; use --{k}s instead of setting {k} in the options")
    model_list = split_names(models) if models is not None else list(base["models"])
    if not model_list:
        raise UsageError("--models is empty; give e.g. --models resnet20")
    tech_list = resolve_techniques(split_names(techniques) if techniques is not None else base["techniques"])
    target = parse_target(target_acc, base["target_acc"])
    until = until_decided if until_decided is not None else base["sequential"] is not None
    if until:
        seq: dict[str, Any] | None = _sequential(base["sequential"], seeds, max_seeds, margin_pp, alpha)
        seed_list = list(range(Plan(**seq).max_seeds))  # type: ignore[arg-type]
    else:
        if max_seeds is not None or margin_pp is not None or alpha is not None:
            raise UsageError("--max-seeds, --margin and --alpha belong to --until-decided; add it, or drop them")
        seq = None
        seed_list = parse_seeds(seeds) if seeds is not None else list(base["seeds"])[: 3 if preset_name else None]
    if error_rate is not None and error_rate not in ("table", "row"):
        raise UsageError(f"--error-rate is table or row, got {error_rate!r}")
    if interval not in ("t", "bootstrap"):
        raise UsageError(f"--interval is t or bootstrap, got {interval!r}")
    grid = Grid(
        model_list,
        tech_list,
        seed_list,
        train_values,
        target,
        interval,
        preset_name if not custom else None,
        sequential=seq,
        budget_s=parse_duration(budget) if budget is not None else base.get("budget_s"),
        error_rate=error_rate or "table",
    )
    # only the dataset chosen (and where it is read, how many threads): the preset's own recipe for it
    recipe_only = recipe and set(given) - FREE_FIELDS == {"dataset"} and not grid_given and budget is None
    if recipe_only and grid.error_rate == "table":
        grid.preset = f"{preset_name} ({given['dataset']})"
    elif preset_name and (custom or grid.error_rate != "table"):
        grid.preset = f"{preset_name} (modified)"
    jobs = jobs if jobs is not None else base["jobs"]
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    default_out = f"{preset_name}-{given['dataset']}" if recipe else preset_name
    return GridSetup(grid, jobs, out or f"results/{default_out or 'compare'}")


__all__ = [
    "CIFAR10_RECIPE",
    "PAPER_EPOCHS",
    "PRESETS",
    "GridSetup",
    "grid_from_options",
    "parse_duration",
    "parse_seeds",
    "parse_target",
    "split_names",
]
