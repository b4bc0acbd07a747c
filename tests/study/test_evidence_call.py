"""The evidence study across calls, on a simulated card (tests/evidence_sim.py): it resumes from the
files a previous call left (as committed), never trains a recorded run again, keeps each call
within its budget, leaves valid files when a call is interrupted, measures the plateau before the
rows, and decides the rows as seeds accumulate. The study, the rule and the files are the real ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from evidence_sim import SIM_STUDY, SimCard
from reslab.study import evidence_run
from reslab.study.evidence import Study
from reslab.study.evidence_run import run_call
from reslab.study.evidencefile import RUNS_FILE, SUMMARY_FILE, read_runs, read_summary

TRUTH = {"scale": "equivalent", "norm": "worse", "fusion": "better"}


def call(out: Path, card: SimCard, budget: float = 120.0, study: Study = SIM_STUDY):
    return run_call(out, study=study, budget_s=budget, trainer=card, clock=card.clock, work=out.parent / "work")


def recorded(out: Path) -> list[tuple[str, str, int, int]]:
    return [(r["model"], r["technique"], r["epochs"], r["seed"]) for r in read_runs(out).records]


def commit(out: Path, dest: Path) -> Path:
    """What a session commits and the next one checks out: the two files, in a fresh folder."""
    dest.mkdir()
    for name in (RUNS_FILE, SUMMARY_FILE):
        shutil.copy(out / name, dest / name)
    return dest


def test_calls_resume_from_committed_results_never_retrain_and_decide_as_seeds_accumulate(tmp_path):
    out = tmp_path / "c0"
    history: list[tuple[str, str, int, int]] = []
    decided = []
    for i in range(30):
        card = SimCard()  # a new session: nothing of the last one but the committed files
        before = set(recorded(out)) if out.exists() else set()
        res = call(out, card)
        assert not set(card.trained) & before, "a recorded run was trained again"
        history += card.trained
        decided.append(res.summary["decided"])
        if res.ended == "done":
            break
        out = commit(out, tmp_path / f"c{i + 1}")
    else:
        pytest.fail("the study never finished")
    assert len(history) == len(set(history)), "a run was trained twice"
    assert sorted(history) == sorted(recorded(out))  # every run trained is recorded, nothing else
    # the rows become decided as seeds accumulate, and end as the truth says
    assert decided[0] == 0 and decided[-1] == 6 and decided == sorted(decided)
    summary = read_summary(out / SUMMARY_FILE)
    for row in summary["rows"]:
        assert row["verdict"] == TRUTH[row["technique"]], row
        assert row["epochs"] == 2 and row["devices"] == ["Sim card A"]
        assert row["seeds"] >= SIM_STUDY.plan.min_seeds
    # the plateau was measured on baseline and its runs at the chosen length are the study's
    for m in summary["models"]:
        assert m["epochs"] == 2 and m["plateau"]["state"] == "levelled"
        assert "doubling to 4" in m["plateau"]["sentence"]
    rec = recorded(out)
    for model in SIM_STUDY.models:
        assert sorted(s for mm, t, e, s in rec if mm == model and e in (1, 4)) == [0, 0, 1, 1, 2, 2]
        assert {t for mm, t, e, s in rec if mm == model and e in (1, 4)} == {"baseline"}
    # a further call trains nothing
    card = SimCard()
    res = call(out, card)
    assert res.ended == "done" and card.trained == [] and res.recorded == []


@pytest.mark.parametrize("budget", [60.0, 90.0, 150.0])
def test_a_call_stays_within_its_budget(tmp_path, budget):
    out = tmp_path / "e"
    warm = SimCard()
    call(out, warm, budget=60.0)  # the first call times the card
    for _ in range(3):
        card = SimCard()
        t0 = card.clock()
        res = call(out, card, budget=budget)
        assert card.clock() - t0 <= budget - evidence_run.STOP_RESERVE_S
        assert card.stopped == []  # every pack started was estimated to fit, and did
        assert res.ended in ("budget", "done")


def test_a_pack_that_runs_over_is_stopped_at_the_budget_and_trained_by_the_next_call(tmp_path):
    out = tmp_path / "e"
    call(out, SimCard(), budget=100.0)
    before = recorded(out)
    summary_before = (out / SUMMARY_FILE).read_text()
    slow = SimCard(per_epoch_s={"resnet20": 40.0, "resnet56": 100.0})  # ten times slower than it was timed
    t0 = slow.clock()
    res = call(out, slow, budget=100.0)
    assert slow.stopped and res.ended == "budget" and res.recorded == []
    assert slow.clock() - t0 <= 100.0
    assert recorded(out) == before  # nothing of the stopped pack is recorded, the files are valid
    read_summary(out / SUMMARY_FILE)
    assert (out / SUMMARY_FILE).read_text() == summary_before
    card = SimCard()
    call(out, card, budget=100.0)
    assert set(slow.stopped) <= set(card.trained) | set(recorded(out))
    assert set(slow.stopped) & set(card.trained)


def test_an_interrupted_call_leaves_valid_files_holding_every_finished_pack(tmp_path):
    out = tmp_path / "e"
    card = SimCard(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        call(out, card, budget=400.0)
    runs = read_runs(out).records
    assert len(runs) == len(card.trained) == 6  # the two packs finished before Ctrl-C
    summary = read_summary(out / SUMMARY_FILE)
    assert summary["runs"] == 6
    nxt = SimCard()
    call(out, nxt, budget=400.0)
    assert not set(nxt.trained) & set(card.trained)


def test_the_plateau_falls_back_to_the_longest_length_and_says_so(tmp_path, monkeypatch):
    import evidence_sim

    monkeypatch.setattr(evidence_sim, "val_end", lambda epochs: 0.80 + 0.02 * epochs)  # never levels off
    out = tmp_path / "e"
    for _ in range(6):
        call(out, SimCard(), budget=200.0)
    m = read_summary(out / SUMMARY_FILE)["models"][0]
    assert m["epochs"] == 4 and m["plateau"]["state"] == "longest"
    assert "still rising" in m["plateau"]["sentence"]
    assert {r["epochs"] for r in read_summary(out / SUMMARY_FILE)["rows"] if r["model"] == m["model"]} == {4}


def test_a_diverged_run_is_recorded_once_and_keeps_its_row_from_good_news(tmp_path):
    out = tmp_path / "e"
    bad = {("resnet20", "fusion", 0)}
    history = []
    for _ in range(30):
        card = SimCard(diverge=bad)
        res = call(out, card, budget=200.0)
        history += card.trained
        if res.ended == "done":
            break
    assert history.count(("resnet20", "fusion", 2, 0)) == 1
    rec = next(r for r in read_runs(out).records if (r["model"], r["technique"], r["seed"]) in bad)
    assert rec["status"] == "diverged" and rec["diverged"] and rec["test_acc"] is None
    rows = read_summary(out / SUMMARY_FILE)["rows"]
    row = next(r for r in rows if r["model"] == "resnet20" and r["technique"] == "fusion")
    assert row["verdict"] not in ("better", "equivalent") and "diverged" in row["reason"]
