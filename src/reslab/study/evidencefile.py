"""The evidence study's two files, with their one reader and writer each: the only code that parses or
serialises them, and the only place that knows their versions.

``runs.jsonl`` (:data:`RUNS_FILE`, version :data:`RUNS_VERSION`) is the study's source of truth: one
compact record per trained run, in the order the runs were recorded, appended by every call of
``reslab evidence`` on any card. A record holds what a run is (``model``, ``technique``, ``seed``,
``epochs`` and the ``settings`` that identify it; the full ``config`` it recorded), how it ended
(``status`` completed or diverged, ``diverged``, ``test_acc``, ``test_loss``, ``chance_acc``,
``best_val_acc``, ``elapsed_s``, ...), its ``curve`` (one row per epoch: validation accuracy and
loss, training loss and accuracy, learning rate, cumulative seconds) and where it ran (``device``,
the card's name, and ``device_info``), never weights or checkpoints. A run is identified by
:func:`run_key`: the same model, technique, seed and settings (epochs included) are the same run,
whichever card trained it.

``summary.json`` (:data:`SUMMARY_FILE`, version :data:`SUMMARY_VERSION`) is derived from the runs by
:mod:`reslab.study.evidence`: the study's settings, each model's plateau measurement and card
pooling, and ``rows``, one per model x technique (x group of cards kept apart) with the keys of
:data:`ROW_KEYS`: ``model``, ``technique``, ``epochs`` (null while not chosen), ``seeds`` (of the look
that decided, or of the last look read), ``diff_pp`` (technique minus baseline in test accuracy,
percentage points), ``interval_pp`` (``[low, high]``, pp), ``verdict`` (better, worse, equivalent,
undecided), ``baseline_acc`` (baseline's mean test accuracy, percent) and ``devices`` (the cards whose
runs the row reads). Numbers that do not exist yet are null.

Either file, when damaged, hand-edited into something else or written by another version, is one
:class:`reslab.errors.UsageError` naming the file, the line or key, and the fix; nothing is written
after it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.study.plan import DECISIONS

RUNS_FILE = "runs.jsonl"
SUMMARY_FILE = "summary.json"
RUNS_VERSION = 1
SUMMARY_VERSION = 1
#: the keys every row of summary.json has
ROW_KEYS = ("model", "technique", "epochs", "seeds", "diff_pp", "interval_pp", "verdict", "baseline_acc", "devices")
#: how a recorded run ended (only finished runs are recorded)
RUN_STATUSES = ("completed", "diverged")


@dataclass
class Runs:
    """The records of ``runs.jsonl``, checked, in recorded order; ``duplicates``: later records of a
    run already recorded (only a hand merge of two copies makes one), left out."""

    records: list[dict[str, Any]]
    duplicates: int = 0


def run_key(record: dict[str, Any]) -> tuple[str, str, int, str]:
    """What identifies a run: model, technique, seed and its settings (epochs included), not the card."""
    settings = json.dumps(record["settings"], sort_keys=True)
    return str(record["model"]), str(record["technique"]), int(record["seed"]), settings


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two settings mappings are the same once written (numbers as JSON keeps them)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def settings_id(settings: dict[str, Any]) -> str:
    """A short name for one set of training settings (a scratch folder per settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------
# runs.jsonl


def _runs_fix(path: Path) -> str:
    return f"restore it from git ('git checkout -- {path}'): its runs cannot be rebuilt, only retrained"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _check_object_and_version(obj: Any, version: int, not_object: str, bad: Callable[[str], UsageError]) -> None:
    """``bad(...)`` unless ``obj`` is a JSON object of this ``version``."""
    if not isinstance(obj, dict):
        raise bad(not_object)
    if obj.get("version") != version:
        raise bad(
            f"version is {obj.get('version')!r}; this reslab reads version {version} (written by another "
            "version of reslab?)"
        )


def validate_record(obj: Any, where: str) -> dict[str, Any]:
    """One record of runs.jsonl, checked; a :class:`UsageError` starting with ``where`` otherwise."""

    def bad(what: str) -> UsageError:
        return UsageError(f"{where}: {what}")

    _check_object_and_version(obj, RUNS_VERSION, "a record is a JSON object", bad)
    for key in ("model", "technique", "device"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise bad(f"{key} must be a non-empty name")
    if not _is_int(obj.get("seed")) or obj["seed"] < 0:
        raise bad(f"seed is {obj.get('seed')!r}; it must be a whole number >= 0")
    if not _is_int(obj.get("epochs")) or obj["epochs"] < 1:
        raise bad(f"epochs is {obj.get('epochs')!r}; it must be a whole number >= 1")
    settings = obj.get("settings")
    if not isinstance(settings, dict) or settings.get("epochs") != obj["epochs"]:
        raise bad("settings must be the run's training settings, with the record's epochs")
    if not isinstance(obj.get("config"), dict):
        raise bad("config must be the run's recorded configuration (an object)")
    if obj.get("status") not in RUN_STATUSES:
        raise bad(f"status is {obj.get('status')!r}; it must be one of {', '.join(RUN_STATUSES)}")
    if obj.get("diverged") is not (obj["status"] == "diverged"):
        raise bad("diverged must be true exactly when status is diverged")
    if obj["status"] == "completed" and not (_is_num(obj.get("test_acc")) and 0 <= obj["test_acc"] <= 1):
        raise bad(f"test_acc is {obj.get('test_acc')!r}; a completed run has an accuracy in [0, 1]")
    for key in ("test_acc", "test_loss", "chance_acc", "best_val_acc", "elapsed_s"):
        if obj.get(key) is not None and not _is_num(obj[key]):
            raise bad(f"{key} is {obj[key]!r}; it must be a number or null")
    curve = obj.get("curve")
    if not isinstance(curve, list) or not all(isinstance(r, dict) and _is_int(r.get("epoch")) for r in curve):
        raise bad("curve must be a list of per-epoch rows, each with its epoch")
    for r in curve:
        for k, v in r.items():
            if v is not None and not _is_num(v):
                raise bad(f"curve epoch {r['epoch']}: {k} is {v!r}; it must be a number or null")
    return obj


def read_runs(out: Path) -> Runs:
    """``out/runs.jsonl``, every record checked (no file: no runs). A record of a run already
    recorded is left out and counted in ``duplicates`` (the first recorded stays)."""
    path = Path(out) / RUNS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Runs([])
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} cannot be read ({type(e).__name__}); {_runs_fix(path)}") from None
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int, str]] = set()
    duplicates = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise UsageError(f"{path} line {n} is not JSON (damaged or cut short); {_runs_fix(path)}") from None
        try:
            rec = validate_record(obj, f"{path} line {n}")
        except UsageError as e:
            raise UsageError(f"{e}; {_runs_fix(path)}") from None
        key = run_key(rec)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        records.append(rec)
    return Runs(records, duplicates)


def _clean(obj: Any) -> Any:
    """JSON has no NaN or infinity: those numbers are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def add_runs(out: Path, new: Iterable[dict[str, Any]]) -> Runs:
    """Append ``new`` records (stamped with this format's version) to ``out/runs.jsonl``, atomically
    (the file is rewritten whole: a kill at any moment leaves the old file or the new one). A record
    of a run already in the file is refused: a run is never recorded, or trained, twice."""
    path = Path(out) / RUNS_FILE
    runs = read_runs(out)
    keys = {run_key(r) for r in runs.records}
    added = []
    for rec in new:
        rec = validate_record(_clean({**rec, "version": RUNS_VERSION}), f"a new record of {path}")
        if run_key(rec) in keys:
            raise RuntimeError(f"{rec['model']} {rec['technique']} seed {rec['seed']} is already recorded in {path}")
        keys.add(run_key(rec))
        added.append(rec)
    if not added:
        return runs
    records = [*runs.records, *added]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return Runs(records, runs.duplicates)


# ---------------------------------------------------------------------------------------
# summary.json


def _summary_fix(path: Path) -> str:
    return (
        f"restore it ('git checkout -- {path}'), or delete it and run 'reslab evidence --no-train --out "
        f"{path.parent}' to rebuild it from {RUNS_FILE}"
    )


def validate_summary(obj: Any, path: Path | str) -> dict[str, Any]:
    """summary.json's content, checked: its version and every row's keys and values."""
    path = Path(path)

    def bad(what: str) -> UsageError:
        return UsageError(f"{path}: {what}; {_summary_fix(path)}")

    _check_object_and_version(obj, SUMMARY_VERSION, "the content must be a JSON object", bad)
    for key in ("runs", "decided"):
        if not _is_int(obj.get(key)) or obj[key] < 0:
            raise bad(f"{key} must be a whole number >= 0")
    if not isinstance(obj.get("study"), dict) or not isinstance(obj.get("models"), list):
        raise bad("study (an object) and models (a list) are missing")
    rows = obj.get("rows")
    if not isinstance(rows, list):
        raise bad("rows must be a list")
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise bad(f"{where} must be an object")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise bad(f"{where} has no {', '.join(missing)}")
        if not (isinstance(row["model"], str) and row["model"] and isinstance(row["technique"], str)):
            raise bad(f"{where}: model and technique must be names")
        if row["epochs"] is not None and not (_is_int(row["epochs"]) and row["epochs"] >= 1):
            raise bad(f"{where}: epochs is {row['epochs']!r}; a whole number >= 1, or null while not chosen")
        if not (_is_int(row["seeds"]) and row["seeds"] >= 0):
            raise bad(f"{where}: seeds is {row['seeds']!r}; a whole number >= 0")
        if row["verdict"] not in DECISIONS:
            raise bad(f"{where}: verdict is {row['verdict']!r}; one of {', '.join(DECISIONS)}")
        for key in ("diff_pp", "baseline_acc"):
            if row[key] is not None and not _is_num(row[key]):
                raise bad(f"{where}: {key} is {row[key]!r}; a number or null")
        iv = row["interval_pp"]
        if iv is not None and not (isinstance(iv, list) and len(iv) == 2 and all(_is_num(x) for x in iv)):
            raise bad(f"{where}: interval_pp is {iv!r}; [low, high] in pp, or null")
        devices = row["devices"]
        if not isinstance(devices, list) or not all(isinstance(d, str) and d for d in devices):
            raise bad(f"{where}: devices must be a list of card names")
        if row["verdict"] != "undecided" and (row["diff_pp"] is None or row["epochs"] is None or not devices):
            raise bad(f"{where}: a decided row has its epochs, difference and cards")
    if obj["decided"] != sum(r["verdict"] != "undecided" for r in rows):
        raise bad("decided does not count the decided rows")
    return obj


def read_summary(path: Path) -> dict[str, Any]:
    """summary.json (a file, or the folder holding it), checked by :func:`validate_summary`."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"{path} does not exist; run 'reslab evidence --no-train --out {path.parent}' to write it"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} cannot be read ({type(e).__name__}); {_summary_fix(path)}") from None
    try:
        obj = json.loads(text)
    except ValueError:
        raise UsageError(f"{path} is not JSON (damaged or cut short); {_summary_fix(path)}") from None
    return validate_summary(obj, path)


def check_summary(out: Path) -> None:
    """Raise the reader's error when ``out/summary.json`` exists but cannot be read (a call refuses
    to replace a damaged file it did not write); nothing when it is missing or fine."""
    path = Path(out) / SUMMARY_FILE
    if path.exists():
        read_summary(path)


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Write ``out/summary.json`` atomically, stamped with its version and checked as the reader checks it."""
    path = Path(out) / SUMMARY_FILE
    obj = validate_summary(_clean({**summary, "version": SUMMARY_VERSION}), path)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
    return path


__all__ = [
    "ROW_KEYS",
    "RUNS_FILE",
    "RUNS_VERSION",
    "RUN_STATUSES",
    "SUMMARY_FILE",
    "SUMMARY_VERSION",
    "Runs",
    "add_runs",
    "check_summary",
    "read_runs",
    "read_summary",
    "run_key",
    "same_settings",
    "settings_id",
    "validate_record",
    "validate_summary",
    "write_summary",
]
