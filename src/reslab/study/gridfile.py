"""The JSON files a grid writes into its results folder beside the runs, each with its one
reader and writer here:

- ``grid.json``, the record of what the grid trains: :func:`read_grid_file` (which checks every
  value before anything is written) and :func:`write_grid_file`; the content is
  :meth:`reslab.study.grid.Grid.to_json`'s;
- ``failed/NAME.json``, a cell whose training raised: :func:`write_failure`, :func:`read_failures`;
- ``timing.json``, the dedicated step-time pass: :func:`write_timing`, :func:`read_timing_file`.

Run folders' files are :mod:`reslab.engine.runs`'s, ``probe-init.json`` is
:mod:`reslab.probe.records`' format and ``claims/`` is :mod:`reslab.study.claims`'."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reslab.engine.config import TrainConfig
from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.study.plan import ERROR_RATES, Plan

GRID_FILE = "grid.json"
FAILED_DIR = "failed"
TIMING_FILE = "timing.json"


def write_grid_file(out: Path, content: dict[str, Any]) -> None:
    """Write ``out/grid.json`` (atomically), after the same checks the reader makes."""
    path = out / GRID_FILE
    atomic_write_text(path, json.dumps(validate_grid(content, path), indent=2) + "\n")


def _load(path: Path) -> Any:
    """A JSON file of the results folder; ``None`` when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def peek_grid(path: Path) -> dict[str, Any]:
    """grid.json's content unchecked, ``{}`` when it is missing or unreadable: for readers that
    only take a hint from it (a width, say) and must not fail on a damaged file."""
    obj = _load(path)
    return obj if isinstance(obj, dict) else {}


def write_failure(results: Path, model: str, technique: str, seed: int, error: str) -> Path:
    """``failed/MODEL-TECHNIQUE-sSEED.json``: the cell's training raised ``error`` (one line)."""
    path = results / FAILED_DIR / f"{model}-{technique}-s{seed}.json"
    payload = {"model": model, "technique": technique, "seed": seed, "error": error}
    atomic_write_text(path, json.dumps(payload) + "\n")
    return path


def read_failures(results: Path) -> list[tuple[str, str, int, str]]:
    """``(model, technique, seed, error)`` of every readable failure record, in name order."""
    out = []
    folder = results / FAILED_DIR
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        info = _load(f)
        try:
            out.append((str(info["model"]), str(info["technique"]), int(info["seed"]), str(info.get("error", ""))))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def write_timing(results: Path, timing: dict[str, Any]) -> None:
    """``timing.json``, as :func:`reslab.engine.timing.measure_step_times` returns it."""
    atomic_write_text(results / TIMING_FILE, json.dumps(timing, indent=1) + "\n")


def read_timing_file(results: Path) -> dict[str, Any]:
    """``timing.json``'s content, ``{}`` when the folder has none (or it is unreadable)."""
    obj = _load(results / TIMING_FILE)
    return obj if isinstance(obj, dict) else {}


def read_grid_file(path: Path) -> dict[str, Any]:
    """``grid.json`` as a dict, once every value in it is one reslab can train and report (the
    one reader of the file; :meth:`Grid.to_json` is its writer). Anything else is a
    :class:`UsageError` naming the file, the key and what it may hold, raised before any file
    is written."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable or not JSON ({e}); restore it, or use a new --out") from None
    return validate_grid(obj, path)


def validate_grid(obj: Any, path: Path | str) -> dict[str, Any]:
    """:func:`read_grid_file`'s checks on an already parsed grid.json."""

    def bad(key: str, allowed: str) -> UsageError:
        got = obj.get(key) if isinstance(obj, dict) else obj
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        return UsageError(f"{path}: {key} is {shown}; {allowed}; fix the file or restore it (or use a new --out)")

    if not isinstance(obj, dict):
        raise bad("the content", "a grid is a JSON object")
    for key in ("models", "techniques"):
        v = obj.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise bad(key, "it must be a non-empty list of names")
    seeds = obj.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(type(x) is int and x >= 0 for x in seeds):
        raise bad("seeds", "it must be a non-empty list of whole numbers >= 0")
    if obj.get("error_rate") not in (None, *ERROR_RATES):
        raise bad("error_rate", f"it must be one of {', '.join(ERROR_RATES)}")
    if obj.get("interval", "t") not in ("t", "bootstrap"):
        raise bad("interval", "it must be 't' or 'bootstrap'")
    target = obj.get("target_acc", "auto")
    if target != "auto" and not (isinstance(target, (int, float)) and not isinstance(target, bool) and 0 < target <= 1):
        raise bad("target_acc", "it must be 'auto' or an accuracy in (0, 1]")
    seq = obj.get("sequential")
    if seq is not None:
        try:
            if not isinstance(seq, dict):
                raise TypeError("not a mapping")
            Plan(**seq)
        except (TypeError, ValueError) as e:
            raise bad("sequential", f"it must be a plan (min_seeds, max_seeds, step, alpha, margin): {e}") from None
    train = obj.get("train", {})
    if not isinstance(train, dict):
        raise bad("train", "it must be a mapping of training option: value")
    for model in obj["models"]:
        for tech in obj["techniques"]:
            values = {**train, "model": model, "technique": tech, "seed": seeds[0]}
            try:
                TrainConfig.from_dict(values, source="train")
            except UsageError as e:
                raise UsageError(f"{path}: {e}; fix the file or restore it (or use a new --out)") from None
    return obj
