"""Parameter and FLOP counts of a model, and a technique's overhead over ``baseline``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.nn.models import build_model


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int  # forward FLOPs for one image (a multiply-add counts as 2)

    def overhead(self, base: Cost) -> tuple[float, float]:
        """(params, flops) ratios relative to ``base``."""
        return self.params / base.params, self.flops / base.flops


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Forward FLOPs of ``model`` on one image of ``input_size`` (C, H, W).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix
    products and convolutions; element-wise work (BN, ReLU, adds) is not included.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, input_size: tuple[int, int, int]) -> Cost:
    return Cost(count_params(model), forward_flops(model, input_size))


def describe(
    name: str,
    technique: str,
    input_size: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    **options: Any,
) -> dict[str, Any]:
    """Cost of ``name`` with ``technique`` and its ratio to the same model with ``baseline``."""
    c, _, _ = input_size
    cost = model_cost(build_model(name, technique, num_classes, c, **options), input_size)
    base = model_cost(build_model(name, "baseline", num_classes, c, **options), input_size)
    p_ratio, f_ratio = cost.overhead(base)
    return {
        "model": name,
        "technique": technique,
        "input_size": list(input_size),
        "params": cost.params,
        "flops": cost.flops,
        "baseline_params": base.params,
        "baseline_flops": base.flops,
        "params_ratio": p_ratio,
        "flops_ratio": f_ratio,
    }
