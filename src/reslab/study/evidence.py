"""The evidence study: the article's question, asked properly, one short GPU call at a time.

**What it asks.** Do the article's techniques (``scale``, ``norm``, ``fusion``), and the literature's
answers to the same problem (``skipinit``, ``layerscale``), change test accuracy against
``baseline`` at three depths (resnet20, resnet56, resnet110), at full width, on all of Fashion-MNIST
(55,000 training images, 5,000 of them held out for validation, the 10,000 test images), trained
until baseline has levelled off? Each row is decided by the project's one rule
(:func:`reslab.study.rule.decide_table`, table-wide: the chance that any row is wrong is at most
0.05) under the sequential :data:`EVIDENCE_PLAN`: looks at 6, 12, 18 and 24 paired seeds, margin
0.5 pp.

**How long.** Not set by a call's length: per model, baseline is trained at the lengths of
:data:`LADDER` (each with its full schedule, :data:`PLATEAU_SEEDS` seeds), and the study trains at
the shortest length after which doubling the training gains less than the margin in baseline's mean
validation accuracy (the validation set, not the test set the rows are decided on). When even the
last doubling gains more, the longest length is used and every place that shows it says baseline was
still rising. The baseline runs of that measurement at the chosen length are runs of the study.

**Many calls, one study.** Everything is recomputed from the recorded runs
(:mod:`reslab.study.evidencefile`, ``runs.jsonl``): the plateau, which cards pool
(:mod:`reslab.study.pooling`), each row's decision and what the next call trains
(:func:`next_packs`), so a call on any card continues where the last one stopped, and a run
(model, technique, seed, settings) recorded once is never trained again.

This module decides and plans; :mod:`reslab.study.evidence_run` trains, within a call's budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reslab.study.evidence_costs import depth_weight
from reslab.study.evidence_plateau import Plateau, measure_plateau
from reslab.study.evidencefile import Runs, same_settings
from reslab.study.plan import Plan
from reslab.study.pooling import ALPHA, MIN_RUNS, UNTESTED, CardCheck, pool_cards
from reslab.study.results import BASELINE
from reslab.study.rule import Outcome, Pair, decide_table

#: the shared training settings: full width, all training and test images, batch 512 (the paper
#: preset's), one validation per epoch, no gradient probe while training (a pack records none)
STUDY_TRAIN: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "batch_size": 512,
    "width": 1.0,
    "train_subset": None,
    "test_subset": None,
    "evals_per_epoch": 1,
    "probe_every": 0,
}
#: the lengths baseline is measured at to find its plateau, each double the one before
LADDER = (10, 20, 40)
#: baseline seeds trained at every length of the ladder (seeds 0, 1, 2)
PLATEAU_SEEDS = 3
#: looks at 6, 12, 18 and 24 paired seeds; the table's error rate 0.05; margin 0.5 pp
EVIDENCE_PLAN = Plan(min_seeds=6, max_seeds=24, step=6, alpha=0.05, margin=0.005)


@dataclass(frozen=True)
class Study:
    """What the evidence study trains and how it decides (:data:`STUDY_TRAIN`, :data:`LADDER`,
    :data:`EVIDENCE_PLAN`); the tests shrink it."""

    models: tuple[str, ...] = ("resnet20", "resnet56", "resnet110")
    techniques: tuple[str, ...] = ("baseline", "scale", "norm", "fusion", "skipinit", "layerscale")
    train: tuple[tuple[str, Any], ...] = tuple(STUDY_TRAIN.items())
    ladder: tuple[int, ...] = LADDER
    plateau_seeds: int = PLATEAU_SEEDS
    plan: Plan = EVIDENCE_PLAN
    error_rate: str = "table"
    #: most seeds of one model and technique trained as one packed model (fewer when the budget asks)
    pack: int = 6
    pool_alpha: float = ALPHA
    pool_min_runs: int = MIN_RUNS

    def __post_init__(self) -> None:
        if not self.techniques or self.techniques[0] != BASELINE or len(self.techniques) < 2:
            raise ValueError("a study's techniques start with baseline and name at least one more")
        if not self.ladder or any(e < 1 for e in self.ladder) or list(self.ladder) != sorted(set(self.ladder)):
            raise ValueError(f"the ladder is increasing epoch counts >= 1, got {self.ladder}")
        if self.plateau_seeds < 1 or self.pack < 1 or self.pool_min_runs < 2:
            raise ValueError("plateau_seeds and pack are >= 1, pool_min_runs >= 2")

    @property
    def train_settings(self) -> dict[str, Any]:
        return dict(self.train)

    def grid(self, model: str, technique: str, epochs: int, seeds: Sequence[int] = (0,), device: str = "auto") -> Any:
        """The :class:`reslab.study.grid.Grid` that trains these cells (``device`` is where, not what)."""
        from reslab.study.grid import Grid

        train = {**self.train_settings, "epochs": int(epochs), "device": device}
        return Grid([model], [technique], list(seeds), train, target_acc="auto", error_rate=self.error_rate)

    def settings(self, epochs: int) -> dict[str, Any]:
        """What identifies a run besides its model, technique and seed: every training setting that
        changes what it computes (``device``, threads, packing and the like do not)."""
        return self.grid(self.models[0], self.techniques[0], epochs).shared_settings()

    def describe(self) -> dict[str, Any]:
        """The study as summary.json states it."""
        p = self.plan
        return {
            "models": list(self.models),
            "techniques": list(self.techniques),
            "train": self.train_settings,
            "ladder": list(self.ladder),
            "plateau_seeds": self.plateau_seeds,
            "plan": {"min_seeds": p.min_seeds, "max_seeds": p.max_seeds, "step": p.step, "looks": list(p.looks)},
            "alpha": p.alpha,
            "margin_pp": 100 * p.margin,
            "error_rate": self.error_rate,
            "pooling": {"test": "welch", "alpha": self.pool_alpha, "min_runs": self.pool_min_runs},
        }


# ---------------------------------------------------------------------------------------
# The recorded runs, by what they are


@dataclass
class Index:
    """The records of the study's settings, by ``(model, technique, epochs, seed)``, in recorded order;
    ``other``: records of other settings, models or techniques (kept, not read)."""

    records: list[dict[str, Any]]
    cells: dict[tuple[str, str, int, int], dict[str, Any]]
    other: int

    def get(self, model: str, technique: str, epochs: int, seed: int) -> dict[str, Any] | None:
        return self.cells.get((model, technique, epochs, seed))

    def at(self, model: str, epochs: int) -> list[dict[str, Any]]:
        return [r for r in self.records if r["model"] == model and r["epochs"] == epochs]


def index_runs(study: Study, records: Sequence[dict[str, Any]]) -> Index:
    settings = {e: study.settings(e) for e in study.ladder}
    mine, cells, other = [], {}, 0
    for r in records:
        e = r["epochs"]
        if (
            e in settings
            and r["model"] in study.models
            and r["technique"] in study.techniques
            and same_settings(r["settings"], settings[e])
        ):
            mine.append(r)
            cells[(r["model"], r["technique"], e, r["seed"])] = r
        else:
            other += 1
    return Index(mine, cells, other)


def plateau(study: Study, index: Index, model: str) -> Plateau:
    """``model``'s training length (:func:`reslab.study.evidence_plateau.measure_plateau`)."""
    return measure_plateau(
        model,
        study.ladder,
        study.plateau_seeds,
        study.plan.margin,
        lambda e, s: index.get(model, BASELINE, e, s),
        index.records,
    )


# ---------------------------------------------------------------------------------------
# The rows: pairs per group of pooled cards, decided together


@dataclass
class Row:
    """One row of the table: a model and technique, read on one group of cards."""

    model: str
    technique: str
    epochs: int | None
    group: tuple[str, ...]  # the cards whose runs it reads (empty while the model's epochs are pending)
    seeds: list[int] = field(default_factory=list)  # its seeds in the group, in order (runs recorded)
    pairs: list[Pair] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # cards that trained the runs of its pairs
    cross: int = 0  # seeds whose two runs ran on cards kept apart (read by neither group)
    outcome: Outcome | None = None
    base_accs: list[float] = field(default_factory=list)  # its group's completed baseline test accuracies

    @property
    def open(self) -> bool:
        """Still needs seeds (no decision and looks left)."""
        return self.outcome is None or self.outcome.next_look is not None

    @property
    def next_look(self) -> int | None:
        return None if self.outcome is None else self.outcome.next_look


@dataclass
class ModelState:
    model: str
    plateau: Plateau
    reference: str | None = None  # the card of the model's first run at its epochs
    groups: list[tuple[str, ...]] = field(default_factory=list)
    checks: list[CardCheck] = field(default_factory=list)
    used: set[int] = field(default_factory=set)  # seeds with any run at its epochs

    @property
    def epochs(self) -> int | None:
        return self.plateau.epochs

    def check(self, device: str) -> CardCheck | None:
        return next((c for c in self.checks if c.device == device), None)

    def group_of(self, device: str) -> int | None:
        return next((i for i, g in enumerate(self.groups) if device in g), None)


@dataclass
class State:
    """The whole study as the recorded runs leave it."""

    study: Study
    index: Index
    models: dict[str, ModelState]
    rows: list[Row]
    duplicates: int = 0

    @property
    def decided(self) -> int:
        return sum(r.outcome is not None and r.outcome.decision != "undecided" for r in self.rows)


def _side(rec: dict[str, Any] | None) -> tuple[float | None, bool]:
    if rec is None:
        return None, False
    if rec["status"] == "diverged":
        return None, True
    return float(rec["test_acc"]), False


def _chance(records: Sequence[dict[str, Any]]) -> float | None:
    vals = [float(r["chance_acc"]) for r in records if r.get("chance_acc") is not None]
    return float(np.median(vals)) if vals else None


def build_state(study: Study, runs: Runs) -> State:
    """Every model's plateau and card groups, and every row decided with the whole table."""
    index = index_runs(study, runs.records)
    models: dict[str, ModelState] = {}
    rows: list[Row] = []
    chances: dict[str, float | None] = {}
    techs = [t for t in study.techniques if t != BASELINE]
    for m in study.models:
        ms = ModelState(m, plateau(study, index, m))
        models[m] = ms
        e = ms.epochs
        recs = index.at(m, e) if e is not None else []
        if e is None or not recs:
            rows += [Row(m, t, e, ()) for t in techs]
            continue
        chances[m] = _chance(recs)
        ms.used = {r["seed"] for r in recs}
        ms.reference = recs[0]["device"]
        accs: dict[str, list[float]] = {}
        for r in recs:
            vals = accs.setdefault(r["device"], [])
            if r["technique"] == BASELINE and r["status"] == "completed":
                vals.append(float(r["test_acc"]))
        ms.groups, ms.checks = pool_cards(
            accs, ms.reference, study.plan.margin, alpha=study.pool_alpha, min_runs=study.pool_min_runs
        )
        group_of = {d: i for i, g in enumerate(ms.groups) for d in g}
        for t in techs:
            mine = [Row(m, t, e, g) for g in ms.groups]
            for g, row in enumerate(mine):
                row.base_accs = [a for d in ms.groups[g] for a in accs.get(d, [])]
            for s in sorted({r["seed"] for r in recs if r["technique"] in (BASELINE, t)}):
                b, x = index.get(m, BASELINE, e, s), index.get(m, t, e, s)
                gb = group_of[b["device"]] if b else None
                gx = group_of[x["device"]] if x else None
                if gb is not None and gx is not None and gb != gx:
                    mine[gb].cross += 1
                    mine[gx].cross += 1
                    continue
                row = mine[gb if gb is not None else gx]  # type: ignore[index]
                row.seeds.append(s)
                (bv, bd), (tv, td) = _side(b), _side(x)
                row.pairs.append(Pair(bv, tv, bd, td))
                row.devices = sorted({*row.devices, *(r["device"] for r in (b, x) if r is not None)})
            rows += mine
    keyed: dict[Hashable, tuple[list[Pair], float | None]] = {
        i: (r.pairs, chances.get(r.model)) for i, r in enumerate(rows)
    }
    for i, out in decide_table(keyed, study.plan, study.error_rate).items():
        rows[i].outcome = out  # type: ignore[index]
    return State(study, index, models, rows, runs.duplicates)


# ---------------------------------------------------------------------------------------
# What to train next, and what it costs


@dataclass(frozen=True)
class Pack:
    """Seeds of one model and technique at one length, trained together (one packed model)."""

    model: str
    technique: str
    epochs: int
    seeds: tuple[int, ...]
    why: str  # plateau | pooling test | look N

    def take(self, k: int) -> Pack:
        return Pack(self.model, self.technique, self.epochs, self.seeds[:k], self.why)

    def words(self) -> str:
        s = self.seeds
        span = f"seed {s[0]}" if len(s) == 1 else f"seeds {_span(s)}"
        return (
            f"{self.model} {self.technique} {self.epochs} epoch{'s' if self.epochs != 1 else ''}, {span} ({self.why})"
        )


def _span(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def next_packs(
    state: State, device: str, exclude: set[tuple[str, str, int, int]] | frozenset = frozenset()
) -> list[Pack]:
    """What a call on ``device`` should train next, in order: the plateau's baseline runs (of the models
    whose plateau this card measures, or nobody yet); where other
    cards have trained a model, baseline runs on this card until the pooling test can be made; then
    the seeds of the next look of every open row of the group this card belongs to. Cheap and early
    seeds first. ``exclude``: cells not to offer (a call's failed ones)."""
    study = state.study
    need: dict[tuple[str, str, int], tuple[set[int], str]] = {}

    def want(m: str, t: str, e: int, seeds: Sequence[int], why: str) -> None:
        free = {s for s in seeds if (m, t, e, s) not in exclude and state.index.get(m, t, e, s) is None}
        if free:
            got, _ = need.setdefault((m, t, e), (set(), why))
            got |= free

    for m, ms in state.models.items():
        e = ms.epochs
        if e is None:
            if ms.plateau.card in (None, device):
                for ep, seeds in ms.plateau.needs:
                    want(m, BASELINE, ep, seeds, "plateau")
            continue
        rows = [r for r in state.rows if r.model == m]
        if not any(r.open for r in rows):
            continue
        fresh = (s for s in itertools.count() if s not in ms.used)
        check = ms.check(device)
        others = any(d != device for g in ms.groups for d in g)
        mine = check.runs if check is not None else 0
        if others and mine < study.pool_min_runs and (check is None or check.verdict == UNTESTED):
            if any(r.open for r in rows if ms.reference in r.group):
                want(m, BASELINE, e, list(itertools.islice(fresh, study.pool_min_runs - mine)), "pooling test")
            continue
        g = ms.group_of(device)
        group = ms.groups[g] if g is not None else (device,)
        extra = list(itertools.islice(fresh, study.plan.max_seeds))
        for r in rows:
            if not r.open or (r.group and r.group != group):
                continue
            n = r.next_look or study.plan.looks[0]
            seq = (r.seeds + extra)[:n]
            look = study.plan.looks.index(n) + 1 if n in study.plan.looks else 0
            why = f"look {look} of {len(study.plan.looks)}"
            want(m, r.technique, e, seq, why)
            want(m, BASELINE, e, seq, why)
    packs = []
    for (m, t, e), (seeds, why) in need.items():
        ordered = sorted(seeds)
        for i in range(0, len(ordered), study.pack):
            packs.append(Pack(m, t, e, tuple(ordered[i : i + study.pack]), why))
    return sorted(packs, key=lambda p: (p.seeds[0], p.technique != BASELINE, depth_weight(p.model) * p.epochs, p.model))


# ---------------------------------------------------------------------------------------
# summary.json's content


def _num(x: float | None, scale: float = 100.0) -> float | None:
    return None if x is None or not math.isfinite(x) else round(scale * x, 4)


def summary_of(state: State, runs: Runs) -> dict[str, Any]:
    """summary.json's content (:mod:`reslab.study.evidencefile` writes and checks it), from the runs alone."""
    study = state.study
    rows = []
    for r in state.rows:
        o = r.outcome
        base = o.base_mean if o is not None and o.base_mean is not None else None
        if base is None and r.base_accs:
            base = float(np.mean(r.base_accs))
        if r.epochs is None:
            reason = state.models[r.model].plateau.sentence(study.plan.margin)
        else:
            reason = o.reason if o is not None else "no runs yet"
        rows.append(
            {
                "model": r.model,
                "technique": r.technique,
                "epochs": r.epochs,
                "seeds": o.n_used if o is not None else 0,
                "trained": o.seeds if o is not None else 0,
                "diff_pp": _num(o.estimate) if o is not None and o.estimate is not None else None,
                "interval_pp": [_num(o.interval[0]), _num(o.interval[1])] if o is not None and o.interval else None,
                "verdict": o.decision if o is not None else "undecided",
                "baseline_acc": _num(base),
                "devices": r.devices,
                "group": list(r.group),
                "pooled": len(r.group) > 1,
                "apart": bool(r.group) and r.group != state.models[r.model].groups[0],
                "cross_card_seeds": r.cross,
                "reason": reason,
            }
        )
    models = []
    for m, ms in state.models.items():
        p = ms.plateau
        e = ms.epochs
        base = [r for r in state.index.at(m, e) if r["technique"] == BASELINE] if e is not None else []
        models.append(
            {
                "model": m,
                "epochs": e,
                "plateau": {
                    "state": p.state,
                    "gain_pp": _num(p.gain),
                    "interval_pp": [_num(p.low), _num(p.high)] if math.isfinite(p.low) else None,
                    "points": [
                        {"epochs": q["epochs"], "runs": q["runs"], "val_acc": _num(q["val_acc"])} for q in p.points
                    ],
                    "sentence": p.sentence(study.plan.margin),
                    "card": p.card,
                },
                "baseline_runs": len(base),
                "reference": ms.reference,
                "cards": [
                    {
                        "device": c.device,
                        "verdict": c.verdict,
                        "runs": c.runs,
                        "mean_acc": _num(c.mean),
                        "diff_pp": _num(c.diff),
                        "p": None if not math.isfinite(c.p) else round(c.p, 4),
                        "words": c.words(study.plan.margin),
                    }
                    for c in ms.checks
                ],
            }
        )
    mine = state.index.records
    return {
        "study": study.describe(),
        "updated": max((str(r.get("recorded") or "") for r in runs.records), default="") or None,
        "runs": len(runs.records),
        "study_runs": len(mine),
        "other_settings": state.index.other,
        "duplicates": state.duplicates,
        "devices": sorted({r["device"] for r in mine}),
        "models": models,
        "rows": rows,
        "decided": state.decided,
    }


__all__ = [
    "EVIDENCE_PLAN",
    "LADDER",
    "PLATEAU_SEEDS",
    "STUDY_TRAIN",
    "Pack",
    "Plateau",
    "Row",
    "State",
    "Study",
    "build_state",
    "next_packs",
    "plateau",
    "summary_of",
]
