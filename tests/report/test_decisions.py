"""`reslab report` decides by the rule of reslab.study.rule on stored runs (issue 18): divergence is an
outcome of its own, ties and nothing-learned decide nothing, the error rate in force is stated first,
and planning figures name more seeds than were spent. Synthetic results folders (tests/synthetic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab.cli import main
from reslab.engine.runs import write_json
from reslab.errors import UsageError
from reslab.study.plan import Plan
from reslab.study.planning import detectable_difference
from synthetic import write_run, write_sequential_grid

BASE6 = [0.902, 0.897, 0.905, 0.899, 0.903, 0.896]
JITTER = [0.0002, -0.0001, 0.0001, -0.0002, 0.0, 0.0001]


def quick_grid(root: Path, techs: dict[str, list[float | None]], error_rate: str | None = None) -> None:
    """A quick-plan grid (looks at 4, 5, 6 seeds) with all 6 seeds trained; ``None`` is a diverged run.
    Every run records chance accuracy 0.1 (ten classes), as reslab train does."""
    write_sequential_grid(root, ["baseline", *techs], max_seeds=6, min_seeds=4, error_rate=error_rate)
    for s, b in enumerate(BASE6):
        write_run(root, "baseline", s, [0.5, b], test_acc=b, chance=0.1)
    for tech, accs in techs.items():
        for s, a in enumerate(accs):
            if a is None:
                write_run(root, tech, s, [0.3], status="diverged", chance=0.1)
            else:
                write_run(root, tech, s, [0.5, a], test_acc=a, chance=0.1)


def report(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, dict]]:
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    decisions = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    return (root / "report.md").read_text(), decisions


def table_row(md: str, technique: str) -> str:
    """The technique's row of the verdict table."""
    return next(line for line in md.splitlines() if line.startswith(f"| resnet8 | {technique} |"))


def advice_line(md: str, technique: str) -> str:
    """The technique's line of advice in the details."""
    return next(line for line in md.splitlines() if line.startswith(f"- {technique}: "))


@pytest.mark.parametrize("failed", [(4, 5), (0, 2), (1, 4, 5)])
@pytest.mark.parametrize("offset", [0.0, 0.02])
def test_a_technique_diverging_in_2_or_3_of_6_seeds_is_never_equivalent_or_better(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], failed: tuple[int, ...], offset: float
) -> None:
    """Otherwise equal to baseline (offset 0) or clearly better (+2 pp); the diverged seeds fall after
    the first look (4, 5) or inside it. The old rule said 'equivalent (0 diverged)' when they fell
    after a decided look."""
    accs: list[float | None] = [b + offset + j for b, j in zip(BASE6, JITTER, strict=True)]
    for i in failed:
        accs[i] = None
    root = tmp_path / "res"
    quick_grid(root, {"boom": accs})
    md, dec = report(root, capsys)
    d, k = dec["boom"], len(failed)
    assert d["decision"] not in ("equivalent", "better"), d
    assert (d["diverged"], d["baseline_diverged"], d["trained"]) == (k, 0, 6)
    row = table_row(md, "boom")
    assert f"| {k} of 6 |" in row and "rate ≤" not in row  # failures, and no claim that bounds them
    assert f"diverged in {k} of 6 seeds where baseline did not" in d["reason"]
    advice = advice_line(md, "boom")
    assert "fails where baseline does not" in advice and "adopt" not in advice and "either" not in advice


def test_diverging_in_every_seed_is_worse_by_the_exact_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "res"
    quick_grid(root, {"boom": [None] * 6})
    md, dec = report(root, capsys)
    assert (dec["boom"]["decision"], dec["boom"]["basis"]) == ("worse", "divergence")
    assert "**worse** (failures)" in table_row(md, "boom") and "| 6 of 6 |" in table_row(md, "boom")
    assert "avoid at this depth: it fails where baseline does not" in advice_line(md, "boom")


def test_accuracy_is_compared_on_the_seeds_where_both_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Baseline diverged in seed 0: that seed gives no difference, and it does not block the technique."""
    root = tmp_path / "res"
    quick_grid(root, {"up": [b + 0.02 + j for b, j in zip(BASE6, JITTER, strict=True)]})
    run = root / "runs" / "resnet8-baseline-s0"
    summary = json.loads((run / "summary.json").read_text())
    summary.update(status="diverged", test_acc=None)
    write_json(run / "summary.json", summary)
    _, dec = report(root, capsys)
    d = dec["up"]
    assert (d["diverged"], d["baseline_diverged"]) == (0, 1)
    assert d["decision"] == "better" and d["finished_pairs"] == d["seeds"] - 1
    assert d["diff_mean"] == pytest.approx(0.02 + sum(JITTER[1 : d["seeds"]]) / (d["seeds"] - 1))


def test_all_tied_runs_decide_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every run predicts one class (all at chance level): nothing was learned. Equal differences in
    every seed (the old rule's 'better' with interval [+0.60, +0.60]): ties decide nothing."""
    root = tmp_path / "chance"
    write_sequential_grid(root, ["baseline", "norm"], max_seeds=6, min_seeds=4)
    for s in range(6):
        for tech in ("baseline", "norm"):
            write_run(root, tech, s, [0.1, 0.1], test_acc=0.1, chance=0.1)
    md, dec = report(root, capsys)
    assert (dec["norm"]["decision"], dec["norm"]["open_because"]) == ("undecided", "nothing learned")
    assert "nothing was learned" in dec["norm"]["reason"] and "(nothing learned)" in table_row(md, "norm")
    assert "Nothing learned: baseline ended at 10.0% against chance 10.0%" in md

    root = tmp_path / "ties"
    quick_grid(root, {"scale": [b + 0.006 for b in BASE6]})
    md, dec = report(root, capsys)
    assert dec["scale"]["decision"] == "undecided" and dec["scale"]["diff_low"] is None
    assert "(ties)" in table_row(md, "scale") and "ties decide nothing" in advice_line(md, "scale")


@pytest.mark.parametrize("error_rate", [None, "table", "row"])
def test_the_error_rate_in_force_is_stated_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], error_rate: str | None
) -> None:
    root = tmp_path / "res"
    techs = {t: [b + 0.001 * (i + 1) * (-1) ** i for i, b in enumerate(BASE6)] for t in ("scale", "norm", "fusion")}
    quick_grid(root, techs, error_rate)
    md, dec = report(root, capsys)
    # stated in the answer, right below the verdict table
    first = md.split("## Answer", 1)[1].split("## Details", 1)[0]
    if error_rate == "row":
        assert "Error rate: each row is wrong with probability at most 0.05 (per row" in first
        assert all(d["row_level"] == 0.05 and d["error_rate"] == "row" for d in dec.values())
    else:  # the default, also for grids written before the option existed
        assert "any of the 3 rows is wrong is at most 0.05 (table-wide" in first
        assert all(d["row_level"] == pytest.approx(0.05 / 3) for d in dec.values())
    assert "Holm" not in md


def test_a_grid_with_an_unknown_error_rate_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "res"
    quick_grid(root, {"scale": list(BASE6)})
    # a hand-edited grid.json: the one writer refuses this value, so the file is damaged after it
    grid = json.loads((root / "grid.json").read_text())
    grid["error_rate"] = "family"
    (root / "grid.json").write_text(json.dumps(grid))
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error_rate is 'family'; it must be one of table, row" in err[0]


def test_planning_figures_exceed_the_seeds_spent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A noisy comparison undecided after all 6 seeds: 'about N seeds would settle it' names more than 6
    (the old figure used the one-look alpha and could name 6), and the detectable difference is the
    exact noncentral-t figure at the per-look level in force."""
    root = tmp_path / "res"
    diffs = [0.012, -0.004, 0.015, 0.001, 0.018, -0.002]
    quick_grid(root, {"noisy": [b + x for b, x in zip(BASE6, diffs, strict=True)]})
    md, dec = report(root, capsys)
    d = dec["noisy"]
    assert (d["decision"], d["open_because"]) == ("undecided", "max seeds")
    assert d["seeds_needed"] is not None and d["seeds_needed"] > d["trained"] == 6
    assert f"about {d['seeds_needed']} seeds would settle it" in advice_line(md, "noisy")
    import numpy as np

    sd = float(np.std(np.array(diffs), ddof=1))
    plan = Plan(4, 6, 1, 0.05, 0.005)  # quick_grid's plan; one row, so the whole alpha
    want = detectable_difference(sd, 6, plan, plan.alpha)
    assert d["detectable_diff"] == pytest.approx(want, rel=1e-3)


def test_compare_records_the_error_rate_and_refuses_to_change_it(tmp_path: Path) -> None:
    from reslab.cli import build_parser
    from reslab.cli.commands.compare import build_grid
    from reslab.study.grid import prepare_results

    def grid(*extra: str):
        args = build_parser().parse_args(["compare", "--models", "resnet8", "--seeds", "2", *extra])
        return build_grid(args)[0]

    assert grid().error_rate == "table" and grid("--error-rate", "row").error_rate == "row"
    assert build_grid(build_parser().parse_args(["compare", "--error-rate", "row"]))[0].preset == "quick (modified)"
    out = tmp_path / "res"
    prepare_results(out, grid("--error-rate", "row"))
    assert json.loads((out / "grid.json").read_text())["error_rate"] == "row"
    with pytest.raises(UsageError, match="--error-rate table"):
        prepare_results(out, grid())


def test_the_html_page_shows_the_decision_labels_in_bold_not_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "res"
    quick_grid(root, {"boom": [None] * 6})
    report(root, capsys)
    page = (root / "report.html").read_text()
    assert "<strong>worse</strong>" in page and "**" not in page


def test_an_interval_wider_than_the_possible_range_says_so() -> None:
    from reslab.study.decisions import interval_pp, interval_ratio

    assert interval_pp(-0.012, 0.034) == "[-1.20, +3.40]"
    assert "wider than the possible range" in interval_pp(-1.16, 0.62)
    assert interval_ratio(0.5, 2.0) == "[0.50, 2.00]" and "unbounded" in interval_ratio(0.0, 3.9e24)
