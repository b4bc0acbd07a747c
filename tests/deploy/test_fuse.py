"""reslab.fuse: folded models give the original's eval outputs on real images.

Every model here has its BN statistics, BN affine parameters and technique parameters
randomised away from their init (and the zero-initialised last BN gammas / Fixup convs
made nonzero), so no fold is trivially exact; the reference is the original model's own
eval forward.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import reslab
from reslab.deploy.fuse import technique_leftovers
from reslab.deploy.fused import ChannelAffine, FusedBlock, FusedResNet, load_fused, save_fused
from reslab.errors import UsageError
from reslab.nn.blocks import BasicBlock, Bottleneck, ResidualBlock
from reslab.nn.models import ResNet
from reslab.nn.techniques import ResidualScaling

TECHNIQUES = reslab.list_techniques()
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def images(fashion) -> torch.Tensor:
    """128 real fashion-mnist test images, normalized (N x 1 x 28 x 28, float32)."""
    t = fashion.test_x[:128].float() / 255.0
    return (t - fashion.mean[0]) / fashion.std[0]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and buffer away from its init, whatever its name.

    BatchNorms get random statistics and affine parameters. Every other floating-point
    tensor (a technique's, a conv's, the classifier's): one that still holds a constant
    init value (0, 1, 1e-6...) becomes that value plus noise on the scale of the larger of
    the value and 1 (0.3 of it for scalars and per-channel gains, 0.1 for weights with a
    fan-in, so zero-initialised convs are nonzero and gains take both signs); any other
    is multiplied by ``1 + 0.2 * noise`` per element.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    done: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(rnd(m.running_mean.shape) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.weight.copy_(rnd(m.weight.shape) * 0.4 + 1.0)
                m.bias.copy_(rnd(m.bias.shape) * 0.3)
                done |= {id(m.running_mean), id(m.running_var), id(m.weight), id(m.bias)}
        tensors = [*model.parameters(), *model.buffers()]
        for t in tensors:
            if id(t) in done or not t.is_floating_point() or t.numel() == 0:
                continue
            done.add(id(t))
            first = t.reshape(-1)[0]
            if bool(torch.all(t == first)):
                spread = (0.3 if t[0].numel() == 1 else 0.1) * max(abs(float(first)), 1.0)
                t.copy_(first + spread * rnd(t.shape))
            else:
                t.mul_(1.0 + 0.2 * rnd(t.shape))
    return model


ARCHS = ("basic", "bottleneck", "imagenet-stem")


def build(arch: str, technique: str) -> ResNet:
    if arch == "basic":
        # Two blocks per stage: identity blocks in a row, then projections (stride 2).
        model = reslab.build_model("resnet14", technique=technique, num_classes=10, in_channels=1, width=0.5)
    elif arch == "bottleneck":
        model = ResNet(Bottleneck, (2, 2), (4, 8), num_classes=10, in_channels=1, technique=technique)
    else:
        # 7x7 stride-2 stem with max pool; conv biases on (the article's default).
        model = reslab.build_model(
            "resnet18", technique=technique, num_classes=10, in_channels=1, width=0.125, conv_bias=True
        )
    return randomize(model).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def shortcut_kinds(model: nn.Module) -> set[str]:
    return {
        "identity" if b.downsample is None else "projection" for b in model.modules() if isinstance(b, ResidualBlock)
    }


class Offset(reslab.Technique):
    """A technique with names no other uses: a learnable per-channel shift and a fixed buffer."""

    name = "test_offset"

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.offset_shift = nn.Parameter(torch.zeros(channels, 1, 1))
        block.register_buffer("offset_gain", torch.ones(1))

    def merge(self, block, branch, shortcut):  # type: ignore[no-untyped-def]
        return branch + block.offset_gain * shortcut + block.offset_shift


@pytest.mark.parametrize("technique", [*TECHNIQUES, "offset"])
def test_randomize_moves_every_parameter_and_buffer(technique: str) -> None:
    tech = Offset() if technique == "offset" else technique
    model = ResNet(BasicBlock, (1, 1), (4, 8), num_classes=10, in_channels=1, technique=tech, conv_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    after = randomize(model).state_dict()
    unmoved = [k for k, v in before.items() if bool(torch.any(v == after[k]))]
    assert unmoved == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_fused_model_matches_original(technique: str, arch: str, images: torch.Tensor) -> None:
    model = build(arch, technique)
    assert shortcut_kinds(model) == {"identity", "projection"}
    before = copy.deepcopy(model.state_dict())
    fused = reslab.fuse(model)
    with torch.no_grad():
        want, got = model(images), fused(images)
    assert want.abs().max() > 0.1  # a meaningful comparison, not two near-zero outputs
    assert rel_err(want, got) < REL_TOL
    # Channels-last (NHWC) models and inputs take other code paths; same outputs.
    nhwc = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(want, nhwc(images.contiguous(memory_format=torch.channels_last))) < REL_TOL
    # The input model is untouched.
    assert model.training is False
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # No BatchNorm and no technique parameter is left.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert technique_leftovers(fused) == []
    tech_names = set(reslab.get_technique(technique).parameter_names) | {"input_bias"}
    assert not any(tech_names & set(n.split(".")) for n, _ in fused.named_parameters())
    # Only torch layers and the fused model's own modules are left: nothing from the technique's
    # code (fixup's modules live in reslab.nn.techniques) and no block of the original model.
    kinds = {type(m).__module__ for m in fused.modules()}
    assert all(k.startswith("torch.nn.") or k == FusedResNet.__module__ for k in kinds), kinds


PLAIN = ("baseline", "scale", "norm", "skipinit", "layerscale", "zero_init")


def structure(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Module types and parameter shapes, in order: what 'layer structure' means here."""
    out = [(type(m).__name__, ()) for m in model.modules()]
    out += [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return out


@pytest.mark.parametrize("arch", ("basic", "bottleneck"))
@pytest.mark.parametrize("technique", PLAIN)
def test_plain_techniques_fuse_to_a_plain_resnet(technique: str, arch: str) -> None:
    model = build(arch, technique)
    fused = reslab.fuse(model)
    baseline = reslab.fuse(build(arch, "baseline"))
    assert structure(fused) == structure(baseline)
    for block in (b for b in fused.modules() if isinstance(b, FusedBlock)):
        assert [type(m) for m in block.branch] in (
            [nn.Conv2d, nn.ReLU, nn.Conv2d],
            [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Conv2d],
        )
        assert block.shortcut is None or type(block.shortcut) is nn.Conv2d
        assert isinstance(block.act, nn.ReLU) and block.pre_affine is None
        if technique != "norm":
            # norm's identity shortcut keeps -a as a per-channel multiply in the add
            # (it is negative where a > 0, so it cannot pass through the ReLU).
            assert block.shortcut_scale is None
    # A positive residual scale passes through the ReLUs into the next convs and the
    # classifier: nothing of it is left in the blocks (shortcut_scale is None above). That
    # holds because the scales of the model that was fused are positive, and not all 1.
    if technique == "scale":
        scales = [float(p.detach()) for n, p in model.named_parameters() if n.endswith(".scale")]
        assert scales and all(v > 0 for v in scales) and any(v != 1.0 for v in scales)


def test_negative_scale_stays_an_exact_multiply(images: torch.Tensor) -> None:
    model = build("basic", "scale")
    with torch.no_grad():
        model.layer1[1].scale.fill_(-0.7)
    fused = reslab.fuse(model)
    assert fused.layer1[1].shortcut_scale is not None
    with torch.no_grad():
        assert rel_err(model(images), fused(images)) < REL_TOL


def test_preact_keeps_bn1_as_affine_only_where_the_raw_input_is_needed(images: torch.Tensor) -> None:
    model = build("basic", "preact")
    fused = reslab.fuse(model)
    for orig, blk in zip(
        (b for b in model.modules() if isinstance(b, ResidualBlock)),
        (b for b in fused.modules() if isinstance(b, FusedBlock)),
        strict=True,
    ):
        # An identity shortcut needs x and relu(bn1(x)): bn1 stays as a ChannelAffine.
        # A projection block gets bn1 folded into the previous block, except after the stem.
        if orig.downsample is None:
            assert isinstance(blk.pre_affine, ChannelAffine)
        elif orig is not model.layer1[0]:
            assert blk.pre_affine is None
    assert fused.head_act is not None  # the final BN went into the last block; its ReLU stays


@pytest.mark.parametrize("shortcut", ("identity", "projection"))
@pytest.mark.parametrize("kind", ("basic", "bottleneck"))
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_fused_block_matches_original(technique: str, kind: str, shortcut: str, images: torch.Tensor) -> None:
    stride = 1 if shortcut == "identity" else 2
    if kind == "basic":
        block = BasicBlock(8, 8, stride=stride, technique=technique, conv_bias=True, drop_path_rate=0.2)
    else:
        block = Bottleneck(8, 2, stride=stride, technique=technique, conv_bias=True, drop_path_rate=0.2)
    assert (block.downsample is None) == (shortcut == "identity")
    randomize(block, seed=3).eval()
    # Real images as 8 channels at different contrasts.
    x = images[:32] * torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1) + torch.linspace(-0.5, 0.5, 8).view(1, 8, 1, 1)
    fused = reslab.fuse(block)
    assert isinstance(fused, FusedBlock)
    with torch.no_grad():
        assert rel_err(block(x), fused(x)) < REL_TOL
    assert technique_leftovers(fused) == []


def test_fixup_input_bias_at_padded_borders_is_exact() -> None:
    # conv(x + c) with zero padding is conv(x) + c * sum(W) only away from the borders:
    # a large input bias makes any border error obvious.
    block = BasicBlock(4, 4, technique="fixup").eval()
    randomize(block, seed=5)
    with torch.no_grad():
        block.conv1.input_bias.fill_(3.0)
        block.conv2.input_bias.fill_(-2.0)
    x = torch.rand(2, 4, 9, 9)
    naive = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        naive.weight.copy_(block.conv1.weight)
        naive.bias.copy_(3.0 * block.conv1.weight.sum(dim=(1, 2, 3)))
        exact = block.conv1(x)
        assert rel_err(exact, naive(x)) > 1e-2  # the naive fold is wrong at the borders
        assert rel_err(block(x), reslab.fuse(block)(x)) < REL_TOL


def test_fused_file_roundtrip(tmp_path: Path, images: torch.Tensor) -> None:
    fused = reslab.fuse(build("basic", "fixup"))
    assert isinstance(fused, FusedResNet)
    path = tmp_path / "fused.safetensors"
    save_fused(path, fused, {"input_size": [1, 28, 28]})
    loaded, meta = load_fused(path)
    assert meta["input_size"] == [1, 28, 28] and meta["spec"]["technique"] == "fixup"
    assert loaded.spec == fused.spec
    with torch.no_grad():
        assert torch.equal(loaded(images), fused(images))


def test_forged_layout_is_refused(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    fused = reslab.fuse(build("basic", "baseline"))
    path = tmp_path / "fused.safetensors"
    save_fused(path, fused)
    layout = copy.deepcopy(fused.layout)
    layout["stages"][0][0]["branch"][0]["out"] = 10**6  # would allocate gigabytes if trusted
    meta = {"kind": "fused", "fused": layout}
    forged = tmp_path / "forged.safetensors"
    save_file(load_file(str(path)), str(forged), metadata={"reslab": json.dumps(meta)})
    with pytest.raises(UsageError, match="do not match its layout"):
        load_fused(forged)


def test_refuses_training_mode_unknown_modules_and_techniques() -> None:
    model = reslab.build_model("resnet8", technique="baseline", in_channels=1, width=0.25)
    with pytest.raises(UsageError, match="eval mode"):
        reslab.fuse(model)  # build_model returns a model in training mode
    model.eval()
    odd = copy.deepcopy(model)
    odd.layer1[0].relu = nn.GELU().eval()
    with pytest.raises(UsageError, match="GELU"):
        reslab.fuse(odd)

    class Halved(ResidualScaling):  # same name, different merge: must not be folded as 'scale'
        def merge(self, block, branch, shortcut):  # type: ignore[no-untyped-def]
            return super().merge(block, branch, shortcut) * 0.5

    block = BasicBlock(4, 4, technique=Halved()).eval()
    with pytest.raises(UsageError, match="Halved"):
        reslab.fuse(block)
    no_stats = copy.deepcopy(model)
    no_stats.layer1[0].bn1 = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(UsageError, match="running statistics"):
        reslab.fuse(no_stats)
    with pytest.raises(UsageError):
        reslab.fuse(nn.Sequential(nn.Conv2d(1, 1, 1)).eval())


def test_fusion_identity_shortcut_is_one_accumulated_matmul(images: torch.Tensor, tmp_path: Path) -> None:
    from reslab.deploy.export import export
    from reslab.deploy.predict import load_predictor

    model = build("basic", "fusion")
    fused = reslab.fuse(model)
    blocks = [b for b in fused.modules() if isinstance(b, FusedBlock)]
    originals = [b for b in model.modules() if isinstance(b, ResidualBlock)]
    for orig, blk in zip(originals, blocks, strict=True):
        # W_s on an identity shortcut: a 1x1 conv weight, applied as a matmul into the branch output.
        assert blk.shortcut_matmul == (orig.downsample is None)
        assert isinstance(blk.shortcut, nn.Conv2d) and blk.shortcut.kernel_size == (1, 1)
    # The matmul path survives tracing and torch.export.
    with torch.no_grad():
        want = model(images[:16])
    for fmt, name in (("exported", "f.pt2"), ("torchscript", "f.pt")):
        path = export(fused, {"input_size": [1, 28, 28]}, fmt, tmp_path / name)
        assert rel_err(want, load_predictor(path, trust=True).logits(images[:16])) < REL_TOL
