"""The fast merge kernels against their plain PyTorch formulas (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reslab.nn.ops import add_scaled, fused_concat_conv1x1


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither format: a transposed view
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous()


@pytest.mark.parametrize("gain_shape", [(1,), (5, 1, 1)], ids=["scalar", "per-channel"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_add_scaled_gradcheck(gain_shape: tuple[int, ...], layout: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _layout(torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=gen), layout).requires_grad_()
    y = _layout(torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=gen), layout).requires_grad_()
    gain = torch.randn(gain_shape, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(add_scaled, (x, gain, y))
    # And against the plain formula's gradients in float32 at a realistic size.
    x32, y32, g32 = (t.detach().float().requires_grad_() for t in (x, y, gain))
    out = add_scaled(x32, g32, y32)
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


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("add_identity", [False, True])
def test_fused_concat_conv_matches_cat_then_conv(layout: str, add_identity: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    a = _layout(torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen), layout).requires_grad_()
    b = _layout(torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen), layout).requires_grad_()
    w = torch.randn(4, 8, 1, 1, dtype=torch.float64, generator=gen).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()

    def reference(a, b, w, bias):
        out = F.conv2d(torch.cat([a, b], dim=1), w, bias)
        return a + out if add_identity else out

    def ours(a, b, w, bias):
        return fused_concat_conv1x1(a, b, w, bias, add_identity=add_identity)

    torch.testing.assert_close(ours(a, b, w, bias), reference(a, b, w, bias))
    assert torch.autograd.gradcheck(ours, (a, b, w, bias))
