"""Cross-step fusion: finish step k's coupling and apply step k+1's ActNorm + 1x1 conv in one pass.

Forward, per pixel tile (all C channels, BLOCK_P pixels of one sample):
    y_k     = coupling_k(z_k, h_k)                                  (never written to memory)
    z_{k+1} = W_{k+1} @ ((y_k + bias_{k+1}) * exp(log_scale_{k+1}))
plus the per-sample partial sums of step k's coupling logdet. A chain of K flow steps therefore costs
1 actnorm_invconv launch + (K - 1) cross-step launches + 1 coupling launch, each one read of z (+ h) and one
write, besides the coupling networks.

Backward recomputes y_k from the saved (z_k, h_k) in registers, so only z_k and h_k are saved per step.

Also here: the fused inverse of one whole step (coupling inverse of step k followed by its ActNorm + 1x1 conv
inverse): x_k = (W_k^-1 @ coupling_k^-1(y_k, h_k)) * exp(-log_scale_k) - bias_k — the inverse needs h_k =
NN(y_k[:, :C_a]) before the step's own conv inverse, so this is the natural one-pass unit when decoding.

Public API
- `cross_step_forward(z, h, bias, log_scale, weight, affine)` -> (z_next, logdet_coupling (B,))
- `cross_step_backward(z, h, grad_z_next, grad_logdet, bias, log_scale, weight, affine)`
      -> (grad_z, grad_h, grad_bias, grad_log_scale, grad_W or None)   (standalone, explicit tensors)
- `step_inverse(y, h, bias, log_scale, weight_inv, affine)` -> x
- `CrossStepFunction` / `apply_cross_step(z, h, bias, log_scale, weight, affine)`: autograd; saves z, h, bias,
  log_scale, W.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    KERNEL_KINDS,
    backward_dot_precision,
    block_pixels,
    cdiv,
    channel_pad,
    check_block_pixels,
    check_device,
    check_grads,
    check_nchw,
    compile_spec_grid,
    dot_precision,
    launch_options,
    on_device_of,
    reduction_programs,
    refuse_double_backward,
)
from .actnorm_invconv import (
    _params,
    actnorm_conv_bwd_tile,
    actnorm_conv_fwd_tile,
    actnorm_conv_inv_tile,
    conv_dot,
    load_grad_with_network_part,
    load_matrix,
    load_vec,
    network_input_grad,
    param_grad_buffers,
    param_grads,
    tile_index,
)
from .coupling import (
    _coupling_geometry,
    coupling_bwd_tile,
    coupling_fwd_tile,
    coupling_inv_tile,
    coupling_load_h,
    coupling_store_dh,
    logdet_like,
    logdet_of,
    logdet_partials,
)
from .precompile import launch

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _cross_step_fwd_kernel(
    z_ptr, h_ptr, out_ptr, w_ptr, bias_ptr, log_scale_ptr, ld_part_ptr,
    C, CA, CB, HC, HW, n_ptiles, G,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr, AFFINE: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * C * HW
    h_base = b.to(tl.int64) * HC * HW
    w = load_matrix(w_ptr, C, CP, False)
    bias = load_vec(bias_ptr, C, CP)
    log_scale = load_vec(log_scale_ptr, C, CP)
    ld_acc = tl.zeros((CP,), dtype=tl.float32)
    for pt in range(g, n_ptiles, G):
        c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        shift, raw, is_b, mask_b = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
        y, logsig = coupling_fwd_tile(z, shift, raw, is_b, mask_b, AFFINE)
        out, _ = actnorm_conv_fwd_tile(y, w, bias, log_scale, PREC)
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        ld_acc += tl.sum(logsig, axis=1)
    if AFFINE:
        tl.store(ld_part_ptr + b * G + g, tl.sum(ld_acc, axis=0))


@triton.jit
def _cross_step_bwd_kernel(
    z_ptr, h_ptr, dout_ptr, dld_ptr, dz_ptr, dh_ptr, w_ptr, bias_ptr, log_scale_ptr,
    dw_part_ptr, dls_part_ptr, db_part_ptr, u_ptr, da_ptr,
    C, CA, CB, HC, HW, n_ptiles, G, part_row, NA, da_sb, da_sc, da_sp,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr, AFFINE: tl.constexpr,
    NEED_DW: tl.constexpr, STORE_U: tl.constexpr, HAS_DA: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * C * HW
    h_base = b.to(tl.int64) * HC * HW
    w_t = load_matrix(w_ptr, C, CP, True)
    bias = load_vec(bias_ptr, C, CP)
    log_scale = load_vec(log_scale_ptr, C, CP)
    dld = tl.load(dld_ptr + b).to(tl.float32)
    dw_acc = tl.zeros((CP, CP), dtype=tl.float32)
    dls_acc = tl.zeros((CP,), dtype=tl.float32)
    db_acc = tl.zeros((CP,), dtype=tl.float32)
    for pt in range(g, n_ptiles, G):
        c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dout = load_grad_with_network_part(dout_ptr, base, offs, mask, c, p, b, da_ptr, NA, da_sb, da_sc, da_sp,
                                           HAS_DA)
        shift, raw, is_b, mask_b = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
        y, _ = coupling_fwd_tile(z, shift, raw, is_b, mask_b, AFFINE)
        dy, du, u = actnorm_conv_bwd_tile(y, dout, w_t, bias, log_scale, PREC)
        u = tl.where(mask, u, 0.0)  # padded pixels: bias * scale, maybe inf (see actnorm_invconv_bwd_kernel)
        dls_acc += tl.sum(du * u, axis=1)
        db_acc += tl.sum(dy, axis=1)
        if NEED_DW:
            dw_acc = conv_dot(dout, tl.trans(u), dw_acc, PREC)
        if STORE_U:  # the weight gradient as one GEMM after the kernel (cross_step_backward's dw_outside)
            tl.store(u_ptr + base + offs, u, mask=mask)
        dz, dshift, draw = coupling_bwd_tile(z, dy, shift, raw, is_b, dld, AFFINE)
        tl.store(dz_ptr + base + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        coupling_store_dh(dh_ptr, h_base, c, p, CA, CB, HW, dshift, draw, mask_b, AFFINE)
    part = b * G + g
    r = tl.arange(0, CP)
    tl.store(dls_part_ptr + part * part_row + r, dls_acc, mask=r < C)
    tl.store(db_part_ptr + part * part_row + r, db_acc, mask=r < C)
    if NEED_DW:
        wmask = (r[:, None] < C) & (r[None, :] < C)
        tl.store(dw_part_ptr + part * part_row + r[:, None] * C + r[None, :], dw_acc, mask=wmask)


@triton.jit
def _step_inverse_kernel(
    y_ptr, h_ptr, x_ptr, w_inv_ptr, bias_ptr, log_scale_ptr,
    C, CA, CB, HC, HW,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr, AFFINE: tl.constexpr,
):
    pt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * C * HW
    h_base = b * HC * HW
    c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    shift, raw, is_b, _ = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
    z = coupling_inv_tile(y, shift, raw, is_b, AFFINE)
    w_inv = load_matrix(w_inv_ptr, C, CP, False)
    x = actnorm_conv_inv_tile(z, w_inv, load_vec(bias_ptr, C, CP), load_vec(log_scale_ptr, C, CP), PREC)
    tl.store(x_ptr + base + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------


def _geometry(z, h, affine, block_p, kind, precision=None):
    B, C, ca, cb, hc, hw, _, _, _ = _coupling_geometry(z, h, affine, 16)
    cp = channel_pad(C)
    bp = check_block_pixels(block_p) or block_pixels(cp, hw, kind, precision)
    return B, C, ca, cb, hc, hw, cp, bp, cdiv(hw, bp)


def cross_step_forward(z, h, bias, log_scale, weight, affine: bool = True, *,
                       block_p: int | None = None, programs_per_sample: int | None = None):
    """(z_next, logdet) with z_next = W @ ((coupling(z, h) + bias) * exp(log_scale)); logdet = coupling's."""
    z = check_nchw(z, "z")
    h = check_nchw(h, "h")
    check_device(z, h)
    prec = dot_precision(z.device)
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _geometry(z, h, affine, block_p, "cross_step_fwd", prec)
    bias, log_scale, weight = _params(bias, log_scale, weight, C, z)
    G = max(1, min(programs_per_sample or n_pt, n_pt))
    out = torch.empty_like(z)
    ld_part = logdet_partials(B, G, affine, z.device)
    with on_device_of(z):
        launch(_cross_step_fwd_kernel, (G, B),
            z, h, out, weight, bias, log_scale, ld_part, C, ca, cb, hc, hw, n_pt, G,
            CP=cp, BLOCK_P=bp, PREC=prec, AFFINE=affine, **launch_options(cp, "cross_step_fwd", prec, bp),
        )
    return out, logdet_of(ld_part, B, affine, torch.promote_types(z.dtype, h.dtype))


def cross_step_backward(z, h, grad_out, grad_logdet, bias, log_scale, weight, affine: bool = True, *,
                        need_dw: bool = True, dw_outside: bool | None = None, grad_out_a: torch.Tensor | None = None,
                        block_p: int | None = None, programs_per_sample: int | None = None):
    """Gradients of (z_next, logdet) = cross_step(z, h, bias, log_scale, W).

    Returns (grad_z, grad_h, grad_bias, grad_log_scale, grad_W or None). grad_z is the direct path only
    (the network's contribution to grad z_a comes back through grad_h). `dw_outside`: as in
    actnorm_invconv_backward (the weight gradient as one GEMM after the kernel; None follows weight_grad_mode()).
    `grad_out_a`: more gradient for z_next's first C_a channels (the next network's input), added in the kernel
    (as actnorm_invconv_backward's grad_y_a).
    """
    z = check_nchw(z, "z")
    h = check_nchw(h, "h")
    grad_out = grad_out.contiguous()
    check_device(z, h)
    check_grads(z, grad_out, grad_logdet if affine else None)
    prec = backward_dot_precision(z.device, channel_pad(z.shape[1]))
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _geometry(z, h, affine, block_p, "cross_step_bwd", prec)
    bias, log_scale, weight = _params(bias, log_scale, weight, C, z)
    G = programs_per_sample or reduction_programs(B, n_pt, z.device)
    G = max(1, min(G, n_pt))
    f32 = dict(device=z.device, dtype=torch.float32)
    if grad_logdet is None or not affine:
        grad_logdet = torch.zeros(B, **f32)
    grad_logdet = grad_logdet.contiguous()
    dz = torch.empty_like(z)
    dh = torch.empty_like(h)
    outside, parts, (dw_part, dls_part, db_part), u = param_grad_buffers(B, G, C, hw, need_dw, dw_outside, z.device)
    grad_out, da = network_input_grad(grad_out, grad_out_a, outside)
    with on_device_of(z):
        launch(_cross_step_bwd_kernel, (G, B),
            z, h, grad_out, grad_logdet, dz, dh, weight, bias, log_scale, dw_part, dls_part, db_part, u, da.tensor,
            C, ca, cb, hc, hw, n_pt, G, parts.shape[1], *da.geometry,
            CP=cp, BLOCK_P=bp, PREC=prec, AFFINE=affine, NEED_DW=need_dw and not outside, STORE_U=outside,
            HAS_DA=da.present, **launch_options(cp, "cross_step_bwd", prec, bp),
        )
    return dz, dh, *param_grads(grad_out, u, parts, outside, need_dw, bias, log_scale, weight)


def step_inverse(y, h, bias, log_scale, weight_inv, affine: bool = True, *, block_p: int | None = None):
    """Inverse of one whole flow step given h = NN(y[:, :C_a]): x = actnorm^-1(W^-1 @ coupling^-1(y, h))."""
    y = check_nchw(y, "y")
    h = check_nchw(h, "h")
    check_device(y, h)
    prec = dot_precision(y.device)
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _geometry(y, h, affine, block_p, "fwd", prec)
    bias, log_scale, weight_inv = _params(bias, log_scale, weight_inv, C, y)
    x = torch.empty_like(y)
    with on_device_of(y):
        launch(_step_inverse_kernel, (n_pt, B),
            y, h, x, weight_inv, bias, log_scale, C, ca, cb, hc, hw,
            CP=cp, BLOCK_P=bp, PREC=prec, AFFINE=affine, **launch_options(cp, "fwd", prec, bp),
        )
    return x


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


class CrossStepFunction(torch.autograd.Function):
    """(z_next, logdet) = cross_step(z, h, bias, log_scale, W, affine). Saves z, h, bias, log_scale, W.
    `network_channels` > 0: also returns z_next[:, :network_channels], a view for the next network's input, whose
    gradient the backward kernel adds (as ActNormInvConvFunction's)."""

    @staticmethod
    def forward(ctx, z, h, bias, log_scale, weight, affine, network_channels=0):
        out, logdet = cross_step_forward(z, h, bias, log_scale, weight, affine)
        ctx.affine = affine
        ctx.save_for_backward(z, h, bias, log_scale, weight)
        return (out, logdet, out[:, :network_channels]) if network_channels else (out, logdet)

    @staticmethod
    def backward(ctx, grad_out, grad_logdet, grad_out_a=None):
        refuse_double_backward("CrossStepFunction")
        z, h, bias, log_scale, weight = ctx.saved_tensors
        dz, dh, db, dls, dw = cross_step_backward(
            z, h, grad_out, grad_logdet, bias, log_scale, weight, ctx.affine, need_dw=ctx.needs_input_grad[4],
            grad_out_a=grad_out_a,
        )
        return dz, dh, db, dls, dw, None, None


def apply_cross_step(z, h, bias, log_scale, weight, affine: bool = True):
    """Differentiable fused (coupling of step k) + (ActNorm + 1x1 conv of step k+1)."""
    return CrossStepFunction.apply(z, h, bias, log_scale, weight, affine)


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (for torch.compile; eager code uses the Function above)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("glowfast::cross_step", mutates_args=())
def cross_step_op(z: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor,
                  weight: torch.Tensor, affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CrossStepFunction as an opaque op with a fake implementation (used under torch.compile, see glowfast.fused)."""
    return cross_step_forward(z, h, bias, log_scale, weight, affine)


@cross_step_op.register_fake
def _(z, h, bias, log_scale, weight, affine):
    return torch.empty_like(z, memory_format=torch.contiguous_format), logdet_like(z, h)


@torch.library.custom_op("glowfast::cross_step_backward", mutates_args=())
def cross_step_backward_op(z: torch.Tensor, h: torch.Tensor, grad_out: torch.Tensor,
                           grad_logdet: torch.Tensor | None, bias: torch.Tensor, log_scale: torch.Tensor,
                           weight: torch.Tensor, affine: bool, need_dw: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cross_step_backward`; grad_W comes back as an empty tensor when it is not needed. The parameter gradients
    are copied out of their shared reduction buffer (a custom op's outputs may not alias each other)."""
    dz, dh, db, dls, dw = cross_step_backward(z, h, grad_out, grad_logdet, bias, log_scale, weight, affine,
                                              need_dw=need_dw)
    return dz, dh, db.clone(), dls.clone(), dw.clone() if need_dw else weight.new_empty(0)


@cross_step_backward_op.register_fake
def _(z, h, grad_out, grad_logdet, bias, log_scale, weight, affine, need_dw):
    contiguous = dict(memory_format=torch.contiguous_format)
    dw = torch.empty_like(weight, **contiguous) if need_dw else weight.new_empty(0)
    return (torch.empty_like(z, **contiguous), torch.empty_like(h, **contiguous), torch.empty_like(bias),
            torch.empty_like(log_scale), dw)


def _op_setup_context(ctx, inputs, output):
    z, h, bias, log_scale, weight, affine = inputs
    ctx.affine = affine
    ctx.save_for_backward(z, h, bias, log_scale, weight)


def _op_backward(ctx, grad_out, grad_logdet):
    z, h, bias, log_scale, weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(z)
    need_dw = ctx.needs_input_grad[4]
    dz, dh, db, dls, dw = cross_step_backward_op(z, h, grad_out, grad_logdet, bias, log_scale, weight, ctx.affine,
                                                 need_dw)
    return dz, dh, db, dls, dw if need_dw else None, None


cross_step_op.register_autograd(_op_backward, setup_context=_op_setup_context)


@torch.library.custom_op("glowfast::step_inverse", mutates_args=())
def step_inverse_op(y: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor,
                    weight_inv: torch.Tensor, affine: bool) -> torch.Tensor:
    """`step_inverse` as an opaque op (not differentiable, like the eager function)."""
    return step_inverse(y, h, bias, log_scale, weight_inv, affine)


@step_inverse_op.register_fake
def _(y, h, bias, log_scale, weight_inv, affine):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------
# Compile specs
# ----------------------------------------------------------------------------------------------------------


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type) for every kernel and constexpr branch."""
    aff = [dict(AFFINE=True), dict(AFFINE=False)]
    bwd = [dict(AFFINE=a, NEED_DW=d, STORE_U=False, HAS_DA=False) for a in (True, False) for d in (True, False)]
    bwd += [dict(AFFINE=a, NEED_DW=False, STORE_U=True, HAS_DA=False) for a in (True, False)]
    # training's launch: the next network's input gradient added in the kernel (HAS_DA)
    heaviest_bwd = dict(AFFINE=True, NEED_DW=True, STORE_U=False, HAS_DA=True)
    specs = []
    for kernel, branches, heaviest in (
        (_cross_step_fwd_kernel, aff, dict(AFFINE=True)),
        (_step_inverse_kernel, aff, dict(AFFINE=True)),
        (_cross_step_bwd_kernel, bwd + [heaviest_bwd, dict(heaviest_bwd, AFFINE=False)], heaviest_bwd),
    ):
        kind = KERNEL_KINDS[kernel.__name__]
        specs += [(kernel, cx, opts, dt) for cx, opts, dt in compile_spec_grid(branches, heaviest, kind)]
    return specs
