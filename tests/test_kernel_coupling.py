"""Fused coupling kernels vs the reference AffineCoupling / AdditiveCoupling (network output h given).

The network runs in torch in both paths; the fused Function receives h = coupling.net(z_a), so gradients of
the network parameters are checked too (they arrive through grad h). Tolerances: tests/tolerances.py.
"""

import pytest
import torch

from glowfast.kernels import apply_coupling, coupling_backward, coupling_forward, coupling_inverse
from glowfast.reference import AdditiveCoupling, AffineCoupling

from conftest import kernel_devices
from helpers import KERNEL_SHAPES, randomize_
from tolerances import assert_exact, assert_grads_exact

SHAPES = KERNEL_SHAPES
COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling}


def make_coupling(kind, C, device):
    return randomize_(COUPLINGS[kind](C, hidden_channels=8), scale=0.2).to(device)


def net_out(layer, z):
    return layer.net(z[:, : layer.channels_a])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kind", list(COUPLINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-bp{s[4]}")
def test_forward_and_inverse(shape, kind, device, exact_precision):
    B, C, H, W, bp = shape
    layer = make_coupling(kind, C, device)
    z = torch.randn(B, C, H, W, device=device)
    with torch.no_grad():
        y_ref, ld_ref = layer(z)
        h = net_out(layer, z)
        y, ld = coupling_forward(z, h, kind == "affine", block_p=bp, programs_per_sample=2)
        assert_exact(y, y_ref, "out", "y")
        assert_exact(ld, ld_ref, "logdet", "logdet")
        z_back = coupling_inverse(y_ref, h, kind == "affine", block_p=bp)
        assert_exact(z_back, layer.inverse(y_ref), "out", "inverse")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("kind", list(COUPLINGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_backward_all_parameters(shape, kind, device, exact_precision):
    B, C, H, W, _ = shape
    layer = make_coupling(kind, C, device)
    z = torch.randn(B, C, H, W, device=device, requires_grad=True)
    params = [z, *layer.parameters()]
    names = ["z", *(n for n, _ in layer.named_parameters())]
    y_ref, ld_ref = layer(z)
    gy, gld = torch.randn_like(y_ref), torch.randn_like(ld_ref)
    expected = torch.autograd.grad((y_ref * gy).sum() + (ld_ref * gld).sum(), params)
    y, ld = apply_coupling(z, net_out(layer, z), kind == "affine")
    actual = torch.autograd.grad((y * gy).sum() + (ld * gld).sum(), params)
    assert_grads_exact(actual, expected, names)


def test_backward_launch_without_logdet_grad(kernel_device):
    """grad_logdet=None means the logdet is unused (zero grad)."""
    layer = make_coupling("affine", 6, kernel_device)
    z = torch.randn(2, 6, 5, 7)
    h = net_out(layer, z).detach().requires_grad_(True)
    zz = z.clone().requires_grad_(True)
    shift, raw = h[:, :3], h[:, 3:]
    y_ref = torch.cat([zz[:, :3], (zz[:, 3:] + shift) * torch.sigmoid(raw + 2.0)], 1)
    gy = torch.randn_like(y_ref)
    gz, gh = torch.autograd.grad(y_ref, [zz, h], gy)
    dz, dh = coupling_backward(z, h.detach(), gy, None, True, block_p=16)
    assert_exact(dz, gz, "grad", "z")
    assert_exact(dh, gh, "grad", "h")


def test_log_sigmoid_is_stable_at_extremes(kernel_device):
    """raw + 2 far in both tails: finite logdet matching -softplus(-(raw + 2)), finite grads."""
    z = torch.randn(1, 4, 3, 5)
    raw = torch.tensor([-200.0, -30.0, -5.0, 0.0, 5.0, 30.0, 200.0, 88.0]).repeat(8)[:30].view(1, 2, 3, 5)
    h = torch.cat([torch.zeros_like(raw), raw], 1).requires_grad_(True)
    y, ld = apply_coupling(z, h, True)
    ld_ref = (-torch.nn.functional.softplus(-(raw + 2.0))).flatten(1).sum(1)
    assert torch.isfinite(ld).all() and torch.isfinite(y).all()
    assert_exact(ld, ld_ref, "logdet", "logdet")
    (gh,) = torch.autograd.grad(ld.sum(), [h])
    hh = h.detach().requires_grad_(True)
    (gh_ref,) = torch.autograd.grad((-torch.nn.functional.softplus(-(hh[:, 2:] + 2.0))).sum(), [hh])
    assert torch.isfinite(gh).all()
    assert_exact(gh, gh_ref, "grad", "grad h")


def test_logdet_gradient_keeps_its_precision_in_the_saturated_tail(kernel_device):
    """d log sigmoid(t) / dt = sigmoid(-t) for t = raw + 2 up to 80: relative accuracy like the reference's
    softplus backward (it was 1 - sigmoid(t): +17% at t = 15 and exactly 0 from t ~ 17)."""
    t = torch.tensor([8.0, 10.0, 12.0, 15.0, 17.0, 20.0, 30.0, 50.0, 80.0])  # sigmoid(-t) normal in fp32
    raw = (t - 2.0).view(1, 1, 1, -1).to(kernel_device)
    z = torch.randn(1, 2, 1, t.numel(), device=kernel_device)
    h = torch.cat([torch.zeros_like(raw), raw], 1).requires_grad_(True)
    _, ld = apply_coupling(z, h, True)
    (gh,) = torch.autograd.grad(ld.sum(), [h])
    truth = torch.sigmoid(-t.double())
    torch.testing.assert_close(gh[0, 1, 0].double(), truth, rtol=1e-5, atol=0)


def test_logdet_keeps_its_relative_precision_in_the_saturated_tail(kernel_device):
    """log sigmoid(t) = -log1p(exp(-t)) is tiny for large t; 1 + e rounds in fp32, so log(1 + e) alone is off by
    up to ~1e-2 relative at t = 12. One pixel per sample, so each logdet is one term, against float64."""
    t = torch.tensor([3.0, 5.0, 8.0, 10.0, 12.0, 15.0, 17.0, 20.0, 30.0, 60.0])  # log sigmoid(t) normal in fp32
    raw = (t - 2.0).view(-1, 1, 1, 1)
    z = torch.randn(t.numel(), 2, 1, 1)
    _, ld = apply_coupling(z, torch.cat([torch.zeros_like(raw), raw], 1), True)
    truth = -torch.nn.functional.softplus(-t.double())
    torch.testing.assert_close(ld.double(), truth, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_io(dtype, device):
    layer = make_coupling("affine", 12, device)
    z = torch.randn(2, 12, 5, 7, device=device)
    with torch.no_grad():
        y_ref, ld_ref = layer(z.to(dtype).float())
        h = net_out(layer, z.to(dtype).float())
        y, ld = coupling_forward(z.to(dtype), h.to(dtype), True)
    assert y.dtype == dtype and ld.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), y_ref, rtol=4 * eps, atol=4 * eps * float(y_ref.abs().max()))
    torch.testing.assert_close(ld.float(), ld_ref, rtol=8 * eps, atol=8 * eps * float(ld_ref.abs().max()))


def test_rejects_wrong_h_shape(kernel_device):
    z = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="h must have shape"):
        coupling_forward(z, torch.randn(2, 3, 3, 3), True)
    with pytest.raises(ValueError, match="at least 2 channels"):
        coupling_forward(torch.randn(2, 1, 3, 3), torch.randn(2, 2, 3, 3), True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current CUDA device; the wrappers switch to the tensors' device first."""
    torch.manual_seed(0)
    z, h = torch.randn(2, 4, 5, 3), torch.randn(2, 4, 5, 3)
    want = coupling_forward(z.cuda(0), h.cuda(0))
    with torch.cuda.device(0):
        got = coupling_forward(z.cuda(1), h.cuda(1))
    assert got[0].device == torch.device("cuda", 1)
    torch.testing.assert_close(got[0].cpu(), want[0].cpu())
    torch.testing.assert_close(got[1].cpu(), want[1].cpu())
