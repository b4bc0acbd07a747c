"""reslab's blocks against the source article's own classes, transcribed as written.

The article (described in docs/article.md) gives one ``ResidualBlock`` class per
technique. They are copied here line by line (only the class names differ) as the
independent reference: our BasicBlock with ``conv_bias=True`` must accept each class's
state dict strictly and compute the same function in train and eval mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from reslab import BasicBlock


class ArticleBaseline(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ArticleScale(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += self.scale * identity
        out = self.relu(out)
        return out


class ArticleNorm(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.residual_norm = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += self.residual_norm(out - identity)
        out = self.relu(out)
        return out


class ArticleFusion(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.feature_fusion = nn.Conv2d(out_channels * 2, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += self.feature_fusion(torch.cat([out, identity], dim=1))
        out = self.relu(out)
        return out


ARTICLE = {"baseline": ArticleBaseline, "scale": ArticleScale, "norm": ArticleNorm, "fusion": ArticleFusion}


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


@pytest.mark.parametrize("technique", list(ARTICLE))
@pytest.mark.parametrize("cin,cout,stride", [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_matches_article_class(technique: str, cin: int, cout: int, stride: int, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    down = _projection(cin, cout, stride) if stride != 1 or cin != cout else None
    ref = ARTICLE[technique](cin, cout, stride, down)
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


@pytest.mark.parametrize("technique", list(ARTICLE))
def test_article_parameter_names(technique: str) -> None:
    ref = ARTICLE[technique](4, 4)
    ours = BasicBlock(4, 4, technique=technique, conv_bias=True)
    assert list(ref.state_dict()) == list(ours.state_dict())
