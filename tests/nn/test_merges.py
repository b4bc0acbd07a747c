"""The fast merge kernels against their plain PyTorch formulas (values and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reslab.nn.ops import add_scaled, add_scaled_lean, concat_conv1x1_cat, concat_conv1x1_split, fused_concat_conv1x1


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither format: a transposed view
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


@pytest.mark.parametrize("gain_shape", [(1,), (5, 1, 1)], ids=["scalar", "per-channel"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("form", [add_scaled_lean, torch.addcmul], ids=["cpu-form", "gpu-form"])
def test_add_scaled_gradcheck(gain_shape: tuple[int, ...], layout: str, form) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _layout(torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=gen), layout).requires_grad_()
    y = _layout(torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=gen), layout).requires_grad_()
    gain = torch.randn(gain_shape, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(form, (x, gain, y))
    # And against the plain formula's gradients in float32 at a realistic size.
    x32, y32, g32 = (t.detach().float().requires_grad_() for t in (x, y, gain))
    out = form(x32, g32, y32)
    ref_in = [t.detach().clone().requires_grad_() for t in (x32, g32, y32)]
    ref = ref_in[0] + ref_in[1] * ref_in[2]
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    for ours, theirs in zip((x32.grad, g32.grad, y32.grad), (t.grad for t in ref_in), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_add_scaled_without_grad_is_addcmul() -> None:
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    gain = torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(add_scaled(x, gain, y), torch.addcmul(x, gain, y))


@pytest.mark.parametrize("form", [concat_conv1x1_split, concat_conv1x1_cat], ids=["cpu-form", "gpu-form"])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("add_identity", [False, True])
def test_fused_concat_conv_matches_cat_then_conv(layout: str, add_identity: bool, groups: int, form) -> None:
    """Against each group's own ``conv1x1(cat[a_g, b_g]) (+ a_g)``: ``groups`` layers side by
    side, as a pack of that many runs holds them."""
    gen = torch.Generator().manual_seed(1)
    c = 4
    a = _layout(torch.randn(2, groups * c, 5, 5, dtype=torch.float64, generator=gen), layout).requires_grad_()
    b = _layout(torch.randn(2, groups * c, 5, 5, dtype=torch.float64, generator=gen), layout).requires_grad_()
    w = torch.randn(groups * c, 2 * c, 1, 1, dtype=torch.float64, generator=gen).requires_grad_()
    bias = torch.randn(groups * c, dtype=torch.float64, generator=gen).requires_grad_()

    def reference(a, b, w, bias):
        outs = []
        for g in range(groups):
            part = slice(g * c, (g + 1) * c)
            out = F.conv2d(torch.cat([a[:, part], b[:, part]], dim=1), w[part], bias[part])
            outs.append(a[:, part] + out if add_identity else out)
        return torch.cat(outs, dim=1)

    def ours(a, b, w, bias):
        return form(a, b, w, bias, add_identity=add_identity)

    torch.testing.assert_close(ours(a, b, w, bias), reference(a, b, w, bias))
    assert torch.autograd.gradcheck(ours, (a, b, w, bias))


def test_the_cpu_takes_the_lean_forms() -> None:
    """What the CPU runs is the form measured faster there (the GPU's is tested in test_cuda)."""
    x, y, gain = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.5], requires_grad=True)
    assert type(add_scaled(x, gain, y).grad_fn).__name__ == "_AddScaledBackward"
    w = torch.randn(3, 6, 1, 1, requires_grad=True)
    assert type(fused_concat_conv1x1(x, y, w, None, True).grad_fn).__name__ == "AddBackward0"
    assert type(concat_conv1x1_cat(x, y, w, None, False).grad_fn).__name__ == "ConvolutionBackward0"


def test_the_built_in_blocks_fold_the_gains_of_skipinit_and_layerscale() -> None:
    from reslab.nn.blocks import BasicBlock
    from reslab.nn.techniques import list_techniques

    folded = {name for name in list_techniques() if BasicBlock(4, 4, technique=name).norm_gain() is not None}
    assert folded >= {"skipinit", "layerscale"}


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("technique", ["skipinit", "layerscale"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "basic-projection"])
def test_a_branch_gain_in_the_last_batchnorm_is_the_merge_s_plus_g_times_f(
    technique: str, kind: str, momentum: float | None
) -> None:
    """A block folds ``s + g * F(x)`` into its last BatchNorm's affine (``norm_gain``): against
    the formula written out with the block's own layers, in float64, in training (output, every
    gradient, the running statistics and counter after two steps) and in evaluation."""
    from reslab.nn.blocks import BasicBlock, Bottleneck

    torch.manual_seed(0)
    if kind == "bottleneck":
        block = Bottleneck(16, 4, technique=technique).double()
    elif kind == "basic-projection":
        block = BasicBlock(8, 16, stride=2, technique=technique).double()
    else:
        block = BasicBlock(8, 8, technique=technique).double()
    gain = block.technique.branch_gain(block)
    with torch.no_grad():  # off their init (zero for skipinit), different per channel
        gain.copy_(torch.rand(gain.shape, dtype=torch.float64) + 0.5)
        for p in block.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    assert block.norm_gain() is gain
    block.last_norm_layer().momentum = momentum
    reference = copy.deepcopy(block)

    def by_formula(b: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        convs = b.branch_convs()
        out = x
        for i, conv in enumerate(convs):  # conv, BatchNorm, ReLU but after the last
            out = getattr(b, f"bn{i + 1}")(conv(out))
            out = F.relu(out) if i < len(convs) - 1 else out
        shortcut = x if b.downsample is None else b.downsample(x)
        return F.relu(shortcut + b.technique.branch_gain(b) * out)

    x = torch.randn(3, block.conv1.in_channels, 6, 6, dtype=torch.float64)
    block(x + 1)  # a first step each: the statistics move off their init
    by_formula(reference, x + 1)
    out, want = block(x), by_formula(reference, x)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    for (name, p), q in zip(block.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(block.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)
    block.eval()
    reference.eval()
    torch.testing.assert_close(block(x), by_formula(reference, x))


def test_a_subclass_that_changes_the_merge_but_inherits_the_gain_keeps_its_merge() -> None:
    """``s + 2 * alpha * F(x)`` in a subclass of skipinit: the inherited ``branch_gain`` no
    longer describes the merge, so the block calls the merge (as ``fuse`` refuses an
    inherited ``fold_merge``)."""
    from reslab.nn.blocks import BasicBlock
    from reslab.nn.techniques import SkipInit

    class Doubled(SkipInit):
        def merge(self, block, branch, shortcut):
            return shortcut + 2 * block.alpha * branch

    torch.manual_seed(0)
    block = BasicBlock(4, 4, technique=Doubled()).eval()
    with torch.no_grad():
        block.alpha.fill_(0.7)
    assert block.norm_gain() is None
    x = torch.randn(2, 4, 5, 5)
    branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    torch.testing.assert_close(block(x), F.relu(x + 1.4 * branch))


@pytest.mark.parametrize("technique", ["skipinit", "layerscale"])
def test_a_folded_gain_traces_to_torchscript_and_leaves_the_model_as_it_was(technique: str) -> None:
    """``reslab export --no-fuse --format torchscript`` traces the unfused model: the fold reads
    the BatchNorm's parameters and never swaps them (which tracing refuses, and which threads
    sharing one model would see half done)."""
    from reslab.nn.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", technique=technique, num_classes=10, in_channels=1, width=0.25).eval()
    before = {n: (type(p), p.data_ptr()) for n, p in model.named_parameters()}
    x = torch.randn(2, 1, 28, 28)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
    assert {n: (type(p), p.data_ptr()) for n, p in model.named_parameters()} == before
