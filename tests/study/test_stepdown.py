"""The step-down finds the hardest cells without listing them: checked against listing all 5^R cells.

For tables of 2 to 4 rows read at one look, every cell (one part of the difference per row: <= -m,
(-m, 0), 0, (0, m), >= m) is tested by its weighted Bonferroni test, written out here from the
definition in docs/decision-rule.md, and each row's decision read off the cells left standing. The
fast rule (:func:`reslab.study.stepdown.decide_table_paths`) must give the same decisions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from reslab.study.calibration import nominal_level, one_sided_level
from reslab.study.plan import DIVERGENCE_SHARE, Plan
from reslab.study.stepdown import EQUIVALENCE_SHARE, decide_table_paths


def _rejects(part: int, mean: float, se: float, k: int, w: float, plan: Plan, outer: bool) -> bool:
    """Whether one row's data, read at weight ``w`` of alpha, excludes its part of the cell."""
    acc = (1 - DIVERGENCE_SHARE) * plan.alpha * w
    m = plan.margin
    if outer:  # parts 0 (<= -m) and 4 (>= m): one-sided bounds
        h = sps.t.ppf(1 - one_sided_level(plan.looks, acc), k - 1) * se
        return mean - h > -m if part == 0 else mean + h < m
    h = sps.t.ppf(1 - nominal_level(plan.looks, acc) / 2, k - 1) * se
    lo, hi = mean - h, mean + h
    return {1: lo >= 0 or hi <= -m, 2: lo > 0 or hi < 0, 3: hi <= 0 or lo >= m}[part]


def _listed(means: np.ndarray, ses: np.ndarray, k: int, plan: Plan) -> list[int]:
    """Each row's code (0 undecided, 1 equivalent, 2 better, 3 worse) from all cells listed."""
    r = len(means)
    standing = []
    for cell in itertools.product(range(5), repeat=r):
        outer = [p in (0, 4) for p in cell]
        n_out = sum(outer)
        weights = [
            (EQUIVALENCE_SHARE / r if n_out < r else 1 / r) if o else (1 - EQUIVALENCE_SHARE * n_out / r) / (r - n_out)
            for o in outer
        ]
        if not any(_rejects(p, means[j], ses[j], k, weights[j], plan, outer[j]) for j, p in enumerate(cell)):
            standing.append(cell)
    codes = []
    for i in range(r):
        parts = {c[i] for c in standing}
        if not parts & {0, 4}:
            codes.append(1)
        elif not parts & {0, 1, 2}:
            codes.append(2)
        elif not parts & {2, 3, 4}:
            codes.append(3)
        else:
            codes.append(0)
    return codes


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_the_fast_step_down_decides_as_listing_every_cell(rows: int) -> None:
    plan = Plan(6, 6, 1, 0.05, 0.01)
    rng = np.random.default_rng(300 + rows)
    n, tables, disagree, decided = plan.max_seeds, 60, 0, 0
    for _ in range(tables):
        # rows from clearly beyond the margin to near 0 and near the margin, with small and large spreads
        effects = rng.choice([-0.2, -0.03, -0.01, -0.004, 0.0, 0.004, 0.01, 0.03, 0.2], size=rows)
        spreads = rng.choice([0.001, 0.003, 0.01, 0.03], size=rows)
        base = 0.8 + 0.01 * rng.standard_normal((1, rows, n))
        tech = base + effects[None, :, None] + spreads[None, :, None] * rng.standard_normal((1, rows, n))
        no = np.zeros((1, rows, n), bool)
        fast = decide_table_paths(base, tech, no, no, plan, 0.1)["code"][0].tolist()
        d = tech[0] - base[0]
        means, ses = d.mean(axis=1), d.std(axis=1, ddof=1) / math.sqrt(n)
        listed = _listed(means, ses, n, plan)
        disagree += fast != listed
        decided += sum(c > 0 for c in fast)
    assert disagree == 0
    assert decided > tables  # the tables decide something, so the comparison means something
