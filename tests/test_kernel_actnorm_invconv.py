"""Fused ActNorm + 1x1 conv kernels vs the reference layers (ActNorm2d -> InvConv1x1 / Shuffle / Reverse).

Runs under the Triton interpreter on CPU (CI) and, when a GPU is present, on CUDA with ieee fp32 dots
(exact regime) plus a TF32 check. Tolerances: tests/tolerances.py.
"""

import copy

import pytest
import torch

from glowfast.kernels import (
    actnorm_invconv_backward,
    actnorm_invconv_forward,
    actnorm_invconv_inverse,
    apply_actnorm_invconv,
    use_dot_precision,
)
from glowfast.reference import ActNorm2d, InvConv1x1, Reverse, Shuffle

from conftest import kernel_devices, requires_cuda
from helpers import KERNEL_SHAPES, OpLog, randomize_
from tolerances import (
    TF32Conv1x1,
    TF32x3Conv1x1,
    assert_exact,
    assert_grads_exact,
    assert_tf32,
    assert_tf32x3,
    tf32_round,
    tf32_split,
)

SHAPES = KERNEL_SHAPES
PERMS = ["lu", "plain", "shuffle", "reverse"]


def make_layers(C, perm, device):
    actnorm = randomize_(ActNorm2d(C), scale=0.3)
    if perm in ("lu", "plain"):
        permute = randomize_(InvConv1x1(C, lu=perm == "lu"), scale=0.05)
    else:
        permute = Shuffle(C) if perm == "shuffle" else Reverse(C)
    return actnorm.to(device), permute.to(device)


def reference(actnorm, permute, x):
    return permute(actnorm(x)[0])[0]


def reference_inverse(actnorm, permute, y):
    return actnorm.inverse(permute.inverse(y))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("perm", PERMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-bp{s[4]}")
def test_forward_and_inverse(shape, perm, device, exact_precision):
    B, C, H, W, bp = shape
    actnorm, permute = make_layers(C, perm, device)
    x = torch.randn(B, C, H, W, device=device)
    with torch.no_grad():
        weight = permute.weight_matrix()
        y_ref = reference(actnorm, permute, x)
        y = actnorm_invconv_forward(x, actnorm.bias, actnorm.log_scale, weight, block_p=bp)
        assert_exact(y, y_ref, "out", "y")
        w_inv = torch.linalg.inv(weight.double()).float()
        x_back = actnorm_invconv_inverse(y_ref, actnorm.bias, actnorm.log_scale, w_inv, block_p=bp)
        assert_exact(x_back, reference_inverse(actnorm, permute, y_ref), "out", "inverse")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("perm", PERMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_backward_all_parameters(shape, perm, device, exact_precision):
    """Grads of x, bias, log_scale and W — or, through weight_matrix(), of the LU factors."""
    B, C, H, W, _ = shape
    actnorm, permute = make_layers(C, perm, device)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    params = [x, actnorm.bias, actnorm.log_scale, *permute.parameters()]
    names = ["x", "bias", "log_scale", *(n for n, _ in permute.named_parameters())]
    y_ref = reference(actnorm, permute, x)
    grad_y = torch.randn_like(y_ref)
    expected = torch.autograd.grad(y_ref, params, grad_y)
    y = apply_actnorm_invconv(x, actnorm.bias, actnorm.log_scale, permute.weight_matrix())
    actual = torch.autograd.grad(y, params, grad_y)
    assert_grads_exact(actual, expected, names)


@pytest.mark.parametrize("programs", [1, 2, 3])
@pytest.mark.parametrize("need_dx,need_dw,dw_outside", [(True, True, False), (False, False, False),
                                                        (True, True, True), (False, False, True)])
def test_backward_launch_loops_and_flags(need_dx, need_dw, dw_outside, programs, kernel_device):
    """The standalone backward launch over 4 masked tiles per sample, optional outputs. programs > 1 is the GPU's
    split reduction (one partial per program, unevenly many tiles each at 3), which CPU defaults never reach.
    dw_outside: the weight gradient from the u the kernel wrote (masked tiles included), by one GEMM after it. The
    partials of all three parameter gradients are summed by one reduction."""
    actnorm, permute = make_layers(12, "plain", kernel_device)
    x = torch.randn(2, 12, 7, 9, requires_grad=True)
    y_ref = reference(actnorm, permute, x)
    grad_y = torch.randn_like(y_ref)
    gx, gb, gls, gw = torch.autograd.grad(y_ref, [x, actnorm.bias, actnorm.log_scale, permute.weight], grad_y)
    with OpLog() as log:
        dx, db, dls, dw = actnorm_invconv_backward(
            x.detach(), grad_y, actnorm.bias, actnorm.log_scale, permute.weight,
            need_dx=need_dx, need_dw=need_dw, dw_outside=dw_outside, block_p=16, programs_per_sample=programs,
        )
    # the parameter gradients' per-program partials share one buffer: one reduction sums them (three before)
    assert [name for name, _, _ in log.calls].count("aten.sum") == 1
    assert_exact(db, gb, "grad", "bias")
    assert_exact(dls, gls, "grad", "log_scale")
    if need_dx:
        assert_exact(dx, gx, "grad", "x")
        assert_exact(dw, gw, "grad", "W")
    else:
        assert dx is None and dw is None


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_io(dtype, device):
    """Half-precision activations: loaded to fp32, computed in fp32, stored in the input dtype."""
    actnorm, permute = make_layers(12, "lu", device)
    x = torch.randn(2, 12, 5, 7, device=device).to(dtype)
    with torch.no_grad():
        y_ref = reference(actnorm, permute, x.float())
        y = actnorm_invconv_forward(x, actnorm.bias, actnorm.log_scale, permute.weight_matrix())
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), y_ref, rtol=2 * eps, atol=2 * eps * float(y_ref.abs().max()))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's padded lanes
def test_padded_pixels_cannot_put_nan_into_the_parameter_gradients(kernel_device):
    """A pixel tile's padded lanes load x = 0, where u = bias * exp(log_scale) may overflow although every real
    pixel's u is finite (x ~ -bias): the sums for grad log_scale and grad W took 0 * inf = NaN there."""
    C, W = 4, 5  # 5 pixels: one tile, most of its lanes padded
    with torch.device("cpu"):  # inputs (CPU generators) and the reference on the CPU; the kernel on kernel_device
        bias = torch.tensor([1e30, 0.0, 0.0, 0.0])
        log_scale = torch.tensor([20.0, 0.0, 0.0, 0.0])
        w = torch.linalg.qr(torch.randn(C, C, generator=torch.Generator().manual_seed(0)))[0]
        x = torch.randn(1, C, 1, W, generator=torch.Generator().manual_seed(1))
        x[0, 0] = -1e30 + torch.arange(W) * 2.3e23  # x + bias finite and non-zero on the real pixels
        gy = torch.randn(1, C, 1, W, generator=torch.Generator().manual_seed(2))
    dev = [t.to(kernel_device) for t in (x, gy, bias, log_scale, w)]
    _, db, dls, dw = actnorm_invconv_backward(dev[0], dev[1], dev[2], dev[3], dev[4])
    with torch.device("cpu"):
        xr, br, lr, wr = (t.clone().requires_grad_(True) for t in (x, bias, log_scale, w))
        u = (xr + br.view(1, -1, 1, 1)) * torch.exp(lr).view(1, -1, 1, 1)
        assert torch.isfinite(u).all()
        y = torch.nn.functional.conv2d(u, wr.view(C, C, 1, 1))
        _, g_b, g_ls, g_w = torch.autograd.grad((y * gy).sum(), [xr, br, lr, wr])
    for got, ref, name in ((db, g_b, "bias"), (dls, g_ls, "log_scale"), (dw, g_w, "W")):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=0, msg=name)


def test_rejects_bad_shapes(kernel_device):
    actnorm, permute = make_layers(4, "plain", kernel_device)
    with pytest.raises(ValueError):
        actnorm_invconv_forward(torch.randn(2, 4, 3), actnorm.bias, actnorm.log_scale, permute.weight)
    with pytest.raises(ValueError):
        actnorm_invconv_forward(torch.randn(2, 5, 3, 3), actnorm.bias, actnorm.log_scale, permute.weight)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("C", [12, 48])
def test_tf32_dots_round_operands(C, device):
    """Under "tf32" every tl.dot operand is rounded to the nearest TF32 value before the product (tensor cores would
    truncate it): forward, inverse and backward equal the rounded-operand product to fp32 accuracy, on the
    interpreter and on a GPU alike; truncated operands would differ by ~1e-3. ActNorm is the identity here (bias 0,
    log_scale 0) so each dot's operand is an input given bit for bit, not an fp32 result that could round apart."""
    _, permute = make_layers(C, "lu", device)
    w = permute.weight_matrix().detach().requires_grad_(True)
    bias, log_scale = (torch.zeros(C, device=device, requires_grad=True) for _ in range(2))
    x = torch.randn(3, C, 9, 7, device=device, requires_grad=True)
    g = torch.randn(3, C, 9, 7, device=device)
    with use_dot_precision("tf32"):
        y = apply_actnorm_invconv(x, bias, log_scale, w)
        grads = torch.autograd.grad(y, [x, bias, log_scale, w], g)
        with torch.no_grad():
            w_inv = torch.linalg.inv(w.double()).float()
            x_back = actnorm_invconv_inverse(y, bias, log_scale, w_inv)
    x64, b64, ls64, w64 = (t.detach().double().requires_grad_(True) for t in (x, bias, log_scale, w))
    y_tf32 = TF32Conv1x1.apply((x64 + b64.view(1, -1, 1, 1)) * ls64.exp().view(1, -1, 1, 1), w64)
    assert_exact(y, y_tf32, "out", "y")
    expected = torch.autograd.grad(y_tf32, [x64, b64, ls64, w64], g.double())
    assert_grads_exact(grads, expected, ["x", "bias", "log_scale", "W"])
    assert_exact(x_back, TF32Conv1x1.apply(y.detach(), w_inv), "out", "inverse")


def _float64_twins(actnorm, permute, x):
    """For the precision tests: the parameter names and leaves (x first) of the fp32 layers, the same leaves of
    float64 copies, the float64 reference output y64, its 1x1-conv input u64 and W in float64."""
    names = ["x", "bias", "log_scale", *(f"permute.{n}" for n, _ in permute.named_parameters())]
    leaves = [x, actnorm.bias, actnorm.log_scale, *permute.parameters()]
    an64, pm64 = copy.deepcopy(actnorm).double(), copy.deepcopy(permute).double()
    x64 = x.detach().double().requires_grad_(True)
    leaves64 = [x64, an64.bias, an64.log_scale, *pm64.parameters()]
    u64 = (x64 + an64.bias.view(1, -1, 1, 1)) * an64.log_scale.exp().view(1, -1, 1, 1)
    return names, leaves, leaves64, reference(an64, pm64, x64), u64, pm64.weight_matrix()


def _split_sum(t: torch.Tensor) -> torch.Tensor:
    hi, lo = tf32_split(t)
    return hi + lo  # exact in fp32: lo is at most 2^-11 of hi


# What one product by 1.0 leaves of an fp32 value under each dot precision.
_ONE_PRODUCT = {"ieee": lambda t: t, "tf32": tf32_round, "tf32x3": _split_sum}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_dot_precisions_bit_exact_on_single_products(precision, device):
    """Where every output of a dot is one product by 1.0 (a permutation W, or a diagonal W applied to ones; ActNorm
    the identity), the kernels give bit for bit what the precision's arithmetic leaves of the other factor: the
    value itself ("ieee"), its TF32 rounding ("tf32"), or hi + lo of its split into two TF32 values ("tf32x3", the
    GPU default: within 2^-22 of the value, unequal to it in about a quarter of cases). On the interpreter and on a
    GPU alike: the operands the kernels hand to a "tf32" tl.dot are TF32 values already, so the hardware's
    truncation is a no-op. Forward (activation side and matrix side), inverse, and grad x (W^T dy)."""
    C = 24
    f = _ONE_PRODUCT[precision]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, C, 5, 3, generator=gen).to(device)
    d = torch.randn(C, generator=gen).to(device)
    if precision != "ieee":
        assert (f(x) != x).float().mean() > 0.2, "the test values must be ones the precision changes"
    perm = torch.randperm(C, generator=gen)
    p_mat = torch.eye(C, device=device)[perm]
    zeros = torch.zeros(C, device=device)
    ones = torch.ones_like(x)
    with use_dot_precision(precision), torch.no_grad():
        assert torch.equal(actnorm_invconv_forward(x, zeros, zeros, p_mat), f(x)[:, perm])
        assert torch.equal(actnorm_invconv_forward(ones, zeros, zeros, torch.diag(d)),
                           f(d).view(1, C, 1, 1).expand_as(ones))
        assert torch.equal(actnorm_invconv_inverse(x, zeros, zeros, p_mat), f(x)[:, perm])
        grad_x = actnorm_invconv_backward(ones, x, zeros, zeros, p_mat)[0]
        assert torch.equal(grad_x, f(x)[:, torch.argsort(perm)])


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("perm", ["lu", "plain"])
@pytest.mark.parametrize("C", [12, 48, 96])
def test_tf32x3_error_is_fp32_level(C, perm, device):
    """The GPU default "tf32x3": forward and every gradient (x, bias, log_scale, W or its LU factors) equal the
    float64 emulation of the split products (TF32x3Conv1x1) to fp32 accuracy, and err vs float64 at most
    TF32X3_FACTOR times the fp32 reference (the reference layers, TF32 off) — a bound plain "tf32" exceeds by
    far. Why the default: plain TF32 moved a trained Glow's held-out bits/dim by +5e-3 on an H200."""
    actnorm, permute = make_layers(C, perm, device)
    gen = torch.Generator().manual_seed(C)
    x = torch.randn(4, C, 17, 15, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(4, C, 17, 15, generator=gen).to(device)
    names, leaves, leaves64, y64, u64, w64 = _float64_twins(actnorm, permute, x)
    y_split = TF32x3Conv1x1.apply(u64, w64)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        y32 = reference(actnorm, permute, x)
        ref32 = _grads(y32, leaves, g)
        outputs = {}
        for precision in ("tf32x3", "tf32"):
            with use_dot_precision(precision):
                y = apply_actnorm_invconv(x, actnorm.bias, actnorm.log_scale, permute.weight_matrix())
                outputs[precision] = (y, *_grads(y, leaves, g))
    finally:
        torch.backends.cudnn.allow_tf32 = old
    split = (y_split, *_grads(y_split, leaves64, g))
    exact = (y64, *_grads(y64, leaves64, g))
    for name, fast, emulated, r32, r64, tf32 in zip(["y", *names], outputs["tf32x3"], split, (y32, *ref32), exact,
                                                    outputs["tf32"], strict=True):
        assert_exact(fast, emulated, "out" if name == "y" else "grad", f"{name} vs the 3xTF32 emulation")
        assert_tf32x3(fast, r32, r64, name)
        with pytest.raises(AssertionError):  # plain TF32 is far outside the bound
            assert_tf32x3(tf32, r32, r64, name)


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g.to(out.dtype))


@requires_cuda
@pytest.mark.parametrize("perm", ["lu", "plain"])
@pytest.mark.parametrize("C", [12, 48, 96])
def test_tf32_flash_rule(C, perm):
    """Default TF32 dots on a GPU, forward and every gradient (x, bias, log_scale, W or its LU factors): error vs
    float64 within 2x that of a TF32 computation — cuDNN's TF32 conv (the PyTorch reference) or, whichever errs
    more, the same math from TF32-rounded operands (what the kernels compute, see test_tf32_dots_round_operands).
    This bound is loose against truncated operands (their max error is only ~2-3x the rounded one's): the sharp
    check that the kernels round is test_tf32_dots_round_operands."""
    actnorm, permute = make_layers(C, perm, "cuda")
    x = torch.randn(4, C, 33, 31, device="cuda", requires_grad=True)
    g = torch.randn(4, C, 33, 31, device="cuda")
    names, leaves, leaves64, y64, u64, w64 = _float64_twins(actnorm, permute, x)
    y_tf32 = TF32Conv1x1.apply(u64, w64)  # the TF32 computation, in float64 from rounded operands
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with use_dot_precision("tf32"):
            y = apply_actnorm_invconv(x, actnorm.bias, actnorm.log_scale, permute.weight_matrix())
            fast = _grads(y, leaves, g)
        y32 = reference(actnorm, permute, x)
        ref32 = _grads(y32, leaves, g)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert_tf32(y, [y32, y_tf32], y64, "y")
    for name, a, r32, rt, r64 in zip(names, fast, ref32, _grads(y_tf32, leaves64, g), _grads(y64, leaves64, g),
                                     strict=True):
        assert_tf32(a, [r32, rt], r64, f"grad {name}")


def test_dot_precision_follows_the_cudnn_conv_setting():
    """On CUDA the kernels' dots run 3xTF32 while cuDNN may use TF32 for convolutions (what governs the reference's
    1x1 conv) and exact fp32 when it may not, through the legacy flag and through torch's per-op API (once that is
    used, reading the legacy flag raises); CPU tensors (the interpreter) always exact; an override wins."""
    from glowfast.kernels._utils import conv_allows_tf32, dot_precision

    cudnn = torch.backends.cudnn
    saved = cudnn.allow_tf32  # restored through the legacy setter: it resets conv and rnn alike
    try:
        cudnn.allow_tf32 = True
        assert dot_precision() == dot_precision("cuda") == "tf32x3" and conv_allows_tf32("cuda")
        assert dot_precision("cpu") == "ieee"
        with use_dot_precision("tf32"):
            assert dot_precision("cuda") == dot_precision("cpu") == "tf32" and conv_allows_tf32("cuda")
        with use_dot_precision("ieee"):
            assert dot_precision("cuda") == "ieee" and not conv_allows_tf32("cuda")
        cudnn.allow_tf32 = False
        assert dot_precision() == "ieee" and not conv_allows_tf32()
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "ieee", "tf32"
        assert dot_precision() == "ieee"
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "tf32", "ieee"
        assert dot_precision() == "tf32x3"
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"  # new API only: the legacy read raises too
        assert dot_precision() == "ieee"
    finally:
        cudnn.allow_tf32 = saved


def test_bad_dot_precision_environment_variable_is_a_clear_error():
    import os
    import subprocess
    import sys

    env = dict(os.environ, GLOWFAST_DOT_PRECISION="fp16")
    r = subprocess.run([sys.executable, "-c", "import glowfast.kernels"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "GLOWFAST_DOT_PRECISION must be one of" in r.stderr
