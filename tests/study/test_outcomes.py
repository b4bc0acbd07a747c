"""What a sequential grid trains next follows the same rule, at the same error rate, as the report
that decides it (issue 18): a comparison decided per row but still open under table-wide control
asks for its next look, and a technique that failed where baseline did not keeps asking."""

from __future__ import annotations

from reslab.study.grid import Grid
from reslab.study.outcomes import Outcomes, comparison_outcome, needed_cells
from reslab.study.results import Cell

BASE = [0.90, 0.91, 0.89, 0.90]
DIFFS = [0.02, 0.0225, 0.0175, 0.02125]  # better at look 4 with 0.05 per row, open at the table's share


def grid(error_rate: str) -> Grid:
    return Grid(
        models=["resnet8", "resnet56"],
        techniques=["baseline", "scale", "norm", "fusion"],
        seeds=list(range(6)),
        sequential={"min_seeds": 4, "max_seeds": 6, "step": 1, "alpha": 0.05, "margin": 0.005},
        error_rate=error_rate,
    )


def outcomes(fail_seed: int | None = None) -> Outcomes:
    out = Outcomes()
    for m in ("resnet8", "resnet56"):
        for s, b in enumerate(BASE):
            out.add(Cell(m, "baseline", s), "completed", {"test_acc": b, "chance_acc": 0.1})
            for t in ("scale", "norm", "fusion"):
                if t == "fusion" and s == fail_seed:
                    out.add(Cell(m, t, s), "diverged", {"chance_acc": 0.1})
                else:
                    out.add(Cell(m, t, s), "completed", {"test_acc": b + DIFFS[s], "chance_acc": 0.1})
    return out


def test_the_next_look_follows_the_error_rate_in_force() -> None:
    row, table = grid("row"), grid("table")
    assert comparison_outcome(row, outcomes(), "resnet8", "scale").decision == "better"
    assert needed_cells(row, outcomes()) == []
    state = comparison_outcome(table, outcomes(), "resnet8", "scale")
    assert (state.decision, state.next_look) == ("undecided", 5)
    assert Cell("resnet8", "scale", 4) in needed_cells(table, outcomes())


def test_a_divergence_keeps_the_comparison_open() -> None:
    state = comparison_outcome(grid("row"), outcomes(fail_seed=1), "resnet8", "fusion")
    assert state.decision == "undecided" and state.diverged_tech == 1 and state.next_look == 5
    assert Cell("resnet8", "fusion", 4) in needed_cells(grid("row"), outcomes(fail_seed=1))
