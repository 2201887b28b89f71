"""torch.compile over the fused path: the kernels' torch.library custom ops (glowfast::actnorm_invconv,
coupling, cross_step, step_inverse and their backward ops) pass torch.library.opcheck (schema, fake
implementation, autograd registration, AOT dispatch), and a compiled fused model traces as one graph
(fullgraph=True) whose outputs and gradients equal the eager fused path's.

On CPU the kernels run under the Triton interpreter and the compile backend is "aot_eager" (dynamo + AOT
autograd with the fake implementations, ops run eagerly); on a GPU the whole-model test also uses the default
inductor backend.
"""

import pytest
import torch

from glowfast import fused
from glowfast.kernels.actnorm_invconv import actnorm_invconv_backward_op, actnorm_invconv_op
from glowfast.kernels.coupling import coupling_backward_op, coupling_op
from glowfast.kernels.cross_step import cross_step_backward_op, cross_step_op, step_inverse_op
from glowfast.model import Glow
from glowfast.reference import FlowStep

from conftest import kernel_devices
from helpers import randomize_
from tolerances import assert_exact, assert_grads_exact


def _inputs(device, B=2, C=6, H=3, W=5, affine=True):
    cb = C - C // 2
    g = dict(device=device)
    z = torch.randn(B, C, H, W, **g)
    h = 0.5 * torch.randn(B, (2 if affine else 1) * cb, H, W, **g)
    bias, log_scale = 0.1 * torch.randn(C, **g), 0.1 * torch.randn(C, **g)
    weight = torch.linalg.qr(torch.randn(C, C, **g))[0]
    return z, h, bias, log_scale, weight


def _opcheck(op, args):
    torch.library.opcheck(op, args)  # raises on the first failing check, with its name


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "additive"])
def test_opcheck_forward_ops(device, affine, exact_precision):
    z, h, bias, log_scale, weight = _inputs(device, affine=affine)
    leaves = [t.requires_grad_() for t in (z, h, bias, log_scale, weight)]
    _opcheck(coupling_op, (leaves[0], leaves[1], affine))
    _opcheck(cross_step_op, (*leaves, affine))
    if affine:
        _opcheck(actnorm_invconv_op, (leaves[0], bias, log_scale, weight))
    with torch.no_grad():
        _opcheck(step_inverse_op, (z.detach(), h.detach(), bias.detach(), log_scale.detach(),
                                   torch.linalg.inv(weight.detach()), affine))


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("need_dw", [True, False])
def test_opcheck_backward_ops(device, need_dw, exact_precision):
    z, h, bias, log_scale, weight = _inputs(device)
    g_out, g_ld = torch.randn_like(z), torch.randn(z.shape[0], device=device)
    _opcheck(actnorm_invconv_backward_op, (z, g_out, bias, log_scale, weight, True, need_dw))
    _opcheck(coupling_backward_op, (z, h, g_out, g_ld, True))
    _opcheck(coupling_backward_op, (z, h[:, :3], g_out, None, False))
    _opcheck(cross_step_backward_op, (z, h, g_out, g_ld, bias, log_scale, weight, True, need_dw))


def test_custom_ops_equal_the_autograd_functions(kernel_device):
    """The op and the Function compute the same thing (forward and every gradient), bit for bit."""
    z, h, bias, log_scale, weight = _inputs(kernel_device)
    leaves = [t.requires_grad_() for t in (z, h, bias, log_scale, weight)]
    out_op, ld_op = cross_step_op(*leaves, True)
    out_fn, ld_fn = fused._EAGER_OPS.cross_step(*leaves, True)
    assert torch.equal(out_op, out_fn) and torch.equal(ld_op, ld_fn)
    g = torch.randn_like(out_op), torch.randn_like(ld_op)
    grads_op = torch.autograd.grad((out_op * g[0]).sum() + (ld_op * g[1]).sum(), leaves)
    grads_fn = torch.autograd.grad((out_fn * g[0]).sum() + (ld_fn * g[1]).sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(grads_op, grads_fn, strict=True))


def _compile_backends(device, inductor=False):
    # inductor (the default backend) only where the kernels are compiled anyway (CUDA), and only for the
    # whole-model test: each cold inductor compile costs tens of seconds of the GPU session's budget
    return ["aot_eager", "inductor"] if device == "cuda" and inductor else ["aot_eager"]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("coupling,permutation,lu", [("affine", "invconv", True), ("additive", "shuffle", True),
                                                     ("affine", "invconv", False)])
def test_compiled_fused_steps_match_eager(device, coupling, permutation, lu, exact_precision):
    steps = randomize_(torch.nn.ModuleList(FlowStep(6, 8, coupling, permutation, lu) for _ in range(3)),
                       scale=0.2).to(device)
    x = torch.randn(2, 6, 3, 5, device=device, requires_grad=True)
    params = [x, *steps.parameters()]
    names = ["x", *(n for n, _ in steps.named_parameters())]

    def run(x):
        return fused.steps_forward(list(steps), x)

    y_ref, ld_ref = run(x)
    g_y, g_ld = torch.randn_like(y_ref), torch.randn_like(ld_ref)
    expected = torch.autograd.grad((y_ref * g_y).sum() + (ld_ref * g_ld).sum(), params)
    for backend in _compile_backends(device):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(run)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        y, ld = torch.compile(run, fullgraph=True, backend=backend)(x)
        assert_exact(y, y_ref, "out", f"{backend}: y")
        assert_exact(ld, ld_ref, "logdet", f"{backend}: logdet")
        actual = torch.autograd.grad((y * g_y).sum() + (ld * g_ld).sum(), params)
        assert_grads_exact(actual, expected, names)

        with torch.no_grad():
            inverse = torch.compile(lambda y: fused.steps_inverse(list(steps), y), fullgraph=True, backend=backend)
            assert_exact(inverse(y_ref), fused.steps_inverse(list(steps), y_ref), "out", f"{backend}: inverse")


@pytest.mark.parametrize("device", kernel_devices())
def test_compiled_fused_glow_training_step(device, exact_precision):
    """A whole fused Glow under torch.compile(fullgraph=True): log-likelihood and all parameter gradients equal
    the eager fused model's (same parameters, dequantisation off)."""
    torch.manual_seed(0)
    model = Glow((1, 8, 8), K=2, L=2, hidden_channels=8, backend="fused").to(device)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, device=device)
    model(x)  # ActNorm's data-dependent init, eagerly
    randomize_(model.levels, scale=0.1)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss_fn(x):
        return model(x, dequantize=False).bits_per_dim.mean()

    loss_ref = loss_fn(x)
    expected = torch.autograd.grad(loss_ref, params)
    for backend in _compile_backends(device, inductor=True):
        torch._dynamo.reset()
        loss = torch.compile(loss_fn, fullgraph=True, backend=backend)(x)
        assert_exact(loss, loss_ref, "logdet", f"{backend}: bits/dim")
        assert_grads_exact(torch.autograd.grad(loss, params), expected, names)


def test_eager_path_uses_the_autograd_functions():
    """Eager calls go through the cheaper autograd.Functions, compiled ones through the custom ops."""
    assert fused._ops() is fused._EAGER_OPS
    seen = []
    torch.compile(lambda x: seen.append(fused._ops()) or x + 1, backend="eager", fullgraph=True)(torch.zeros(1))
    assert seen == [fused._COMPILE_OPS]
