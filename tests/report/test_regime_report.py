"""The report states the training regime (issue 18, item 5): a comparison of runs that were still
rising is labelled early training in its rows, and no recommendation claims final accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.report.build import build_report
from synthetic import write_run, write_sequential_grid

BASE = [0.850, 0.860, 0.855, 0.852, 0.858]
DIFF = {"up": [0.020, 0.0205, 0.0195], "down": [-0.030, -0.0305, -0.0295], "same": [0.0002, -0.0002, 0.0001, 0.0]}


def _grid(root: Path, curve) -> None:
    """The decision-table grid of test_report.py (better / worse / equivalent by seed 3 or 4), with
    every run's validation curve shaped by ``curve(end_accuracy)``."""
    write_sequential_grid(root, ["baseline", *DIFF])
    for s, b in enumerate(BASE):
        write_run(root, "baseline", s, curve(b), test_acc=b, chance=0.1)
    for tech, diffs in DIFF.items():
        for s, d in enumerate(diffs):
            write_run(root, tech, s, curve(BASE[s] + d), test_acc=BASE[s] + d, chance=0.1)


def test_rising_runs_are_early_training_and_speak_of_convergence(tmp_path: Path) -> None:
    root = tmp_path / "rising"
    _grid(root, lambda end: [0.6, 0.7, 0.78, end])  # baseline rises ~7 pp over the last quarter
    build_report(root)
    dec = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    assert [dec[t]["decision"] for t in DIFF] == ["better", "worse", "equivalent"]
    for d in dec.values():
        assert d["regime"]["early_training"] and d["regime"]["label"] == "early training"
        assert d["regime"]["baseline_rise_last_quarter"] == pytest.approx(sum(b - 0.78 for b in BASE) / 5)
        assert "final" not in d["recommendation"]
    assert dec["up"]["recommendation"].startswith("Faster to learn at this depth: after 4 epochs")
    assert "confirm with longer training" in dec["up"]["recommendation"]
    assert dec["down"]["recommendation"].startswith("Slower to learn at this depth")
    assert "says nothing yet about full training" in dec["same"]["recommendation"]
    md = (root / "report.md").read_text()
    assert "final accuracy" not in md and "final test accuracy" not in md
    # the answer's regime sentence says which question the verdicts answer, before the table
    answer = md.split("## Answer", 1)[1].split("| model |", 1)[0]
    assert "resnet8: 4 epochs; baseline ended at" in answer and "still rising" in answer
    assert "about accuracy this early (convergence speed), not after full training" in answer
    assert "| **better** |" in md and "| **worse** |" in md
    assert "confirm with longer training" in md.split("## Details", 1)[1]


def test_flat_runs_are_called_flat_and_their_decisions_speak_of_accuracy(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _grid(root, lambda end: [0.6, end - 0.01, end, end])  # nothing gained over the last quarter
    build_report(root)
    dec = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    assert not dec["up"]["regime"]["early_training"] and dec["up"]["regime"]["label"] == "flat at the end"
    assert dec["up"]["recommendation"].startswith("Adopt at this depth")
    assert "after 4 epochs (flat by then)" in dec["down"]["recommendation"]
    md = (root / "report.md").read_text()
    assert "early training" not in md.split("How to read this")[0].split("|---|")[1]
    assert "flat by then (" in md and "within the 0.5 pp margin)" in md and "still rising" not in md


def test_a_reference_run_makes_a_flat_looking_grid_early_training(tmp_path: Path, capsys) -> None:
    """Flat over its last quarter is not a plateau when the same model trained long ends 5 pp higher."""
    root = tmp_path / "flat"
    _grid(root, lambda end: [0.6, end - 0.01, end, end])
    ref = write_run(tmp_path / "long", "baseline", 0, [0.8, 0.85, 0.88, 0.9, 0.905, 0.906, 0.906, 0.906])
    assert main(["report", str(root), "--reference", str(ref)]) == 0
    dec = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    assert dec["up"]["regime"]["early_training"]
    assert dec["up"]["regime"]["gap_to_reference"] == pytest.approx(0.906 - sum(BASE) / 5)
    assert dec["up"]["regime"]["reference"] == str(ref)
    assert "short of the reference run resnet8-baseline-s0 (8 epochs, 90.6%)" in (root / "report.md").read_text()
    # a folder that is no run: one line, exit 2, the report untouched
    before = (root / "report.md").read_text()
    assert main(["report", str(root), "--reference", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run folder" in err[0] and "Traceback" not in err[0]
    assert (root / "report.md").read_text() == before
