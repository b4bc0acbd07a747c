"""Run folders: what a run has written and what its status is.

The one place that writes ``summary.json``, ``metrics.jsonl`` and the other JSON files of a
run folder, and that reads a folder's status back. :mod:`reslab.engine.train` (deciding whether
to start, resume or refuse), :mod:`reslab.study.compare` (which cells are left) and
:mod:`reslab.study.results` (what a report shows) all ask here, so they agree on what an
unreadable folder is. Layout: see ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reslab.engine.config import TrainConfig, read_config_file
from reslab.errors import UsageError

#: what a run writes; ``overwrite`` removes exactly these, nothing else in the folder
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "model-best.safetensors",
    "checkpoint",
    "gradients.jsonl",
    "evals.jsonl",
    "tensorboard",
)
SUMMARY_FILE = "summary.json"
#: a status that says no more than that the folder holds a run whose summary cannot be read
UNKNOWN = "unknown"
STATE_WORDS = {"stale": "its process is gone", UNKNOWN: "its summary.json is unreadable"}


# ---------------------------------------------------------------------------------------
# Writing


def write_json(path: Path, obj: Any) -> None:
    # imported here: readers of run folders (reports) need no torch, which checkpoint loads
    from reslab.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from reslab.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def jsonl_line(record: dict[str, Any]) -> str:
    """One record of a JSON-lines file a run appends to (metrics, gradients), newline included."""
    return json.dumps(record) + "\n"


def read_json(path: Path) -> Any:
    """A JSON file of a run folder (a checkpoint's record, say); ``None`` when missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file a run wrote, for readers (reports): a line that is not
    a JSON object (a torn last line, the writer killed mid-write) is skipped, not fatal."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record to a JSON-lines file of a run folder (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(jsonl_line(record))


def read_jsonl_prefix(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file this run appends to, up to the first torn line (a
    kill mid-write): what follows it was never part of a consistent state."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


def remove_run(out: Path) -> None:
    """Delete a run's own files (:data:`RUN_FILES`), nothing else in ``out``."""
    for f in RUN_FILES:
        p = out / f
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ---------------------------------------------------------------------------------------
# Reading the status


#: summary.json's numbers: each a number or null (a string here is damage, not a result)
SUMMARY_NUMBERS = ("test_acc", "test_loss", "best_val_acc", "elapsed_s", "chance_acc", "params", "flops")


def _summary_fault(obj: Any) -> str | None:
    """Why a parsed summary.json is not one reslab wrote (None when it could be)."""
    if not isinstance(obj, dict):
        return f"holds a JSON {type(obj).__name__}, not an object"
    if "status" in obj and not isinstance(obj["status"], str):
        return f"has status {obj['status']!r}, not a word"
    for key in SUMMARY_NUMBERS:
        v = obj.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"has {key} {v!r}, not a number"
    return None


def read_summary(out: Path) -> dict[str, Any] | None:
    """``summary.json`` as a dict; ``None`` when it is missing, unreadable or damaged (a value of
    the wrong kind, :func:`summary_problem` says which)."""
    summary = read_json(out / SUMMARY_FILE)
    return summary if _summary_fault(summary) is None else None


def summary_problem(file: Path) -> str | None:
    """Why ``file`` (a summary.json that exists) cannot be read as one; ``None`` when it can or
    does not exist (no summary yet: a run killed as it started)."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"cannot be read ({e.__class__.__name__})"
    try:
        obj = json.loads(text)
    except ValueError:
        return "is not valid JSON"
    return _summary_fault(obj)


def has_run(out: Path) -> bool:
    """Whether ``out`` holds any file a run writes."""
    return any((out / f).exists() for f in RUN_FILES)


def status_of(summary: dict[str, Any] | None) -> str:
    """The status a run's summary.json records; :data:`UNKNOWN` when it could not be read
    or names none."""
    if summary is None or not summary.get("status"):
        return UNKNOWN
    return str(summary["status"])


def recorded_status(out: Path) -> str | None:
    """The status summary.json records: ``None`` for no run here, :data:`UNKNOWN` for a
    run whose summary cannot be read or names no status."""
    return status_of(read_summary(out)) if has_run(out) else None


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` lists a checkpoint to resume from (intact or not: resuming checks)."""
    ck = out / "checkpoint"
    return (ck / "latest.json").is_file() or any(ck.glob("epoch-*.json"))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def run_state(out: Path) -> str | None:
    """:func:`recorded_status`, with a ``running`` run whose process is gone as ``stale``.

    summary.json records the pid and host of the process training it; a ``running`` status
    whose process is gone was killed, or stopped by an error before it could say so. A run
    recorded on another host stays ``running``: it cannot be checked.
    """
    status = recorded_status(out)
    if status != "running":
        return status
    summary = read_summary(out) or {}
    if summary.get("host", socket.gethostname()) == socket.gethostname():
        pid = summary.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or not process_alive(pid):
            return "stale"
    return status


def owner(out: Path) -> str:
    summary = read_summary(out) or {}
    return f"process {summary.get('pid', '?')} on {summary.get('host', '?')}"


def extendable(saved: dict[str, Any]) -> bool:
    """Can a run be given more epochs and stay the run it would have been with them
    from the start? Only where the learning rate of every step already taken does not
    depend on the total: a constant schedule without warm-up."""
    return saved.get("schedule") == "constant" and not saved.get("warmup")


# ---------------------------------------------------------------------------------------
# Who may write a run folder: an OS lock held for the whole run

#: the lock file of a run folder (never removed: a process may hold it open)
LOCK_FILE = ".reslab.lock"


class RunLock:
    """An exclusive ``fcntl.flock`` on ``out/.reslab.lock``, held from before a training call looks
    at the folder until it returns, and released by the kernel when the process dies (so a killed
    run never leaves a lock behind).

    Local file systems honour flock between processes of one machine; NFS and other network file
    systems may not. Across machines the grid's cell claims (:mod:`reslab.study.claims`, leases
    renewed while a run trains and taken over when they go stale) are what keep two workers off one
    cell; this lock is the guard for the common case, two commands on one machine (docs/architecture.md).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> RunLock:
        """Take the lock, or a :class:`UsageError` naming the process that holds it. Creates
        ``out`` when it does not exist (``created`` then says so), writes nothing else."""
        import fcntl

        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UsageError(f"cannot use {self.out} as a run folder: {e.strerror}; pass another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise UsageError(
                f"{self.out} is being trained right now by {holder}; wait for it to finish, stop it, or pass "
                "another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the kernel drops the lock with the last descriptor
            self._fd = None

    def forget_if_empty(self) -> None:
        """Remove the folder this lock created when nothing but the lock file is in it (a call
        refused before it wrote anything)."""
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.out.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(outs: Sequence[Path]) -> Iterator[None]:
    """Hold the :class:`RunLock` of every folder in ``outs`` (in a fixed order, so two packs that
    share a folder cannot deadlock: the second is refused). A call refused with a
    :class:`UsageError` before it wrote anything leaves no folder it created behind."""
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(RunLock(o)) for o in sorted(set(outs), key=str)]
        try:
            yield
        except UsageError:
            for lock in locks:
                lock.release()
                lock.forget_if_empty()
            raise


def _lock_holder(fd: int) -> str:
    """'process 123 on host' from a held lock file (what its holder wrote there)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"process {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


# ---------------------------------------------------------------------------------------
# Deciding what a new training call does with a folder


def plan_run(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """``(resume, overwrite)`` as they apply to the run already in ``out``, or a
    :class:`UsageError` saying why this call may not touch it.

    A run killed, interrupted or failed before its first checkpoint has nothing worth
    keeping, so a plain call and ``resume`` both start it again (its files are replaced).
    """
    state = run_state(out)
    checkpointed = has_checkpoint(out)
    restartable = state in ("stale", "interrupted", "failed", UNKNOWN) and not checkpointed
    if state == "running" and not overwrite:
        elsewhere = (read_summary(out) or {}).get("host") != socket.gethostname()
        if not (resume and elsewhere and checkpointed):
            gone = "if it is gone, pass --resume to continue" if elsewhere else "or pass --overwrite to replace it"
            raise UsageError(
                f"{out} is being trained right now by {owner(out)}; wait for it to finish or stop it first ({gone})"
            )
    if resume and not overwrite:
        if restartable or state is None:
            return False, True  # --resume of a run with no checkpoint starts it
        if not checkpointed:
            raise UsageError(
                f"nothing to resume in {out}: its {state} run has no checkpoint; pass --overwrite to replace it"
            )
        if state == "completed":
            _check_extension(out, cfg)
    elif not resume and state is not None and not overwrite:
        if restartable:
            return resume, True
        if state == "completed":
            saved = read_config_file(out / "config.yaml") if (out / "config.yaml").is_file() else {}
            more = (
                ", or --resume --epochs N to extend it"
                if extendable(saved)
                else f", or another --out (its {saved.get('schedule', 'learning-rate')} schedule cannot be extended)"
            )
            raise UsageError(f"{out} already holds a completed run; pass --overwrite to replace it{more}")
        if state == "diverged":
            raise UsageError(f"{out} already holds a diverged run; pass --overwrite to replace it (try a lower --lr)")
        raise UsageError(
            f"{out} already holds an unfinished run ({STATE_WORDS.get(str(state), state)}, checkpointed); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    return resume, overwrite


def _check_extension(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a completed run unless it gets more epochs on a schedule that allows them."""
    saved = read_config_file(out / "config.yaml") if (out / "config.yaml").is_file() else {}
    done = int(saved.get("epochs") or 0)
    if cfg.epochs <= done:
        raise UsageError(
            f"the run in {out} is already completed ({done} epochs); to extend it pass --epochs N "
            f"with N > {done}, or pass --overwrite to retrain"
        )
    if not extendable(saved):
        why = (
            f"its {saved.get('schedule')} schedule already brought the learning rate down to zero at epoch {done}"
            if saved.get("schedule") != "constant"
            else f"its warm-up ({saved.get('warmup')}) was a fraction of {done} epochs, so more epochs "
            "would change the learning rate of steps already taken"
        )
        raise UsageError(
            f"the run in {out} cannot be extended honestly: {why}; start a new run with --epochs "
            f"{cfg.epochs} in another --out (runs trained with --schedule constant --warmup 0 can be extended)"
        )
