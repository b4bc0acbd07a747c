"""Input normalisation: ``(pixel - mean) / std`` per channel, pixels in [0, 1], with the
training data's statistics (:class:`reslab.engine.data.ArrayDataset`'s ``mean``/``std``, kept in a
saved model's metadata). Training, the probe, export and predict all normalise here, so a
model sees the same inputs wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class Normalize:
    """The per-channel normalisation of one dataset.

    Two entry points, one rule: :meth:`from_uint8` for 0..255 images (the training hot
    loop: one fused multiply-add per pixel, with the 1/255 folded into the scale) and
    :meth:`from_unit` for float images already in [0, 1] (probe batches, inputs to
    predict). They agree up to float32 rounding; each keeps the exact arithmetic its
    callers have always had, so outputs stay bit-identical across versions.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | None = None) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)
        self.shift = -self.mean / self.std

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], channels: int) -> Normalize:
        """The normalisation a saved model was trained with; none (mean 0, std 1) when its
        metadata does not say."""
        return cls(metadata.get("mean") or [0.0] * channels, metadata.get("std") or [1.0] * channels)

    def from_uint8(self, x: Tensor, channels_last: bool = False) -> Tensor:
        """A uint8 batch (N, C, H, W) as normalised float32, in the memory format asked for."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.addcmul(self.shift, x.to(torch.float32, memory_format=fmt), self.scale)

    def from_unit(self, x: Tensor) -> Tensor:
        """A float batch (N, C, H, W) of pixels in [0, 1], normalised."""
        return (x - self.mean) / self.std
