"""README.md's "What reslab found" is generated from docs/evidence/summary.json, which is what the
committed runs give: nothing in the section is written by hand, and before any GPU run it says that
the study has not run, and how to run it, with no number."""

from __future__ import annotations

import shutil
from pathlib import Path

from evidence_sim import SIM_STUDY, SimCard
from reslab.report.evidence import (
    BEGIN,
    END,
    STUDY_FILE,
    readme_section,
    readme_text,
    update_readme,
    write_study_report,
)
from reslab.study.evidence_run import rebuild, run_call
from reslab.study.evidencefile import RUNS_FILE, SUMMARY_FILE, read_summary

ROOT = Path(__file__).resolve().parents[2]
EVIDENCE = ROOT / "docs" / "evidence"


def test_the_readme_section_is_the_one_the_committed_summary_gives():
    assert readme_text(ROOT / "README.md") == readme_section(read_summary(EVIDENCE / SUMMARY_FILE)), (
        "README.md's evidence section is out of date: run 'python -m reslab.report.evidence --readme'"
    )


def test_the_committed_summary_and_report_are_what_the_committed_runs_give(tmp_path):
    shutil.copy(EVIDENCE / RUNS_FILE, tmp_path / RUNS_FILE)
    rebuild(tmp_path, report=write_study_report)
    assert read_summary(tmp_path) == read_summary(EVIDENCE), "run 'reslab evidence --no-train' and commit"
    assert (tmp_path / STUDY_FILE).read_text() == (EVIDENCE / STUDY_FILE).read_text()


def test_before_any_run_the_section_says_the_study_has_not_run_and_shows_no_number(tmp_path):
    (tmp_path / RUNS_FILE).write_text("")
    section = readme_section(rebuild(tmp_path))
    assert section.startswith("**Not measured yet.**")
    assert "`reslab evidence`" in section and "benchmarks/gpu.sh" in section
    assert "%" not in section and "|" not in section and "better" not in section and "worse" not in section


def test_with_runs_the_section_shows_the_decision_table_with_its_regime_and_link(tmp_path):
    out = tmp_path / "e"
    for _ in range(30):
        card = SimCard()
        if (
            run_call(out, study=SIM_STUDY, budget_s=200.0, trainer=card, clock=card.clock, work=out / "w").ended
            == "done"
        ):
            break
    summary = read_summary(out)
    section = readme_section(summary)
    assert "Not measured yet" not in section and "docs/evidence/study.md" in section
    assert "2 epochs: doubling to 4 gained" in section and "Sim card A" in section
    assert f"{summary['decided']} of 6 rows decided" in section
    for row in summary["rows"]:
        lo, hi = row["interval_pp"]
        assert (
            f"| {row['model']} | {row['technique']} | 2 | {row['seeds']} | {row['diff_pp']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            in section
        )
        assert f"**{row['verdict']}** | {row['baseline_acc']:.2f} | Sim card A |" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## What reslab found\n\n{BEGIN}\nold text\n{END}\n\n## Next\n")
    assert update_readme(readme, summary) and not update_readme(readme, summary)
    assert readme_text(readme) == section and readme.read_text().endswith(f"{END}\n\n## Next\n")
