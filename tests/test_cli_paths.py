"""What a user sees when a path, an option or the machine gets in the way: one line naming
the problem and the fix, exit status 2, no traceback, nothing existing damaged."""

from __future__ import annotations

import pytest

from reslab.cli import main

TINY = ["--model", "resnet8", "--width", "0.25", "--epochs", "1", "--batch-size", "64", "--train-subset", "128"]
TINY += ["--val-size", "64", "--threads", "1", "--quiet"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"reslab {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_train_data_dir_without_dataset_exits_2(tmp_path, capsys, kind):
    given = tmp_path / "data"
    if kind == "empty":
        given.mkdir()
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(given), "--out", str(out)]) == 2
    line = _one_line_error(capsys, "train")
    assert f"--data-dir {given}" in line
    assert ("does not exist" if kind == "missing" else "train-images-idx3-ubyte") in line
    assert not out.exists()  # no config.yaml recording the wrong folder
