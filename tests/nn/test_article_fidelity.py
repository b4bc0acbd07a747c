"""reslab's blocks against an independent reference of the source article's blocks.

The reference below is written for this test from what the article states, not from its
code: each block has a branch ``F = bn2(conv2(relu(bn1(conv1(x)))))`` of 3x3 convs with a
bias (PyTorch's default ``bias=True``), the shortcut ``s`` is ``x`` or, when the shape
changes, a projection, and a ReLU follows the merge. The three techniques differ only in
the merge and the parameter they add to the block, under the article's names:

* ``scale``: ``F + scale * s``, ``scale = nn.Parameter(torch.ones(1))``;
* ``norm``: ``F + residual_norm(F - s)``, ``residual_norm = BatchNorm2d(C)``;
* ``fusion``: ``F + feature_fusion(cat[F, s])``, ``feature_fusion = Conv2d(2C, C, 1)`` with a bias.

reslab's BasicBlock with ``conv_bias=True`` must load the reference's state dict strictly
(same keys, same order, same shapes) and compute the same outputs, gradients and BN
statistics in train and eval mode. The mutation test shows the comparison would catch a
wrong formula or a misplaced ReLU: each plausible mistake, written into the reference,
makes it disagree with reslab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from reslab import BasicBlock

Merge = Callable[[nn.Module, Tensor, Tensor], Tensor]

# The article's merges, F = branch output, s = shortcut.
MERGES: dict[str, Merge] = {
    "baseline": lambda blk, f, s: f + s,
    "scale": lambda blk, f, s: f + blk.scale * s,
    "norm": lambda blk, f, s: f + blk.residual_norm(f - s),
    "fusion": lambda blk, f, s: f + blk.feature_fusion(torch.cat([f, s], dim=1)),
}

# Plausible ways to get each merge wrong; the reference must tell every one from reslab.
MUTANTS: dict[str, dict[str, Merge]] = {
    "baseline": {"no shortcut": lambda blk, f, s: f, "difference": lambda blk, f, s: f - s},
    "scale": {
        "scale ignored": lambda blk, f, s: f + s,
        "scale on the branch": lambda blk, f, s: blk.scale * f + s,
    },
    "norm": {
        "reversed difference": lambda blk, f, s: f + blk.residual_norm(s - f),
        "shortcut kept": lambda blk, f, s: s + blk.residual_norm(f - s),
    },
    "fusion": {
        "swapped concatenation": lambda blk, f, s: f + blk.feature_fusion(torch.cat([s, f], dim=1)),
        "shortcut kept": lambda blk, f, s: s + blk.feature_fusion(torch.cat([f, s], dim=1)),
    },
}


class ReferenceBlock(nn.Module):
    """One article block: ``relu(merge(F, s))`` (``relu_after=False``: ``merge(relu(F), s)``, a mutant)."""

    def __init__(
        self,
        technique: str,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        merge: Merge | None = None,
        relu_after: bool = True,
    ) -> None:
        super().__init__()
        # Registration order decides the state-dict order, which must be the article's.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        if technique == "scale":
            self.scale = nn.Parameter(torch.ones(1))
        elif technique == "norm":
            self.residual_norm = nn.BatchNorm2d(out_channels)
        elif technique == "fusion":
            self.feature_fusion = nn.Conv2d(2 * out_channels, out_channels, 1, bias=True)
        self.merge = merge or MERGES[technique]
        self.relu_after = relu_after

    def forward(self, x: Tensor) -> Tensor:
        f = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        s = x if self.downsample is None else self.downsample(x)
        if not self.relu_after:
            return self.merge(self, torch.relu(f), s)
        return torch.relu(self.merge(self, f, s))


TECHNIQUES = list(MERGES)


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Move every parameter and BN statistic off its init so no term can hide at 0 or 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "weight" in name else 0.2))
            if name.endswith("scale"):
                p.fill_(-0.7)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _reference_and_ours(
    technique: str, cin: int, cout: int, stride: int, gen: torch.Generator, **reference: Any
) -> tuple[ReferenceBlock, BasicBlock]:
    """A randomized reference block (``reference``: its merge and ReLU placement) and reslab's
    BasicBlock holding the same state dict, loaded strictly."""
    down = _projection(cin, cout, stride) if stride != 1 or cin != cout else None
    ref = ReferenceBlock(technique, cin, cout, stride, down, **reference)
    _randomize(ref, gen)
    ours = BasicBlock(
        cin,
        cout,
        stride,
        downsample=_projection(cin, cout, stride) if down is not None else None,
        technique=technique,
        conv_bias=True,
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_matches_article_class(technique: str, cin: int, cout: int, stride: int, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    ref, ours = _reference_and_ours(technique, cin, cout, stride, gen)

    x = torch.randn(6, cin, 10, 10, generator=gen)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        ref = ref.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        x_ref = x.clone().requires_grad_()
        x_ours = x.clone().requires_grad_()
        y_ref = ref(x_ref)
        y_ours = ours(x_ours)
        assert (y_ref - y_ours).abs().max().item() < 1e-5, f"{technique} train={train}"
        # The gradients must agree too: the fast merges rewrite the arithmetic.
        g = torch.randn(y_ref.shape, generator=gen)
        y_ref.backward(g)
        y_ours.backward(g)
        assert (x_ref.grad - x_ours.grad).abs().max().item() < 1e-4
        for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
            assert n1 == n2
            assert (p1.grad - p2.grad).abs().max().item() < 1e-4, n1
            p1.grad = None
            p2.grad = None
    # Train mode updated the BN running statistics identically.
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), ours.named_buffers(), strict=True):
        assert n1 == n2
        assert torch.allclose(b1.float(), b2.float(), atol=1e-6), n1


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_article_parameter_names(technique: str) -> None:
    ref = ReferenceBlock(technique, 4, 4)
    ours = BasicBlock(4, 4, technique=technique, conv_bias=True)
    assert list(ref.state_dict()) == list(ours.state_dict())


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
def test_every_mutant_of_the_reference_disagrees_with_reslab(technique: str, cin: int, cout: int, stride: int) -> None:
    """The comparison above is sensitive: a wrong formula or a misplaced ReLU would fail it."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, cin, 10, 10, generator=gen)
    cases = [(label, merge, True) for label, merge in MUTANTS[technique].items()]
    cases.append(("ReLU on the branch instead of after the merge", MERGES[technique], False))
    for label, merge, relu_after in cases:
        mutant, ours = _reference_and_ours(technique, cin, cout, stride, gen, merge=merge, relu_after=relu_after)
        for train in (True, False):
            mutant.train(train)
            ours.train(train)
            with torch.no_grad():
                gap = (mutant(x) - ours(x)).abs().max().item()
            assert gap > 1e-2, f"{technique}: the mutant '{label}' (train={train}) is not told apart"
