"""The evidence study's call with real training (a worker process, resnet8 at quarter width on a few
hundred Fashion-MNIST images): finished runs become compact records (no weights), a second call
trains nothing, and a pack still training at the budget's end is stopped and not recorded."""

from __future__ import annotations

import pytest

from reslab.study.evidence import Study
from reslab.study.evidence_run import run_call
from reslab.study.evidencefile import RUNS_FILE, read_runs, read_summary
from reslab.study.plan import Plan

TINY_TRAIN = (
    ("dataset", "fashion-mnist"),
    ("width", 0.25),
    ("train_subset", 256),
    ("val_size", 128),
    ("test_subset", 256),
    ("batch_size", 64),
    ("evals_per_epoch", 1),
    ("probe_every", 0),
)


def tiny(epochs: int) -> Study:
    return Study(
        models=("resnet8",),
        techniques=("baseline", "scale"),
        train=TINY_TRAIN,
        ladder=(epochs,),
        plateau_seeds=2,
        plan=Plan(2, 2, 1, 0.05, 0.01),
        pack=2,
    )


@pytest.mark.slow
def test_real_runs_become_compact_records_and_are_not_trained_again(tmp_path):
    out, work = tmp_path / "e", tmp_path / "work"
    res = run_call(out, study=tiny(1), budget_s=600.0, work=work, device="cpu", threads=1, reserve_s=5.0)
    assert res.failed == [] and res.ended == "done"
    runs = read_runs(out).records
    assert sorted((r["technique"], r["seed"]) for r in runs) == [
        ("baseline", 0),
        ("baseline", 1),
        ("scale", 0),
        ("scale", 1),
    ]
    for r in runs:
        assert r["status"] == "completed" and not r["diverged"] and 0 < r["test_acc"] <= 1
        assert [row["epoch"] for row in r["curve"]] == [1] and 0 < r["curve"][0]["val_acc"] <= 1
        assert r["config"]["model"] == "resnet8" and r["config"]["seed"] == r["seed"]
        assert r["device_info"]["type"] == "cpu" and r["device"] == r["device_info"]["name"]
        assert r["pack"]["size"] == 2 and r["pack"]["wall_s"] > 0
    assert not any(p.suffix in (".safetensors", ".pt") for p in out.rglob("*"))  # no weights in the study's folder
    assert len((out / RUNS_FILE).read_text()) < 4 * 4000  # compact: a few KB a run
    summary = read_summary(out)
    assert summary["runs"] == 4 and summary["rows"][0]["trained"] == 2
    again = run_call(out, study=tiny(1), budget_s=600.0, work=work, device="cpu", threads=1, reserve_s=5.0)
    assert again.recorded == [] and again.ended == "done"
    assert read_runs(out).records == runs


@pytest.mark.slow
def test_a_pack_still_training_at_the_budgets_end_is_stopped_and_not_recorded(tmp_path):
    out, work = tmp_path / "e", tmp_path / "work"
    res = run_call(out, study=tiny(2000), budget_s=30.0, work=work, device="cpu", threads=1, reserve_s=5.0)
    assert res.ended == "budget" and res.recorded == [] and res.failed == []
    assert read_runs(out).records == []
    assert read_summary(out)["runs"] == 0  # the files are there and valid
    assert any("stopped" in line for line in res.lines)
