"""What a run is made of: its fixed parts (:class:`Engine`) and what changes as it trains
(:class:`RunState`, all of which goes into every checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reslab.engine.config import TrainConfig
from reslab.engine.distributed import Dist
from reslab.nn.normalize import Normalize


@dataclass
class Engine:
    """The fixed parts of a run, built once by :func:`build_engine` and read by the epoch
    and evaluation functions and the callbacks."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    source: Any  # ArraySource | FolderSource
    #: the model itself: evaluated and saved
    raw_model: nn.Module
    #: what the training steps call: ``raw_model``, wrapped by DDP and/or torch.compile
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    norm: Normalize
    #: a fresh autocast context (or a null one) per forward pass
    autocast: Callable[[], Any]
    steps_per_epoch: int
    #: what the saved weights carry besides the model's spec
    meta: dict[str, Any]
    params: int
    flops: int
    #: what loading ``init_weights`` did, for the progress output ("" when nothing was loaded)
    pretrained_note: str = ""
    #: the training step as a replayed CUDA graph (:class:`reslab.engine.graphed.GraphedStep`)
    #: when ``cuda_graphs`` is on, else None
    graphed: Any = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def check_every(self) -> int:
        """Steps between finiteness checks of the loss: each one syncs with the host, which
        a GPU pays for."""
        return 1 if self.device.type == "cpu" else 25

    @property
    def mid_evals(self) -> set[int]:
        """Steps (1-based, within an epoch) after which the validation set is evaluated
        besides the epoch's end."""
        k = self.cfg.evals_per_epoch
        steps = {round(j * self.steps_per_epoch / k) for j in range(1, k)}
        return steps - {0, self.steps_per_epoch}


@dataclass
class RunState:
    """What changes as a run trains; all of it goes into every checkpoint."""

    start_epoch: int = 1
    step: int = 0
    elapsed: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: every validation (evals_per_epoch > 1 adds some inside epochs: time-to-target at sub-epoch resolution)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def record_epoch(
        self, epoch: int, result: EpochResult, val_loss: float, val_acc: float, epoch_s: float
    ) -> dict[str, Any]:
        """Add a finished epoch; return its metrics.jsonl row."""
        self.elapsed += epoch_s
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_acc": result.acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": result.lr,
            "epoch_s": round(epoch_s, 3),
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(result.images / result.train_s, 1),
        }
        self.metrics.append(row)
        self.evals.append({"epoch": epoch, "step": self.step, "val_loss": val_loss, "val_acc": val_acc})
        if val_acc > self.best_acc:
            self.best_acc, self.best_epoch = val_acc, epoch
        return row


@dataclass
class EpochResult:
    """The training half of an epoch, summed over ranks."""

    loss: float
    acc: float
    images: float
    #: seconds spent training (validations inside the epoch excluded)
    train_s: float
    #: the learning rate of the epoch's last step
    lr: float
