"""The evidence study's files have one reader and writer (reslab.study.evidencefile), which checks
them: a damaged, hand-edited or other-version file is one line naming the file and the fix, from
the library and from 'reslab evidence', and nothing is written after it."""

from __future__ import annotations

import json
import math

import pytest

from evidence_sim import SIM_STUDY, SimCard
from reslab.cli import main
from reslab.errors import UsageError
from reslab.study.evidence import build_state, summary_of
from reslab.study.evidence_run import run_call
from reslab.study.evidencefile import (
    ROW_KEYS,
    RUNS_FILE,
    SUMMARY_FILE,
    SUMMARY_VERSION,
    add_runs,
    read_runs,
    read_summary,
    write_summary,
)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study folder after two simulated calls."""
    out = tmp_path_factory.mktemp("evidence") / "e"
    for _ in range(2):
        card = SimCard()
        run_call(out, study=SIM_STUDY, budget_s=150.0, trainer=card, clock=card.clock, work=out / "work")
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_the_summary_reads_back_what_was_written_and_matches_the_runs(study_dir):
    summary = read_summary(study_dir / SUMMARY_FILE)
    assert summary["version"] == SUMMARY_VERSION
    runs = read_runs(study_dir)
    assert summary["runs"] == len(runs.records) > 0
    again = summary_of(build_state(SIM_STUDY, runs), runs)
    assert {**again, "version": SUMMARY_VERSION} == summary  # derived from the runs alone
    for row in summary["rows"]:
        assert set(ROW_KEYS) <= set(row)
    assert read_summary(study_dir) == summary  # the folder names its file


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda s: "{not json", "is not JSON"),
        (lambda s: json.dumps({**json.loads(s), "version": SUMMARY_VERSION + 1}), "version is"),
        (lambda s: json.dumps([1, 2]), "JSON object"),
        (lambda s: json.dumps({**json.loads(s), "rows": [{"model": "resnet20"}]}), "has no technique"),
        (
            lambda s: json.dumps({**json.loads(s), "rows": [{**json.loads(s)["rows"][0], "verdict": "great"}]}),
            "verdict is 'great'",
        ),
        (lambda s: json.dumps({**json.loads(s), "decided": 99}), "decided does not count"),
        (lambda s: s[: len(s) // 2], "is not JSON"),
    ],
)
def test_a_damaged_summary_is_one_line_naming_the_file_and_the_fix(study_dir, tmp_path, edit, says):
    path = tmp_path / SUMMARY_FILE
    path.write_text(edit((study_dir / SUMMARY_FILE).read_text()))
    with pytest.raises(UsageError) as e:
        read_summary(path)
    msg = _one_line(e)
    assert str(path) in msg and says in msg and "git checkout" in msg and "--no-train" in msg


def test_the_writer_refuses_what_the_reader_would_refuse_and_writes_no_nan(tmp_path, study_dir):
    summary = read_summary(study_dir / SUMMARY_FILE)
    with pytest.raises(UsageError):
        write_summary(tmp_path, {**summary, "rows": [{**summary["rows"][0], "seeds": -1}]})
    assert not (tmp_path / SUMMARY_FILE).exists()
    row = {**summary["rows"][0], "diff_pp": math.nan}
    write_summary(tmp_path, {**summary, "rows": [row, *summary["rows"][1:]]})
    text = (tmp_path / SUMMARY_FILE).read_text()
    assert "NaN" not in text and read_summary(tmp_path)["rows"][0]["diff_pp"] is None


def test_runs_jsonl_is_checked_line_by_line(study_dir, tmp_path):
    lines = (study_dir / RUNS_FILE).read_text().splitlines()
    path = tmp_path / RUNS_FILE
    bad_version = json.dumps({**json.loads(lines[1]), "version": 7})
    no_acc = json.dumps({**json.loads(lines[1]), "test_acc": None})
    for body, line, says in [
        ([lines[0], "{torn", *lines[2:]], 2, "is not JSON"),
        ([lines[0], bad_version], 2, "version is 7"),
        ([lines[0], no_acc], 2, "test_acc is None"),
    ]:
        path.write_text("\n".join(body) + "\n")
        with pytest.raises(UsageError) as e:
            read_runs(tmp_path)
        msg = _one_line(e)
        assert f"{path} line {line}" in msg and says in msg and "git checkout" in msg


def test_a_run_is_recorded_once(study_dir, tmp_path):
    lines = (study_dir / RUNS_FILE).read_text().splitlines()
    (tmp_path / RUNS_FILE).write_text("\n".join([*lines, lines[0]]) + "\n")  # a bad hand merge
    runs = read_runs(tmp_path)
    assert len(runs.records) == len(lines) and runs.duplicates == 1
    with pytest.raises(RuntimeError, match="already recorded"):
        add_runs(tmp_path, [runs.records[0]])


def test_the_command_says_one_line_and_changes_nothing_on_a_damaged_file(study_dir, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / RUNS_FILE).write_text((study_dir / RUNS_FILE).read_text())
    (out / SUMMARY_FILE).write_text('{"version": 99}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for argv in (["--no-train"], ["--plan"], ["--budget", "1m", "--device", "cpu", "--work", str(tmp_path / "w")]):
        assert main(["evidence", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("reslab evidence: error: ") and "version is 99" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / SUMMARY_FILE).unlink()
    (out / RUNS_FILE).write_text("garbage\n")
    assert main(["evidence", "--out", str(out), "--no-train"]) == 2
    assert f"{out / RUNS_FILE} line 1 is not JSON" in capsys.readouterr().err
    assert not (out / SUMMARY_FILE).exists()


def test_a_second_call_on_the_same_folder_is_refused_while_one_runs(study_dir):
    from reslab.study.evidence_run import locked

    with locked(study_dir):
        with pytest.raises(UsageError, match="being written by another 'reslab evidence' call"):
            card = SimCard()
            run_call(study_dir, study=SIM_STUDY, budget_s=100.0, trainer=card, clock=card.clock)
        assert card.trained == []
