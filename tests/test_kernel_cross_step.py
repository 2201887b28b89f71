"""Cross-step kernel (step k's coupling + step k+1's ActNorm + 1x1 conv) and the fused whole-step inverse,
vs the reference layers. Tolerances: tests/tolerances.py."""

import pytest
import torch

from glowfast.kernels import apply_cross_step, cross_step_backward, cross_step_forward, step_inverse
from glowfast.reference import FlowStep

from conftest import kernel_devices
from helpers import KERNEL_SHAPES, randomize_
from tolerances import assert_exact, assert_grads_exact

SHAPES = KERNEL_SHAPES
# (permutation, lu) of step k+1: every coupling meets every permutation across the shapes.
PERMS = {"lu": ("invconv", True), "plain": ("invconv", False), "shuffle": ("shuffle", True),
         "reverse": ("reverse", True)}
CASES = [
    pytest.param(shape, coupling, perm, id=f"{'x'.join(map(str, shape[:4]))}-{coupling}-{perm}")
    for i, shape in enumerate(SHAPES)
    for coupling in ("affine", "additive")
    for perm in (("lu", "shuffle") if i % 2 == 0 else ("plain", "reverse"))
]


def make_steps(C, coupling, perm, device):
    permutation, lu = PERMS[perm]
    step_k = randomize_(FlowStep(C, 8, coupling, permutation, lu), scale=0.2).to(device)
    step_next = randomize_(FlowStep(C, 8, coupling, permutation, lu), scale=0.2).to(device)
    return step_k, step_next


def reference(step_k, step_next, z):
    y, ld = step_k.coupling(z)
    u = step_next.actnorm(y)[0]
    return step_next.permute(u)[0], ld


def net_out(step, z):
    return step.coupling.net(z[:, : step.coupling.channels_a])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape,coupling,perm", CASES)
def test_forward(shape, coupling, perm, device, exact_precision):
    B, C, H, W, bp = shape
    step_k, step_next = make_steps(C, coupling, perm, device)
    z = torch.randn(B, C, H, W, device=device)
    with torch.no_grad():
        out_ref, ld_ref = reference(step_k, step_next, z)
        out, ld = cross_step_forward(z, net_out(step_k, z), step_next.actnorm.bias, step_next.actnorm.log_scale,
                                     step_next.permute.weight_matrix(), coupling == "affine",
                                     block_p=bp, programs_per_sample=2)
    assert_exact(out, out_ref, "out", "z_next")
    assert_exact(ld, ld_ref, "logdet", "logdet")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape,coupling,perm", CASES)
def test_backward_all_parameters(shape, coupling, perm, device, exact_precision):
    """Grads of z, step k's coupling network, step k+1's actnorm and W / LU factors."""
    B, C, H, W, _ = shape
    step_k, step_next = make_steps(C, coupling, perm, device)
    z = torch.randn(B, C, H, W, device=device, requires_grad=True)
    params = [z, *step_k.coupling.parameters(), *step_next.actnorm.parameters(), *step_next.permute.parameters()]
    names = ["z", *(f"coupling.{n}" for n, _ in step_k.coupling.named_parameters()),
             *(f"next.actnorm.{n}" for n, _ in step_next.actnorm.named_parameters()),
             *(f"next.permute.{n}" for n, _ in step_next.permute.named_parameters())]
    out_ref, ld_ref = reference(step_k, step_next, z)
    g_out, g_ld = torch.randn_like(out_ref), torch.randn_like(ld_ref)
    expected = torch.autograd.grad((out_ref * g_out).sum() + (ld_ref * g_ld).sum(), params)
    out, ld = apply_cross_step(z, net_out(step_k, z), step_next.actnorm.bias, step_next.actnorm.log_scale,
                               step_next.permute.weight_matrix(), coupling == "affine")
    actual = torch.autograd.grad((out * g_out).sum() + (ld * g_ld).sum(), params)
    assert_grads_exact(actual, expected, names)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_backward_launch_one_program_per_sample(coupling, kernel_device):
    """Standalone backward: one program per sample looping over 4 masked tiles; need_dw=False."""
    step_k, step_next = make_steps(6, coupling, "plain", kernel_device)
    z = torch.randn(2, 6, 7, 9, requires_grad=True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    an, pm = step_next.actnorm, step_next.permute
    # the reference coupling restated with h as a leaf, so grad h is checked directly
    cb = 3
    if coupling == "affine":
        shift, raw = h[:, :cb], h[:, cb:]
        y = torch.cat([z[:, :3], (z[:, 3:] + shift) * torch.sigmoid(raw + 2.0)], 1)
        ld_ref = (-torch.nn.functional.softplus(-(raw + 2.0))).flatten(1).sum(1)
    else:
        y = torch.cat([z[:, :3], z[:, 3:] + h], 1)
        ld_ref = torch.zeros(2)
    out_ref = pm(an(y)[0])[0]
    g_out, g_ld = torch.randn_like(out_ref), torch.randn(2)
    loss = (out_ref * g_out).sum() + (ld_ref * g_ld).sum()
    gz, gh, gb, gls = torch.autograd.grad(loss, [z, h, an.bias, an.log_scale])
    dz, dh, db, dls, dw = cross_step_backward(z.detach(), h.detach(), g_out, g_ld, an.bias, an.log_scale,
                                              pm.weight, coupling == "affine", need_dw=False, block_p=16,
                                              programs_per_sample=1)
    assert dw is None
    for a, e, n in ((dz, gz, "z"), (dh, gh, "h"), (db, gb, "bias"), (dls, gls, "log_scale")):
        assert_exact(a, e, "grad", n)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape,coupling,perm", CASES)
def test_step_inverse(shape, coupling, perm, device, exact_precision):
    """x = actnorm^-1(W^-1 @ coupling^-1(y, NN(y_a))) in one kernel == FlowStep.inverse."""
    B, C, H, W, bp = shape
    step, _ = make_steps(C, coupling, perm, device)
    y = torch.randn(B, C, H, W, device=device)
    with torch.no_grad():
        x_ref = step.inverse(y)
        w_inv = torch.linalg.inv(step.permute.weight_matrix().double()).float()
        x = step_inverse(y, net_out(step, y), step.actnorm.bias, step.actnorm.log_scale, w_inv,
                         coupling == "affine", block_p=bp)
    assert_exact(x, x_ref, "out", "x")
