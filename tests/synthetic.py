"""Synthetic results folders for the report's tests: run folders in the format ``reslab train``
writes (config.yaml, metrics.jsonl, summary.json) and a grid.json, with made-up numbers chosen so
that every figure can be checked by hand."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path

import yaml

from reslab.engine import runs

SEEDS = (0, 1, 2)


#: made-up techniques the report's tests name by what they show
LABELS = ("up", "down", "same", "noisy", "short", "boom")


@contextlib.contextmanager
def labelled_techniques() -> Iterator[None]:
    """Register :data:`LABELS` as plugin techniques with baseline's plain merge, the way a user's
    own technique is (a report refuses a grid.json naming a technique reslab does not know), and
    remove them afterwards, so that no other test sees them in the registry."""
    import reslab.nn.techniques  # noqa: F401 - the built-in techniques, registered on import
    from reslab.nn import registry

    base = registry.technique_class("baseline")
    added = [n for n in LABELS if n not in registry._REGISTRY]
    for label in added:
        registry.register(type(f"Synthetic_{label}", (base,), {"name": label}))
    try:
        yield
    finally:
        for label in added:
            registry._REGISTRY.pop(label, None)


def write_run(
    root: Path,
    technique: str,
    seed: int,
    val_acc: list[float],
    *,
    model: str = "resnet8",
    status: str = "completed",
    test_acc: float | None = None,
    epoch_s: float = 10.0,
    images_per_s: float = 1000.0,
    params: int = 1000,
    flops: int = 50_000,
    epochs: int | None = None,
    gradients: list[dict] | None = None,
    chance: float | None = None,
) -> Path:
    run = root / "runs" / f"{model}-{technique}-s{seed}"
    run.mkdir(parents=True)
    epochs = epochs or len(val_acc)
    cfg = {"model": model, "technique": technique, "seed": seed, "dataset": "fashion-mnist", "epochs": epochs}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = []
    for i, acc in enumerate(val_acc):
        e = i + 1
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "train_acc": acc,
                "val_loss": 1.0 / e,
                "val_acc": acc,
                "lr": 0.1,
                "epoch_s": epoch_s,
                "elapsed_s": epoch_s * e,
                "images_per_s": images_per_s,
            }
        )
    runs.write_jsonl(run / "metrics.jsonl", rows)
    if status != "running":
        summary = {
            "status": status,
            "model": model,
            "technique": technique,
            "dataset": "fashion-mnist",
            "seed": seed,
            "epochs": epochs,
            "best_val_acc": max(val_acc) if status == "completed" else None,
            "best_epoch": val_acc.index(max(val_acc)) + 1,
            "test_acc": test_acc if test_acc is not None else val_acc[-1],
            "test_loss": 0.3,
            "elapsed_s": epoch_s * len(val_acc),
            "params": params,
            "flops": flops,
        }
        if status == "diverged":
            summary["diverged_epoch"] = len(val_acc) + 1
            summary["test_acc"] = None
        if chance is not None:
            summary["chance_acc"] = chance
        runs.write_json(run / "summary.json", summary)
    if gradients:
        runs.write_jsonl(run / "gradients.jsonl", gradients)
    return run


def write_grid(
    root: Path,
    techniques: list[str],
    seeds=SEEDS,
    target: float = 0.85,
    interval: str = "t",
    sequential: dict | None = None,
    error_rate: str | None = None,
) -> None:
    """``root/grid.json`` for a fashion-mnist grid of resnet8 and ``techniques``, written the way
    ``reslab compare`` writes it: :meth:`Grid.to_json` through the one writer, which checks it.
    ``sequential`` is a plan as a dict; ``error_rate`` ``None`` keeps the grid's default."""
    from reslab.study.grid import Grid
    from reslab.study.gridfile import write_grid_file

    root.mkdir(parents=True, exist_ok=True)
    extra = {} if error_rate is None else {"error_rate": error_rate}
    grid = Grid(
        models=["resnet8"],
        techniques=list(techniques),
        seeds=list(seeds),
        train={"dataset": "fashion-mnist", "epochs": 3},
        target_acc=target,
        interval=interval,
        sequential=sequential,
        **extra,
    )
    write_grid_file(root, grid.to_json())


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path / "summary.csv") as f:
        return {r["technique"]: r for r in csv.DictReader(f)}


def write_sequential_grid(
    root: Path, techniques: list[str], max_seeds: int = 5, min_seeds: int = 3, error_rate: str | None = None
) -> None:
    """:func:`write_grid` with a sequential plan of looks from ``min_seeds`` to ``max_seeds``, one seed a look."""
    plan = {"min_seeds": min_seeds, "max_seeds": max_seeds, "step": 1, "alpha": 0.05, "margin": 0.005}
    write_grid(root, techniques, seeds=range(max_seeds), sequential=plan, error_rate=error_rate)
