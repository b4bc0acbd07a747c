"""Models, blocks and techniques against torchvision and closed-form properties."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import reslab
from reslab import BasicBlock, Bottleneck, build_model, cifar_resnet, list_techniques
from reslab.nn.describe import describe, forward_flops
from reslab.nn.techniques import FixupScaleBias

ALL = list_techniques()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_matches_torchvision(name: str) -> None:
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    ours = build_model(name, technique="baseline", num_classes=1000, in_channels=3).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def test_cifar_parameter_count() -> None:
    # He et al. 2016 report 0.27M parameters for ResNet-20 with zero-padding shortcuts.
    # Ours uses projection shortcuts: add two 1x1 convs + BN (16->32, 32->64).
    model = build_model("resnet20", num_classes=10, in_channels=3)
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    n = sum(p.numel() for p in model.parameters())
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9) + (32 * 64 * 9 + 5 * 64 * 64 * 9)
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    fc = 64 * 10 + 10
    assert n - extra == convs + bns + fc
    assert round((n - extra) / 1e6, 2) == 0.27


def _conv_flops(cin: int, cout: int, k: int, hw: int) -> int:
    return 2 * cin * cout * k * k * hw


def test_flops_closed_form() -> None:
    # ResNet-20 on 1x28x28: stage maps are 28, 14 and 7 pixels wide.
    expected = _conv_flops(1, 16, 3, 28 * 28)
    expected += 6 * _conv_flops(16, 16, 3, 28 * 28)
    expected += _conv_flops(16, 32, 3, 14 * 14) + 5 * _conv_flops(32, 32, 3, 14 * 14) + _conv_flops(16, 32, 1, 14 * 14)
    expected += _conv_flops(32, 64, 3, 7 * 7) + 5 * _conv_flops(64, 64, 3, 7 * 7) + _conv_flops(32, 64, 1, 7 * 7)
    expected += 2 * 64 * 10
    model = build_model("resnet20", in_channels=1)
    assert forward_flops(model, (1, 28, 28)) == expected
    # Fusion adds a 1x1 conv from 2C to C channels per block.
    fusion_extra = (
        3 * _conv_flops(32, 16, 1, 28 * 28) + 3 * _conv_flops(64, 32, 1, 14 * 14) + 3 * _conv_flops(128, 64, 1, 7 * 7)
    )
    d = describe("resnet20", "fusion", (1, 28, 28))
    assert d["baseline_flops"] == expected
    assert d["flops"] == expected + fusion_extra
    assert d["flops_ratio"] == pytest.approx((expected + fusion_extra) / expected)


@pytest.mark.parametrize("technique", ALL)
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("stride", [1, 2])
def test_one_train_step(technique: str, kind: str, stride: int) -> None:
    torch.manual_seed(0)
    if kind == "basic":
        block = BasicBlock(8, 8 * stride, stride=stride, technique=technique)
        out_channels = 8 * stride
    else:
        block = Bottleneck(16, 4 * stride, stride=stride, technique=technique)
        out_channels = 16 * stride
    assert (block.downsample is not None) == (stride == 2)
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_channels, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, block.conv1.in_channels, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    touched: set[str] = set()
    # Two steps: techniques that start the branch at zero (skipinit, zero_init, fixup)
    # only open it in the first step, so some weights see their first gradient in the second.
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if p.grad.abs().sum() > 0:
                touched.add(name)
        opt.step()
    assert touched == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("technique", ["skipinit", "zero_init"])
def test_zero_branch_techniques_are_relu_at_init(kind: str, technique: str) -> None:
    torch.manual_seed(0)
    block = BasicBlock(8, 8, technique=technique) if kind == "basic" else Bottleneck(16, 4, technique=technique)
    x = torch.randn(5, block.conv1.in_channels, 6, 6)
    for train in (True, False):
        block.train(train)
        assert torch.equal(block(x.clone()), torch.relu(x))
    # With a projection shortcut the block is ReLU of the projection.
    block = BasicBlock(8, 16, 2, technique=technique) if kind == "basic" else Bottleneck(16, 8, 2, technique=technique)
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(block.downsample(x)))


def test_layerscale_init_value() -> None:
    block = BasicBlock(4, 4, technique="layerscale")
    assert torch.equal(block.gamma, torch.full((4, 1, 1), 1e-6))
    block = BasicBlock(4, 4, technique="layerscale", technique_args={"init_value": 0.1})
    assert torch.equal(block.gamma, torch.full((4, 1, 1), 0.1))
    model = build_model("resnet8", technique="layerscale", technique_args={"init_value": 1e-3})
    assert all(torch.equal(b.gamma, torch.full_like(b.gamma, 1e-3)) for _, b in reslab.residual_blocks(model))


class _CountedInit(reslab.Technique):
    """The plain merge, recording every init rule applied (a private instance, not registered)."""

    def __init__(self) -> None:
        self.blocks: list[nn.Module] = []
        self.models: list[nn.Module] = []

    def init_block(self, block: nn.Module, num_blocks: int) -> None:
        self.blocks.append(block)

    def init_model(self, model: nn.Module) -> None:
        self.models.append(model)


@pytest.mark.parametrize("kind", [BasicBlock, Bottleneck])
def test_a_model_initialises_each_block_once(kind: type[nn.Module]) -> None:
    tech = _CountedInit()
    model = reslab.nn.models.ResNet(kind, (2, 1), (4, 8), technique=tech)
    blocks = [b for _, b in reslab.residual_blocks(model)]
    assert len(blocks) == 3
    assert len(tech.blocks) == 3 and {id(b) for b in tech.blocks} == {id(b) for b in blocks}
    assert tech.models == [model]
    # a block built on its own initialises itself, once; init=False leaves it to its owner
    alone = _CountedInit()
    block = kind(16, 4 if kind is Bottleneck else 16, technique=alone)
    assert alone.blocks == [block]
    deferred = _CountedInit()
    kind(16, 4 if kind is Bottleneck else 16, technique=deferred, init=False)
    assert deferred.blocks == []


def test_zero_init_last_survives_the_models_he_init() -> None:
    # the block's rule runs after the model's He init, which sets every BatchNorm weight to 1
    model = build_model("resnet8", technique="zero_init")
    for _, b in reslab.residual_blocks(model):
        assert torch.count_nonzero(b.last_norm_layer().weight) == 0
        assert torch.all(b.bn1.weight == 1)


def test_fixup_init_and_bound() -> None:
    """Fixup ResNet-110 at init: logits exactly 0, and the feature scale bounded by e^2.

    Derivation. A He-initialised conv (weight variance 2/fan_in) maps an input with
    second moment q to pre-activations with second moment 2q; ReLU of a symmetric
    variable halves it. Fixup scales the first conv of each 2-layer branch by
    c = L^(-1/2), so with the last conv at *any* He-scale value (as after training
    begins), the branch adds 2 c^2 q = 2q/L to a block's second moment and
    E[x_{l+1}^2] <= E[x_l^2] (1 + 2/L) (the final ReLU can only lower it). Projection
    shortcuts (1x1, He fan_out over twice the channels) preserve q. Over L blocks
    E[x_L^2] / E[x_0^2] <= (1 + 2/L)^L < e^2. Without Fixup's scaling the same network
    (no BN) would grow like 3^L.
    """
    torch.manual_seed(0)
    model = build_model("resnet110", technique="fixup", in_channels=1).eval()
    blocks = [b for _, b in reslab.residual_blocks(model)]
    L = len(blocks)
    assert L == 54
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for b in blocks:
        assert torch.count_nonzero(b.conv2.weight) == 0
        expected_std = math.sqrt(2.0 / (b.conv1.in_channels * 9)) * L**-0.5
        assert b.conv1.weight.std().item() == pytest.approx(expected_std, rel=0.1)
        assert isinstance(b.bn2, FixupScaleBias)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.count_nonzero(model(x)) == 0
        for b in blocks:  # the last layer as it might be after some training: He scale
            nn.init.kaiming_normal_(b.conv2.weight, mode="fan_in", nonlinearity="relu")
        x0 = model.relu(model.bn1(model.conv1(x)))
        h = x0
        for stage in model.stages():
            h = stage(h)
        ratio = h.pow(2).mean().item() / x0.pow(2).mean().item()
        assert 0.1 < ratio < math.e**2
        # The bound is Fixup's doing: undo its L^(-1/2) scaling and the scale explodes.
        for b in blocks:
            b.conv1.weight.mul_(L**0.5)
        h = x0
        for stage in model.stages():
            h = stage(h)
        assert h.pow(2).mean().item() / x0.pow(2).mean().item() > 1e6


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid techniques: baseline, scale, norm, fusion"):
        build_model("resnet20", technique="nope")
    with pytest.raises(ValueError, match="valid models: resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(21)


@pytest.mark.parametrize("technique", ["fixup", "preact"])
def test_incompatible_options_are_refused(technique: str) -> None:
    with pytest.raises(ValueError, match="zero_init_last needs a BatchNorm"):
        build_model("resnet20", technique=technique, zero_init_last=True)


def test_unknown_option_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown model options"):
        build_model("resnet20", depth=3)
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_model("resnet20", drop_path_rate=1.0)
    with pytest.raises(ValueError, match="technique arguments"):
        BasicBlock(4, 4, technique=reslab.get_technique("layerscale"), technique_args={"init_value": 1.0})
    with pytest.raises(ValueError, match="does not take arguments"):
        build_model("resnet20", technique="scale", technique_args={"init_value": 1.0})


def test_zero_init_last_combines_with_other_techniques() -> None:
    model = build_model("resnet8", technique="norm", zero_init_last=True)
    for _, b in reslab.residual_blocks(model):
        assert torch.count_nonzero(b.bn2.weight) == 0
        assert torch.equal(b.residual_norm.weight, torch.ones_like(b.residual_norm.weight))


@pytest.mark.parametrize("technique", ALL)
def test_drop_path_combines_with_every_technique(technique: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", technique=technique, in_channels=1, drop_path_rate=0.5)
    rates = [b.drop_path.p for _, b in reslab.residual_blocks(model)]
    assert rates == pytest.approx([0.5 / 3, 1.0 / 3, 0.5])  # linear in depth (Huang et al.)
    x = torch.randn(8, 1, 12, 12)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no randomness in eval


def test_drop_path_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    dp = reslab.DropPath(0.3).train()
    x = torch.ones(200_000, 1, 1, 1)
    y = dp(x)
    kept = (y != 0).float().mean().item()
    # Binomial(200k, 0.7): 5 standard deviations is about 0.005.
    assert kept == pytest.approx(0.7, abs=0.006)
    assert torch.all((y == 0) | torch.isclose(y, torch.tensor(1 / 0.7)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("technique", ALL)
def test_every_technique_builds_every_family(technique: str) -> None:
    for name, size in (("resnet20", 16), ("resnet50", 32)):
        model = build_model(name, technique=technique, num_classes=7, in_channels=2)
        out = model(torch.randn(2, 2, size, size))
        assert out.shape == (2, 7)
        assert model.spec.technique == technique


def test_channels_last_safe_avoids_the_small_strided_1x1_conv() -> None:
    """oneDNN's channels_last backward of a 1x1 stride-2 conv with 2-7 input channels
    corrupts the heap on AVX2-only CPUs (torch 2.14.1); the engine then runs NCHW."""
    from reslab.nn.models import channels_last_safe

    assert not channels_last_safe(build_model("resnet8", width=0.25, in_channels=1))  # 4 -> 8 projection
    assert channels_last_safe(build_model("resnet8", width=0.5, in_channels=1))  # 8 -> 16 is fine
    assert channels_last_safe(build_model("resnet8", width=0.25, in_channels=1), "meta")
