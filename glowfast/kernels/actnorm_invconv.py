"""ActNorm + invertible 1x1 conv in one pass over NCHW data: y = W @ ((x + bias) * exp(log_scale)) per pixel.

Kernels read NCHW directly (sample b, channel c, pixel p at b*C*HW + c*HW + p): a program owns a
(CP, BLOCK_P) tile — all channels, padded to a power of two >= 16 with masked loads, times BLOCK_P pixels of
one sample — and applies the 1x1 conv with `tl.dot` (W zero-padded to CP x CP).

The log-determinant H*W*(sum(log_scale) + log|det W|) depends on the parameters only; the caller adds it in
torch (from the batched-LU op or the LU parametrisation), so no kernel here computes it.

Public API
- `actnorm_invconv_forward(x, bias, log_scale, weight)` -> y
- `actnorm_invconv_inverse(y, bias, log_scale, weight_inv)` -> x = (W^-1 @ y) * exp(-log_scale) - bias
- `actnorm_invconv_backward(x, grad_y, bias, log_scale, weight)` -> (grad_x, grad_bias, grad_log_scale, grad_W);
  a standalone launch taking explicit tensors (x may be reconstructed by the inverse kernels in a
  memory-saving backward).
- `ActNormInvConvFunction` / `apply_actnorm_invconv(x, bias, log_scale, weight)`: autograd; saves x and the
  parameters (bias, log_scale, W), nothing else. W may come from the LU parametrisation
  (`InvConv1x1.weight_matrix()`): grad_W then flows into the LU factors through torch autograd.
- `actnorm_invconv_op` (`torch.ops.glowfast.actnorm_invconv`): the same as a torch.library custom op with a
  fake implementation and registered autograd, for torch.compile (see glowfast.fused).
"""

from __future__ import annotations

from typing import NamedTuple

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
    weight_grad_outside,
)
from .precompile import launch

# ----------------------------------------------------------------------------------------------------------
# Tile helpers (also used by cross_step.py)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def tile_index(pt, C, HW, CP: tl.constexpr, BLOCK_P: tl.constexpr):
    """Channel / pixel indices, NCHW offsets (within one sample) and mask of pixel tile `pt`."""
    c = tl.arange(0, CP)
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    offs = c[:, None] * HW + p[None, :]
    mask = (c[:, None] < C) & (p[None, :] < HW)
    return c, p, offs, mask


@triton.jit
def load_vec(ptr, C, CP: tl.constexpr):
    c = tl.arange(0, CP)
    return tl.load(ptr + c, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def round_to_tf32(x):
    """fp32 -> the nearest TF32 value (10-bit mantissa, ties away from zero: cvt.rna.tf32.f32, as cuBLAS rounds).

    Why: given raw fp32 operands, the tensor cores behind a "tf32" tl.dot drop the 13 low mantissa bits. That
    truncation shrinks every product a little, always towards zero, so a Glow's log-likelihood drifts by an
    amount that grows with depth (the flow's log-determinant assumes the exact W; float64 emulation, held-out
    bits/dim, benchmarks/tf32_rounding.py: -4.0e-2 truncated vs +7e-4 rounded at 64 flow steps on digits, -4.2e-2
    vs +2e-4 at 32 on MNIST). Rounded operands pass through the tensor cores unchanged.
    NaN is kept as it is (its bits + 0x1000 could carry into the sign bit)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def split_tf32(x):
    """x = hi + lo (up to 2^-22 |x|) with hi and lo both TF32 values: the operands of a 3xTF32 product."""
    hi = round_to_tf32(x)
    return hi, round_to_tf32(x - hi)


@triton.jit
def conv_dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b (acc may be None): the 1x1 conv's matrix product at precision PREC.

    "ieee": exact fp32 (FMA loops). "tf32": one tensor-core product of the operands rounded to TF32 (relative error
    ~5e-4 per product). "tf32x3" (the GPU default): a_hi b_hi + a_hi b_lo + a_lo b_hi from the split of each
    operand into two TF32 values (`split_tf32`; the dropped a_lo b_lo is ~2^-22 of the product): fp32-level
    accuracy (~1e-6 relative) from three tensor-core products, where plain TF32 biased a Glow's bits/dim by
    +5e-3 on an H200 (benchmarks/RESULTS.md). Every operand reaching a "tf32" tl.dot here is already a TF32
    value, so the tensor cores' truncation is a no-op and the interpreter (which multiplies in fp32) computes
    what the GPU does, up to summation order: CI checks the GPU's arithmetic. Splitting or rounding a matrix
    operand loaded before a pixel-tile loop is loop-invariant (hoisted by the compiler)."""
    if PREC == "tf32x3":
        a_hi, a_lo = split_tf32(a)
        b_hi, b_lo = split_tf32(b)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    elif PREC == "tf32":
        return tl.dot(round_to_tf32(a), round_to_tf32(b), acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def load_matrix(ptr, C, CP: tl.constexpr, TRANS: tl.constexpr):
    """The (C, C) row-major fp32 matrix at ptr, zero-padded to (CP, CP), transposed when TRANS."""
    r = tl.arange(0, CP)
    mask = (r[:, None] < C) & (r[None, :] < C)
    if TRANS:
        offs = r[None, :] * C + r[:, None]
    else:
        offs = r[:, None] * C + r[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def actnorm_conv_fwd_tile(x, w, bias, log_scale, PREC: tl.constexpr):
    """u = (x + b) * exp(log_scale); y = W @ u. Returns (y, u)."""
    u = (x + bias[:, None]) * tl.exp(log_scale)[:, None]
    y = conv_dot(w, u, None, PREC)
    return y, u


@triton.jit
def actnorm_conv_inv_tile(y, w_inv, bias, log_scale, PREC: tl.constexpr):
    """x = (W^-1 @ y) * exp(-log_scale) - b."""
    u = conv_dot(w_inv, y, None, PREC)
    return u * tl.exp(-log_scale)[:, None] - bias[:, None]


@triton.jit
def actnorm_conv_bwd_tile(x, dy, w_t, bias, log_scale, PREC: tl.constexpr):
    """Given x and dL/dy: returns (dx, du, u) with du = W^T dy, dx = du * s."""
    s = tl.exp(log_scale)
    u = (x + bias[:, None]) * s[:, None]
    du = conv_dot(w_t, dy, None, PREC)
    dx = du * s[:, None]
    return dx, du, u


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _actnorm_invconv_fwd_kernel(
    x_ptr, y_ptr, w_ptr, bias_ptr, log_scale_ptr,
    C, HW,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    pt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * C * HW
    _, _, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    w = load_matrix(w_ptr, C, CP, False)
    y, _ = actnorm_conv_fwd_tile(x, w, load_vec(bias_ptr, C, CP), load_vec(log_scale_ptr, C, CP), PREC)
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _actnorm_invconv_inv_kernel(
    y_ptr, x_ptr, w_inv_ptr, bias_ptr, log_scale_ptr,
    C, HW,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):
    pt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * C * HW
    _, _, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    w_inv = load_matrix(w_inv_ptr, C, CP, False)
    x = actnorm_conv_inv_tile(y, w_inv, load_vec(bias_ptr, C, CP), load_vec(log_scale_ptr, C, CP), PREC)
    tl.store(x_ptr + base + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_grad_with_network_part(dy_ptr, base, offs, mask, c, p, b, da_ptr, NA, da_sb, da_sc, da_sp,
                                HAS_DA: tl.constexpr):
    """dL/dy of a (CP, BLOCK_P) tile, plus (HAS_DA) the gradient that reached y's first NA channels through the
    next coupling network's input (a view of y; any strides with one pixel stride da_sp: NCHW or channels_last),
    which autograd would otherwise add in two more kernels (slice_backward's zero-filled copy, then the sum)."""
    dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DA:  # int32 offsets within the sample (as the tiles' own), the sample's base in int64
        da_sample = da_ptr + b.to(tl.int64) * da_sb
        dy += tl.load(da_sample + c[:, None] * da_sc + p[None, :] * da_sp, mask=mask & (c[:, None] < NA),
                      other=0.0).to(tl.float32)
    return dy


@triton.jit
def _actnorm_invconv_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, bias_ptr, log_scale_ptr,
    dw_part_ptr, dls_part_ptr, db_part_ptr, u_ptr, da_ptr,
    C, HW, n_ptiles, G, part_row, NA, da_sb, da_sc, da_sp,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, STORE_U: tl.constexpr, HAS_DA: tl.constexpr,
):
    """Program (g, b) loops over pixel tiles g, g + G, ... of sample b; writes one partial of each reduction.
    STORE_U (with NEED_DW off): writes u = (x + b) * s instead, for the weight gradient as one GEMM afterwards.
    HAS_DA: dL/dy also has the part da that reached y[:, :NA] through a view (`load_grad_with_network_part`)."""
    g = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * C * HW
    w_t = load_matrix(w_ptr, C, CP, True)
    bias = load_vec(bias_ptr, C, CP)
    log_scale = load_vec(log_scale_ptr, C, CP)
    dw_acc = tl.zeros((CP, CP), dtype=tl.float32)
    dls_acc = tl.zeros((CP,), dtype=tl.float32)
    db_acc = tl.zeros((CP,), dtype=tl.float32)
    for pt in range(g, n_ptiles, G):
        c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dy = load_grad_with_network_part(dy_ptr, base, offs, mask, c, p, b, da_ptr, NA, da_sb, da_sc, da_sp, HAS_DA)
        dx, du, u = actnorm_conv_bwd_tile(x, dy, w_t, bias, log_scale, PREC)
        if NEED_DX:
            tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        # dy is 0 on padded pixels/channels, so du is too; u is masked all the same: there it is bias * scale
        # (x loaded as 0), which may overflow to inf, and 0 * inf would put a NaN into the sums
        u = tl.where(mask, u, 0.0)
        dls_acc += tl.sum(du * u, axis=1)
        db_acc += tl.sum(dx, axis=1)
        if NEED_DW:
            dw_acc = conv_dot(dy, tl.trans(u), dw_acc, PREC)
        if STORE_U:
            tl.store(u_ptr + base + offs, u, mask=mask)
    part = b * G + g
    r = tl.arange(0, CP)
    tl.store(dls_part_ptr + part * part_row + r, dls_acc, mask=r < C)
    tl.store(db_part_ptr + part * part_row + r, db_acc, mask=r < C)
    if NEED_DW:
        wmask = (r[:, None] < C) & (r[None, :] < C)
        tl.store(dw_part_ptr + part * part_row + r[:, None] * C + r[None, :], dw_acc, mask=wmask)


# ----------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------


def _geometry(x: torch.Tensor, block_p: int | None, kind: str = "fwd", precision: str | None = None):
    B, C, H, W = x.shape
    hw = H * W
    cp = channel_pad(C)
    bp = check_block_pixels(block_p) or block_pixels(cp, hw, kind, precision)
    return B, C, hw, cp, bp, cdiv(hw, bp)


def _params(bias, log_scale, weight, C, data):
    check_device(data, bias, log_scale, weight)
    if bias.shape != (C,) or log_scale.shape != (C,) or weight.shape != (C, C):
        raise ValueError(
            f"expected bias/log_scale ({C},) and W ({C}, {C}); got {tuple(bias.shape)}, "
            f"{tuple(log_scale.shape)}, {tuple(weight.shape)}"
        )
    return bias.contiguous(), log_scale.contiguous(), weight.contiguous()


def actnorm_invconv_forward(x, bias, log_scale, weight, *, block_p: int | None = None) -> torch.Tensor:
    """y = W @ ((x + bias) * exp(log_scale)) per pixel; x NCHW."""
    x = check_nchw(x, "x")
    check_device(x)
    prec = dot_precision(x.device)
    B, C, hw, cp, bp, n_pt = _geometry(x, block_p, "fwd", prec)
    bias, log_scale, weight = _params(bias, log_scale, weight, C, x)
    y = torch.empty_like(x)
    with on_device_of(x):
        launch(_actnorm_invconv_fwd_kernel, (n_pt, B),
            x, y, weight, bias, log_scale, C, hw,
            CP=cp, BLOCK_P=bp, PREC=prec, **launch_options(cp, "fwd", prec, bp),
        )
    return y


def actnorm_invconv_inverse(y, bias, log_scale, weight_inv, *, block_p: int | None = None) -> torch.Tensor:
    """x = (W^-1 @ y) * exp(-log_scale) - bias per pixel; `weight_inv` is W^-1 (C, C)."""
    y = check_nchw(y, "y")
    check_device(y)
    prec = dot_precision(y.device)
    B, C, hw, cp, bp, n_pt = _geometry(y, block_p, "fwd", prec)
    bias, log_scale, weight_inv = _params(bias, log_scale, weight_inv, C, y)
    x = torch.empty_like(y)
    with on_device_of(y):
        launch(_actnorm_invconv_inv_kernel, (n_pt, B),
            y, x, weight_inv, bias, log_scale, C, hw,
            CP=cp, BLOCK_P=bp, PREC=prec, **launch_options(cp, "fwd", prec, bp),
        )
    return x


def actnorm_invconv_backward(
    x, grad_y, bias, log_scale, weight, *,
    need_dx: bool = True, need_dw: bool = True, dw_outside: bool | None = None, grad_y_a: torch.Tensor | None = None,
    block_p: int | None = None, programs_per_sample: int | None = None,
):
    """Gradients of y = W @ ((x + bias) * exp(log_scale)) given the layer input x and dL/dy.

    Returns (grad_x or None, grad_bias, grad_log_scale, grad_W or None), parameter grads in the parameters'
    dtypes. Reductions: per-program partials summed by torch (deterministic for a fixed grid).
    `dw_outside`: the weight gradient as one fp32 GEMM over all pixels after the kernel, which writes u for it,
    instead of a 3xTF32 product in its loop (that product is most of the loop's instructions and registers;
    benchmarks/RESULTS.md). None (the default) follows `glowfast.kernels.weight_grad_mode()` ("kernel" unless
    GLOWFAST_WEIGHT_GRAD=gemm or `use_weight_grad("gemm")`).
    `grad_y_a`: more gradient for y's first C_a channels, (B, C_a, H, W), that reached them through a view (the
    next coupling network's input, `network_input_grad`); the kernel adds it to grad_y's.
    """
    x = check_nchw(x, "x")
    grad_y = grad_y.contiguous()
    check_grads(x, grad_y)
    prec = backward_dot_precision(x.device, channel_pad(x.shape[1]))
    B, C, hw, cp, bp, n_pt = _geometry(x, block_p, "actnorm_invconv_bwd", prec)
    bias, log_scale, weight = _params(bias, log_scale, weight, C, x)
    G = programs_per_sample or reduction_programs(B, n_pt, x.device)
    G = max(1, min(G, n_pt))
    dx = torch.empty_like(x) if need_dx else x.new_empty(1)
    outside, parts, (dw_part, dls_part, db_part), u = param_grad_buffers(B, G, C, hw, need_dw, dw_outside, x.device)
    grad_y, da = network_input_grad(grad_y, grad_y_a, outside)
    with on_device_of(x):
        launch(_actnorm_invconv_bwd_kernel, (G, B),
            x, grad_y, dx, weight, bias, log_scale, dw_part, dls_part, db_part, u, da.tensor,
            C, hw, n_pt, G, parts.shape[1], *da.geometry,
            CP=cp, BLOCK_P=bp, PREC=prec, NEED_DX=need_dx, NEED_DW=need_dw and not outside, STORE_U=outside,
            HAS_DA=da.present, **launch_options(cp, "actnorm_invconv_bwd", prec, bp),
        )
    return (dx if need_dx else None,
            *param_grads(grad_y, u, parts, outside, need_dw, bias, log_scale, weight))


class NetworkGrad(NamedTuple):
    """A backward kernel's HAS_DA arguments: the tensor (a placeholder when absent), (NA, batch, channel and pixel
    strides), and whether it is present."""

    tensor: torch.Tensor
    geometry: tuple[int, int, int, int]
    present: bool


def network_input_grad(grad_y: torch.Tensor, grad_y_a: torch.Tensor | None, outside: bool
                       ) -> tuple[torch.Tensor, NetworkGrad]:
    """(grad_y, the HAS_DA arguments) of a backward launch given the extra gradient `grad_y_a` of y[:, :C_a].

    grad_y_a is read in place where its pixels have one stride (NCHW or channels_last views, what networks hand
    back), else made contiguous. With the weight gradient `outside` the kernel (a GEMM of the whole grad_y after
    it), the two are summed here instead, since that GEMM needs the sum."""
    absent = NetworkGrad(grad_y, (0, 0, 0, 0), False)  # the kernel reads nothing through it
    if grad_y_a is None:
        return grad_y, absent
    B, C, H, W = grad_y.shape
    if grad_y_a.dim() != 4 or grad_y_a.shape[0] != B or grad_y_a.shape[2:] != grad_y.shape[2:] \
            or not 0 < grad_y_a.shape[1] <= C:
        raise ValueError(f"the network input's gradient must be (B, C_a <= {C}, {H}, {W}) beside the output's "
                         f"{tuple(grad_y.shape)}; got {tuple(grad_y_a.shape)}")
    check_device(grad_y, grad_y_a)
    if outside:
        total = grad_y.clone()
        total[:, :grad_y_a.shape[1]] += grad_y_a
        return total, absent
    sb, sc, sh, sw = grad_y_a.stride()
    if H > 1 and sh != W * sw:
        grad_y_a = grad_y_a.contiguous()
        sb, sc, _, sw = grad_y_a.stride()
    return grad_y, NetworkGrad(grad_y_a, (grad_y_a.shape[1], sb, sc, sw), True)


def param_grad_buffers(B: int, G: int, C: int, hw: int, need_dw: bool, dw_outside: bool | None, device):
    """(outside, parts, (dw_part, dls_part, db_part), u) for a backward kernel with a 1x1-conv dot and G programs
    per sample. `parts` is one (B*G, row) fp32 buffer of the per-program partial sums, each row [dW (C*C, unless the
    weight gradient is `outside` the kernel: `weight_grad_outside`, or not needed) | d log_scale (C) | d bias (C)];
    the kernel writes them through the three views (row stride `part_row` = row), and `param_grads` sums them in
    one reduction (three per backward call before: ~190 small kernels per CIFAR-10 training step). u (B, C, HW)
    for the GEMM when outside (else a placeholder: the kernel reads u_ptr only with STORE_U)."""
    f32 = dict(device=device, dtype=torch.float32)
    outside = need_dw and weight_grad_outside(dw_outside)
    n_dw = C * C if need_dw and not outside else 0
    parts = torch.empty((B * G, n_dw + 2 * C), **f32)
    views = (parts[:, :n_dw] if n_dw else parts, parts[:, n_dw:n_dw + C], parts[:, n_dw + C:])
    u = torch.empty((B, C, hw), **f32) if outside else parts
    return outside, parts, views, u


def param_grads(dy, u, parts, outside: bool, need_dw: bool, bias, log_scale, weight):
    """(grad_bias, grad_log_scale, grad_W or None) from the buffers of `param_grad_buffers`, in the parameters'
    dtypes: the partials summed over programs in one reduction; or (`outside`) the weight gradient as one fp32 GEMM
    of dy with the u the kernel wrote, (B, C, HW) (exact unless torch's fp32 matmuls were allowed TF32)."""
    C = bias.numel()
    sums = parts.sum(0)
    n_dw = sums.numel() - 2 * C
    grad_w = None
    if need_dw:
        grad_w = sums[:n_dw].view(C, C) if not outside else \
            torch.einsum("bip,bjp->ij", dy.reshape(u.shape[0], C, -1).to(torch.float32), u)
        grad_w = grad_w.to(weight.dtype)
    return sums[n_dw + C:].to(bias.dtype), sums[n_dw:n_dw + C].to(log_scale.dtype), grad_w


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


class ActNormInvConvFunction(torch.autograd.Function):
    """y = W @ ((x + bias) * exp(log_scale)). Saves x, bias, log_scale, W.

    `network_channels` > 0: also returns y[:, :network_channels], a view, for the next coupling network's input;
    its gradient then comes to this backward beside y's and the kernel adds the two (without the view output,
    autograd adds the network's gradient to y's in two more kernels: slice_backward's zero-filled copy, then the
    sum)."""

    @staticmethod
    def forward(ctx, x, bias, log_scale, weight, network_channels=0):
        y = actnorm_invconv_forward(x, bias, log_scale, weight)
        ctx.save_for_backward(x, bias, log_scale, weight)
        return (y, y[:, :network_channels]) if network_channels else y

    @staticmethod
    def backward(ctx, grad_y, grad_y_a=None):
        refuse_double_backward("ActNormInvConvFunction")
        x, bias, log_scale, weight = ctx.saved_tensors
        dx, db, dls, dw = actnorm_invconv_backward(
            x, grad_y, bias, log_scale, weight,
            need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[3], grad_y_a=grad_y_a,
        )
        return dx, db, dls, dw, None


def apply_actnorm_invconv(x, bias, log_scale, weight) -> torch.Tensor:
    """Differentiable fused ActNorm + 1x1 conv (no logdet: that is parameter-only, see module docstring)."""
    return ActNormInvConvFunction.apply(x, bias, log_scale, weight)


# ----------------------------------------------------------------------------------------------------------
# torch.library custom op (for torch.compile; eager code uses the Function above)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("glowfast::actnorm_invconv", mutates_args=())
def actnorm_invconv_op(x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """ActNormInvConvFunction as an opaque op with a fake implementation (for torch.compile; glowfast.fused)."""
    return actnorm_invconv_forward(x, bias, log_scale, weight)


@actnorm_invconv_op.register_fake
def _(x, bias, log_scale, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("glowfast::actnorm_invconv_backward", mutates_args=())
def actnorm_invconv_backward_op(x: torch.Tensor, grad_y: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor,
                                weight: torch.Tensor, need_dx: bool, need_dw: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`actnorm_invconv_backward`; a gradient that is not needed comes back as an empty tensor. The parameter
    gradients are copied out of their shared reduction buffer (a custom op's outputs may not alias each other)."""
    dx, db, dls, dw = actnorm_invconv_backward(x, grad_y, bias, log_scale, weight, need_dx=need_dx, need_dw=need_dw)
    return (dx if need_dx else x.new_empty(0), db.clone(), dls.clone(), dw.clone() if need_dw else weight.new_empty(0))


@actnorm_invconv_backward_op.register_fake
def _(x, grad_y, bias, log_scale, weight, need_dx, need_dw):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty(0)
    return dx, torch.empty_like(bias), torch.empty_like(log_scale), dw


def _op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _op_backward(ctx, grad_y):
    x, bias, log_scale, weight = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx, db, dls, dw = actnorm_invconv_backward_op(x, grad_y, bias, log_scale, weight, need_dx, need_dw)
    return dx if need_dx else None, db, dls, dw if need_dw else None


actnorm_invconv_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Compile specs for the GPU-free sm_90 compile check (tests/test_triton_compile_sm90.py)
# ----------------------------------------------------------------------------------------------------------


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type) for every kernel and constexpr branch."""
    specs = []
    for kernel, branches, heaviest in (
        (_actnorm_invconv_fwd_kernel, [{}], {}),
        (_actnorm_invconv_inv_kernel, [{}], {}),
        (_actnorm_invconv_bwd_kernel,
         [dict(NEED_DX=True, NEED_DW=True, STORE_U=False, HAS_DA=False),
          dict(NEED_DX=False, NEED_DW=False, STORE_U=False, HAS_DA=False),
          dict(NEED_DX=True, NEED_DW=False, STORE_U=True, HAS_DA=False),
          dict(NEED_DX=True, NEED_DW=True, STORE_U=False, HAS_DA=True)],
         dict(NEED_DX=True, NEED_DW=True, STORE_U=False, HAS_DA=True)),  # training's launch (glowfast.fused)
    ):
        kind = KERNEL_KINDS[kernel.__name__]
        specs += [(kernel, cx, opts, dt) for cx, opts, dt in compile_spec_grid(branches, heaviest, kind)]
    return specs
