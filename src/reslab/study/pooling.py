"""When runs from different cards may be read as one sample: the evidence study's pooling rule.

A GPU is lent in short calls, and the next call may get another card. A paired difference
technique - baseline is only worth pooling across cards where the card does not change what is
measured, and baseline is the run every row shares, so the rule tests baseline, per model:

* The **reference** card of a model is the one that recorded the model's first run of the study.
* Another card is **pooled** with it when both have at least :data:`MIN_RUNS` completed baseline
  runs and their test accuracies agree within seed noise: Welch's two-sample t test does not reject
  equal means at :data:`ALPHA` (two-sided) **and** the difference of the means is smaller than the
  study's equivalence margin (a card that shifts baseline by more than the margin would move every
  row by as much as the rule's "equivalent" allows, however noisy the seeds).
* A card that fails either is kept **apart**: its runs make rows of their own, decided on their own
  seeds, and the summary names it. A card with fewer than :data:`MIN_RUNS` baseline runs (or a
  reference with fewer) is **untested** and kept apart until both have them.

Agreement found this way is not proof of equality (3 runs a side detect only large shifts); the
margin condition is what bounds a shift the test cannot see. Tested both ways in
``tests/study/test_evidence_pooling.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: Welch's test level: a card whose baseline differs at this level is kept apart
ALPHA = 0.05
#: completed baseline runs each card needs before it is tested
MIN_RUNS = 3

REFERENCE, POOLED, APART, UNTESTED = "reference", "pooled", "apart", "untested"


@dataclass(frozen=True)
class CardCheck:
    """One card's baseline against the reference card's, for one model."""

    device: str
    runs: int  # completed baseline runs on this card
    mean: float  # their mean test accuracy (nan without one)
    verdict: str  # reference | pooled | apart | untested
    diff: float = math.nan  # this card's mean minus the reference's
    p: float = math.nan  # Welch's two-sided p-value

    def words(self, margin: float) -> str:
        """The check in a few words, e.g. 'pooled (+0.04 pp, p = 0.71)'."""
        if self.verdict == REFERENCE:
            return f"reference ({self.runs} baseline runs)"
        if self.verdict == UNTESTED:
            return f"untested: {self.runs} baseline runs (the test needs {MIN_RUNS} on each card); kept apart"
        detail = f"{100 * self.diff:+.2f} pp, Welch p = {self.p:.2g}"
        if self.verdict == POOLED:
            return f"pooled ({detail})"
        why = "differs beyond seed noise" if self.p < ALPHA else f"differs by more than the {100 * margin:g} pp margin"
        return f"kept apart: baseline {why} ({detail})"


def cards_agree(
    ref: Sequence[float], other: Sequence[float], margin: float, alpha: float = ALPHA
) -> tuple[bool, float, float]:
    """``(agree, p, diff)``: whether ``other``'s baseline accuracies agree with ``ref``'s (Welch's
    test does not reject at ``alpha`` and ``|diff| < margin``), the test's p-value and
    ``mean(other) - mean(ref)``. Without any spread on either card the p-value is 1 for equal means
    and 0 otherwise."""
    a, b = np.asarray(ref, dtype=float), np.asarray(other, dtype=float)
    diff = float(b.mean() - a.mean())
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = float(sps.ttest_ind(b, a, equal_var=False).pvalue)
    return (p >= alpha and abs(diff) < margin), p, diff


def pool_cards(
    accs: Mapping[str, Sequence[float]],
    reference: str,
    margin: float,
    *,
    alpha: float = ALPHA,
    min_runs: int = MIN_RUNS,
) -> tuple[list[tuple[str, ...]], list[CardCheck]]:
    """Group the cards of one model: ``accs`` maps each card to its completed baseline runs' test
    accuracies (a card with runs but no completed baseline maps to an empty list). Returns the groups
    (the reference's first, then one per card kept apart, in ``accs``' order) and each card's check."""
    if reference not in accs:
        raise ValueError(f"the reference card {reference!r} has no runs")
    ref = list(accs[reference])
    checks = [CardCheck(reference, len(ref), float(np.mean(ref)) if ref else math.nan, REFERENCE)]
    pooled = [reference]
    apart: list[tuple[str, ...]] = []
    for card, values in accs.items():
        if card == reference:
            continue
        vals = list(values)
        mean = float(np.mean(vals)) if vals else math.nan
        if len(vals) < min_runs or len(ref) < min_runs:
            checks.append(CardCheck(card, len(vals), mean, UNTESTED))
            apart.append((card,))
            continue
        agree, p, diff = cards_agree(ref, vals, margin, alpha)
        checks.append(CardCheck(card, len(vals), mean, POOLED if agree else APART, diff, p))
        if agree:
            pooled.append(card)
        else:
            apart.append((card,))
    return [tuple(pooled), *apart], checks


__all__ = ["ALPHA", "APART", "MIN_RUNS", "POOLED", "REFERENCE", "UNTESTED", "CardCheck", "cards_agree", "pool_cards"]
