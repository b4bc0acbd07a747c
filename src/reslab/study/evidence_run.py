"""One call of the evidence study (:mod:`reslab.study.evidence`): train what fits in a budget, and
record every finished run the moment its pack ends.

A call (``reslab evidence``):

1. reads the recorded runs (``OUT/runs.jsonl``; a damaged ``runs.jsonl`` or ``summary.json`` stops it
   with one line before anything is written) and asks one worker process which card it trains on;
2. repeatedly decides the study from the runs (:func:`reslab.study.evidence.build_state`), takes the
   first pack of :func:`reslab.study.evidence.next_packs` whose estimated time
   (:class:`reslab.study.evidence.Costs`) fits in what is left of the budget (shrinking the pack to
   fewer seeds where that fits; a pack of a study nothing was ever timed for only as the call's
   first), and trains it in the worker (:func:`reslab.study.cells.claim_and_run_pack`, run folders in
   the scratch ``--work`` folder, one per settings);
3. appends each finished run (completed or diverged) to ``runs.jsonl`` as a compact record and
   rewrites ``summary.json`` and the study's report;
4. stops when nothing is left to train on this card, when the next pack does not fit, or at the
   budget's end: :data:`STOP_RESERVE_S` before it the pack in training is stopped at a step boundary
   (its runs are not recorded; on the same machine the next call resumes them from their
   checkpoints in ``--work``), and the files are left as the last finished pack wrote them.

Every file is written atomically (:func:`reslab.files.atomic_write`), so an interrupted call (Ctrl-C,
SIGTERM, a kill) leaves valid files holding every run finished before it. The budget counts from the
command's start: the worker's start-up, each pack's build and warm-up and the writing are inside it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reslab.errors import UsageError
from reslab.study.evidence import Pack, State, Study, build_state, next_packs, summary_of
from reslab.study.evidence_costs import Costs
from reslab.study.evidencefile import (
    RUN_STATUSES,
    Runs,
    add_runs,
    check_summary,
    read_runs,
    settings_id,
    write_summary,
)
from reslab.study.grid import Grid
from reslab.study.results import RUNS_DIR, Cell
from reslab.version import __version__

#: the default budget of one call, start-up included
DEFAULT_BUDGET_S = 480.0
#: seconds of the budget kept to stop a pack and write the files
STOP_RESERVE_S = 30.0
#: how long a pack stopped at the budget's end gets to record its runs as interrupted
STOP_WAIT_S = 15.0
#: where the run folders (checkpoints included) are trained: scratch, never committed
DEFAULT_WORK = Path("results") / "evidence-work"
#: what a record keeps of each epoch of a run's metrics
CURVE_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "elapsed_s")
#: what a record keeps of a run's summary.json
SUMMARY_KEYS = (
    "test_acc",
    "test_loss",
    "chance_acc",
    "best_val_acc",
    "best_epoch",
    "diverged_epoch",
    "elapsed_s",
    "params",
    "flops",
)


@dataclass
class Trained:
    """What became of one cell of a pack: its status (completed, diverged, or why it has no result:
    failed, held, lost), and for a finished run what its folder recorded."""

    cell: Cell
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    #: found finished in the scratch folder (trained by an earlier call whose record was lost): not timed
    found: bool = False

    @property
    def finished(self) -> bool:
        """A result to record (completed or diverged)."""
        return self.status in RUN_STATUSES


class Trainer(Protocol):
    """Trains packs for a call; :class:`WorkerTrainer` in a worker process, a simulation in the tests."""

    def device(self) -> dict[str, Any]:
        """The card (or CPU) it trains on, as :func:`reslab.engine.devices.describe_device` says."""
        ...

    def train(self, grid: Grid, cells: list[Cell], work: Path, timeout_s: float) -> list[Trained] | None:
        """Train ``cells`` (one model and technique) into ``work``; None when stopped at ``timeout_s``."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# The worker


def _worker_init(threads: int | None) -> None:
    import torch

    from reslab.nn.plugins import import_from_env

    if threads:
        torch.set_num_threads(threads)
    import_from_env()


def _describe(device: str) -> dict[str, Any]:
    from reslab.engine.devices import describe_device, pick_device

    return describe_device(pick_device(device))


def _train_cells(grid: Grid, cells: list[Cell], work: str, threads: int | None) -> list[Trained]:
    """In the worker: claim and train the cells (resuming any checkpoint found in ``work``), then read
    what each finished run's folder recorded."""
    from reslab.study.cells import claim_and_run_pack
    from reslab.study.results import read_run

    out = []
    for cell, run in claim_and_run_pack(grid, cells, Path(work), threads):
        data = read_run(Path(work) / RUNS_DIR / cell.name) if run.kind in ("trained", "finished") else None
        if data is None:
            out.append(Trained(cell, run.kind, error=run.error))
        else:
            out.append(
                Trained(cell, data.status, data.config, data.summary, data.metrics, found=run.kind == "finished")
            )
    return out


class WorkerTrainer:
    """Trains in one worker process (:class:`reslab.pool.WorkerPool`), started at the first call and
    kept for the whole call; at the timeout the pack is stopped like after SIGTERM, and the worker
    is killed when it does not stop within :data:`STOP_WAIT_S`."""

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.setting = device
        self.threads = threads
        self._pool: Any = None

    def _start(self) -> Any:
        from reslab.pool import WorkerPool

        if self._pool is None:
            self._pool = WorkerPool(1, _worker_init, (self.threads,))
        return self._pool

    def _run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> tuple[bool, Any]:
        from reslab.pool import WorkerDied, WorkerStopped

        pool = self._start()
        pool.submit(fn.__name__, fn, *args)
        end = time.monotonic() + max(0.0, timeout_s)
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                for done in pool.wait(timeout=min(left, 1.0)):
                    if isinstance(done.error, WorkerStopped | WorkerDied):
                        self.close()
                        return False, done.error
                    if done.error is not None:
                        raise done.error
                    return True, done.value
        except KeyboardInterrupt as e:
            from reslab.signals import Terminated

            pool.signal_busy(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            self.close(STOP_WAIT_S)
            raise
        pool.signal_busy(signal.SIGTERM)  # the budget's end: stop at a step boundary
        with contextlib.suppress(Exception):
            pool.wait(timeout=STOP_WAIT_S)
        self.close(0.0)
        return False, None

    def device(self) -> dict[str, Any]:
        from reslab.pool import RemoteError

        try:
            ok, value = self._run(_describe, self.setting, timeout_s=600.0)
        except RemoteError as e:
            raise UsageError(
                str(e.args[0]) if e.type_name == "UsageError" else f"--device {self.setting}: {e}"
            ) from None
        if not ok:
            raise UsageError(f"the worker process could not start on --device {self.setting} ({value})")
        return dict(value)

    def train(self, grid: Grid, cells: list[Cell], work: Path, timeout_s: float) -> list[Trained] | None:
        from reslab.pool import RemoteError, WorkerDied, WorkerStopped

        try:
            ok, value = self._run(_train_cells, grid, cells, str(work), self.threads, timeout_s=timeout_s)
        except RemoteError as e:
            return [Trained(c, "failed", error=str(e)) for c in cells]
        if not ok:
            if isinstance(value, WorkerDied | WorkerStopped):  # killed, or stopped by a signal sent to it alone
                why = str(value) if isinstance(value, WorkerDied) else f"the worker was {value}"
                return [Trained(c, "failed", error=why) for c in cells]
            return None
        return list(value)

    def close(self, grace_s: float = 5.0) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close(grace_s)


# ---------------------------------------------------------------------------------------
# Records


def _round(v: Any) -> Any:
    return float(f"{v:.6g}") if isinstance(v, float) else v


def make_record(
    study: Study, pack: Pack, run: Trained, device: dict[str, Any], pack_id: str, size: int, wall_s: float | None
) -> dict[str, Any]:
    """A finished run's compact record for runs.jsonl (no weights, no checkpoints)."""
    s = run.summary
    rec: dict[str, Any] = {
        "model": run.cell.model,
        "technique": run.cell.technique,
        "seed": run.cell.seed,
        "epochs": pack.epochs,
        "settings": study.settings(pack.epochs),
        "status": run.status,
        "diverged": run.status == "diverged",
        **{k: s.get(k) for k in SUMMARY_KEYS},
        "curve": [{k: _round(m[k]) for k in CURVE_KEYS if k in m} for m in run.metrics if "epoch" in m],
        "device": str(device.get("name") or device.get("type") or "unknown device"),
        "device_info": device,
        "config": run.config,
        "pack": {"id": pack_id, "size": size, "wall_s": None if run.found or wall_s is None else round(wall_s, 2)},
        "recorded": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reslab": __version__,
    }
    if run.status != "completed":
        rec["test_acc"] = None
    return rec


# ---------------------------------------------------------------------------------------
# A call


@dataclass
class CallResult:
    """What a call did: the records it added, the cells that failed (error lines), why it ended
    (``done``: nothing left on this card; ``budget``: the next pack does not fit or the budget ran
    out), and the study as it now stands."""

    recorded: list[dict[str, Any]]
    failed: list[str]
    ended: str
    summary: dict[str, Any]
    state: State
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the ``out`` folder itself (no lock file in the committed folder):
    a second call on the same folder on this machine is refused with one line."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(
                f"{out} is being written by another 'reslab evidence' call on this machine; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


def write_files(
    out: Path, study: Study, runs: Runs, report: Callable[[Path], Any] | None = None
) -> tuple[dict[str, Any], State]:
    """summary.json from the runs, then the report (``report(out)``, the caller's writer)."""
    state = build_state(study, runs)
    summary = summary_of(state, runs)
    write_summary(out, summary)
    if report is not None:
        report(out)
    return summary, state


def rebuild(out: str | Path, study: Study | None = None, report: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Rewrite summary.json (and the report) from runs.jsonl, training nothing; a damaged summary.json
    is refused like in a call (delete it first to have it rebuilt)."""
    out = Path(out)
    with locked(out):
        runs = read_runs(out)
        check_summary(out)
        summary, _ = write_files(out, study or Study(), runs, report)
    return summary


def _fit(packs: Sequence[Pack], costs: Costs, left: float, first: bool) -> tuple[Pack | None, float | None, str]:
    """``(pack, estimate, "")``: the first pack (or the most of its seeds) whose estimate fits in
    ``left`` seconds, a pack nothing can estimate (estimate None) only as the call's ``first``; else
    ``(None, None, why)``."""
    from reslab.study.estimate import fmt_duration

    shortest: tuple[Pack, float] | None = None
    for p in packs:
        for k in range(len(p.seeds), 0, -1):
            est = costs.estimate(p.model, p.technique, p.epochs, k)
            if est is None:
                if first:
                    return p, None, ""
                break
            if est <= left:
                return p.take(k), est, ""
            if k == 1 and (shortest is None or est < shortest[1]):
                shortest = (p.take(1), est)
    if shortest is None:
        return None, None, "no pack can be timed before it starts, and this call has trained already"
    return None, None, f"the next run ({shortest[0].words()}) needs about {fmt_duration(shortest[1])}"


def run_call(
    out: str | Path,
    *,
    study: Study | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    work: str | Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    trainer: Trainer | None = None,
    report: Callable[[Path], Any] | None = None,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    started: float | None = None,
    reserve_s: float = STOP_RESERVE_S,
    allow_cpu: bool = True,
) -> CallResult:
    """One call of the evidence study into ``out`` (module docstring). ``started``: the ``clock()``
    time the budget counts from (default: now). ``allow_cpu``: False refuses to train where the
    worker finds no GPU."""
    from reslab.study.estimate import fmt_duration

    study = study or Study()
    out = Path(out)
    work = Path(work) if work is not None else DEFAULT_WORK
    t0 = clock() if started is None else started
    deadline = t0 + budget_s - reserve_s
    lines: list[str] = []

    def tell(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    recorded: list[dict[str, Any]] = []
    failed: list[str] = []
    skip: set[tuple[str, str, int, int]] = set()
    with locked(out):
        runs = read_runs(out)
        check_summary(out)
        own = trainer is None
        trainer = trainer or WorkerTrainer(device, threads)
        try:
            info = trainer.device()
            card = str(info.get("name") or info.get("type"))
            if not allow_cpu and info.get("type") == "cpu":
                raise UsageError(
                    "no GPU is visible: the evidence study trains full-width ResNets on all of Fashion-MNIST "
                    "(hours on a CPU); pass --device cpu to train here anyway, or --plan to see what a call would train"
                )
            state = build_state(study, runs)
            tell(
                f"evidence: {len(runs.records)} runs recorded, {state.decided} of {len(state.rows)} rows decided; "
                f"this call trains on {card} for at most {fmt_duration(budget_s)}"
            )
            ended, tried = "done", False
            while True:
                packs = next_packs(state, card, skip)
                if not packs:
                    tell("evidence: nothing left to train on this card" + _why_nothing(state))
                    break
                pack, est, why = _fit(packs, Costs(runs.records, card), deadline - clock(), not tried)
                if pack is None:
                    ended = "budget"
                    tell(f"evidence: the budget is spent: {why}, {fmt_duration(max(0.0, deadline - clock()))} left")
                    break
                tried = True
                tell(f"evidence: training {pack.words()}" + (f", about {fmt_duration(est)}" if est else ""))
                cells = [Cell(pack.model, pack.technique, s) for s in pack.seeds]
                grid = study.grid(pack.model, pack.technique, pack.epochs, pack.seeds, device)
                folder = work / f"e{pack.epochs}-{settings_id(study.settings(pack.epochs))}"
                t_pack = clock()
                result = trainer.train(grid, cells, folder, deadline - clock())
                wall = clock() - t_pack
                if result is None:
                    ended = "budget"
                    tell(
                        f"evidence: stopped {pack.words()} at the budget's end after {fmt_duration(wall)}; "
                        "nothing of it is recorded"
                    )
                    break
                pack_id = uuid.uuid4().hex[:12]
                new = [make_record(study, pack, r, info, pack_id, len(cells), wall) for r in result if r.finished]
                if new:
                    runs = add_runs(out, new)
                    recorded += new
                    summary, state = write_files(out, study, runs, report)
                    tell(f"evidence: recorded {_outcomes(new)} in {fmt_duration(wall)}; {state.decided} rows decided")
                for r in result:
                    if r.finished:
                        continue
                    if r.error and r.error.startswith("UsageError: "):  # the user's to fix (a missing dataset)
                        raise UsageError(r.error.removeprefix("UsageError: "))
                    skip.add((r.cell.model, r.cell.technique, pack.epochs, r.cell.seed))
                    failed.append(
                        f"{r.cell.name}, {pack.epochs} epochs: {r.status}" + (f" ({r.error})" if r.error else "")
                    )
                    tell(f"evidence: {failed[-1]}")
            summary, state = write_files(out, study, runs, report)
        finally:
            if own:
                trainer.close()
    return CallResult(recorded, failed, ended, summary, state, lines)


def _outcomes(records: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        what = "diverged" if r["diverged"] else f"{100 * r['test_acc']:.2f}%"
        parts.append(f"{r['model']}-{r['technique']}-s{r['seed']} {what}")
    return ", ".join(parts)


def _why_nothing(state: State) -> str:
    if all(not r.open for r in state.rows):
        return ": every row is decided or its plan is spent"
    waiting = [f"{m}'s plateau is measured on {ms.plateau.card}" for m, ms in state.models.items() if ms.epochs is None]
    return " (" + "; ".join([*waiting, "the open rows need runs on the cards their groups hold"]) + ")"


def plan_call(
    out: str | Path, card: str, *, study: Study | None = None, budget_s: float = DEFAULT_BUDGET_S
) -> list[str]:
    """What the next call on ``card`` would train, in order, with estimates; nothing is written."""
    from reslab.study.estimate import fmt_duration

    study = study or Study()
    out = Path(out)
    runs = read_runs(out)
    check_summary(out)
    state = build_state(study, runs)
    margin = study.plan.margin
    lines = [
        f"evidence study in {out}: {len(runs.records)} runs recorded, {state.decided} of {len(state.rows)} rows decided"
    ]
    for m, ms in state.models.items():
        cards = "; ".join(c.words(margin) for c in ms.checks if len(ms.checks) > 1)
        lines.append(f"  {m}: {ms.plateau.sentence(margin)}" + (f"; cards: {cards}" if cards else ""))
    packs = next_packs(state, card)
    if not packs:
        lines.append(f"the next call on {card} would train nothing" + _why_nothing(state))
        return lines
    left = budget_s - STOP_RESERVE_S
    lines.append(
        f"the next call on {card} ({fmt_duration(budget_s)}, {fmt_duration(left)} of it for training) would train, "
        "as far as its budget goes:"
    )
    costs = Costs(runs.records, card)
    used = 0.0
    for i, p in enumerate(packs, 1):
        est = costs.estimate(p.model, p.technique, p.epochs, len(p.seeds))
        if est is None and i == 1:
            note = "nothing of the study is timed yet: started first, and stopped at the budget's end if it runs over"
            used = left
        elif est is None:
            note = "estimated once the first pack is timed"
        else:
            used += est
            note = f"about {fmt_duration(est)}" + ("" if used <= left else " (after this call's budget)")
        lines.append(f"  {i}. {p.words()}: {note}")
    lines.append("after each pack the study is decided again, so a plateau or a look can change what follows")
    return lines


__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_WORK",
    "STOP_RESERVE_S",
    "CallResult",
    "Trained",
    "Trainer",
    "WorkerTrainer",
    "make_record",
    "plan_call",
    "rebuild",
    "run_call",
    "write_files",
]
