"""The table's step-down: how the rows of a decision table share one error rate.

Why not plain Holm over the rows
--------------------------------
Holm's procedure frees a rejected hypothesis's share for the others because a hypothesis rejected
rightly was false, so it could not have been an error. A row here decides better, worse *or*
equivalent, and every row can err whatever its true difference: one that is rightly called
equivalent at a difference of 0 could as well have been wrongly called better. Freeing its share
then lets the table err more often than alpha: two rows at a difference of 0, one measured
precisely (interval half-width half the margin: equivalent, or else wrong) and one noisily, go wrong
together in about 1.5 alpha of tables under Holm over rows (tests/study/test_rule.py shows it).

The partitioning principle instead
----------------------------------
Each row's true difference d lies in exactly one of five parts:
``P1 = (-inf, -m]``, ``P2 = (-m, 0)``, ``P3 = {0}``, ``P4 = (0, m)``, ``P5 = [m, inf)``.
A *cell* names one part per row; exactly one cell is true. Each cell is tested at level alpha by a
weighted Bonferroni test: row j's part is rejected when row j's interval (or bound) at level
``w_j * alpha`` excludes it at some look, and the cell is rejected when some row rejects its part.
The true cell is then rejected with probability at most ``sum_j w_j alpha <= alpha`` (Finner and
Strassburger 2002), whatever the weights, as long as they depend on the cell only, never on data.
A row is called

* ``worse`` when every cell with its part in P3, P4 or P5 is rejected (every d >= 0 is excluded),
* ``better`` when every cell with P1, P2 or P3 is rejected,
* ``equivalent`` when every cell with P1 or P5 is rejected (every |d| >= m is excluded),

so a wrong call needs the true cell rejected: the table errs with probability at most alpha.

The weights: a row whose part is P1 or P5 (a difference at least the margin) gets
``EQUIVALENCE_SHARE / R`` of alpha, tested by one-sided bounds; the rows in P2-P4 (inside the
margin) share the rest equally. So equivalence is always judged at ``EQUIVALENCE_SHARE / R`` per
bound, and a row whose interval lies wholly beyond the margin frees its share of the rest for the
others: the step-down. With ``l`` rows beyond the margin, each other row's interval is built at
``(1 - EQUIVALENCE_SHARE * l / R) / (R - l)`` of alpha: ``1/R`` with none (Bonferroni), rising to
``1 - EQUIVALENCE_SHARE (R - 1) / R`` for the last one. For one row (or ``error_rate="row"``) that
is the whole alpha for the interval and for each equivalence bound.

Which cells are hardest to reject is found without listing them: a cell can stand only where
every other row's part is one its data does not exclude, so for each count ``l`` of rows beyond
the margin it is enough to know which rows can be beyond the margin and which inside it
(:func:`_arrangeable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from reslab.study.calibration import nominal_level, one_sided_level
from reslab.study.divergence import divergence_bounds
from reslab.study.plan import DIVERGENCE_SHARE, ERROR_RATES, Plan

#: fewest finished pairs an interval is formed from
MIN_PAIRS = 3
#: a run within this of chance accuracy has learned nothing (accuracy as a fraction)
CHANCE_TOL = 0.01
#: a model whose baseline's mean accuracy ends within this of chance has not clearly learned, and
#: none of its rows is decided: a 1 pp margin against at most 5 pp of learning would call a
#: technique "equivalent" to nothing (docs/decision-rule.md, "Nothing learned, nothing decided")
LEARNED_MIN = 0.05
#: confidence of the one-sided Clopper-Pearson bound on a technique's failure rate
FAILURE_CONFIDENCE = 0.95
#: a spread below this (accuracy fraction) is zero: ties decide nothing
ZERO_SPREAD = 1e-9
#: share of each row's part of alpha kept for its equivalence bounds (the parts beyond the margin)
EQUIVALENCE_SHARE = 0.5


def inner_weights(rows: int, share: float = EQUIVALENCE_SHARE) -> np.ndarray:
    """Weight (fraction of alpha) of each row inside the margin when ``l`` rows are beyond it,
    for ``l = 0 .. rows - 1``."""
    return np.array([(1 - share * k / rows) / (rows - k) for k in range(rows)])


def outer_weights(rows: int, share: float = EQUIVALENCE_SHARE) -> tuple[float, float]:
    """Weight of a row beyond the margin: while some row is inside it, and when none is."""
    return share / rows, 1.0 / rows


def _crit(levels: np.ndarray, n_max: int, two_sided: bool) -> np.ndarray:
    """t quantiles ``[level, k]`` for k = 0..n_max pairs (inf below 2)."""
    out = np.full((len(levels), n_max + 1), np.inf)
    k = np.arange(2, n_max + 1)
    for i, a in enumerate(levels):
        out[i, 2:] = sps.t.ppf(1 - (a / 2 if two_sided else a), k - 1)
    return out


def _arrangeable(lf: np.ndarray, bf: np.ndarray, count: int) -> np.ndarray:
    """For each row i (axis 1), whether the *other* rows can take parts their data allow with
    exactly ``count`` of them beyond the margin (``lf``: can be beyond, ``bf``: can be inside)."""
    only_l, both, none = lf & ~bf, lf & bf, ~lf & ~bf
    ol = only_l.sum(axis=1, keepdims=True) - only_l
    bo = both.sum(axis=1, keepdims=True) - both
    no = none.sum(axis=1, keepdims=True) - none
    return (no == 0) & (ol <= count) & (count <= ol + bo)


def decide_table_paths(
    base: np.ndarray,
    tech: np.ndarray,
    base_div: np.ndarray,
    tech_div: np.ndarray,
    plan: Plan,
    chance: float | Sequence[float | None] | np.ndarray | None,
    alpha: float | None = None,
    error_rate: str = "table",
    avail: np.ndarray | None = None,
    chance_tol: float = CHANCE_TOL,
    learned_min: float = LEARNED_MIN,
) -> dict[str, np.ndarray]:
    """The rule on ``S`` tables of ``R`` rows at once: arrays ``(S, R, N)`` of accuracies and
    divergence flags for the ``N`` seeds (in seed order); ``avail`` ``(S, R)`` or ``(R,)``: the
    seeds that exist per row (default N). ``chance``: per row, or one for all. Returns arrays
    ``(S, R)``: ``code`` (0 undecided, 1 equivalent, 2 better, 3 worse), ``n`` (seeds of the
    deciding or last look), ``estimate``, ``low``, ``high`` (the interval the decision reads),
    ``nominal`` (its two-sided level), ``level`` (the share of alpha it was judged at), ``basis`` (1:
    decided by the failures), ``fail_tech``, ``fail_base`` (one side's failures over all existing
    seeds), ``fail_tech_look``, ``fail_base_look`` (up to the look), ``nothing`` (baseline did not
    clearly learn: every run failed, or its mean accuracy at a look ended within ``learned_min`` of
    chance), ``base_mean`` (baseline's mean accuracy over its finished runs of that look, or of all
    seeds before the first look), ``zero`` (no spread at the last look), ``tech_failed`` (the
    technique's failed runs, all existing seeds), ``fail_bound`` (the exact one-sided
    Clopper-Pearson bound at :data:`FAILURE_CONFIDENCE` on its failure rate from them: what an
    equivalent or better row does not exclude)."""
    if error_rate not in ERROR_RATES:
        raise ValueError(f"error_rate is 'table' or 'row', got {error_rate!r}")
    base, tech = np.asarray(base, dtype=float), np.asarray(tech, dtype=float)
    s, r, n_avail = base.shape
    if error_rate == "row" and r > 1:

        def one(a: np.ndarray) -> np.ndarray:  # each row a table of its own
            return np.asarray(a).reshape(s * r, 1, n_avail)

        ch = np.broadcast_to(_chance_rows(chance, s, r), (s, r)).reshape(s * r, 1)
        av = np.broadcast_to(np.asarray(n_avail if avail is None else avail), (s, r)).reshape(s * r, 1)
        out = decide_table_paths(
            one(base), one(tech), one(base_div), one(tech_div), plan, ch, alpha, "table", av, chance_tol, learned_min
        )
        return {k: v.reshape(s, r) for k, v in out.items()}
    alpha = plan.alpha if alpha is None else alpha
    avail_a = np.broadcast_to(np.asarray(n_avail if avail is None else avail), (s, r))
    seed_idx = np.arange(n_avail)
    exists = seed_idx[None, None, :] < avail_a[:, :, None]
    fb = (np.asarray(base_div, bool) | ~np.isfinite(base)) & exists
    ft = (np.asarray(tech_div, bool) | ~np.isfinite(tech)) & exists
    ch = _chance_rows(chance, s, r)
    # baseline's finished accuracies (at chance level included): whether the model learned at all
    b_fin = np.isfinite(base) & ~np.asarray(base_div, bool) & exists
    with np.errstate(invalid="ignore"):
        fb |= (base <= ch[:, :, None] + chance_tol) & exists
        ft |= (tech <= ch[:, :, None] + chance_tol) & exists
    ok = ~fb & ~ft & exists
    only_t, only_b = ft & ~fb, fb & ~ft
    fail_t, fail_b = only_t.sum(axis=2), only_b.sum(axis=2)
    nothing = (fb | ~exists).all(axis=2) & (avail_a > 0)
    base_mean = _masked_mean(base, b_fin)
    d = np.where(ok, tech - base, 0.0)

    acc_alpha = (1 - DIVERGENCE_SHARE) * alpha
    w_in = inner_weights(r)
    w_out_part, w_out_all = outer_weights(r)
    looks = plan.looks
    a_in = np.array([nominal_level(looks, w * acc_alpha) for w in w_in])
    a_out = np.array([one_sided_level(looks, w * acc_alpha) for w in (w_out_part, w_out_all)])
    c_in, c_out = _crit(a_in, max(n_avail, 2), True), _crit(a_out, max(n_avail, 2), False)
    div_bounds = dict(zip(looks, divergence_bounds(looks, DIVERGENCE_SHARE * alpha / r), strict=True))

    m = plan.margin
    code, basis, n_at = np.zeros((s, r), int), np.zeros((s, r), int), np.zeros((s, r), int)
    mean, se = np.full((s, r), np.nan), np.full((s, r), np.nan)
    k_at, zero, valid = np.zeros((s, r), int), np.zeros((s, r), bool), np.zeros((s, r), bool)
    cut_t, cut_b = np.zeros((s, r), int), np.zeros((s, r), int)
    # per row, the smallest inner level (index into w_in) at which each inner part is excluded
    # (r: never), and whether each outer part is excluded at the two outer weights
    in_idx = np.full((s, r, 3), r)
    out_rej = np.zeros((s, r, 2, 2), bool)  # [part P1/P5, weight partial/all]
    bind_in, bind_out = np.zeros((s, r), int), np.zeros((s, r), int)
    for n in looks:
        here = (code == 0) & ~nothing & (avail_a >= n)
        if not here.any():
            continue
        # a model whose baseline did not clearly learn by this look decides nothing, now or later
        bm = _masked_mean(base[:, :, :n], b_fin[:, :, :n])
        with np.errstate(invalid="ignore"):
            unlearned = here & ~(bm > ch + learned_min)
        base_mean[here], n_at[unlearned], nothing[unlearned] = bm[here], n, True
        here &= ~unlearned
        k = ok[:, :, :n].sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.where(ok[:, :, :n], d[:, :, :n], 0.0).sum(axis=2) / k
            var = np.where(ok[:, :, :n], (d[:, :, :n] - mu[:, :, None]) ** 2, 0.0).sum(axis=2) / (k - 1)
        sd = np.sqrt(var)
        ok_now = (k >= MIN_PAIRS) & (sd > ZERO_SPREAD)
        n_at[here], k_at[here], valid[here] = n, k[here], ok_now[here]
        mean[here], se[here] = mu[here], (sd / np.sqrt(np.maximum(k, 1)))[here]
        zero[here] = ((k >= 2) & (sd <= ZERO_SPREAD))[here]
        cut_t[here], cut_b[here] = only_t[:, :, :n].sum(axis=2)[here], only_b[:, :, :n].sum(axis=2)[here]
        # what this look's data excludes, for the rows that took it
        kk = np.minimum(k_at, max(n_avail, 2))
        new_idx = np.full((s, r, 3), r)
        with np.errstate(invalid="ignore"):
            for level in range(r - 1, -1, -1):
                h = c_in[level][kk] * se
                lo, hi = mean - h, mean + h
                rej = np.stack([(lo >= 0) | (hi <= -m), (lo > 0) | (hi < 0), (hi <= 0) | (lo >= m)], axis=2)
                new_idx = np.where(rej & valid[:, :, None], level, new_idx)
            new_out = np.zeros((s, r, 2, 2), bool)
            for wi in range(2):
                h = c_out[wi][kk] * se
                new_out[:, :, 0, wi] = valid & (mean - h > -m)
                new_out[:, :, 1, wi] = valid & (mean + h < m)
        in_idx[here] = new_idx[here]
        out_rej[here] = new_out[here]

        # which parts of each row some unrejected cell still allows
        in_max = in_idx.max(axis=2)  # a row can lie inside the margin at inner level l iff l < in_max
        alive_in = np.zeros((s, r, 3), bool)
        alive_out = np.zeros((s, r, 2), bool)
        first_in = np.full((s, r), r)
        some_partial = np.zeros((s, r), bool)
        for count in range(r):  # the row itself inside the margin, `count` others beyond it
            lf = ~(out_rej[:, :, 0, 0] & out_rej[:, :, 1, 0])
            can = _arrangeable(lf, count < in_max, count)
            alive_in |= (count < in_idx) & can[:, :, None]
            first_in = np.where(can & (first_in == r), count, first_in)
        for total in range(1, r + 1):  # the row itself beyond the margin, `total` rows beyond it
            wi = 0 if total < r else 1
            lf = ~(out_rej[:, :, 0, wi] & out_rej[:, :, 1, wi])
            can = _arrangeable(lf, total < in_max, total - 1)
            alive_out |= ~out_rej[:, :, :, wi] & can[:, :, None]
            if total < r:
                some_partial |= can
        clean = fail_t == 0
        take = here & valid
        hits = [
            (1, take & clean & ~alive_out[:, :, 0] & ~alive_out[:, :, 1]),
            (2, take & clean & ~alive_out[:, :, 0] & ~alive_in[:, :, 0] & ~alive_in[:, :, 1]),
            (3, take & ~alive_in[:, :, 1] & ~alive_in[:, :, 2] & ~alive_out[:, :, 1]),
        ]
        open_ = here.copy()
        for c, hit in hits:
            code[open_ & hit] = c
            open_ &= ~hit
        b_n = div_bounds[n]
        if b_n is not None:
            div_hit = open_ & ((cut_t - cut_b) >= b_n)
            code[div_hit], basis[div_hit] = 3, 1
        bind_in[here] = np.minimum(first_in, r - 1)[here]
        bind_out[here] = np.where(some_partial, 0, 1)[here]

    tech_failed = (ft & exists).sum(axis=2)
    eq = code == 1
    kk = np.minimum(k_at, max(n_avail, 2))
    with np.errstate(invalid="ignore"):  # rows with no interval: inf quantile times nan spread
        h = np.where(eq, c_out[bind_out, kk] * se, c_in[bind_in, kk] * se)
    low = np.where(valid, mean - h, np.nan)
    high = np.where(valid, mean + h, np.nan)
    nominal = np.where(eq, 2 * a_out[bind_out], a_in[bind_in])
    level = np.where(eq, np.array([w_out_part, w_out_all])[bind_out], w_in[bind_in]) * alpha
    return {
        "code": code,
        "n": n_at,
        "estimate": mean,
        "low": low,
        "high": high,
        "nominal": nominal,
        "level": level,
        "basis": basis,
        "fail_tech": fail_t,
        "fail_base": fail_b,
        "fail_tech_look": cut_t,
        "fail_base_look": cut_b,
        "nothing": nothing,
        "base_mean": base_mean,
        "zero": zero,
        "tech_failed": tech_failed,
        "fail_bound": failure_bound(tech_failed, avail_a),
    }


def failure_bound(
    failed: np.ndarray | int, seeds: np.ndarray | int, confidence: float = FAILURE_CONFIDENCE
) -> np.ndarray:
    """The exact one-sided Clopper-Pearson upper bound on a failure rate from ``failed`` of ``seeds``
    (1 when every seed failed, nan without seeds): 0 of 6 gives 39.3% at 95%."""
    k, n = np.asarray(failed, float), np.asarray(seeds, float)
    # scipy's beta quantile, not binomtest(...).proportion_ci: that takes one scalar k, n at a time
    with np.errstate(invalid="ignore", divide="ignore"):
        b = sps.beta.ppf(confidence, k + 1, np.maximum(n - k, 1e-300))
    return np.where(n <= 0, np.nan, np.where(k >= n, 1.0, b))


def seeds_for_failure_bound(
    failed: int, seeds: int, bound: float = 0.10, confidence: float = FAILURE_CONFIDENCE
) -> int:
    """The fewest seeds (at least ``seeds``) whose bound, with no failure beyond the ``failed`` seen,
    is at most ``bound``: 29 for none failed at 10% and 95%."""
    n = max(int(seeds), 1)
    while float(failure_bound(failed, n, confidence)) > bound:
        n += 1
    return n


def _masked_mean(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the last axis where ``mask`` holds (nan where it never does)."""
    k = mask.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, a, 0.0).sum(axis=-1) / np.where(k > 0, k, np.nan)


def _chance_rows(chance: float | Sequence[float | None] | np.ndarray | None, s: int, r: int) -> np.ndarray:
    """The chance accuracy as ``(S, R)`` (-inf where unknown: then only non-finite runs fail): one
    for all, one per row, or an ``(S, R)`` array."""
    if chance is None or isinstance(chance, (int, float)):
        return np.full((s, r), -np.inf if chance is None else float(chance))
    arr = np.asarray(chance)
    if arr.dtype.kind == "f":  # already numbers (nan or -inf: unknown)
        vals = np.where(np.isnan(arr), -np.inf, arr)
    else:
        vals = np.array([[-np.inf if v is None else float(v) for v in row] for row in np.atleast_2d(arr)])
    if vals.shape[-1] != r:
        raise ValueError(f"chance has {vals.shape[-1]} values for {r} rows")
    return np.broadcast_to(vals, (s, r))


__all__ = [
    "CHANCE_TOL",
    "EQUIVALENCE_SHARE",
    "FAILURE_CONFIDENCE",
    "LEARNED_MIN",
    "MIN_PAIRS",
    "ZERO_SPREAD",
    "decide_table_paths",
    "failure_bound",
    "inner_weights",
    "outer_weights",
    "seeds_for_failure_bound",
]
