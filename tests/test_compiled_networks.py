"""--compile-networks (glowfast.amp.compiled_network_forward): the standard coupling network as one torch.compile'd
function of its input and weights = the module, values and every gradient, alone, with bf16 and channels_last, and
inside a fused Glow; its conflicts and refusals. (torch.compile on the CPU here: inductor's C++ code; each new input
shape compiles, so the cases are few.)"""

import copy

import pytest
import torch

from glowfast.amp import (
    compiled_network_forward,
    compiled_networks_enabled,
    coupling_networks,
    disable_compiled_networks,
    disable_gemm_networks,
    enable_bf16_networks,
    enable_channels_last_networks,
    enable_compiled_networks,
    enable_gemm_networks,
    enable_triton_networks,
)
from glowfast.reference.coupling import CouplingNetwork

from conftest import cuda_devices
from helpers import assert_option_keeps_the_fused_model
from tolerances import assert_bf16, assert_exact


def _weighted_grads(out, inputs):
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    return torch.autograd.grad((out * weights).sum(), inputs)


def _random_network(cin, hidden, cout, device="cpu", std=0.2, dtype=torch.float32):
    """A standard network (seed 0) with every parameter drawn from N(0, std^2): no zero-initialised conv3."""
    torch.manual_seed(0)
    net = CouplingNetwork(cin, hidden, cout).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net


def _assert_exact_with_grads(out, ref, x, net):
    """out = ref and the gradients of x and every parameter equal, shapes included (exact-fp32 tolerances)."""
    assert_exact(out, ref, "out", "network output")
    inputs = [x, *net.parameters()]
    names = ["x", *(n for n, _ in net.named_parameters())]
    for name, a, e in zip(names, _weighted_grads(out, inputs), _weighted_grads(ref, inputs), strict=True):
        assert a.shape == e.shape, name
        assert_exact(a, e, "grad", name)


@pytest.mark.parametrize("device", cuda_devices())
@pytest.mark.parametrize("shape", [(3, 6, 8, 8), (2, 2, 5, 3)])
def test_compiled_network_equals_the_module(device, shape, exact_precision):
    """fp32: the compiled function = CouplingNetwork.forward, output and the gradients of x and every parameter
    (the exact-fp32 tolerances; on a GPU without TF32); odd, non-square images too."""
    net = _random_network(shape[1], 32, 2 * shape[1], device)
    x = torch.randn(*shape, device=device, requires_grad=True)
    ref = net(x)
    out = compiled_network_forward(net, x)
    assert out.is_contiguous() and out.dtype == torch.float32
    _assert_exact_with_grads(out, ref, x, net)


@pytest.mark.parametrize("device", cuda_devices())
def test_compiled_bf16_channels_last_network_equals_the_eager_options(device):
    """With bf16 and channels_last (the fast GPU configuration) the compiled function computes what the eager
    options compute: the same bf16 operations (inductor may round its fused intermediates differently: bf16's
    tolerance), fp32 NCHW output, fp32 gradients."""
    net = _random_network(6, 32, 12, device)
    holder = torch.nn.ModuleList([net])
    enable_bf16_networks(holder)
    enable_channels_last_networks(holder)
    x = torch.randn(2, 6, 8, 8, device=device, requires_grad=True)
    inputs = [x, *net.parameters()]
    ref = net(x)  # the eager options
    assert enable_compiled_networks(holder) == 1 and compiled_networks_enabled(holder)
    out = net(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert not torch.equal(out, compiled_network_forward(net, x))  # bf16 really ran (fp32 differs)
    for a, e in zip(_weighted_grads(out, inputs), _weighted_grads(ref, inputs), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-2)


def test_compiled_networks_in_the_fused_model_and_their_errors(kernel_device):
    """In a fused Glow: the same likelihood and gradients; a deep copy keeps the option; gemm and triton networks
    exclude it with a clear error; a non-standard network is refused, changing nothing."""
    m = assert_option_keeps_the_fused_model(kernel_device, enable_compiled_networks)
    assert compiled_networks_enabled(copy.deepcopy(m))
    for other in (enable_gemm_networks, enable_triton_networks):
        with pytest.raises(ValueError, match="enable one of them"):
            other(m)
    assert disable_compiled_networks(m) == 4 and enable_gemm_networks(m) == 4
    with pytest.raises(ValueError, match="two different forwards"):
        enable_compiled_networks(m)
    assert disable_gemm_networks(m) == 4
    plain = copy.deepcopy(m)
    coupling_networks(plain)[0].conv1.padding = (2, 2)
    with pytest.raises(ValueError, match="standard coupling network"):
        enable_compiled_networks(plain)
    assert not any(compiled_networks_enabled(n) for n in coupling_networks(plain))


def test_every_level_and_batch_size_gets_its_graph_beyond_dynamos_default_limit():
    """One graph per input shape (and grad mode): a CIFAR-10 run needs 3 levels x (training, init, evaluation,
    sampling), more than dynamo's default 8 graphs per function, past which the H100 benchmark's second batch size
    ran eager networks. Here the global limit is 2 and four shapes (which dynamo may cover with static or dynamic
    graphs) still compile past it: more than 2 graphs (dynamo's own counter; without the raised limit, 2)."""
    import torch._dynamo.utils

    from glowfast import amp

    torch._dynamo.reset()  # as in a fresh process: no graph of an earlier test covers these shapes
    torch.manual_seed(0)
    nets = {c: CouplingNetwork(c, 8, 2 * c) for c in (1, 2)}
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(**{amp._LIMIT_KEY: 2}), torch.no_grad():
        for c, side in ((1, 4), (1, 6), (2, 4), (2, 6)):
            x = torch.randn(1, c, side, side)
            torch.testing.assert_close(compiled_network_forward(nets[c], x), nets[c](x), rtol=1e-5, atol=1e-6)
        assert getattr(torch._dynamo.config, amp._LIMIT_KEY) == 2  # the caller's setting is back after each call
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before > 2


def test_a_model_compiled_as_a_whole_traces_the_network_in_its_own_graph():
    """Under an outer torch.compile (a user compiling the whole model) the network is traced as plain ops, in one
    graph with its caller (fullgraph: no break at the inner compiled function or its config patch)."""
    torch.manual_seed(0)
    net = CouplingNetwork(2, 8, 4)
    x = torch.randn(1, 2, 5, 5)
    outer = torch.compile(lambda t: compiled_network_forward(net, t) * 2.0, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(outer(x), net(x) * 2.0, rtol=1e-5, atol=1e-6)


def test_options_pickled_before_the_compiled_option_still_run():
    """A whole model saved (torch.save) by a glowfast without this option holds option dicts without its key: it
    still runs, and the option can be enabled on it."""
    torch.manual_seed(0)
    net = CouplingNetwork(2, 8, 4)
    holder = torch.nn.ModuleList([net])
    enable_bf16_networks(holder)
    del net._glowfast_net_options["compiled"]  # the dict as the earlier version pickled it
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        before = net(x)
        assert enable_compiled_networks(holder) == 1
        torch.testing.assert_close(net(x), before, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", cuda_devices())
def test_channel_padding_computes_the_same_function(device, exact_precision):
    """pad_network_channels(8): conv1's 6 input channels and conv3's 12 output channels zero-padded to 16 inside the
    compiled function, the output sliced back: the module's values and every gradient (exact-fp32 tolerances), and
    the gradients keep the parameters' shapes. A bad multiple is refused."""
    from glowfast.amp import pad_network_channels

    net = _random_network(6, 32, 12, device)
    x = torch.randn(2, 6, 5, 7, device=device, requires_grad=True)
    ref = net(x)
    with pad_network_channels(8):
        out = compiled_network_forward(net, x)
    assert out.shape == ref.shape and out.is_contiguous()
    _assert_exact_with_grads(out, ref, x, net)
    for bad in (-8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="channel padding"), pad_network_channels(bad):
            pass


def test_bf16_networks_pad_to_eight_by_default_and_the_context_overrides_it():
    """The default (measured faster on the H200: bf16 pads, fp32 does not); a pad_network_channels context sets one
    multiple for both, nested contexts restore the outer one, and None inside a context is the default again."""
    from glowfast.amp import BF16_CHANNEL_PAD, network_channel_pad, pad_network_channels

    assert (network_channel_pad(True), network_channel_pad(False)) == (BF16_CHANNEL_PAD, 0) == (8, 0)
    with pad_network_channels(0):
        assert (network_channel_pad(True), network_channel_pad(False)) == (0, 0)
        with pad_network_channels(4):
            assert (network_channel_pad(True), network_channel_pad(False)) == (4, 4)
        with pad_network_channels(None):
            assert (network_channel_pad(True), network_channel_pad(False)) == (8, 0)
        assert network_channel_pad(True) == 0
    assert (network_channel_pad(True), network_channel_pad(False)) == (8, 0)


def test_default_bf16_padding_keeps_the_compiled_network_equal_to_the_unpadded_one():
    """A compiled bf16 network with the default padding (6 -> 8 and 12 -> 16 channels) against the same network
    with the padding off: the same function up to bf16 rounding, values and the input's gradient."""
    from glowfast.amp import pad_network_channels

    net = _random_network(6, 32, 12)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    padded = compiled_network_forward(net, x, bf16=True)
    (gx_padded,) = torch.autograd.grad(padded.square().sum(), x)
    with pad_network_channels(0):
        plain = compiled_network_forward(net, x, bf16=True)
    (gx_plain,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(padded, plain, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_padded, gx_plain, rtol=3e-2, atol=3e-2)


def test_channel_padding_really_pads_the_thin_convolutions():
    """The padded math (eager, under a dispatch mode that records every convolution): conv1 reads 8 channels, not 6,
    and conv3 writes 16, not 12; the 512-wide 1x1 is untouched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from glowfast.amp import _standard_network_math

    class Convolutions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.convolution.default:
                self.shapes.append((args[0].shape[1], out.shape[1]))
            return out

    net = CouplingNetwork(6, 32, 12)
    c1, c2, c3 = net.conv1, net.conv2, net.conv3
    with torch.no_grad(), Convolutions() as mode:
        _standard_network_math(torch.randn(1, 6, 4, 4), c1.weight, c1.bias, c2.weight, c2.bias, c3.conv.weight,
                               c3.conv.bias, c3.logs, 3.0, False, False, 8)
    assert mode.shapes == [(8, 32), (32, 32), (32, 16)]


# ------------------------------------------------------------------ the thin 3x3 convolutions as GEMMs (25th session)
def _thin_gemm_math(net, x, bf16=False, channels_last=False, pad=0, relu_epilogue=False):
    from glowfast.amp import _standard_network_math

    c1, c2, c3 = net.conv1, net.conv2, net.conv3
    return _standard_network_math(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.conv.weight, c3.conv.bias, c3.logs,
                                  float(c3.logscale_factor), bf16, channels_last, pad, True, relu_epilogue)


@pytest.mark.parametrize("relu_epilogue", [False, True])
@pytest.mark.parametrize("pad", [0, 8])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 2, 1, 4)])
def test_thin_gemms_equal_the_module_in_float64(shape, pad, relu_epilogue):
    """The GEMM forms of the 3x3 convolutions (im2col + GEMM for conv1, GEMM to taps + shifted tap sums for conv3)
    in float64, eager: the module's output and the gradients of x and every parameter to float64 rounding; odd,
    non-square images, a 1-pixel-high one (every tap but the middle row falls outside), with and without padding,
    with and without the ReLUs in the GEMMs' epilogues (`_gemm_relu`: its own backward)."""
    net = _random_network(shape[1], 16, 2 * shape[1], std=0.3, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    inputs = [x, *net.parameters()]
    out, ref = _thin_gemm_math(net, x, pad=pad, relu_epilogue=relu_epilogue), net(x)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    names = ["x", *(n for n, _ in net.named_parameters())]
    for name, a, e in zip(names, _weighted_grads(out, inputs), _weighted_grads(ref, inputs), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_thin_gemms_leave_no_convolution():
    """Under thin_gemms the network launches no convolution at all (the 1x1 is a GEMM as well): three matrix
    products instead."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    net = CouplingNetwork(6, 32, 12)
    with torch.no_grad(), Ops() as mode:
        _thin_gemm_math(net, torch.randn(1, 6, 4, 4))
    assert not [n for n in mode.names if "convolution" in n]
    assert sum(n.split(".")[0] in ("mm", "addmm") for n in mode.names) == 3
    # with the ReLUs in the epilogues: conv1's and conv2's GEMMs are _addmm_activation, and no ReLU runs apart
    with torch.no_grad(), Ops() as mode:
        _thin_gemm_math(net, torch.randn(1, 6, 4, 4), relu_epilogue=True)
    ops = [n.split(".")[0] for n in mode.names]
    assert ops.count("_addmm_activation") == 2 and ops.count("mm") == 1 and "addmm" not in ops
    assert not [n for n in ops if n.startswith("relu")]


@pytest.mark.parametrize("device", cuda_devices())
def test_compiled_thin_gemms_equal_the_module(device, exact_precision):
    """compiled_network_forward inside thin_convolutions_as_gemms(): the module's output and every gradient at the
    exact-fp32 tolerances (compiled; on a GPU without TF32), padded as bf16 networks pad by default; a bad value
    is refused."""
    from glowfast.amp import pad_network_channels, thin_convolutions_as_gemms

    net = _random_network(6, 32, 12, device)
    x = torch.randn(2, 6, 5, 7, device=device, requires_grad=True)
    ref = net(x)
    with thin_convolutions_as_gemms(), pad_network_channels(8):
        out = compiled_network_forward(net, x)
    assert out.is_contiguous() and out.dtype == torch.float32
    _assert_exact_with_grads(out, ref, x, net)
    with pytest.raises(ValueError, match="True or False"), thin_convolutions_as_gemms(1):
        pass


@pytest.mark.parametrize("device", cuda_devices())
def test_compiled_relu_epilogues_equal_the_module(device, exact_precision):
    """compiled_network_forward inside relu_in_gemm_epilogues() (with the thin GEMMs, so that both conv1's and
    conv2's ReLUs are in epilogues: test_thin_gemms_leave_no_convolution counts the ops): the module's output and
    every gradient at the exact-fp32 tolerances, compiled; a bad value is refused."""
    from glowfast.amp import relu_in_gemm_epilogues, thin_convolutions_as_gemms

    net = _random_network(6, 32, 12, device)
    x = torch.randn(2, 6, 5, 3, device=device, requires_grad=True)
    ref = net(x)
    with thin_convolutions_as_gemms(), relu_in_gemm_epilogues():
        out = compiled_network_forward(net, x)
    assert out.is_contiguous() and out.dtype == torch.float32
    _assert_exact_with_grads(out, ref, x, net)
    with pytest.raises(ValueError, match="True or False"), relu_in_gemm_epilogues(1):
        pass


@pytest.mark.parametrize("options", [(True, False), (False, True)], ids=["gemm3x3", "relu_epilogue"])
@pytest.mark.parametrize("device", cuda_devices())
def test_compiled_bf16_thin_gemms_err_as_the_eager_bf16_options(device, options):
    """bf16 channels_last with the thin GEMMs, or with conv2's ReLU in its GEMM's epilogue (the benchmark variants)
    against a float64 module: errors within the BF16 rule of the eager bf16 options' errors (tolerances.py; the GEMM
    to taps rounds each tap to bf16 before the fp32 sum, where cuDNN rounds the sum once), fp32 NCHW output and
    fp32 gradients."""
    from glowfast.amp import relu_in_gemm_epilogues, thin_convolutions_as_gemms

    thin_gemms, relu_epilogue = options

    net = _random_network(6, 32, 12, device)
    net64 = copy.deepcopy(net).double()
    x = torch.randn(2, 6, 8, 8, device=device, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    ref64 = net64(x64)
    grads64 = _weighted_grads(ref64, [x64, *net64.parameters()])
    holder = torch.nn.ModuleList([net])
    enable_bf16_networks(holder)
    enable_channels_last_networks(holder)
    inputs = [x, *net.parameters()]
    ref = net(x)  # the eager options: cuDNN's bf16 convolutions
    enable_compiled_networks(holder)
    with thin_convolutions_as_gemms(thin_gemms), relu_in_gemm_epilogues(relu_epilogue):
        out = net(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_bf16(out, ref, ref64, "out", "network output")
    names = ["x", *(n for n, _ in net.named_parameters())]
    for name, a, e, e64 in zip(names, _weighted_grads(out, inputs), _weighted_grads(ref, inputs), grads64,
                               strict=True):
        assert a.dtype == torch.float32
        assert_bf16(a, e, e64, "grad", name)


def test_eager_networks_compile_nothing_and_compute_the_same():
    """Inside eager_networks() (ActNorm's init pass in the trainer) a compiled network runs its eager options:
    dynamo compiles no frame, and the output is the compiled one's (exact-fp32 tolerance); outside it compiles."""
    from torch._dynamo.utils import counters

    from glowfast.amp import eager_networks

    net = _random_network(2, 16, 4)
    holder = torch.nn.ModuleList([net])
    enable_compiled_networks(holder)
    x = torch.randn(1, 2, 3, 5)
    torch._dynamo.reset()
    counters.clear()
    with eager_networks():
        eager = net(x)
    assert sum(counters["frames"].values()) == 0
    compiled = net(x)
    assert counters["frames"]["ok"] >= 1
    assert_exact(eager, compiled, "out", "network output")
