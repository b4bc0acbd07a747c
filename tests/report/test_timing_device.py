"""The report names the machine behind its step-time figures (the timing pass's device)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reslab.report.build import build_report
from reslab.report.decision_table import timing_device_words
from reslab.study.gridfile import write_timing
from synthetic import SEEDS, write_grid, write_run

STEPS = {"resnet8/baseline": [0.010, 0.011, 0.010], "resnet8/scale": [0.012, 0.012, 0.013]}


def _grid(root: Path, timing: dict | None) -> str:
    write_grid(root, ["baseline", "scale"])
    for s in SEEDS:
        write_run(root, "baseline", s, [0.70, 0.80, 0.86 + s / 100])
        write_run(root, "scale", s, [0.72, 0.81, 0.87 + s / 100])
    if timing is not None:
        write_timing(root, timing)
    return build_report(root).report_md.read_text()


def _decision_paragraph(md: str) -> str:
    """The note under the verdict table, which reads its time/step column."""
    return next(line for line in md.splitlines() if line.startswith("Error rate:"))


def test_cpu_timing_names_the_processor_and_threads(tmp_path: Path) -> None:
    timing = {
        "settings": {"threads": 2, "precision": "fp32", "torch": "2.14.1"},
        "device": {"type": "cpu", "name": "AMD EPYC 7B13", "threads": 2, "torch": "2.14.1"},
        "steps": STEPS,
    }
    md = _grid(tmp_path / "res", timing)
    words = "the CPU (AMD EPYC 7B13, 2 threads), fp32, torch 2.14.1"
    assert words in _decision_paragraph(md)


def test_gpu_timing_names_the_card(tmp_path: Path) -> None:
    timing = {
        "settings": {"threads": 4, "precision": "bf16", "torch": "2.11.0"},
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "index": 0},
        "steps": STEPS,
    }
    md = _grid(tmp_path / "res", timing)
    words = "NVIDIA H100 80GB HBM3 (CUDA, compute capability 9.0), bf16, torch 2.11.0"
    assert words in _decision_paragraph(md)
    assert "thread" not in words
    # a grid that replays its steps as CUDA graphs was timed so, and says so
    graphed = {**timing, "settings": {**timing["settings"], "cuda_graphs": True}}
    assert (
        timing_device_words(graphed)
        == "NVIDIA H100 80GB HBM3 (CUDA, compute capability 9.0), bf16, CUDA graphs, torch 2.11.0"
    )


def test_old_timing_file_without_a_device_still_renders(tmp_path: Path) -> None:
    timing = {"settings": {"threads": 2, "torch": "2.14.1"}, "steps": STEPS}
    md = _grid(tmp_path / "res", timing)
    assert "device not recorded" in _decision_paragraph(md)
    assert "ms" in md[md.index("### Cost") :]  # the step times themselves still show


@pytest.mark.parametrize(
    ("timing", "words"),
    [(None, "no timing pass"), ({}, "no timing pass"), ({"steps": STEPS, "device": "cpu"}, "device not recorded")],
)
def test_device_words_without_a_usable_record(timing: dict | None, words: str) -> None:
    assert timing_device_words(timing) == words


def test_a_timing_pass_whose_rounds_disagree_says_its_ratios_are_rough(tmp_path: Path) -> None:
    """Rounds 1.2 s, 0.25 s and 0.24 s of one variant (a busy machine): the note says the ratios are
    rough by how much (1.2 / 0.24 = 5.0x) and how to measure again; steady rounds say nothing."""
    device = {"type": "cpu", "name": "AMD EPYC", "threads": 1}
    busy = {"device": device, "steps": {**STEPS, "resnet8/baseline": [1.2, 0.25, 0.24]}}
    note = _decision_paragraph(_grid(tmp_path / "busy", busy))
    assert "differ by up to 5.0x" in note and "delete timing.json" in note
    assert "rough" not in _decision_paragraph(_grid(tmp_path / "quiet", {"device": device, "steps": STEPS}))
