"""The divergence test: an exact sequential test of the imbalance of failures.

Per seed, only the technique failed (+1), only baseline failed (-1), or neither or both (0). When both
fail equally often, independently within a seed, the running sum S is a symmetric lazy walk whose
step probability ``pi`` is at most 1/4; :func:`divergence_bounds` finds, by dynamic programming over a
grid of ``pi``, per-look bounds on S that are crossed with probability at most ``alpha`` for every
``pi``. Crossing one makes the technique ``worse``.
"""

from __future__ import annotations

import numpy as np

from reslab.caches import memoize


def _imbalance_tails(n_max: int) -> np.ndarray:
    """``tails[i, n, s]``: P(S_n >= s - n_max) for the imbalance S_n = (seeds where only the technique
    failed) - (seeds where only baseline failed) after n seeds, at the i-th point of a grid of
    ``pi`` = P(only the technique fails) = P(only baseline fails) in [0, 1/4]."""
    pis = np.linspace(0.0, 0.25, 251)
    dist = np.zeros((len(pis), 2 * n_max + 1))
    dist[:, n_max] = 1.0
    tails = np.zeros((len(pis), n_max + 1, 2 * n_max + 2))
    for n in range(n_max + 1):
        if n:
            up, down = np.roll(dist, 1, axis=1), np.roll(dist, -1, axis=1)
            dist = pis[:, None] * (up + down) + (1 - 2 * pis[:, None]) * dist
        tails[:, n, :-1] = np.cumsum(dist[:, ::-1], axis=1)[:, ::-1]
    return tails


@memoize("divergence.bounds", maxsize=256)
def divergence_bounds(looks: tuple[int, ...], alpha: float) -> tuple[int | None, ...]:
    """Per look, the imbalance S (seeds where only the technique failed minus seeds where only
    baseline failed) at which the technique is called ``worse`` (None: no imbalance suffices).

    Under the null that both fail equally often, independently within a seed (or positively
    dependent), a seed adds +1 or -1 with the same probability ``pi <= 1/4``; the bounds are the
    loosest with one tail probability ``a`` for every look such that, for every ``pi``, the chance
    of crossing at any look is at most ``alpha`` (computed exactly over a grid of ``pi``)."""
    n_max = looks[-1]
    tails = _imbalance_tails(n_max)
    sup = tails.max(axis=0)  # (n, s): largest tail probability over the null

    def bounds(a: float) -> tuple[int | None, ...]:
        out: list[int | None] = []
        for n in looks:
            ok = [v for v in range(1, n + 1) if sup[n, v + n_max] <= a]
            out.append(ok[0] if ok else None)
        return tuple(out)

    def crossing(bs: tuple[int | None, ...]) -> float:
        pis = np.linspace(0.0, 0.25, 251)[:, None]
        dist = np.zeros((pis.shape[0], 2 * n_max + 1))
        dist[:, n_max] = 1.0
        crossed, at = np.zeros(pis.shape[0]), dict(zip(looks, bs, strict=True))
        for n in range(1, n_max + 1):
            dist = pis * (np.roll(dist, 1, axis=1) + np.roll(dist, -1, axis=1)) + (1 - 2 * pis) * dist
            if at.get(n) is not None:
                crossed += dist[:, at[n] + n_max :].sum(axis=1)
                dist[:, at[n] + n_max :] = 0.0
        return float(crossed.max())

    best: tuple[int | None, ...] = tuple(None for _ in looks)
    for a in sorted({float(v) for v in sup[looks[0] :, n_max + 1 :].ravel() if 0 < v <= alpha}):
        bs = bounds(a)
        if crossing(bs) <= alpha:
            best = bs
    return best


def imbalance_p(imbalance: int, n: int) -> float:
    """The largest chance, when both fail equally often, of an imbalance at least this large at n seeds."""
    if imbalance <= 0:
        return 1.0
    return float(_imbalance_tails(n)[:, n, imbalance + n].max())


__all__ = ["divergence_bounds", "imbalance_p"]
