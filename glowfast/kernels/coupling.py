"""Affine / additive coupling, given the network output h (the network itself never runs here).

With C_a = C // 2, C_b = C - C_a, z_a = z[:, :C_a], z_b = z[:, C_a:]:
- affine: shift = h[:, :C_b], raw = h[:, C_b:], s = sigmoid(raw + 2), y_b = (z_b + shift) * s,
  logdet = sum_{c,h,w} log sigmoid(raw + 2), computed stably as min(t, 0) - log1p(exp(-|t|)), t = raw + 2;
- additive: y_b = z_b + h, logdet 0;
and y = cat(z_a, y_b) written directly (no concatenation): a program owns a tile of all C channels of
BLOCK_P pixels of one sample; row c < C_a copies z, row c >= C_a reads shift/raw from h rows c - C_a and
c - C_a + C_b.

Public API
- `coupling_forward(z, h, affine)` -> (y, logdet (B,))
- `coupling_inverse(y, h, affine)` -> z     (h = NN(y_a) = NN(z_a), computed by the caller)
- `coupling_backward(z, h, grad_y, grad_logdet, affine)` -> (grad_z, grad_h); standalone launch with explicit
  tensors. grad_z holds only the direct path: the network's contribution to grad z_a arrives through h
  (torch autograd adds it).
- `CouplingFunction` / `apply_coupling(z, h, affine)`: autograd; saves z and h only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    GPU_TILES,
    NUM_STAGES,
    block_pixels,
    cdiv,
    check_block_pixels,
    check_channels,
    check_device,
    check_grads,
    check_nchw,
    gpu_tile,
    next_power_of_2,
    on_device_of,
    overridden_num_warps,
    refuse_double_backward,
)
from .actnorm_invconv import tile_index
from .precompile import launch

# ----------------------------------------------------------------------------------------------------------
# Tile helpers (also used by cross_step.py)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def sigmoid_and_log_sigmoid(t):
    """(sigmoid(t), log sigmoid(t)) without overflow for any t, from e = exp(-|t|) in (0, 1]:
    sigmoid = 1 / (1 + e) for t >= 0, e / (1 + e) for t < 0; log sigmoid = min(t, 0) - log1p(e), with log1p
    via the u = 1 + e correction trick (accurate without libdevice, which the interpreter lacks)."""
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    sig = tl.where(t >= 0, 1.0 / u, e / u)
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / d))
    return sig, tl.minimum(t, 0.0) - log1p


@triton.jit
def sigmoid_pair(t):
    """(sigmoid(t), sigmoid(-t)) from one exp, neither by cancellation (1 - sigmoid(t) is 0 for t > ~17)."""
    e = tl.exp(-tl.abs(t))
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    return tl.where(t >= 0, big, small), tl.where(t >= 0, small, big)


@triton.jit
def stable_sigmoid(t):
    sig, _ = sigmoid_pair(t)
    return sig


@triton.jit
def coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE: tl.constexpr):
    """(shift, raw, is_b, mask_b) aligned with the rows of a full-channel (CP, BLOCK_P) tile."""
    is_b = (c >= CA) & (c < C)
    mask_b = is_b[:, None] & (p[None, :] < HW)
    offs = (c - CA)[:, None] * HW + p[None, :]
    shift = tl.load(h_ptr + h_base + offs, mask=mask_b, other=0.0).to(tl.float32)
    if AFFINE:
        raw = tl.load(h_ptr + h_base + CB * HW + offs, mask=mask_b, other=0.0).to(tl.float32)
    else:
        raw = shift
    return shift, raw, is_b, mask_b


@triton.jit
def coupling_fwd_tile(z, shift, raw, is_b, mask_b, AFFINE: tl.constexpr):
    """Returns (y, logsig) with logsig zero outside the valid b rows (and all zero if additive)."""
    if AFFINE:
        sig, logsig = sigmoid_and_log_sigmoid(raw + 2.0)
        y_b = (z + shift) * sig
        logsig = tl.where(mask_b, logsig, 0.0)
    else:
        y_b = z + shift
        logsig = tl.zeros_like(z)
    return tl.where(is_b[:, None], y_b, z), logsig


@triton.jit
def coupling_inv_tile(y, shift, raw, is_b, AFFINE: tl.constexpr):
    if AFFINE:
        z_b = y / stable_sigmoid(raw + 2.0) - shift
    else:
        z_b = y - shift
    return tl.where(is_b[:, None], z_b, y)


@triton.jit
def coupling_bwd_tile(z, dy, shift, raw, is_b, dld, AFFINE: tl.constexpr):
    """Given z, dL/dy and dL/dlogdet (scalar): returns (dz, dshift, draw)."""
    if AFFINE:
        # d log sigmoid(t) / dt = sigmoid(-t), not 1 - sig (as the reference's softplus backward); the y path
        # keeps the reference's sig * (1 - sig)
        sig, sig_neg = sigmoid_pair(raw + 2.0)
        dshift = dy * sig
        draw = dy * (z + shift) * sig * (1.0 - sig) + dld * sig_neg
        dz = tl.where(is_b[:, None], dshift, dy)
    else:
        dshift = dy
        draw = dy
        dz = dy
    return dz, dshift, draw


@triton.jit
def coupling_store_dh(dh_ptr, h_base, c, p, CA, CB, HW, dshift, draw, mask_b, AFFINE: tl.constexpr):
    offs = (c - CA)[:, None] * HW + p[None, :]
    tl.store(dh_ptr + h_base + offs, dshift.to(dh_ptr.dtype.element_ty), mask=mask_b)
    if AFFINE:
        tl.store(dh_ptr + h_base + CB * HW + offs, draw.to(dh_ptr.dtype.element_ty), mask=mask_b)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _coupling_fwd_kernel(
    z_ptr, h_ptr, y_ptr, ld_part_ptr,
    C, CA, CB, HC, HW, n_ptiles, G,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, AFFINE: tl.constexpr,
):
    g = tl.program_id(0)
    b = tl.program_id(1)
    base = b.to(tl.int64) * C * HW
    h_base = b.to(tl.int64) * HC * HW
    ld_acc = tl.zeros((CP,), dtype=tl.float32)
    for pt in range(g, n_ptiles, G):
        c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        shift, raw, is_b, mask_b = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
        y, logsig = coupling_fwd_tile(z, shift, raw, is_b, mask_b, AFFINE)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        ld_acc += tl.sum(logsig, axis=1)
    if AFFINE:
        tl.store(ld_part_ptr + b * G + g, tl.sum(ld_acc, axis=0))


@triton.jit
def _coupling_inv_kernel(
    y_ptr, h_ptr, z_ptr,
    C, CA, CB, HC, HW,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, AFFINE: tl.constexpr,
):
    pt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * C * HW
    h_base = b * HC * HW
    c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    shift, raw, is_b, mask_b = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
    z = coupling_inv_tile(y, shift, raw, is_b, AFFINE)
    tl.store(z_ptr + base + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coupling_bwd_kernel(
    z_ptr, h_ptr, dy_ptr, dld_ptr, dz_ptr, dh_ptr,
    C, CA, CB, HC, HW,
    CP: tl.constexpr, BLOCK_P: tl.constexpr, AFFINE: tl.constexpr,
):
    pt = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * C * HW
    h_base = b * HC * HW
    c, p, offs, mask = tile_index(pt, C, HW, CP, BLOCK_P)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    shift, raw, is_b, mask_b = coupling_load_h(h_ptr, h_base, c, p, C, CA, CB, HW, AFFINE)
    dld = tl.load(dld_ptr + b).to(tl.float32)
    dz, dshift, draw = coupling_bwd_tile(z, dy, shift, raw, is_b, dld, AFFINE)
    tl.store(dz_ptr + base + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    coupling_store_dh(dh_ptr, h_base, c, p, CA, CB, HW, dshift, draw, mask_b, AFFINE)


# ----------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------


def coupling_block_pixels(cp: int, hw: int) -> int:
    return block_pixels(cp, hw, "coupling")


def _coupling_geometry(z, h, affine, block_p):
    B, C, H, W = z.shape
    if C < 2:
        raise ValueError(f"coupling needs at least 2 channels, got {C}")
    check_channels(C)
    ca = C // 2
    cb = C - ca
    hc = (2 if affine else 1) * cb
    if tuple(h.shape) != (B, hc, H, W):
        raise ValueError(f"h must have shape {(B, hc, H, W)} for C={C} ({'affine' if affine else 'additive'}), "
                         f"got {tuple(h.shape)}")
    hw = H * W
    cp = next_power_of_2(C)
    bp = check_block_pixels(block_p) or coupling_block_pixels(cp, hw)
    return B, C, ca, cb, hc, hw, cp, bp, cdiv(hw, bp)


def _launch_options(cp, bp):
    nw = gpu_tile("coupling", cp)[1] if cp * bp >= 4096 else 4
    return dict(num_warps=overridden_num_warps() or nw, num_stages=NUM_STAGES)


def coupling_forward(z, h, affine: bool = True, *, block_p: int | None = None,
                     programs_per_sample: int | None = None):
    """y = cat(z_a, coupled z_b) and the per-sample logdet (zeros for additive)."""
    z = check_nchw(z, "z")
    h = check_nchw(h, "h")
    check_device(z, h)
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _coupling_geometry(z, h, affine, block_p)
    G = max(1, min(programs_per_sample or n_pt, n_pt))
    y = torch.empty_like(z)
    ld_part = logdet_partials(B, G, affine, z.device)
    with on_device_of(z):
        launch(_coupling_fwd_kernel, (G, B),
            z, h, y, ld_part, C, ca, cb, hc, hw, n_pt, G,
            CP=cp, BLOCK_P=bp, AFFINE=affine, **_launch_options(cp, bp),
        )
    return y, logdet_of(ld_part, B, affine, torch.promote_types(z.dtype, h.dtype))


def logdet_partials(B: int, G: int, affine: bool, device) -> torch.Tensor:
    """The forward kernels' (B, G) per-program logdet partials: uninitialised, since with `affine` every program
    stores its slot (a zero fill would be one more kernel per flow step); a placeholder when additive (no store).
    One program per sample (G = 1: images of one pixel tile, CIFAR-10's second and third levels) writes the logdet
    itself, a (B,) buffer (the kernels' slot b * G + g is b), and `logdet_of` returns it without a sum kernel."""
    if not affine:
        return torch.empty((1,), device=device, dtype=torch.float32)
    return torch.empty((B, G) if G > 1 else (B,), device=device, dtype=torch.float32)


def logdet_of(ld_part: torch.Tensor, B: int, affine: bool, dtype: torch.dtype) -> torch.Tensor:
    """The per-sample logdet (B,) from `logdet_partials` after the launch: their sum (the buffer itself when one
    program per sample wrote it), or zeros when additive."""
    if not affine:
        return torch.zeros(B, device=ld_part.device, dtype=dtype)
    return (ld_part.sum(1) if ld_part.dim() == 2 else ld_part).to(dtype)


def coupling_inverse(y, h, affine: bool = True, *, block_p: int | None = None):
    """z = cat(y_a, y_b / sigmoid(raw + 2) - shift) (affine) or cat(y_a, y_b - h) (additive)."""
    y = check_nchw(y, "y")
    h = check_nchw(h, "h")
    check_device(y, h)
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _coupling_geometry(y, h, affine, block_p)
    z = torch.empty_like(y)
    with on_device_of(y):
        launch(_coupling_inv_kernel, (n_pt, B),
            y, h, z, C, ca, cb, hc, hw, CP=cp, BLOCK_P=bp, AFFINE=affine, **_launch_options(cp, bp),
        )
    return z


def coupling_backward(z, h, grad_y, grad_logdet, affine: bool = True, *, block_p: int | None = None):
    """(grad_z, grad_h) of (y, logdet) = coupling(z, h). grad_logdet: (B,) or None."""
    z = check_nchw(z, "z")
    h = check_nchw(h, "h")
    grad_y = grad_y.contiguous()
    check_device(z, h)
    check_grads(z, grad_y, grad_logdet if affine else None)
    B, C, ca, cb, hc, hw, cp, bp, n_pt = _coupling_geometry(z, h, affine, block_p)
    if grad_logdet is None or not affine:
        grad_logdet = torch.zeros(B, device=z.device, dtype=torch.float32)
    grad_logdet = grad_logdet.contiguous()
    dz = torch.empty_like(z)
    dh = torch.empty_like(h)
    with on_device_of(z):
        launch(_coupling_bwd_kernel, (n_pt, B),
            z, h, grad_y, grad_logdet, dz, dh, C, ca, cb, hc, hw,
            CP=cp, BLOCK_P=bp, AFFINE=affine, **_launch_options(cp, bp),
        )
    return dz, dh


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


class CouplingFunction(torch.autograd.Function):
    """(y, logdet) = coupling(z, h). Saves z and h (not y)."""

    @staticmethod
    def forward(ctx, z, h, affine):
        y, logdet = coupling_forward(z, h, affine)
        ctx.affine = affine
        ctx.save_for_backward(z, h)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        refuse_double_backward("CouplingFunction")
        z, h = ctx.saved_tensors
        dz, dh = coupling_backward(z, h, grad_y, grad_logdet, ctx.affine)
        return dz, dh, None


def apply_coupling(z, h, affine: bool = True):
    """Differentiable fused coupling: (y, logdet) given the input z and the network output h = NN(z_a)."""
    return CouplingFunction.apply(z, h, affine)


# ----------------------------------------------------------------------------------------------------------
# torch.library custom op (for torch.compile; eager code uses the Function above)
# ----------------------------------------------------------------------------------------------------------


def logdet_like(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The (B,) logdet buffer of a coupling of z given h: in the dtype the reference's arithmetic would give,
    promote(z, h) (it was h's: an fp16 h made an fp32 z's logdet overflow to -inf)."""
    return torch.empty((z.shape[0],), dtype=torch.promote_types(z.dtype, h.dtype), device=z.device)


@torch.library.custom_op("glowfast::coupling", mutates_args=())
def coupling_op(z: torch.Tensor, h: torch.Tensor, affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CouplingFunction as an opaque op with a fake implementation (used under torch.compile, see glowfast.fused)."""
    return coupling_forward(z, h, affine)


@coupling_op.register_fake
def _(z, h, affine):
    return torch.empty_like(z, memory_format=torch.contiguous_format), logdet_like(z, h)


@torch.library.custom_op("glowfast::coupling_backward", mutates_args=())
def coupling_backward_op(z: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None,
                         affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return coupling_backward(z, h, grad_y, grad_logdet, affine)


@coupling_backward_op.register_fake
def _(z, h, grad_y, grad_logdet, affine):
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            torch.empty_like(h, memory_format=torch.contiguous_format))


def _op_setup_context(ctx, inputs, output):
    z, h, affine = inputs
    ctx.affine = affine
    ctx.save_for_backward(z, h)


def _op_backward(ctx, grad_y, grad_logdet):
    z, h = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(z)
    dz, dh = coupling_backward_op(z, h, grad_y, grad_logdet, ctx.affine)
    return dz, dh, None


coupling_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Compile specs
# ----------------------------------------------------------------------------------------------------------


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type) for every kernel and constexpr branch.

    No tl.dot here: small tiles with fp32 and bf16 data, and every production tile of GPU_TILES["coupling"]."""
    specs = []
    for kernel in (_coupling_fwd_kernel, _coupling_inv_kernel, _coupling_bwd_kernel):
        for affine in (True, False):
            specs.append((kernel, dict(CP=4, BLOCK_P=32, AFFINE=affine), _launch_options(4, 32), "*fp32"))
        specs.append((kernel, dict(CP=4, BLOCK_P=32, AFFINE=True), _launch_options(4, 32), "*bf16"))
        for cp, (bp, nw) in GPU_TILES["coupling"].items():
            specs.append((kernel, dict(CP=cp, BLOCK_P=bp, AFFINE=True), dict(num_warps=nw, num_stages=NUM_STAGES),
                          "*fp32"))
    return specs
