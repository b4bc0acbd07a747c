"""The optimizer's settings over a run: the learning-rate schedule and which parameters decay."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from reslab.engine.config import TrainConfig

#: the ``step`` schedule: the fractions of all steps at which the learning rate is multiplied
#: by :data:`STEP_FACTOR`
STEP_MILESTONES = (0.5, 0.75)
STEP_FACTOR = 0.1


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``.

    Warm-up rises linearly to ``cfg.lr`` over the first ``warmup * total`` steps; then
    ``onecycle`` decays linearly to zero at the last step, ``cosine`` follows half a
    cosine to zero, ``step`` divides ``cfg.lr`` by 10 at half and again at three quarters
    of all steps (He et al. 2016's CIFAR schedule: 32k and 48k of 64k iterations) and
    ``constant`` stays at ``cfg.lr``.
    """
    warm = round(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * STEP_FACTOR ** sum(step >= round(m * total) for m in STEP_MILESTONES)
    span = max(total - warm, 1)
    t = (step - warm) / span  # 0 at the peak, approaching 1 at the end
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr * (1.0 - t)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: BatchNorm affine parameters, biases,
    and the techniques' gains (scale, alpha, gamma, Fixup scalars) are left undecayed,
    since shrinking them towards zero changes what the block computes, not its capacity."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
