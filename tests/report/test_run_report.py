"""'reslab report RUN' on one run folder writes its curves (and gradient figure when recorded)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from reslab.cli import main
from reslab.engine.runs import write_json


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, tiny_train_config):
    from reslab.engine.train import train

    out = tmp_path_factory.mktemp("runs") / "probed"
    cfg = tiny_train_config(epochs=2, train_subset=256, val_size=64, probe_every=2)
    assert train(cfg, out, progress=False)["status"] == "completed"
    return out


def test_report_on_a_run_folder_writes_its_figures(probed_run, capsys):
    assert main(["report", str(probed_run)]) == 0
    folder = probed_run / "report"
    for name in ("curves.png", "gradients.png"):
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size[0] >= 800
    md = (folder / "report.md").read_text()
    summary = json.loads((probed_run / "summary.json").read_text())
    assert "![training curves](curves.png)" in md and "![gradient norms](gradients.png)" in md
    assert f"{summary['epochs_completed']} of {summary['epochs']} epochs" in md
    assert "Gradient norms recorded every 2 steps" in md
    assert str(folder / "curves.png") in capsys.readouterr().out


def test_report_on_a_run_without_gradients_writes_curves_only(tmp_path, tiny_train_config):
    from reslab.engine.train import train

    run = tmp_path / "plain"
    train(tiny_train_config(epochs=1, train_subset=128, val_size=64), run, progress=False)
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "curves.png").is_file() and not (run / "report" / "gradients.png").exists()


def test_report_messages_for_a_file_and_a_missing_path(tmp_path, capsys):
    f = tmp_path / "summary.csv"
    f.write_text("x\n")
    assert main(["report", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "does not exist" not in err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_on_a_run_before_its_first_epoch(tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    write_json(run / "summary.json", {"status": "running"})
    (run / "metrics.jsonl").write_text("")
    assert main(["report", str(run)]) == 2
    assert "no completed epoch" in capsys.readouterr().err
