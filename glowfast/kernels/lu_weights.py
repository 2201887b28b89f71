"""The parameter side of a level of LU-parametrised flow steps in one kernel each way: every step's
W_k = P_k @ L_k @ U_k and the level's summed per-pixel parameter log-determinant.

The reference layer (`glowfast.reference.InvConv1x1.weight_matrix`, lu=True) computes, per step,

    L = lower * tril_mask + I,   U = upper * triu_mask + diag(sign_s * exp(log_s)),   W = (P @ L) @ U

and the level's log-determinant per pixel is sum_k (sum(log_scale_k) + sum(log_s_k)). `glowfast.fused.level_weights`
did it for all K steps with ~18 small torch kernels forward (six stacks of the steps' tensors, masks, exp,
diag_embed, two batched matmuls, sums) and ~12 backward. In a CUDA-graphed step each small kernel costs a few
microseconds whatever its size: the K-step chain of issue 4 at CIFAR-10's smallest shapes was ~170 us of which the
flow kernels' share was a small part (benchmarks/RESULTS.md). Here: one torch.cat of the steps' tensors (one copy
kernel), one forward kernel (program k builds W_k; program 0 also sums the log-determinant), and one backward kernel
writing every step's gradients into one buffer whose views are the gradients.

Same function as the reference, forward and backward, up to the fp32 summation order of the products and sums. The
products with P are row gathers (P is a permutation matrix: the layer's definition, built by its LU at init, and
checked: `permutation_matrices`), which for finite values is what the reference's fp32 product with P computes
exactly; the products with L and U are exact fp32 (`input_precision="ieee"`), as torch's fp32 matmuls are unless TF32
was allowed for them; the masks multiply as the reference's do (an inf in an entry they remove gives NaN, as there).
Non-finite factors give a non-finite W; a NaN spreads over fewer entries than the reference's product with P spreads
it (tested).

Public API
- `lu_level_weights(perms, log_scales)` -> (W (K, C, C), param_ld 0-d): differentiable w.r.t. every `lower`,
  `upper`, `log_s` and `log_scale` (`LUWeightsFunction`); `perms` are the steps' InvConv1x1(lu=True) layers.
- `try_lu_level_weights(perms, log_scales)`: the same, or None where the kernels do not take these tensors.
- `lu_weights_run_on(perms, log_scales)`: whether the kernels take these tensors (else glowfast.fused keeps its
  torch ops, which torch.compile also traces: this Function is eager-only); among the conditions, that every P is a
  permutation matrix (`permutation_matrices`, checked once per tensor version).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import triton_kernels_run_on
from ._utils import MAX_CHANNELS, channel_pad, check_device, on_device_of, refuse_double_backward
from .precompile import launch

# (padded channels, warps) of the launches: every level up to 64 channels on the one 64-channel tile, so that a model
# compiles one variant per direction (start-up: each Triton compile is ~0.4-0.8 s, a fresh process compiles them one
# after another unless precompiled, and issue 6's start-up budget is 20 s). A step is one program, and its products
# loop over the real channel count in chunks (`range(0, C, KB)`), so the padding costs masked lanes, not chunks.
# The sm_90 cubins (Triton 3.8, no GPU needed: _compile_check): at cp 64 the backward holds 255 registers without a
# spill on 8 warps (72 B spilled on 4); at cp 128 it spills 488 B on 16 warps (1,016 on 8), the one tolerated spill
# (tests/test_triton_compile_sm90.py): once per training step for a level wider than 64 channels.
_TILES = {64: 8, 128: 16}


def _tile(channels: int) -> tuple[int, int]:
    cp = 64 if channels <= 64 else channel_pad(channels)
    return cp, _TILES[cp]


# The products run in chunks of KB inner indices, their operands loaded from the step's (cached) tensors chunk by
# chunk: one CP x CP accumulator and two CP x KB operands live at a time, where whole-matrix products at CP 64 spilled
# hundreds of registers per thread on sm_90 (exact-fp32 dots are FMA loops over register tiles).
KB = tl.constexpr(16)  # tl.dot's smallest inner size


@triton.jit
def _lower_entries(step_ptr, i, j, mask, C):
    """L[i, j] of L = lower * tril_mask + I at broadcastable index grids i, j (the reference's mask product: an inf
    the mask removes becomes NaN)."""
    lower = tl.load(step_ptr + C * C + i * C + j, mask=mask, other=0.0)
    return lower * (i > j).to(tl.float32) + ((i == j) & mask).to(tl.float32)


@triton.jit
def _upper_entries(step_ptr, i, j, mask, C):
    """U[i, j] of U = upper * triu_mask + diag(sign_s * exp(log_s)) at broadcastable index grids i, j."""
    upper = tl.load(step_ptr + 2 * C * C + i * C + j, mask=mask, other=0.0)
    on_diag = (i == j) & mask
    sign_s = tl.load(step_ptr + 3 * C * C + i, mask=on_diag, other=0.0)
    log_s = tl.load(step_ptr + 3 * C * C + C + i, mask=on_diag, other=0.0)
    return upper * (j > i).to(tl.float32) + tl.where(on_diag, sign_s * tl.exp(log_s), 0.0)


@triton.jit
def _source_rows(step_ptr, C, CP: tl.constexpr):
    """src with P[i, src[i]] = 1 for every row i of the permutation matrix P (the packed tensors' first): P @ M is M's
    rows gathered, src[i] = sum_j j * P[i, j]."""
    r = tl.arange(0, CP)
    src = tl.zeros((CP,), dtype=tl.float32)
    for jb in range(0, C, KB):
        j = jb + tl.arange(0, KB)
        p = tl.load(step_ptr + r[:, None] * C + j[None, :], mask=(r[:, None] < C) & (j[None, :] < C), other=0.0)
        src += tl.sum(p * j[None, :].to(tl.float32), axis=1)
    return tl.minimum(tl.maximum(src.to(tl.int32), 0), C - 1)  # in bounds whatever P holds (it is checked)


@triton.jit
def _target_rows(step_ptr, m, C, CP: tl.constexpr):
    """dst[m] with P[dst[m], m] = 1 for the columns m (a vector) of P: P^T @ M is M's rows gathered by dst."""
    r = tl.arange(0, CP)
    p = tl.load(step_ptr + r[:, None] * C + m[None, :], mask=(r[:, None] < C) & (m[None, :] < C), other=0.0)
    dst = tl.sum(p * r[:, None].to(tl.float32), axis=0).to(tl.int32)
    return tl.minimum(tl.maximum(dst, 0), C - 1)  # in bounds whatever P holds (it is checked)


@triton.jit
def _lu_weights_fwd_kernel(packed_ptr, w_ptr, ld_ptr, K, C, CP: tl.constexpr):
    """Program k: W_k = (P L) U, P L as L's rows gathered, an exact-fp32 product; program 0 also the level's
    sum_k (sum(log_s_k) + sum(log_scale_k)) (one program: no atomics, deterministic)."""
    k = tl.program_id(0)
    step = 3 * C * C + 3 * C  # packed floats per step
    step_ptr = packed_ptr + k.to(tl.int64) * step
    r = tl.arange(0, CP)
    src = _source_rows(step_ptr, C, CP)
    acc = tl.zeros((CP, CP), dtype=tl.float32)
    for jb in range(0, C, KB):
        j = jb + tl.arange(0, KB)
        pl = _lower_entries(step_ptr, src[:, None], j[None, :], (r[:, None] < C) & (j[None, :] < C), C)
        up = _upper_entries(step_ptr, j[:, None], r[None, :], (j[:, None] < C) & (r[None, :] < C), C)
        acc = tl.dot(pl, up, acc, input_precision="ieee")
    inside = (r[:, None] < C) & (r[None, :] < C)
    tl.store(w_ptr + k.to(tl.int64) * C * C + r[:, None] * C + r[None, :], acc, mask=inside)
    if k == 0:
        total = tl.zeros((KB, CP), dtype=tl.float32)
        for s0 in range(0, K, KB):  # KB steps' log_s and log_scale rows at a time
            s = s0 + tl.arange(0, KB)
            vec = packed_ptr + s[:, None] * step + 3 * C * C + C + r[None, :]  # < 2**31 (lu_weights_run_on)
            mask = (s[:, None] < K) & (r[None, :] < C)
            total += tl.load(vec, mask=mask, other=0.0) + tl.load(vec + C, mask=mask, other=0.0)
        tl.store(ld_ptr, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _lu_weights_bwd_kernel(packed_ptr, dw_ptr, dld_ptr, grad_ptr, C, CP: tl.constexpr):
    """Program k: step k's gradients [d lower | d upper | d log_s | d log_scale] from dL/dW_k and dL/d param_ld.
    With G = P^T dW (dW's rows gathered by dst): dL = G U^T and dU = L^T G (= (P L)^T dW), then the masks and exp's
    rule, as the reference's autograd computes them (its products with P select entries exactly)."""
    k = tl.program_id(0).to(tl.int64)
    step_ptr = packed_ptr + k * (3 * C * C + 3 * C)
    dw_ptr += k * C * C
    g = grad_ptr + k * (2 * C * C + 2 * C)
    r = tl.arange(0, CP)
    rows = r[:, None]
    cols = r[None, :]
    inside = (rows < C) & (cols < C)
    dst = _target_rows(step_ptr, r, C, CP)
    dld = tl.load(dld_ptr)

    acc = tl.zeros((CP, CP), dtype=tl.float32)  # d(L) = G @ U^T, over U's columns j
    for jb in range(0, C, KB):
        j = jb + tl.arange(0, KB)
        g_cols = tl.load(dw_ptr + dst[:, None] * C + j[None, :], mask=(rows < C) & (j[None, :] < C), other=0.0)
        up_t = _upper_entries(step_ptr, cols, j[:, None], (j[:, None] < C) & (cols < C), C)  # (j, a) -> U[a, j]
        acc = tl.dot(g_cols, up_t, acc, input_precision="ieee")
    tl.store(g + rows * C + cols, acc * (rows > cols).to(tl.float32), mask=inside)

    acc = tl.zeros((CP, CP), dtype=tl.float32)  # d(U) = L^T @ G, over L's rows m
    for mb in range(0, C, KB):
        m = mb + tl.arange(0, KB)
        low_t = _lower_entries(step_ptr, m[None, :], rows, (rows < C) & (m[None, :] < C), C)  # (a, m) -> L[m, a]
        dst_m = _target_rows(step_ptr, m, C, CP)
        g_rows = tl.load(dw_ptr + dst_m[:, None] * C + cols, mask=(m[:, None] < C) & (cols < C), other=0.0)
        acc = tl.dot(low_t, g_rows, acc, input_precision="ieee")
    tl.store(g + C * C + rows * C + cols, acc * (cols > rows).to(tl.float32), mask=inside)
    on_diag = (rows == cols) & inside
    d_diag = tl.sum(tl.where(on_diag, acc, 0.0), axis=1)
    sign_s = tl.load(step_ptr + 3 * C * C + r, mask=r < C, other=0.0)
    log_s = tl.load(step_ptr + 3 * C * C + C + r, mask=r < C, other=0.0)
    tl.store(g + 2 * C * C + r, d_diag * (sign_s * tl.exp(log_s)) + dld, mask=r < C)
    tl.store(g + 2 * C * C + C + r, tl.zeros((CP,), dtype=tl.float32) + dld, mask=r < C)


def _step_inputs(perms, log_scales) -> list[torch.Tensor]:
    """Every step's tensors in the packed order: per step (p, lower, upper, sign_s, log_s, log_scale)."""
    return [t for perm, log_scale in zip(perms, log_scales, strict=True)
            for t in (perm.p, perm.lower, perm.upper, perm.sign_s, perm.log_s, log_scale)]


def lu_weights_run_on(perms, log_scales) -> bool:
    """Whether `lu_level_weights` takes these steps: fp32 tensors where the kernels run (CUDA, or the CPU under
    TRITON_INTERPRET=1), eager (not while torch.compile traces), all of one channel count, at most MAX_CHANNELS."""
    if not perms or torch.compiler.is_compiling():
        return False
    first = perms[0].lower
    if not triton_kernels_run_on(first):
        return False
    c = first.shape[0]
    if c > MAX_CHANNELS or len(perms) * (3 * c * c + 3 * c) >= 2**31:  # the kernels' tile and int32 offsets
        return False
    return all(t.dtype == torch.float32 and t.device == first.device for t in _step_inputs(perms, log_scales)) and \
        all(perm.lower.shape == (c, c) and log_scale.shape == (c,) for perm, log_scale in zip(perms, log_scales)) \
        and permutation_matrices([perm.p for perm in perms])


_CHECKED = "_glowfast_permutation_version"  # on a P tensor: the version (tensor._version) found a permutation


def permutation_matrices(ps) -> bool:
    """Whether every P is a permutation matrix (0/1 entries, one 1 in each row and column), which the kernels'
    row gathers take it to be (InvConv1x1 builds it so; a P loaded or edited otherwise would give a wrong W). Checked
    once per tensor and version (one host sync; an in-place write, such as load_state_dict's, bumps the version).
    While a CUDA graph is being captured an unchecked P is not checked (a sync is not allowed there): False, and
    level_weights takes the torch ops, right for any P."""
    unchecked = [p for p in ps if _version(p) is None or getattr(p, _CHECKED, None) != _version(p)]
    if not unchecked:
        return True
    if unchecked[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    stacked = torch.stack(unchecked)
    valid = ((stacked == 0) | (stacked == 1)).all() & (stacked.sum(1) == 1).all() & (stacked.sum(2) == 1).all()
    if not bool(valid):
        return False
    for p in unchecked:
        if _version(p) is not None:
            setattr(p, _CHECKED, _version(p))
    return True


def _version(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference-mode tensor, which has none (its P is then checked every call)."""
    try:
        return t._version
    except RuntimeError:
        return None


class LUWeightsFunction(torch.autograd.Function):
    """(W (K, C, C), param_ld) of K LU-parametrised steps; inputs: K, C, then per step
    (p, lower, upper, sign_s, log_s, log_scale) flattened, each P a permutation matrix (`lu_level_weights` checks).
    Saves the packed copy of the inputs."""

    @staticmethod
    def forward(ctx, n_steps: int, channels: int, *flat):
        packed = torch.cat(flat)
        w = packed.new_empty((n_steps, channels, channels))
        param_ld = packed.new_empty(())
        cp, warps = _tile(channels)
        with on_device_of(packed):
            launch(_lu_weights_fwd_kernel, (n_steps,), packed, w, param_ld, n_steps, channels, CP=cp,
                   num_warps=warps)
        ctx.save_for_backward(packed)
        ctx.shape = (n_steps, channels)
        return w, param_ld

    @staticmethod
    def backward(ctx, grad_w, grad_ld):
        refuse_double_backward("LUWeightsFunction")
        (packed,) = ctx.saved_tensors
        n_steps, c = ctx.shape
        grad = packed.new_empty((n_steps, 2 * c * c + 2 * c))
        cp, warps = _tile(c)
        with on_device_of(packed):
            launch(_lu_weights_bwd_kernel, (n_steps,), packed, grad_w.contiguous(), grad_ld.contiguous(), grad,
                   c, CP=cp, num_warps=warps)
        # the step count and channels; then each step's flat inputs, as _step_inputs orders them (views of grad)
        per_step = zip(*(part.unbind(0) for part in grad.split((c * c, c * c, c, c), dim=1)), strict=True)
        out = [None, None]
        for d_lower, d_upper, d_log_s, d_log_scale in per_step:
            out += [None, d_lower, d_upper, None, d_log_s, d_log_scale]
        needs = ctx.needs_input_grad
        return tuple(g if g is not None and needs[i] else None for i, g in enumerate(out))


def lu_level_weights(perms, log_scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's W (K, C, C) and sum_k (sum(log_scale_k) + sum(log_s_k)) (0-d) of K InvConv1x1(lu=True) layers
    `perms` and their ActNorm log-scales, by the two kernels (module docstring); differentiable."""
    check_device(*_step_inputs(perms, log_scales))
    if not permutation_matrices([perm.p for perm in perms]):
        raise ValueError("lu_level_weights: every step's P must be a permutation matrix, checked once per tensor "
                         "version and never while a CUDA graph is being captured (call it once before capturing); "
                         "glowfast.fused.level_weights takes torch ops for any other P")
    return _apply(perms, log_scales)


def try_lu_level_weights(perms, log_scales) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`lu_level_weights` where the kernels take these tensors (`lu_weights_run_on`), else None (the caller then
    computes them otherwise: glowfast.fused.level_weights's torch ops); each check made once."""
    return _apply(perms, log_scales) if lu_weights_run_on(perms, log_scales) else None


def _apply(perms, log_scales) -> tuple[torch.Tensor, torch.Tensor]:
    flat = [t.reshape(-1) for t in _step_inputs(perms, log_scales)]
    return LUWeightsFunction.apply(len(perms), perms[0].lower.shape[0], *flat)


def is_production_spec(kernel_name: str, constexprs: dict, options: dict, data_type: str) -> bool:
    """Every spec is the launch configuration of its channel count (_compile_check's spill test)."""
    return True


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type): both kernels at both launch tiles."""
    return [(kernel, dict(CP=cp), dict(num_warps=nw), "*fp32")
            for kernel in (_lu_weights_fwd_kernel, _lu_weights_bwd_kernel) for cp, nw in _TILES.items()]
