"""The report answers at a glance: its first section holds the regime, a decision plot and a verdict
table of at most 8 columns; an equivalent row states the failure rate its seeds do not exclude; a
grid that learned nothing decides nothing and says why; the default preset's report stays short; and
a reader's browser shows the plot and the table's header on the first screen (1400 x 900).
Synthetic results folders (tests/synthetic.py) with chosen accuracies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from reslab.engine.runs import write_json
from reslab.report.browser import SCREEN, find_browser, measure
from reslab.report.build import build_report
from reslab.study.gridfile import write_grid_file
from synthetic import write_run, write_sequential_grid

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example-report"
JITTER = [0.0002, -0.0001, 0.0001, -0.0002, 0.0, 0.0001]


def tiny_grid(root: Path, level: float = 0.80, chance: float = 0.1) -> None:
    """resnet8, baseline and two techniques, six seeds read once: 'same' equals baseline up to a
    tiny jitter, 'down' is 3 pp lower. ``level``: where baseline ends."""
    write_sequential_grid(root, ["baseline", "same", "down"], max_seeds=6, min_seeds=6)
    grid = json.loads((root / "grid.json").read_text())
    grid["sequential"]["margin"] = 0.01
    write_grid_file(root, grid)
    for s in range(6):
        b = level + 0.003 * s
        write_run(root, "baseline", s, [level - 0.2, b], test_acc=b, chance=chance)
        write_run(root, "same", s, [level - 0.2, b + JITTER[s]], test_acc=b + JITTER[s], chance=chance)
        d = b - 0.03 + 20 * JITTER[s]
        write_run(root, "down", s, [level - 0.2, d], test_acc=d, chance=chance)


def answer_of(md: str) -> str:
    return md.split("## Answer", 1)[1].split("\n## ", 1)[0]


def table_header(section: str) -> list[str]:
    line = next(x for x in section.splitlines() if x.startswith("| model |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_first_section_holds_the_regime_the_plot_and_a_short_verdict_table(tmp_path: Path) -> None:
    root = tmp_path / "g"
    tiny_grid(root)
    files = build_report(root)
    md = files.report_md.read_text()
    answer = answer_of(md)
    # in this order: one sentence per model on the regime, the plot, the table
    regime = answer.index("- resnet8: 2 epochs; baseline ended at")
    plot = answer.index("![decision plot")
    table = answer.index("| model | technique | verdict |")
    assert regime < plot < table
    assert (root / "figures" / "decisions.png").stat().st_size > 5000
    header = table_header(answer)
    assert len(header) <= 8, header
    assert header == [
        "model",
        "technique",
        "verdict",
        "difference, pp [interval]",
        "seeds",
        "failures",
        "time/step",
        "gradients at init",
    ]
    # the HTML has the same figure, first, with the table after it
    html = files.report_html.read_text()
    assert html.index('id="decision-plot"') < html.index('id="verdict-table"') < html.index("Details")


def test_an_equivalent_row_states_the_failure_rate_its_seeds_do_not_exclude(tmp_path: Path) -> None:
    root = tmp_path / "g"
    tiny_grid(root)
    build_report(root)
    md = (root / "report.md").read_text()
    dec = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    assert dec["same"]["decision"] == "equivalent" and dec["down"]["decision"] == "worse"
    bound = 1 - 0.05 ** (1 / 6)  # exact one-sided Clopper-Pearson for 0 failures in 6
    assert dec["same"]["failure_rate_bound"] == pytest.approx(bound)
    row = next(x for x in answer_of(md).splitlines() if x.startswith("| resnet8 | same |"))
    assert f"| 0 of 6; rate ≤ {100 * bound:.0f}% |" in row and "39%" in row
    # a worse row makes no claim that would need the bound
    down = next(x for x in answer_of(md).splitlines() if x.startswith("| resnet8 | down |"))
    assert "| 0 of 6 |" in down and "rate" not in down
    # how to tighten it: 29 seeds without a failure, and the option that asks for them
    assert "29 seeds without a failure bring it to 10% (--seeds 29 --max-seeds 29)" in answer_of(md)


@pytest.mark.parametrize("above", [0.015, 0.03, 0.04])
def test_a_grid_that_learned_nothing_decides_nothing_and_says_why(tmp_path: Path, above: float) -> None:
    """Every run ends a few points above chance and the runs agree tightly: the rule before would have
    called 'same' equivalent and 'down' worse; now no row is decided."""
    root = tmp_path / "g"
    tiny_grid(root, level=0.1 + above, chance=0.1)
    # keep 'down' above chance too (it is 3 pp under baseline)
    for s in range(6):
        run = root / "runs" / f"resnet8-down-s{s}"
        summary = json.loads((run / "summary.json").read_text())
        summary["test_acc"] = max(summary["test_acc"], 0.1 + 0.012)
        write_json(run / "summary.json", summary)
    build_report(root)
    md = (root / "report.md").read_text()
    dec = json.loads((root / "decisions.json").read_text())
    assert [d["decision"] for d in dec] == ["undecided", "undecided"]
    assert all(d["open_because"] == "nothing learned" for d in dec)
    answer = answer_of(md)
    assert answer.count("undecided (nothing learned)") == 2
    mean = 100 * (0.1 + above + 0.003 * 2.5)
    line = next(x for x in answer.splitlines() if x.startswith("- resnet8: "))  # the model's first line says it
    assert f"Nothing learned: baseline ended at {mean:.1f}% against chance 10.0%, within 5 pp of it" in line
    assert "flat by then" not in answer and answer.count("Nothing learned") == 1


def default_shaped_grid(root: Path) -> None:
    """A results folder shaped like the default preset's: its grid.json, init probe and timing pass
    (the committed example's own files), with synthetic runs of both models, four techniques and six
    seeds, every row undecided at a plausible spread."""
    root.mkdir(parents=True)
    for name in ("grid.json", "probe-init.json", "timing.json"):
        shutil.copy(EXAMPLE / name, root / name)
    offsets = {"baseline": 0.0, "scale": 0.004, "norm": -0.02, "fusion": 0.01}
    for model, level, k in (("resnet8", 0.62, 3), ("resnet56", 0.58, 5)):
        for tech, off in offsets.items():
            for s in range(6):
                acc = level + off + 0.02 * math.sin(k * s + len(tech))
                write_run(
                    root, tech, s, [0.3, 0.5, acc], model=model, test_acc=acc, chance=0.1, params=10_000, flops=10**6
                )


def test_the_default_presets_report_is_at_most_10_kb(tmp_path: Path) -> None:
    root = tmp_path / "quick"
    default_shaped_grid(root)
    md = build_report(root).report_md.read_text()
    assert len(md.encode()) <= 10_000, len(md.encode())
    # each decision's interval once, in the verdict table
    for d in json.loads((root / "decisions.json").read_text()):
        iv = f"[{100 * d['diff_low']:+.2f}, {100 * d['diff_high']:+.2f}]"
        assert md.count(iv) == 1, (d["technique"], iv)
    assert md.index("## Answer") < md.index("## Details") < md.index("## How to read this")
    assert "docs/decision-rule.md" in md.split("## How to read this", 1)[1]


def test_a_reader_sees_the_plot_and_the_tables_header_on_the_first_screen(tmp_path: Path) -> None:
    """Headless Chromium at 1400 x 900: the decision plot and the verdict table's header lie on the
    first screen, and no cell of the verdict table wraps past two lines."""
    if find_browser() is None:
        pytest.skip("no chromium binary installed (CI installs Debian's chromium: see README.md's test command)")
    root = tmp_path / "quick"
    default_shaped_grid(root)
    build_report(root)
    boxes = measure(root / "report.html", SCREEN)
    screen = boxes["viewport"].bottom
    plot, table = boxes["decision-plot"], boxes["verdict-table"]
    assert 0 < plot.top < plot.bottom <= screen, (plot, screen)
    assert plot.bottom <= table.top < table.head_bottom <= screen, (table, screen)
    one_line = min(table.cell_heights)
    assert max(table.cell_heights) < 1.9 * one_line, table.cell_heights  # two lines at most
