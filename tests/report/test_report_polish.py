"""The report's user-facing details (issue 18, item 6): a corrupt run file is an error that names
the file and the fix, the title and settings say what was compared, and intervals never show
impossible bounds. Synthetic results folders (tests/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reslab.cli import main
from synthetic import write_grid, write_run


def small_grid(root: Path, seeds: int = 3) -> None:
    write_grid(root, ["baseline", "scale"], seeds=range(seeds))
    for s in range(seeds):
        write_run(root, "baseline", s, [0.5, 0.80 + 0.01 * s])
        write_run(root, "scale", s, [0.5, 0.81 + 0.01 * s])


@pytest.mark.parametrize("content", ['{"status": "compl', "[1, 2]", ""])
def test_a_corrupt_summary_is_an_error_naming_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    root = tmp_path / "compare"
    small_grid(root)
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in root.iterdir() if p.is_file()}
    bad = root / "runs" / "resnet8-scale-s1" / "summary.json"
    bad.write_text(content)
    assert main(["report", str(root)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert (
        str(bad) in lines[0] and "re-run the same compare command" in lines[0] and "delete the run folder" in lines[0]
    )
    # nothing of the report already there was replaced
    assert {p: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_the_scheduler_still_reads_an_unreadable_summary_as_unknown(tmp_path: Path) -> None:
    from reslab.study.results import read_run

    root = tmp_path / "compare"
    small_grid(root)
    run = root / "runs" / "resnet8-scale-s1"
    (run / "summary.json").write_text("{")
    assert read_run(run) is not None and read_run(run).status == "interrupted"
