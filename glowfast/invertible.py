"""Memory-saving backward for a level of fused flow steps: keep the output, reconstruct the inputs.

A flow is invertible, so backward does not need the activations forward computed: from a step's output it can
recompute the step's input exactly (up to rounding) with the inverse kernels. `invertible_steps` runs the K
steps of a level forward with the fused kernels *without* recording anything but the level's output y, and in
backward walks the steps last to first:

    h_k  = NN_k(y_k[:, :C_a])                     (the coupling keeps the a-half: the network's input is exact)
    z_k  = coupling_inverse(y_k, h_k)             (the coupling's input)
    dz_k, dh_k = coupling_backward(z_k, h_k, dy_k, dlogdet)
    dz_k[:, :C_a] += d NN_k / d input (dh_k)       (torch autograd through the network, recomputed here)
    x_k  = actnorm_invconv_inverse(z_k, W_k^-1)   (the step's input = the previous step's output y_{k-1})
    dx_k, dbias_k, dlog_scale_k, dW_k = actnorm_invconv_backward(x_k, dz_k, ...)

Activation memory is then one tensor per level instead of ~2 per step plus each network's saved activations
(the networks' activations are recomputed, one at a time, as in gradient checkpointing: about one extra
network forward per step). Forward values are the ordinary fused path's; gradients differ from it only by the
rounding of the reconstruction (tested against the reference). W^-1 is computed once per backward, in float64
like the reference's inverse. The reconstruction divides by the affine coupling's scale s = sigmoid(raw + 2),
so its rounding is amplified by 1/s: negligible for ordinary scales, ~2e-4 relative gradient error at
s = 3e-4, order 1 at s ~ 1e-8 (docs/DESIGN.md has the measurements).

The standalone launch functions used here are the ones the ordinary fused path's autograd Functions use
(glowfast.kernels); the coupling networks are called as modules (with the parameter tensors forward saw), so
bf16 / channels_last options apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .kernels._utils import refuse_double_backward
from .kernels.actnorm_invconv import actnorm_invconv_backward, actnorm_invconv_inverse
from .kernels.coupling import coupling_backward, coupling_inverse

__all__ = ["invertible_steps"]


def _step_tensors(step, weight) -> list[torch.Tensor]:
    return [step.actnorm.bias, step.actnorm.log_scale, weight, *step.coupling.net.parameters()]


class _InvertibleSteps(torch.autograd.Function):
    """(y, coupling logdet) of K fused steps; saves y and the parameters only. Inputs: (steps, bounds, x,
    *[bias_k, log_scale_k, W_k, *net_params_k for every k]); step k's tensors are tensors[bounds[k]:bounds[k+1]]."""

    @staticmethod
    def forward(ctx, steps, bounds, x, *tensors):
        from .fused import fused_chain

        weights = [tensors[start + 2] for start in bounds[:-1]]
        y, ld = fused_chain(steps, x, weights)  # grad mode is off inside Function.forward: nothing is recorded
        if ld is None:
            ld = x.new_zeros(x.shape[0])
        ctx.steps, ctx.bounds = steps, bounds
        ctx.save_for_backward(y, *tensors)
        return y, ld

    @staticmethod
    def backward(ctx, grad_y, grad_ld):
        refuse_double_backward("_InvertibleSteps")
        from .fused import _is_affine, inverse_float64

        y, *tensors = ctx.saved_tensors
        steps, bounds = ctx.steps, ctx.bounds
        weights = [tensors[start + 2] for start in bounds[:-1]]
        # no check: W is invertible by construction and the forward already used it; unchecked, the batched LU op
        # reads nothing back to the host, so this backward can be captured in a CUDA graph (torch.linalg.inv_ex,
        # the fallback without the op, may go through MAGMA/cuSOLVER, which can synchronise)
        w_invs = inverse_float64(torch.stack(weights), check=False).to(weights[0].dtype).unbind(0)
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        ca = y.shape[1] // 2
        out, g_out = y.detach(), grad_y if grad_y is not None else torch.zeros_like(y)
        for k in reversed(range(len(steps))):
            step, o, end = steps[k], bounds[k], bounds[k + 1]
            bias, log_scale, weight = tensors[o], tensors[o + 1], tensors[o + 2]
            net_params = list(tensors[o + 3: end])
            affine = _is_affine(step)
            with torch.enable_grad():
                net_in = out[:, :ca].detach().requires_grad_(True)
                # the parameter tensors forward used, not necessarily the module's current ones: under
                # torch.func.functional_call (or any parameter swap) the module holds other tensors again by now.
                # The plain call when they are the same (functional_call costs ~0.1 ms of host time per step).
                net = step.coupling.net
                named = list(net.named_parameters())
                if all(p is q for (_, p), q in zip(named, net_params, strict=True)):
                    h = net(net_in)
                else:
                    h = torch.func.functional_call(net, {n: q for (n, _), q in zip(named, net_params)}, (net_in,))
            z = coupling_inverse(out, h.detach(), affine)
            dz, dh = coupling_backward(z, h.detach(), g_out, grad_ld if affine else None, affine)
            # frozen network parameters (requires_grad=False) get None: autograd.grad refuses to differentiate them
            trainable = [p for p in net_params if p.requires_grad]
            g_in, *g_trainable = torch.autograd.grad(h, [net_in, *trainable], dh, allow_unused=True)
            g_iter = iter(g_trainable)
            g_net = [next(g_iter) if p.requires_grad else None for p in net_params]
            dz[:, :ca] += g_in
            x_k = actnorm_invconv_inverse(z, bias, log_scale, w_invs[k])
            dx, db, dls, dw = actnorm_invconv_backward(x_k, dz, bias, log_scale, weight)
            grads[o:end] = [db, dls, dw, *g_net]
            out, g_out = x_k, dx
        return (None, None, g_out, *grads)


def invertible_steps(steps: Sequence, x: torch.Tensor, weights: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, sum of the coupling log-determinants (zeros if all additive)) of the fused steps, differentiable
    w.r.t. x, the W's given and every step's ActNorm and network parameters, with the memory-saving backward."""
    steps = list(steps)
    per_step = [_step_tensors(s, w) for s, w in zip(steps, weights, strict=True)]
    bounds = (0, *itertools.accumulate(len(t) for t in per_step))
    return _InvertibleSteps.apply(steps, bounds, x, *(t for ts in per_step for t in ts))
