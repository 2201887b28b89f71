"""--amp bf16: coupling networks under bf16 autocast (CPU here), flow and log-determinants in fp32; and
--channels-last: the networks in NHWC, the flow in NCHW, the same function."""

import pytest
import torch

from glowfast import Glow
from glowfast.amp import (
    bf16_networks_enabled,
    channels_last_networks_enabled,
    coupling_networks,
    disable_bf16_networks,
    disable_channels_last_networks,
    disable_gemm_networks,
    enable_bf16_networks,
    enable_channels_last_networks,
    enable_gemm_networks,
    gemm_network_forward,
    gemm_networks_enabled,
    nhwc_network_forward,
)

from conftest import cuda_devices
from helpers import OpLog, assert_option_keeps_the_fused_model
from tolerances import assert_exact


def _model(device, coupling="affine"):
    torch.manual_seed(0)
    m = Glow((1, 8, 8), K=2, L=2, hidden_channels=16, coupling=coupling, backend="reference").to(device)
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, device=device)
    m.train()
    m(x)  # ActNorm init
    # make the networks non-trivial (ZeroConv2d starts at zero, which bf16 would represent exactly)
    with torch.no_grad():
        for net in coupling_networks(m):
            net.conv3.conv.weight.normal_(0, 0.05)
    return m, x


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_bf16_networks_only(device, coupling, exact_precision):  # no TF32: the round trip is checked to 1e-4
    m, x = _model(device, coupling)
    keys = list(m.state_dict())
    ref = m(x, generator=torch.Generator(device).manual_seed(1)).log_prob
    assert enable_bf16_networks(m) == 4 and enable_bf16_networks(m) == 0 and bf16_networks_enabled(m)
    assert list(m.state_dict()) == keys  # no parameter / state-dict change

    dtypes = {}
    hooks = [m.levels[0].steps[0].coupling.net.conv1.register_forward_hook(
                 lambda mod, i, o: dtypes.__setitem__("conv1", o.dtype)),
             m.levels[0].steps[0].coupling.register_forward_hook(
                 lambda mod, i, o: dtypes.__setitem__("coupling", (o[0].dtype, o[1].dtype)))]
    out = m(x, generator=torch.Generator(device).manual_seed(1))
    for h in hooks:
        h.remove()
    assert dtypes["conv1"] == torch.bfloat16  # the network ran in bf16 ...
    assert dtypes["coupling"] == (torch.float32, torch.float32)  # ... the flow and its logdet stay fp32
    assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()
    assert not torch.equal(out.log_prob, ref)  # bf16 rounding is really there
    torch.testing.assert_close(out.bits_per_dim, ref / (-64 * torch.log(torch.tensor(2.0))), rtol=2e-2, atol=2e-2)

    out.bits_per_dim.mean().backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in m.parameters())

    # still exactly invertible: the inverse runs the same bf16 network on the same input
    m.eval()
    with torch.no_grad():
        xc = m.preprocess(x, generator=torch.Generator(device).manual_seed(2))
        z, _ = m.encode(xc)
        torch.testing.assert_close(m.decode(z), xc, rtol=0, atol=1e-4)

    assert disable_bf16_networks(m) == 4 and not bf16_networks_enabled(m)
    m.train()
    again = m(x, generator=torch.Generator(device).manual_seed(1)).log_prob
    assert torch.equal(again.detach(), ref.detach())


@pytest.mark.parametrize("device", cuda_devices())
def test_channels_last_networks_compute_the_same_function(device, exact_precision):
    m, x = _model(device)
    keys = list(m.state_dict())
    g = torch.Generator(device)
    ref = m(x, generator=g.manual_seed(1)).log_prob
    ref_grads = torch.autograd.grad(ref.sum(), list(m.parameters()))
    assert enable_channels_last_networks(m) == 4 and enable_channels_last_networks(m) == 0
    assert channels_last_networks_enabled(m) and not bf16_networks_enabled(m)
    assert list(m.state_dict()) == keys
    net = m.levels[0].steps[0].coupling.net
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.conv1.weight.is_contiguous()  # really NHWC (the 3x3 weight, not a degenerate 1x1 one)
    formats = {}
    nhwc = torch.channels_last
    hook = net.conv3.conv.register_forward_hook(lambda mod, i, o: formats.__setitem__(
        "conv3", (i[0].is_contiguous(memory_format=nhwc), o.is_contiguous(memory_format=nhwc))))
    out = m(x, generator=g.manual_seed(1)).log_prob
    hook.remove()
    assert formats["conv3"] == (True, True)  # the network ran in NHWC ...
    h = net(torch.randn(2, net.conv1.in_channels, 4, 4, device=device))
    assert h.is_contiguous()  # ... and hands NCHW back to the flow
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out.sum(), list(m.parameters())), ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # composes with bf16; each option switches off on its own
    assert enable_bf16_networks(m) == 4 and bf16_networks_enabled(m) and channels_last_networks_enabled(m)
    both = m(x, generator=g.manual_seed(1)).log_prob
    torch.testing.assert_close(both, ref, rtol=2e-2, atol=2e-1)
    assert disable_channels_last_networks(m) == 4 and bf16_networks_enabled(m)
    assert net.conv1.weight.is_contiguous()
    assert disable_bf16_networks(m) == 4 and not hasattr(net, "_glowfast_net_options")
    assert torch.equal(m(x, generator=g.manual_seed(1)).log_prob.detach(), ref.detach())


@pytest.mark.parametrize("copy_kind", ["deepcopy", "torch.save"])
def test_network_options_survive_copies_and_state_dict_round_trips(copy_kind, tmp_path):
    """A deep copy, or a whole model saved with torch.save and loaded (its load failed), keeps the options and
    runs its own weights."""
    import copy

    m, x = _model("cpu")
    enable_channels_last_networks(m)
    enable_bf16_networks(m)
    if copy_kind == "deepcopy":
        twin = copy.deepcopy(m)
    else:
        torch.save(m, tmp_path / "model.pt")
        twin = torch.load(tmp_path / "model.pt", weights_only=False)
    assert bf16_networks_enabled(twin) and channels_last_networks_enabled(twin)
    ref = m(x, dequantize=False).log_prob
    with torch.no_grad():  # the copy's networks must use the copy's weights, not the original's
        for net in coupling_networks(twin):
            net.conv3.conv.weight.mul_(2)
    assert torch.equal(m(x, dequantize=False).log_prob, ref)
    assert not torch.equal(twin(x, dequantize=False).log_prob, ref)

    plain, _ = _model("cpu")
    plain.load_state_dict(m.state_dict())  # NHWC-strided weights load into an NCHW model and back
    disable_bf16_networks(m)
    torch.testing.assert_close(plain(x, dequantize=False).log_prob, m(x, dequantize=False).log_prob,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("shape", [(3, 6, 8, 8), (1, 12, 4, 4), (2, 2, 5, 3)])
@pytest.mark.parametrize("layout", ["nhwc", "gemm"])
def test_fast_network_forwards_equal_the_module(device, shape, layout, exact_precision):
    """The channels_last network (1x1 conv as a GEMM over pixels) and the all-GEMM network (im2col / col2im
    3x3s) = CouplingNetwork.forward, values and every gradient; they must follow the module's architecture, so
    a change there fails here."""
    from glowfast.reference.coupling import CouplingNetwork

    b, c, hgt, wid = shape
    net = CouplingNetwork(c, 32, 2 * c).to(device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(*shape, device=device, requires_grad=True)
    ref = net(x)
    expected = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel(), device=device).view_as(ref)).sum(),
                                   [x, *net.parameters()])
    if layout == "nhwc":
        net.to(memory_format=torch.channels_last)
        out = nhwc_network_forward(net, x.contiguous(memory_format=torch.channels_last))
    else:
        out = gemm_network_forward(net, x)
        assert out.is_contiguous()
    assert_exact(out, ref, "out", "network output")
    actual = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum(),
                                 [x, *net.parameters()])
    for (name, _), a, e in zip([("x", None), *net.named_parameters()], actual, expected, strict=True):
        assert a.shape == e.shape, name
        assert_exact(a, e, "grad", name)


@pytest.mark.parametrize("layout", ["nhwc", "gemm"])
@pytest.mark.parametrize("precision,user_setting", [("tf32", "ieee"), ("ieee", "tf32"), ("tf32", "none")])
def test_network_gemms_compute_at_the_convolutions_precision(layout, precision, user_setting):
    """The GEMM layouts replace convolutions, which run in TF32 under PyTorch's default while cuBLAS defaults to
    full fp32: every product of the GEMM networks, forward and backward, runs at the convolutions' precision
    (glowfast.kernels.dot_precision, here forced), whatever cuBLAS's own setting; that setting is restored."""
    from glowfast.kernels import use_dot_precision
    from glowfast.reference.coupling import CouplingNetwork

    net = CouplingNetwork(6, 32, 12)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    if layout == "nhwc":
        net.to(memory_format=torch.channels_last)
        x_in, forward = x.contiguous(memory_format=torch.channels_last), nhwc_network_forward
    else:
        x_in, forward = x, gemm_network_forward
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = user_setting
        with use_dot_precision(precision):
            with OpLog() as fwd:
                out = forward(net, x_in)
            assert matmul.fp32_precision == user_setting  # restored between forward and backward
            with OpLog() as bwd:
                out.square().sum().backward()
        assert matmul.fp32_precision == user_setting
    finally:
        matmul.fp32_precision = saved
    n_gemms = 1 if layout == "nhwc" else 3
    assert fwd.matmul_precisions == [precision] * n_gemms
    assert bwd.matmul_precisions == [precision] * (2 * n_gemms)  # grad input and grad weight of each product
    assert torch.isfinite(x.grad).all()


def test_bf16_gemm_networks_run_in_bf16_and_keep_the_flow_fp32():
    """--amp bf16 with --gemm-networks: the GEMMs run in bf16 as autocast runs addmm; the flow and its
    log-likelihood stay fp32, within bf16's rounding of the fp32 model."""
    m, x = _model("cpu")
    ref = m(x, dequantize=False).log_prob
    enable_gemm_networks(m)
    enable_bf16_networks(m)
    net = coupling_networks(m)[0]
    with OpLog() as log:
        h = net(torch.randn(2, net.conv1.in_channels, 4, 4))
    assert log.matmul_dtypes == [torch.bfloat16] * 3 and h.dtype == torch.float32  # handed back to the flow in fp32
    out = m(x, dequantize=False)
    assert out.log_prob.dtype == torch.float32 and not torch.equal(out.log_prob, ref)
    torch.testing.assert_close(out.log_prob, ref, rtol=2e-2, atol=2.0)
    out.bits_per_dim.mean().backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in m.parameters())


def test_fused_backend_with_channels_last_networks(kernel_device):
    """The fused kernels read the NHWC networks' outputs (handed back as NCHW): same likelihood and gradients."""
    assert_option_keeps_the_fused_model(kernel_device, enable_channels_last_networks)


def test_gemm_networks_in_the_model_and_their_errors(kernel_device):
    """--gemm-networks: same likelihood and gradients as cuDNN's convolutions, on the fused backend too; it and
    channels_last exclude each other with a clear error; a non-standard network is refused."""
    m = assert_option_keeps_the_fused_model(kernel_device, enable_gemm_networks)
    assert gemm_networks_enabled(m)
    with pytest.raises(ValueError, match="enable one of them"):
        enable_channels_last_networks(m)
    assert disable_gemm_networks(m) == 4 and enable_channels_last_networks(m) == 4
    with pytest.raises(ValueError, match="enable one of them"):
        enable_gemm_networks(m)
    disable_channels_last_networks(m)
    coupling_networks(m)[0].conv1.padding = (2, 2)
    with pytest.raises(ValueError, match="standard coupling network"):
        enable_gemm_networks(m)


@pytest.mark.parametrize("change", ["conv3_padding_0", "conv3_kernel_1x1", "conv3_kernel_5x5_padding_2"])
def test_gemm_networks_refuse_a_non_standard_last_convolution(change):
    """gemm_network_forward hard-codes conv3 as a 3x3 convolution with padding 1 (its col2im `fold`); a network
    whose last convolution is anything else computes a different function, so enabling gemm must refuse it
    (and change nothing) rather than silently run the 3x3-pad-1 formula."""
    m, _ = _model("cpu")
    net = coupling_networks(m)[1]
    conv = net.conv3.conv
    if change == "conv3_padding_0":
        conv.padding = (0, 0)
    elif change == "conv3_kernel_1x1":  # padding 1 as the standard one: only the kernel size differs
        net.conv3.conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1, padding=1)
    else:  # a "same"-size convolution, like the standard one, with another kernel
        net.conv3.conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 5, padding=2)
    with pytest.raises(ValueError, match="standard coupling network"):
        enable_gemm_networks(m)
    assert not any(gemm_networks_enabled(n) for n in coupling_networks(m))
    assert all(not hasattr(n, "_glowfast_net_options") for n in coupling_networks(m))
