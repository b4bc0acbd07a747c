"""The fast merge kernels against their plain PyTorch formulas (values and gradients)."""

from __future__ import annotations

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
