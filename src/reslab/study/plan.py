"""The plan of a comparison and the error rate each row of a table is run at.

A :class:`Plan` fixes, before anything trains, the looks at which a comparison is read (``Plan(4, 6)``:
at 4, 5 and 6 seeds), the error rate ``alpha`` and the equivalence margin. A table's rows share
alpha (``"table"``, the default: P(any wrong row) <= alpha; :mod:`reslab.study.stepdown`) or keep
it each (``"row"``). The rule that reads the looks is :mod:`reslab.study.rule`.
"""

from __future__ import annotations

from dataclasses import dataclass

DECISIONS = ("better", "worse", "equivalent", "undecided")
ERROR_RATES = ("table", "row")
#: share of a row's error rate spent on the divergence test (the rest goes to the accuracy interval)
DIVERGENCE_SHARE = 0.2


@dataclass(frozen=True)
class Plan:
    """Looks at ``min_seeds, min_seeds + step, ..., max_seeds`` seeds; ``margin`` in accuracy fraction."""

    min_seeds: int = 4
    max_seeds: int = 6
    step: int = 1
    alpha: float = 0.05
    margin: float = 0.005

    def __post_init__(self) -> None:
        if self.min_seeds < 2:
            raise ValueError(f"the first look needs at least 2 seeds, got {self.min_seeds}")
        if self.max_seeds < self.min_seeds:
            raise ValueError(f"max seeds ({self.max_seeds}) must be at least the first look's ({self.min_seeds})")
        if self.step < 1:
            raise ValueError(f"seeds are added at least one at a time, got step {self.step}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not self.margin > 0:
            raise ValueError(f"the equivalence margin must be positive, got {self.margin}")

    @property
    def looks(self) -> tuple[int, ...]:
        out = list(range(self.min_seeds, self.max_seeds + 1, self.step))
        if out[-1] != self.max_seeds:
            out.append(self.max_seeds)
        return tuple(out)

    def next_look(self, n: int) -> int | None:
        return next((k for k in self.looks if k > n), None)


#: the quick preset's plan: one look at 6 seeds, a margin of 1 pp (benchmarks/README.md, "The quick
#: preset": at 125 steps the test sample alone moves a paired difference by about 1 pp); with
#: ``--max-seeds 24`` it looks at 6, 12, 18 and 24 seeds
QUICK = Plan(6, 6, 6, 0.05, 0.01)
#: the paper preset's plan: looks at 3, 6 and 9 seeds, each look one pack of 3 seeds per technique
PAPER = Plan(3, 9, 3, 0.05, 0.005)


__all__ = ["DECISIONS", "DIVERGENCE_SHARE", "ERROR_RATES", "PAPER", "QUICK", "Plan"]
