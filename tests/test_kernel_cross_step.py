"""Cross-step kernel (step k's coupling + step k+1's ActNorm + 1x1 conv) and the fused whole-step inverse,
vs the reference layers. Tolerances: tests/tolerances.py."""

import copy

import pytest
import torch

from glowfast.kernels import (
    apply_cross_step,
    cross_step_backward,
    cross_step_forward,
    step_inverse,
    use_dot_precision,
)
from glowfast.reference import FlowStep

from conftest import kernel_devices, requires_cuda
from helpers import KERNEL_SHAPES, OpLog, randomize_
from tolerances import TF32Conv1x1, TF32x3Conv1x1, assert_exact, assert_grads_exact, assert_tf32, assert_tf32x3

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


def coupling_given_h(z, h, affine):
    """The reference coupling restated with the network output h as an input, so grad h is checked directly."""
    ca = z.shape[1] // 2
    cb = z.shape[1] - ca
    if affine:
        shift, raw = h[:, :cb], h[:, cb:]
        y = torch.cat([z[:, :ca], (z[:, ca:] + shift) * torch.sigmoid(raw + 2.0)], 1)
        return y, (-torch.nn.functional.softplus(-(raw + 2.0))).flatten(1).sum(1)
    return torch.cat([z[:, :ca], z[:, ca:] + h], 1), torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)


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


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's padded lanes
def test_padded_pixels_cannot_put_nan_into_the_parameter_gradients(kernel_device):
    """As for actnorm_invconv_backward: on a tile's padded lanes u = bias * exp(log_scale) may be inf while every
    real pixel's is finite; the grad log_scale / W sums must not take 0 * inf = NaN from them."""
    C, W = 4, 5
    with torch.device("cpu"):  # inputs (a CPU generator) and the reference on the CPU; the kernel on kernel_device
        g = torch.Generator().manual_seed(0)
        z, grad_out = torch.randn(1, C, 1, W, generator=g), torch.randn(1, C, 1, W, generator=g)
        z[0, 0] = -1e30 + torch.arange(W) * 2.3e23  # z_a passes through the coupling: y_0 + bias finite
        h = 0.1 * torch.randn(1, C, 1, W, generator=g)  # [shift; raw] of the two b channels
        grad_ld = torch.randn(1, generator=g)
        bias, log_scale = torch.tensor([1e30, 0.0, 0.0, 0.0]), torch.tensor([20.0, 0.0, 0.0, 0.0])
        w = torch.linalg.qr(torch.randn(C, C, generator=g))[0]
    dev = [t.to(kernel_device) for t in (z, h, grad_out, grad_ld, bias, log_scale, w)]
    _, _, db, dls, dw = cross_step_backward(*dev, affine=True)
    with torch.device("cpu"):
        zr, hr, br, lr, wr = (t.clone().requires_grad_(True) for t in (z, h, bias, log_scale, w))
        sig = torch.sigmoid(hr[:, 2:] + 2.0)
        y = torch.cat([zr[:, :2], (zr[:, 2:] + hr[:, :2]) * sig], 1)
        ld = torch.log(sig).flatten(1).sum(1)
        u = (y + br.view(1, -1, 1, 1)) * torch.exp(lr).view(1, -1, 1, 1)
        assert torch.isfinite(u).all()
        out = torch.nn.functional.conv2d(u, wr.view(C, C, 1, 1))
        g_b, g_ls, g_w = torch.autograd.grad((out * grad_out).sum() + (ld * grad_ld).sum(), [br, lr, wr])
    for got, ref, name in ((db, g_b, "bias"), (dls, g_ls, "log_scale"), (dw, g_w, "W")):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=0, msg=name)


@pytest.mark.parametrize("programs,need_dw,dw_outside", [(1, False, False), (2, True, False), (3, True, False),
                                                         (3, True, True), (1, False, True)])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_backward_launch_loops_over_tiles(coupling, programs, need_dw, dw_outside, kernel_device):
    """Standalone backward over 4 masked tiles per sample. programs > 1 is the GPU's split reduction (one partial
    per program, unevenly many tiles each at 3), which CPU defaults never reach; need_dw=False drops grad W;
    dw_outside computes it from the u the kernel wrote, by one GEMM after it. One reduction sums the partials of all
    three parameter gradients."""
    step_k, step_next = make_steps(6, coupling, "plain", kernel_device)
    z = torch.randn(2, 6, 7, 9, requires_grad=True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    an, pm = step_next.actnorm, step_next.permute
    y, ld_ref = coupling_given_h(z, h, coupling == "affine")
    out_ref = pm(an(y)[0])[0]
    g_out, g_ld = torch.randn_like(out_ref), torch.randn(2)
    loss = (out_ref * g_out).sum() + (ld_ref * g_ld).sum()
    gz, gh, gb, gls, gw = torch.autograd.grad(loss, [z, h, an.bias, an.log_scale, pm.weight])
    with OpLog() as log:
        dz, dh, db, dls, dw = cross_step_backward(z.detach(), h.detach(), g_out, g_ld, an.bias, an.log_scale,
                                                  pm.weight, coupling == "affine", need_dw=need_dw,
                                                  dw_outside=dw_outside, block_p=16, programs_per_sample=programs)
    assert [name for name, _, _ in log.calls].count("aten.sum") == 1  # one reduction for the three gradients
    if need_dw:
        assert_exact(dw, gw, "grad", "W")
    else:
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


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("C", [12, 48])
def test_tf32_dots_round_operands(C, device):
    """Under "tf32" the cross-step kernels round every tl.dot operand to TF32 (forward, the backward's W^T dout and
    its grad-W product, the step inverse): equal to the rounded-operand product to fp32 accuracy. Additive coupling
    and an identity ActNorm keep each operand an exact fp32 sum (see test_kernel_actnorm_invconv.py)."""
    step_k, step_next = make_steps(C, "additive", "lu", device)
    w = step_next.permute.weight_matrix().detach().requires_grad_(True)
    bias, log_scale = (torch.zeros(C, device=device, requires_grad=True) for _ in range(2))
    z = torch.randn(3, C, 9, 7, device=device, requires_grad=True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    g = torch.randn(3, C, 9, 7, device=device)
    with use_dot_precision("tf32"):
        out, _ = apply_cross_step(z, h, bias, log_scale, w, False)
        grads = torch.autograd.grad(out, [z, h, bias, log_scale, w], g)
        with torch.no_grad():
            w_inv = torch.linalg.inv(w.double()).float()
            z_back = step_inverse(out, h, bias, log_scale, w_inv, False)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (z, h, bias, log_scale, w)]
    z64, h64, b64, ls64, w64 = leaves64
    y64, _ = coupling_given_h(z64, h64, False)
    out_tf32 = TF32Conv1x1.apply((y64 + b64.view(1, -1, 1, 1)) * ls64.exp().view(1, -1, 1, 1), w64)
    assert_exact(out, out_tf32, "out", "out")
    assert_grads_exact(grads, torch.autograd.grad(out_tf32, leaves64, g.double()), ["z", "h", "bias", "log_scale", "W"])
    v = out.detach().clone()
    v[:, C // 2:] -= h.detach()  # the additive coupling's inverse (in fp32, as the kernel), then W^-1
    assert_exact(z_back, TF32Conv1x1.apply(v, w_inv), "out", "inverse")


@requires_cuda
@pytest.mark.parametrize("perm", ["lu", "plain"])
@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("C", [12, 48, 96])
def test_tf32_flash_rule(C, coupling, perm):
    """Default TF32 dots on a GPU: the cross-step output, its log-determinant and every gradient (z, h, step k+1's
    bias, log_scale, W or its LU factors) within 2x the error vs float64 of a TF32 computation — the reference
    layers with cuDNN's TF32 conv, or the same math from TF32-rounded operands (see
    tests/test_kernel_actnorm_invconv.py::test_tf32_flash_rule)."""
    affine = coupling == "affine"
    step_k, step_next = make_steps(C, coupling, perm, "cuda")
    an, pm = step_next.actnorm, step_next.permute
    z = torch.randn(4, C, 33, 31, device="cuda", requires_grad=True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    names = ["z", "h", "bias", "log_scale", *(f"permute.{n}" for n, _ in pm.named_parameters())]
    leaves = [z, h, an.bias, an.log_scale, *pm.parameters()]
    an64, pm64 = copy.deepcopy(an).double(), copy.deepcopy(pm).double()
    z64, h64 = (t.detach().double().requires_grad_(True) for t in (z, h))
    leaves64 = [z64, h64, an64.bias, an64.log_scale, *pm64.parameters()]
    y64, ld64 = coupling_given_h(z64, h64, affine)
    out64 = pm64(an64(y64)[0])[0]
    # the TF32 computation, in float64 from rounded operands
    y_tf32, ld_tf32 = coupling_given_h(z64, h64, affine)
    u_tf32 = (y_tf32 + an64.bias.view(1, -1, 1, 1)) * an64.log_scale.exp().view(1, -1, 1, 1)
    out_tf32 = TF32Conv1x1.apply(u_tf32, pm64.weight_matrix())
    g_out, g_ld = torch.randn_like(z), torch.randn(4, device="cuda")

    def grads(out, ld, wrt):
        loss = (out * g_out.to(out.dtype)).sum() + (ld * g_ld.to(ld.dtype)).sum()
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with use_dot_precision("tf32"):
            out, ld = apply_cross_step(z, h, an.bias, an.log_scale, pm.weight_matrix(), affine)
            fast = grads(out, ld, leaves)
        y32, ld32 = coupling_given_h(z, h, affine)
        out32 = pm(an(y32)[0])[0]
        ref32 = grads(out32, ld32, leaves)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert_tf32(out, [out32, out_tf32], out64, "out")
    assert_tf32(ld, ld32, ld64, "logdet")
    for name, a, r32, rt, r64 in zip(names, fast, ref32, grads(out_tf32, ld_tf32, leaves64),
                                     grads(out64, ld64, leaves64), strict=True):
        assert_tf32(a, [r32, rt], r64, f"grad {name}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("perm", ["lu", "plain"])
@pytest.mark.parametrize("C", [12, 48])
def test_tf32x3_error_is_fp32_level(C, perm, device):
    """The GPU default "tf32x3" in the cross-step kernels: output, log-determinant and every gradient (z, h, step
    k+1's bias, log_scale, W or its LU factors) equal the float64 emulation of the split products to fp32 accuracy
    and err vs float64 at most TF32X3_FACTOR times the fp32 reference layers (see
    tests/test_kernel_actnorm_invconv.py::test_tf32x3_error_is_fp32_level)."""
    step_k, step_next = make_steps(C, "affine", perm, device)
    an, pm = step_next.actnorm, step_next.permute
    gen = torch.Generator().manual_seed(C + 1)
    z = torch.randn(4, C, 17, 15, generator=gen).to(device).requires_grad_(True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    g_out, g_ld = torch.randn(4, C, 17, 15, generator=gen).to(device), torch.randn(4, generator=gen).to(device)
    names = ["out", "logdet", "z", "h", "bias", "log_scale", *(f"permute.{n}" for n, _ in pm.named_parameters())]
    leaves = [z, h, an.bias, an.log_scale, *pm.parameters()]
    an64, pm64 = copy.deepcopy(an).double(), copy.deepcopy(pm).double()
    z64, h64 = (t.detach().double().requires_grad_(True) for t in (z, h))
    leaves64 = [z64, h64, an64.bias, an64.log_scale, *pm64.parameters()]

    def outputs_and_grads(out, ld, wrt):
        loss = (out * g_out.to(out.dtype)).sum() + (ld * g_ld.to(ld.dtype)).sum()
        return (out, ld, *torch.autograd.grad(loss, wrt, retain_graph=True))

    y64, ld64 = coupling_given_h(z64, h64, True)
    exact = outputs_and_grads(pm64(an64(y64)[0])[0], ld64, leaves64)
    u64 = (y64 + an64.bias.view(1, -1, 1, 1)) * an64.log_scale.exp().view(1, -1, 1, 1)
    split = outputs_and_grads(TF32x3Conv1x1.apply(u64, pm64.weight_matrix()), ld64, leaves64)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with use_dot_precision("tf32x3"):
            fast = outputs_and_grads(*apply_cross_step(z, h, an.bias, an.log_scale, pm.weight_matrix(), True), leaves)
        y32, ld32 = coupling_given_h(z, h, True)
        ref32 = outputs_and_grads(pm(an(y32)[0])[0], ld32, leaves)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    for name, a, emulated, r32, r64 in zip(names, fast, split, ref32, exact, strict=True):
        assert_exact(a, emulated, "out" if name == "out" else "grad", f"{name} vs the 3xTF32 emulation")
        assert_tf32x3(a, r32, r64, name)


def test_exact_backward_dots_policy():
    """use_exact_backward_dots(max_cp): the backward kernels' dots in exact fp32 at padded channel counts up to
    max_cp where the default is 3xTF32 (a CUDA device, cuDNN's TF32 on; no GPU needed to ask); the forward kernels,
    larger cp, a forced precision and CPU tensors keep theirs; off by default and again after; bad limits refused."""
    from glowfast.kernels._utils import backward_dot_precision, dot_precision, use_exact_backward_dots

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        assert [backward_dot_precision("cuda", cp) for cp in (16, 32, 64)] == ["tf32x3"] * 3
        with use_exact_backward_dots():
            assert [backward_dot_precision("cuda", cp) for cp in (16, 32, 64)] == ["ieee", "ieee", "tf32x3"]
            assert dot_precision("cuda") == "tf32x3"  # what the forward kernels ask
            for forced in ("tf32x3", "tf32"):
                with use_dot_precision(forced):
                    assert backward_dot_precision("cuda", 16) == forced
            assert backward_dot_precision("cpu", 64) == "ieee"
            with use_exact_backward_dots(16):
                assert [backward_dot_precision("cuda", cp) for cp in (16, 32)] == ["ieee", "tf32x3"]
            with use_exact_backward_dots(0):
                assert backward_dot_precision("cuda", 16) == "tf32x3"
        assert backward_dot_precision("cuda", 16) == "tf32x3"
        torch.backends.cudnn.allow_tf32 = False  # exact fp32 everywhere already
        with use_exact_backward_dots():
            assert backward_dot_precision("cuda", 64) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = old
    for bad in (-1, 16.0, True, None):
        with pytest.raises(ValueError, match="max_cp"), use_exact_backward_dots(bad):
            pass


def test_exact_backward_dots_from_the_environment():
    """GLOWFAST_EXACT_BACKWARD_MAX_CP sets the limit for a process (what `python -m glowfast.train` can be given);
    anything but an int >= 0 stops the import with the variable's name."""
    import os
    import subprocess
    import sys

    probe = ("import torch; torch.backends.cudnn.allow_tf32 = True; from glowfast.kernels import _utils; "
             "print([_utils.backward_dot_precision('cuda', cp) for cp in (16, 32, 64)])")

    def run(value):
        env = {**os.environ, "GLOWFAST_EXACT_BACKWARD_MAX_CP": value}
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)

    ok = run("16")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip() == "['ieee', 'tf32x3', 'tf32x3']"
    for value in ("-1", "32.0", "all"):
        bad = run(value)
        assert bad.returncode != 0 and "GLOWFAST_EXACT_BACKWARD_MAX_CP must be an int >= 0" in bad.stderr, value


@requires_cuda
@pytest.mark.parametrize("C", [12, 48])
def test_exact_backward_dots_reach_the_backward_kernels_only(C, monkeypatch):
    """On a GPU under use_exact_backward_dots(): the backward launches at C = 12 (cp 16) run exact-fp32 dots and
    the forward ones 3xTF32, at C = 48 (cp 64) everything stays 3xTF32; the gradients are bit for bit those of the
    forced exact-fp32 kernels (the same backward kernels on the same inputs: each function here takes the leaves
    themselves, and its backward recomputes from them, whatever its forward's precision)."""
    from glowfast.kernels import actnorm_invconv, apply_actnorm_invconv, cross_step, use_exact_backward_dots

    launches = []
    for module in (actnorm_invconv, cross_step):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, _real=real, **k: (
            launches.append((kernel.__name__, k.get("PREC"))), _real(kernel, grid, *a, **k))[1])
    step_k, step_next = make_steps(C, "affine", "lu", "cuda")
    an, pm = step_next.actnorm, step_next.permute
    gen = torch.Generator().manual_seed(C)
    z = torch.randn(2, C, 9, 7, generator=gen).cuda().requires_grad_(True)
    h = net_out(step_k, z).detach().requires_grad_(True)
    g_out, g_ld = torch.randn(2, C, 9, 7, generator=gen).cuda(), torch.randn(2, generator=gen).cuda()
    leaves = [z, h, an.bias, an.log_scale, *pm.parameters()]
    names = ["z", "h", "bias", "log_scale", *(f"permute.{n}" for n, _ in pm.named_parameters())]

    def grads():
        x = apply_actnorm_invconv(z, an.bias, an.log_scale, pm.weight_matrix())
        out, ld = apply_cross_step(z, h, an.bias, an.log_scale, pm.weight_matrix(), True)
        return torch.autograd.grad(((x + out) * g_out).sum() + (ld * g_ld).sum(), leaves)

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with use_exact_backward_dots():
            policy = grads()
        seen = dict(launches)
        with use_dot_precision("ieee"):
            exact = grads()
    finally:
        torch.backends.cudnn.allow_tf32 = old
    backward = "ieee" if C <= 32 else "tf32x3"
    assert seen == {"_actnorm_invconv_fwd_kernel": "tf32x3", "_cross_step_fwd_kernel": "tf32x3",
                    "_cross_step_bwd_kernel": backward, "_actnorm_invconv_bwd_kernel": backward}
    if C <= 32:
        for name, a, e in zip(names, policy, exact, strict=True):
            assert torch.equal(a, e), name
