"""The next coupling network's input gradient added inside the backward kernels (HAS_DA).

The eager Functions that write z_k (ActNormInvConvFunction, CrossStepFunction) return z_k[:, :C_a] as a view output
for the network; its gradient arrives at their backward beside z_k's, and `actnorm_invconv_backward(...,
grad_y_a=)` / `cross_step_backward(..., grad_out_a=)` add it in the kernel. The property: the same gradients as
the backward given the summed gradient (grad + grad_a zero-padded to all channels), for every layout a network may
hand back, and the whole chain's gradients equal the reference's without the two kernels per step autograd used.
Tolerances: tests/tolerances.py (EXACT).
"""

import pytest
import torch

from glowfast import fused
from glowfast.kernels import ActNormInvConvFunction, CrossStepFunction, actnorm_invconv_backward, cross_step_backward
from glowfast.reference import ActNorm2d, InvConv1x1

from helpers import OpLog, make_steps, randomize_
from tolerances import assert_exact, assert_grads_exact


def _layouts(ga: torch.Tensor) -> dict:
    """The same values as NCHW-contiguous, channels_last, a channel slice of a wider tensor (non-contiguous, one
    pixel stride) and H/W-transposed memory (no single pixel stride: made contiguous first)."""
    b, c, h, w = ga.shape
    wider = torch.randn(b, c + 3, h, w, device=ga.device)
    wider[:, 1:c + 1] = ga
    return {"contiguous": ga.contiguous(), "channels_last": ga.contiguous(memory_format=torch.channels_last),
            "slice": wider[:, 1:c + 1], "transposed": ga.transpose(2, 3).contiguous().transpose(2, 3)}


def _padded(ga: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.nn.functional.pad(ga, (0, 0, 0, 0, 0, channels - ga.shape[1]))


def _params(C, device):
    an = randomize_(ActNorm2d(C), scale=0.3).to(device)
    w = randomize_(InvConv1x1(C, lu=True), scale=0.05).to(device).weight_matrix().detach()
    return an.bias.detach(), an.log_scale.detach(), w


@pytest.mark.parametrize("dw_outside", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "transposed"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 13, 3, 4)])
def test_actnorm_invconv_backward_adds_the_network_grad(shape, layout, dw_outside, kernel_device):
    B, C, H, W = shape
    bias, log_scale, w = _params(C, kernel_device)
    x, gy = torch.randn(shape), torch.randn(shape)
    ga = _layouts(torch.randn(B, C // 2, H, W))[layout]
    got = actnorm_invconv_backward(x, gy, bias, log_scale, w, grad_y_a=ga, dw_outside=dw_outside)
    expected = actnorm_invconv_backward(x, gy + _padded(ga, C), bias, log_scale, w, dw_outside=dw_outside)
    assert_grads_exact(list(got), list(expected), ["x", "bias", "log_scale", "W"])


@pytest.mark.parametrize("dw_outside", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice", "transposed"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 13, 3, 4)])
def test_cross_step_backward_adds_the_network_grad(shape, affine, layout, dw_outside, kernel_device):
    B, C, H, W = shape
    cb = C - C // 2
    bias, log_scale, w = _params(C, kernel_device)
    z, g_out = torch.randn(shape), torch.randn(shape)
    h = 0.3 * torch.randn(B, 2 * cb if affine else cb, H, W)
    g_ld = torch.randn(B)
    ga = _layouts(torch.randn(B, C // 2, H, W))[layout]
    got = cross_step_backward(z, h, g_out, g_ld, bias, log_scale, w, affine, grad_out_a=ga, dw_outside=dw_outside)
    expected = cross_step_backward(z, h, g_out + _padded(ga, C), g_ld, bias, log_scale, w, affine,
                                   dw_outside=dw_outside)
    assert_grads_exact(list(got), list(expected), ["z", "h", "bias", "log_scale", "W"])


def test_a_misshapen_network_grad_is_refused(kernel_device):
    bias, log_scale, w = _params(6, kernel_device)
    x, gy = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    for bad in (torch.randn(2, 3, 4, 5), torch.randn(1, 3, 4, 4), torch.randn(2, 7, 4, 4), torch.randn(2, 3, 16)):
        with pytest.raises(ValueError, match="network input's gradient"):
            actnorm_invconv_backward(x, gy, bias, log_scale, w, grad_y_a=bad)


def test_the_functions_return_the_network_input_as_a_view(kernel_device):
    """The view output is y's first channels (shares y's memory), and gradients through both outputs equal
    autograd's through the reference layers; without `network_channels` the Functions return what they did."""
    C = 6
    an = randomize_(ActNorm2d(C), scale=0.3).to(kernel_device)
    inv = randomize_(InvConv1x1(C, lu=True), scale=0.05).to(kernel_device)
    x = torch.randn(2, C, 4, 5, requires_grad=True)
    w = inv.weight_matrix()
    y, ya = ActNormInvConvFunction.apply(x, an.bias, an.log_scale, w, C // 2)
    assert ya._base is y and torch.equal(ya, y[:, :C // 2])
    assert isinstance(ActNormInvConvFunction.apply(x, an.bias, an.log_scale, w), torch.Tensor)
    leaves = [x, an.bias, an.log_scale, inv.lower, inv.upper, inv.log_s]
    proj = torch.randn(y.shape)
    got = torch.autograd.grad((y * proj).sum() + ya.square().sum(), leaves)
    y_ref = inv(an(x)[0])[0]
    expected = torch.autograd.grad((y_ref * proj).sum() + y_ref[:, :C // 2].square().sum(), leaves)
    assert_grads_exact(list(got), list(expected), ["x", "bias", "log_scale", "lower", "upper", "log_s"])

    h = 0.3 * torch.randn(2, 2 * (C - C // 2), 4, 5, requires_grad=True)
    outs = CrossStepFunction.apply(y.detach(), h, an.bias, an.log_scale, w.detach(), True, C // 2)
    assert len(outs) == 3 and outs[2]._base is outs[0]
    assert len(CrossStepFunction.apply(y.detach(), h, an.bias, an.log_scale, w.detach(), True)) == 2


def test_the_chain_adds_no_slice_backward_and_keeps_the_reference_gradients(kernel_device):
    """A fused chain's backward: no slice_backward (autograd's zero-filled copy of each network's input gradient)
    and gradients of every parameter and the input equal to the reference's."""
    steps = make_steps(3, 6, "affine", "invconv", True, kernel_device)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    params = [x, *steps.parameters()]
    y, ld = fused.steps_forward(list(steps), x)
    g_y = torch.randn_like(y)
    with OpLog() as backward:
        got = torch.autograd.grad((y * g_y).sum() + ld.sum(), params)
    assert "aten.slice_backward" not in backward.ops
    z, ld_ref = x, 0
    for s in steps:
        z, ld_k = s(z)
        ld_ref = ld_ref + ld_k
    expected = torch.autograd.grad((z * g_y).sum() + ld_ref.sum(), params)
    assert_exact(y, z, "out", "y")
    assert_grads_exact(list(got), list(expected), [str(i) for i in range(len(params))])
