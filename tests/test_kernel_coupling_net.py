"""The Triton coupling network (glowfast.kernels.coupling_net) vs the reference CouplingNetwork module.

Forward and every gradient (input and all seven parameters) against the module's own fp32 forward/backward
(cuDNN or the CPU's conv), EXACT tolerances (tests/tolerances.py: the interpreter, or a GPU with TF32 off); bf16
hidden activations against the module under bf16 autocast (the BF16 rule); on a GPU also the default TF32 dots
against float64 by the TF32 rule. Then the model option (--triton-networks) and its errors.
"""

import pytest
import torch

from glowfast import Glow
from glowfast.amp import (
    coupling_networks,
    disable_triton_networks,
    enable_bf16_networks,
    enable_channels_last_networks,
    enable_gemm_networks,
    enable_triton_networks,
    triton_networks_enabled,
)
from glowfast.kernels.coupling_net import (
    _nchw_strides,
    apply_coupling_network,
    conv3x3,
    conv3x3_weight_grad,
    coupling_network_forward,
    network_precision,
    pack_weight,
    pack_weight_transposed,
    tile_override,
    use_bf16_dots,
)
from glowfast.reference.coupling import CouplingNetwork

from conftest import kernel_devices, requires_cuda
from helpers import assert_option_keeps_the_fused_model
from tolerances import assert_bf16, assert_exact, assert_grads_exact, assert_tf32

# (B, C, H, W, hidden): the network of a C-channel coupling reads C_a = C // 2 channels and writes 2 C_b.
# C from 2 to 96 (C_a 1..48, 2 C_b 2..96: one K step and several; one output tile and several), hidden not a
# multiple of the hidden tile, odd and non-square images, 1x1 and 1xW images (every off-centre tap padding).
SHAPES = [
    (1, 2, 5, 7, 16),
    (2, 3, 4, 6, 24),
    (2, 12, 7, 9, 40),
    (1, 48, 5, 5, 16),
    (2, 96, 3, 7, 16),
    (3, 4, 1, 1, 16),
    (2, 6, 1, 5, 16),
]


def _net(C, hidden, device, dtype=torch.float32):
    """A network with every parameter non-zero (ZeroConv2d starts at zero) and ReLUs that cut both ways."""
    net = CouplingNetwork(C // 2, hidden, 2 * (C - C // 2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.to(device=device, dtype=dtype)


def _shape_id(s):
    return "B{}_C{}_{}x{}_h{}".format(*s)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_forward_and_all_gradients_match_the_module(shape, device, exact_precision):
    B, C, H, W, hidden = shape
    net = _net(C, hidden, device)
    z = torch.randn(B, C, H, W, device=device, requires_grad=True)
    params = [z, *net.parameters()]
    names = ["z", *(n for n, _ in net.named_parameters())]
    ref = net(z[:, : C // 2])
    g = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, params, g)
    out = apply_coupling_network(net, z[:, : C // 2])  # a channel slice: read in place
    assert out.shape == ref.shape and out.is_contiguous()
    assert_exact(out, ref, "out", "h")
    assert_grads_exact(torch.autograd.grad(out, params, g), expected, names)


@pytest.mark.parametrize("bf16_dots", [False, True], ids=["fp32_dots", "bf16_dots"])
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("shape", [(4, 12, 8, 8, 64), (4, 48, 4, 4, 64), (2, 4, 8, 8, 64)], ids=_shape_id)
def test_bf16_activations_err_like_bf16_autocast(shape, device, bf16_dots):
    """bf16 hidden activations: output and every gradient err like the module under bf16 autocast (the BF16 rule of
    tests/tolerances.py), both against the float64 module; the output and all gradients stay fp32. With the 3x3
    convs' dots on fp32 operands (the default) and on bf16 operands (`use_bf16_dots`: tensor cores on a GPU, their
    emulation under the interpreter)."""
    B, C, H, W, hidden = shape
    net64 = _net(C, hidden, device, torch.float64)
    net = _net(C, hidden, device)
    net.load_state_dict(net64.state_dict())
    z64 = torch.randn(B, C, H, W, device=device, dtype=torch.float64, requires_grad=True)
    g64 = torch.randn(B, 2 * (C - C // 2), H, W, device=device, dtype=torch.float64)
    ref64 = net64(z64[:, : C // 2])
    expected = torch.autograd.grad(ref64, [z64, *net64.parameters()], g64)
    z = z64.detach().float().requires_grad_(True)
    params = [z, *net.parameters()]
    with torch.autocast(device, dtype=torch.bfloat16):
        auto = net(z[:, : C // 2]).float()
    auto_grads = torch.autograd.grad(auto, params, g64.float())
    with use_bf16_dots(bf16_dots):
        assert network_precision(torch.device(device), torch.bfloat16).startswith("bf16") == bf16_dots
        out = apply_coupling_network(net, z[:, : C // 2], torch.bfloat16)
        grads = torch.autograd.grad(out, params, g64.float())
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_bf16(out, auto, ref64, "out", "h")
    for (name, _), g, a, e in zip([("z", None), *net.named_parameters()], grads, auto_grads, expected, strict=True):
        assert_bf16(g, a, e, "grad", name)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("cin", [1, 6, 12, 24])
def test_both_k_orders_compute_the_conv(cin, device, exact_precision):
    """`_conv3x3_kernel` steps K tap by tap or over flattened (tap, channel) pairs (FLAT_K, `uses_flat_k`'s pick for
    thin inputs); forced either way, conv1's forward and conv3's input gradient (a conv into a thin output run
    through the same kernel) equal F.conv2d at the EXACT tolerance; steps spanning taps (cin 6 at BLOCK_K 16) and
    padding at the end of K included. Likewise the weight gradient, by tap or over (channel, tap) columns
    (`uses_flat_wgrad`), against torch's, with column tiles spanning taps and a partial last one."""
    B, H, W, cout = 2, 5, 6, 20
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(B, cin, H, W, generator=g).to(device)
    w = torch.randn(cout, cin, 3, 3, generator=g).to(device)
    expected = torch.nn.functional.conv2d(x, w, padding=1)
    expected_dx = torch.nn.grad.conv2d_input(x.shape, w, expected, padding=1)
    for flat in (False, True):
        with tile_override(conv=(16, 32, 16, 4), flat_k=flat):
            out = torch.empty(B, cout, H, W, device=device)
            conv3x3(x, _nchw_strides(x), pack_weight(w), out, _nchw_strides(out), (B, H, W, cin, cout),
                    precision="ieee")
            dx = torch.empty(B, cin, H, W, device=device)
            conv3x3(out, _nchw_strides(out), pack_weight_transposed(w), dx, _nchw_strides(dx),
                    (B, H, W, cout, cin), precision="ieee")
        with tile_override(wgrad=(16, 16, 16, 4), flat_k=flat):
            dw = conv3x3_weight_grad(x, _nchw_strides(x), out, _nchw_strides(out), (B, H, W, cin, cout),
                                     precision="ieee")
        assert_exact(out, expected, "out", f"conv, flat_k={flat}")
        assert_exact(dx, expected_dx, "out", f"input gradient, flat_k={flat}")
        assert_exact(dw, torch.nn.grad.conv2d_weight(x, w.shape, out, padding=1), "grad", f"weight, flat_k={flat}")


@pytest.mark.parametrize("device", kernel_devices())
def test_bf16_dots_multiply_the_bf16_rounded_operands(device):
    """The "bf16" dots' arithmetic (tensor cores on a GPU, "bf16_emulated" under the interpreter): a 3x3 conv and its
    weight gradient equal the float64 conv of the operands rounded to bf16 (round to nearest even, as autocast casts)
    up to fp32 accumulation, ~1e-6 relative; the fp32 operands themselves (the "ieee" dots) give a different result
    by ~1e-3, so the check sees the rounding."""
    B, H, W, cin, cout = 2, 5, 7, 24, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, cin, H, W, generator=g).to(device)
    w = torch.randn(cout, cin, 3, 3, generator=g).to(device)
    dout = torch.randn(B, cout, H, W, generator=g).to(device)
    rx, rw, rd = (t.bfloat16().double() for t in (x, w, dout))
    expected = torch.nn.functional.conv2d(rx, rw, padding=1)
    expected_dw = torch.nn.grad.conv2d_weight(rx, w.shape, rd, padding=1)
    outs = {}
    for dots in (True, False):
        with use_bf16_dots(dots):
            p = network_precision(torch.device(device), torch.bfloat16)
            assert p.startswith("bf16") == dots
            out = torch.empty(B, cout, H, W, device=device)
            conv3x3(x, _nchw_strides(x), pack_weight(w), out, _nchw_strides(out), (B, H, W, cin, cout), precision=p)
            dw = conv3x3_weight_grad(x, _nchw_strides(x), dout, _nchw_strides(dout), (B, H, W, cin, cout),
                                     precision=p)
        outs[dots] = out, dw
    for got, want in zip(outs[True], (expected, expected_dw), strict=True):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 2e-6, err
    assert (outs[False][0].double() - expected).abs().max() / expected.abs().max() > 1e-4


@pytest.mark.parametrize("device", kernel_devices())
def test_inputs_in_any_memory_layout(device, exact_precision):
    """A channels_last or transposed input is not a pixel-contiguous NCHW view: copied, same result."""
    net = _net(12, 16, device)
    x = torch.randn(2, 6, 5, 7, device=device)
    ref = net(x)
    for view in (x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert_exact(apply_coupling_network(net, view), ref, "out", "layout")


def test_weight_packing_and_the_transposed_kernel():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    packed = pack_weight(w)
    for tap in range(9):  # packed[tap, c, o] = w[o, c, kh, kw] with tap = 3 kh + kw
        assert torch.equal(packed[tap], w[:, :, tap // 3, tap % 3].T)
    # the transposed kernel is the packed kernel of the conv whose output is the input gradient of w's conv
    flipped = w.flip(2, 3).transpose(0, 1)
    assert torch.equal(pack_weight_transposed(w), pack_weight(flipped))
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    gy = torch.randn(2, 5, 6, 4, dtype=torch.float64)
    expected = torch.nn.grad.conv2d_input(x.shape, w, gy, padding=1)
    assert torch.allclose(torch.nn.functional.conv2d(gy, flipped, padding=1), expected)


@pytest.mark.parametrize("device", kernel_devices())
def test_bad_input_is_refused_with_a_clear_error(device):
    net = _net(12, 16, device)
    c1, c2, c3 = net.conv1, net.conv2, net.conv3
    args = [c1.weight, c1.bias, c2.weight, c2.bias, c3.conv.weight, c3.conv.bias, c3.logs, 3.0]
    x = torch.randn(2, 6, 4, 4, device=device)
    with pytest.raises(TypeError, match="fp32"):
        coupling_network_forward(x.double(), *args)
    with pytest.raises(ValueError, match="NCHW"):
        coupling_network_forward(x[0], *args)
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(16, 6, 3, 3\), expected \(16, 5, 3, 3\)"):
        coupling_network_forward(x[:, :5], *args)
    with pytest.raises(TypeError, match="floating-point"):
        coupling_network_forward(x.int(), *args)


@pytest.mark.parametrize("device", kernel_devices())
def test_an_empty_batch(device):
    """No images: empty output, zero parameter gradients, nothing launched (a CUDA grid of 0 programs is an error)."""
    net = _net(6, 16, device)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = apply_coupling_network(net, x)
    assert out.shape == (0, 6, 4, 4)
    grads = torch.autograd.grad(out.sum(), [x, *net.parameters()])
    assert grads[0].shape == x.shape and all(float(g.abs().sum()) == 0.0 for g in grads[1:])


@pytest.mark.parametrize("device", kernel_devices())
def test_double_backward_is_refused(device):
    net = _net(4, 16, device)
    x = torch.randn(1, 2, 3, 3, device=device, requires_grad=True)
    out = apply_coupling_network(net, x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@requires_cuda
@pytest.mark.parametrize("shape", [(8, 12, 16, 16, 512), (8, 48, 4, 4, 512)], ids=_shape_id)
def test_tf32_dots_follow_the_tf32_rule(shape):
    """GPU default (TF32 allowed): error vs float64 at most TF32_FACTOR x that of the module under cuDNN's TF32."""
    B, C, H, W, hidden = shape
    net64 = _net(C, hidden, "cuda", torch.float64)
    net = _net(C, hidden, "cuda")
    net.load_state_dict(net64.state_dict())
    x64 = torch.randn(B, C // 2, H, W, device="cuda", dtype=torch.float64)
    ref64 = net64(x64)
    assert_tf32(apply_coupling_network(net, x64.float()), net(x64.float()), ref64, name="h")


# ---------------------------------------------------------------------------------------------- the model option
def test_triton_networks_keep_the_fused_model(kernel_device):
    """--triton-networks on a fused Glow: same log-likelihood and every gradient as the module networks."""
    m = assert_option_keeps_the_fused_model(kernel_device, enable_triton_networks)
    assert triton_networks_enabled(m) and enable_triton_networks(m) == 0
    assert disable_triton_networks(m) == 4 and not triton_networks_enabled(m)
    assert all(not hasattr(n, "_glowfast_net_options") for n in coupling_networks(m))


def test_triton_networks_with_the_memory_saving_backward(kernel_device):
    """The memory-saving backward recomputes each network from the reconstructed input: same gradients."""
    def enable(m):
        m.memory_saving = True
        return enable_triton_networks(m)

    assert assert_option_keeps_the_fused_model(kernel_device, enable).memory_saving


def test_triton_networks_run_the_kernels_only_where_they_can(kernel_device, monkeypatch):
    """fp32 tensors where the kernels run: the Triton network; float64 (or without the interpreter on CPU): the
    module's forward, the same function."""
    import glowfast.kernels.coupling_net as cn

    calls = []
    real = cn.CouplingNetworkFunction.apply
    monkeypatch.setattr(cn.CouplingNetworkFunction, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = Glow((1, 8, 8), K=1, L=1, hidden_channels=16, backend="reference")
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    m(x)
    enable_triton_networks(m)
    m(x)
    assert len(calls) == 1  # one network, run by the kernels
    m.double()(x)
    assert len(calls) == 1  # float64: the module's forward
    if kernel_device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU process without the interpreter
        m.float()(x)
        assert len(calls) == 1


def test_triton_networks_exclude_the_other_layouts(kernel_device):
    m = Glow((1, 8, 8), K=1, L=2, hidden_channels=16, backend="reference")
    enable_triton_networks(m)
    for enable in (enable_channels_last_networks, enable_gemm_networks):
        with pytest.raises(ValueError, match="enable one of them"):
            enable(m)
    assert enable_bf16_networks(m) == 2 and triton_networks_enabled(m)  # bf16 hidden activations
    m2 = Glow((1, 8, 8), K=1, L=1, hidden_channels=16, backend="reference")
    coupling_networks(m2)[0].conv2 = torch.nn.Conv2d(16, 16, 1, bias=False)
    with pytest.raises(ValueError, match="with biases"):
        enable_triton_networks(m2)
    assert not any(hasattr(n, "_glowfast_net_options") for n in coupling_networks(m2))
