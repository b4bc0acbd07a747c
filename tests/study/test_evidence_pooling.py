"""Runs of different cards are pooled only where baseline agrees across them (reslab.study.pooling),
tested both ways: on the rule alone, and on a study that two simulated cards continue in turn."""

from __future__ import annotations

import numpy as np
import pytest

from evidence_sim import SIM_STUDY, SimCard
from reslab.study.evidence import build_state, next_packs
from reslab.study.evidence_run import run_call
from reslab.study.evidencefile import add_runs, read_runs, read_summary
from reslab.study.pooling import APART, POOLED, REFERENCE, UNTESTED, cards_agree, pool_cards

MARGIN = 0.005
TRUTH = {"scale": "equivalent", "norm": "worse", "fusion": "better"}


def test_cards_agree_within_seed_noise_and_are_kept_apart_beyond_it():
    rng = np.random.default_rng(0)
    a = 0.91 + 0.001 * rng.standard_normal(6)
    same = 0.91 + 0.001 * rng.standard_normal(6)
    shifted = same + 0.02
    ok, p, diff = cards_agree(a, same, MARGIN)
    assert ok and p >= 0.05 and abs(diff) < MARGIN
    ok, p, diff = cards_agree(a, shifted, MARGIN)
    assert not ok and p < 0.05 and diff == pytest.approx(0.02, abs=0.003)
    # noisy cards whose means differ by more than the margin: the test cannot see it, the margin does
    noisy_a = np.array([0.90, 0.93, 0.88])
    noisy_b = noisy_a[::-1] + 0.006
    ok, p, diff = cards_agree(noisy_a, noisy_b, MARGIN)
    assert p >= 0.05 and diff == pytest.approx(0.006) and not ok


def test_pool_cards_groups_the_reference_with_the_cards_that_agree():
    accs = {
        "A": [0.910, 0.912, 0.911],
        "B": [0.911, 0.910, 0.912],  # agrees
        "C": [0.940, 0.941, 0.939],  # shifted by 3 pp
        "D": [0.911],  # too few runs to test
    }
    groups, checks = pool_cards(accs, "A", MARGIN)
    assert groups == [("A", "B"), ("C",), ("D",)]
    assert [c.verdict for c in checks] == [REFERENCE, POOLED, APART, UNTESTED]
    assert "kept apart" in checks[2].words(MARGIN) and "untested" in checks[3].words(MARGIN)
    # a reference with too few runs tests nobody
    groups, checks = pool_cards({"A": [0.91, 0.92], "B": [0.91, 0.91, 0.92]}, "A", MARGIN)
    assert groups == [("A",), ("B",)] and checks[1].verdict == UNTESTED


def _call(out, card, budget=120.0):
    return run_call(out, study=SIM_STUDY, budget_s=budget, trainer=card, clock=card.clock, work=out / "work")


def _plateaus_on_a(out):
    """Card A measures every model's plateau (a plateau is measured on one card) and starts the rows."""
    for _ in range(10):
        _call(out, SimCard(name="A"))
        if all(m["epochs"] for m in read_summary(out / "summary.json")["models"]):
            return
    pytest.fail("the plateaus were never measured")


def test_a_second_card_that_agrees_is_pooled_after_its_own_baseline_runs(tmp_path):
    out = tmp_path / "e"
    _plateaus_on_a(out)
    before = {(r["model"], r["technique"], r["epochs"], r["seed"]) for r in read_runs(out).records}
    b = SimCard(name="B")
    _call(out, b)
    # B first trains baseline at the chosen length on seeds nobody used: the pooling test's runs
    first = [c for c in b.trained if c[0] == "resnet20" and c[2] == 2][: SIM_STUDY.pool_min_runs]
    assert len(first) == SIM_STUDY.pool_min_runs and {t for m, t, e, s in first} == {"baseline"}
    assert not {(m, t, e, s) for m, t, e, s in first} & before
    assert min(s for *_, s in first) >= SIM_STUDY.plateau_seeds
    history = []
    for name in "BABABA":
        card = SimCard(name=name)
        _call(out, card)
        history += card.trained
    while True:
        card = SimCard(name="A")
        res = _call(out, card)
        history += card.trained
        if res.ended == "done":
            break
    all_runs = [(r["model"], r["technique"], r["epochs"], r["seed"]) for r in read_runs(out).records]
    assert len(all_runs) == len(set(all_runs))
    summary = read_summary(out / "summary.json")
    for m in summary["models"]:
        assert {c["device"]: c["verdict"] for c in m["cards"]} == {"A": "reference", "B": "pooled"}
    for row in summary["rows"]:
        assert row["pooled"] and row["devices"] == ["A", "B"] and not row["apart"]
        assert row["verdict"] == TRUTH[row["technique"]]


def test_a_card_whose_baseline_differs_keeps_its_own_rows(tmp_path):
    out = tmp_path / "e"
    _plateaus_on_a(out)
    shifted = dict(name="B", shift=0.02)
    for _ in range(40):
        card = SimCard(**shifted)
        res = _call(out, card)
        if res.ended == "done":
            break
    runs = read_runs(out).records
    base_card = {
        (r["model"], r["seed"]): r["device"] for r in runs if r["technique"] == "baseline" and r["epochs"] == 2
    }
    for r in runs:  # every run B trained pairs with a baseline B trained
        if r["device"] == "B" and r["epochs"] == 2:
            assert base_card[(r["model"], r["seed"])] == "B", r
    summary = read_summary(out / "summary.json")
    for m in summary["models"]:
        verdicts = {c["device"]: c["verdict"] for c in m["cards"]}
        assert verdicts == {"A": "reference", "B": "apart"}
        assert "kept apart" in next(c["words"] for c in m["cards"] if c["device"] == "B")
    rows_b = [r for r in summary["rows"] if r["apart"]]
    assert {(r["model"], r["technique"]) for r in rows_b} == {(m, t) for m in SIM_STUDY.models for t in TRUTH}
    for r in rows_b:
        assert r["devices"] == ["B"] and r["group"] == ["B"] and r["verdict"] == TRUTH[r["technique"]]
    for r in summary["rows"]:
        if not r["apart"]:
            assert r["devices"] == ["A"]
    # card A goes on with its own rows only
    state = build_state(SIM_STUDY, read_runs(out))
    for p in next_packs(state, "A"):
        for s in p.seeds:
            assert base_card.get((p.model, s), "A") == "A"


def test_a_card_with_too_few_baseline_runs_is_untested_and_trains_baseline_first(tmp_path):
    out = tmp_path / "e"
    for _ in range(3):
        _call(out, SimCard(name="A"))
    runs = read_runs(out)
    state = build_state(SIM_STUDY, runs)
    e = state.models["resnet20"].epochs
    one = next(
        r for r in runs.records if r["model"] == "resnet20" and r["technique"] == "baseline" and r["epochs"] == e
    )
    used = state.models["resnet20"].used
    fresh = min(s for s in range(100) if s not in used)
    add_runs(out, [{**one, "device": "B", "seed": fresh, "recorded": "later"}])
    state = build_state(SIM_STUDY, read_runs(out))
    ms = state.models["resnet20"]
    assert ms.check("B").verdict == UNTESTED and ms.groups[1:] == [("B",)]
    packs = [p for p in next_packs(state, "B") if p.model == "resnet20"]
    assert len(packs) == 1 and packs[0].technique == "baseline" and packs[0].why == "pooling test"
    assert len(packs[0].seeds) == SIM_STUDY.pool_min_runs - 1 and fresh not in packs[0].seeds
    # an untested card's runs are not read by the reference's rows
    ref_rows = [r for r in state.rows if r.model == "resnet20" and r.group == ms.groups[0]]
    assert all("B" not in r.devices for r in ref_rows)


def test_a_plateau_is_measured_on_one_card(tmp_path):
    out = tmp_path / "e"
    _call(out, SimCard(name="A"), budget=60.0)
    state = build_state(SIM_STUDY, read_runs(out))
    by_a = [m for m, ms in state.models.items() if ms.epochs is None and ms.plateau.card == "A"]
    free = [m for m, ms in state.models.items() if ms.epochs is None and ms.plateau.card is None]
    assert by_a and free
    on_b = {p.model for p in next_packs(state, "B") if p.why == "plateau"}
    on_a = {p.model for p in next_packs(state, "A") if p.why == "plateau"}
    assert not on_b & set(by_a) and set(free) <= on_b  # B never continues A's measurement
    assert set(by_a) <= on_a
