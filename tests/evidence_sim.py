"""A simulated card for the evidence study's tests: it "trains" a pack instantly, advancing a fake
clock by what the pack would cost, and returns runs whose accuracies follow a known truth (a
plateau in epochs, a fixed effect per technique, paired seed noise, a shift per card). The study
and its call are the real ones; only the training is replaced."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from reslab.study.evidence import Study
from reslab.study.evidence_run import Trained
from reslab.study.plan import Plan

#: two models x three techniques, a ladder of 1, 2 and 4 epochs, looks at 3, 6 and 9 seeds
SIM_STUDY = Study(
    models=("resnet20", "resnet56"),
    techniques=("baseline", "scale", "norm", "fusion"),
    ladder=(1, 2, 4),
    plateau_seeds=3,
    plan=Plan(3, 9, 3, 0.05, 0.005),
    pack=3,
)
#: the truth: technique minus baseline in test accuracy
EFFECTS = {"baseline": 0.0, "scale": 0.0, "norm": -0.03, "fusion": 0.02}
#: the sim's levelling off: doubling 1 -> 2 epochs gains 3.7 pp, 2 -> 4 gains 0.3 pp, so 2 is chosen
TOP = 0.92


def val_end(epochs: int) -> float:
    return TOP - 0.04 * math.exp(-2.5 * (epochs - 1))


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class Clock:
    """A fake monotonic clock the simulated card advances."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += max(0.0, dt)


@dataclass
class SimCard:
    name: str = "Sim card A"
    clock: Clock = field(default_factory=Clock)
    shift: float = 0.0  # added to every accuracy this card measures
    startup_s: float = 5.0
    per_epoch_s: dict[str, float] = field(default_factory=lambda: {"resnet20": 2.0, "resnet56": 5.0})
    effects: dict[str, float] = field(default_factory=lambda: dict(EFFECTS))
    noise: float = 0.0003  # a technique's own seed noise (the paired spread)
    seed_noise: float = 0.002  # shared by the runs of one seed
    diverge: set[tuple[str, str, int]] = field(default_factory=set)
    interrupt_at: int | None = None  # raise KeyboardInterrupt at this train call (1-based)
    trained: list[tuple[str, str, int, int]] = field(default_factory=list)  # every cell it trained
    stopped: list[tuple[str, str, int, int]] = field(default_factory=list)  # cells stopped at a timeout
    calls: int = 0

    def device(self) -> dict:
        return {"type": "cuda", "name": self.name, "capability": "9.0"}

    def cost(self, model: str, epochs: int, k: int) -> float:
        return self.startup_s + self.per_epoch_s[model] * epochs * k

    def acc(self, model: str, technique: str, seed: int, epochs: int) -> float:
        u = _rng("seed", model, seed).normal() * self.seed_noise
        e = _rng("tech", model, technique, seed, epochs).normal() * self.noise
        return val_end(epochs) + self.effects[technique] + u + e + self.shift

    def train(self, grid, cells, work, timeout_s):
        self.calls += 1
        if self.interrupt_at == self.calls:
            self.clock.advance(1.0)
            raise KeyboardInterrupt
        epochs = int(grid.train["epochs"])
        model = cells[0].model
        cost = self.cost(model, epochs, len(cells))
        if cost > timeout_s:
            self.clock.advance(timeout_s)
            self.stopped += [(c.model, c.technique, epochs, c.seed) for c in cells]
            return None
        self.clock.advance(cost)
        out = []
        for c in cells:
            self.trained.append((c.model, c.technique, epochs, c.seed))
            config = {"model": c.model, "technique": c.technique, "seed": c.seed, "epochs": epochs, "device": "cuda"}
            if (c.model, c.technique, c.seed) in self.diverge:
                summary = {"status": "diverged", "chance_acc": 0.1, "diverged_epoch": 1, "elapsed_s": cost / 2}
                out.append(Trained(c, "diverged", config, summary, []))
                continue
            test = self.acc(c.model, c.technique, c.seed, epochs)
            end = test + _rng("val", c.model, c.technique, c.seed, epochs).normal() * 0.001
            curve = [
                {"epoch": k, "val_acc": end - 0.1 * (1 - k / epochs), "train_loss": 1.0 / k, "elapsed_s": k * 1.0}
                for k in range(1, epochs + 1)
            ]
            summary = {
                "status": "completed",
                "test_acc": test,
                "test_loss": 0.3,
                "chance_acc": 0.1,
                "best_val_acc": end,
                "elapsed_s": self.per_epoch_s[model] * epochs * len(cells),
                "params": 1000,
                "flops": 2000,
            }
            out.append(Trained(c, "completed", config, summary, curve))
        return out

    def close(self) -> None:
        pass
