"""The coupling network (conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d) with its thin 3x3 convolutions in Triton.

Why: a Glow's coupling networks are most of a fused training step (benchmarks/RESULTS.md), and their two 3x3
convolutions are *thin* — few input channels (conv1: C_a -> 512) or few output channels (conv3: 512 -> 2 C_b) —
shapes on which cuDNN runs at 14-37 TFLOP/s on an H100 (shared/TOOLCHAIN.md: 460-800 us forward + backward per
layer at batch 256, 16x16), while the memory they must move takes ~30-60 us. Here each is one implicit-GEMM pass:
a program owns BLOCK_M pixels x BLOCK_N output channels and accumulates the 9 taps x C_in products with tl.dot,
gathering the shifted input pixels itself (zero padding by masks), with bias, scale, ReLU or the ReLU-backward
mask applied before the single store. The 1x1 convolution stays a cuBLAS GEMM over the pixel rows.

Layouts: the network's input x_a (a channel slice of the flow's NCHW z, no copy) and output h (NCHW, what the
coupling kernel reads) are NCHW; the hidden activations (B*H*W, 512) are pixel rows (NHWC), the layout of the
GEMM and of coalesced channel loads. Every kernel takes (batch, channel, pixel) strides, so one kernel serves
both layouts.

Kernels (all 3x3, stride 1, zero padding 1):
- `_conv3x3_kernel`: out[p, o] = epilogue(sum_{tap, c} in[p + d_tap, c] * w[tap, c, o]). The forward of conv1
  (bias + ReLU) and conv3 (bias, then scale exp(logscale_factor * logs)), and the input gradients of both
  (a 3x3 conv with the kernel flipped and transposed; for conv3 the epilogue applies ReLU's backward mask).
  For conv3's input gradient it also writes per-tile column sums: conv2's bias gradient without another pass.
- `_conv3x3_wgrad_kernel`: partial[g, o, c, tap] = sum over pixel tiles g, g + G, ... of
  in[p + d_tap, c] * dout[p, o], in the weight's own layout; torch sums the G partials (deterministic, no atomics).
- `_relu_backward_kernel`: the first ReLU's backward in place, with conv1's bias gradient (column sums), one pass.
The 1x1's bias and ReLU run in cuBLASLt's epilogue (`torch._addmm_activation`).

Precision: the dots follow the convolutions they replace — TF32 (operands rounded to TF32, as cuDNN/cuBLAS round)
when cuDNN may use TF32 for convolutions (PyTorch's default on a GPU), exact fp32 otherwise and for CPU tensors
(the interpreter); the 1x1 GEMM likewise. The network only computes the coupling's shift and scale: whatever its
rounding, the flow stays exactly invertible (the inverse runs the same kernels on the same input) and its
log-determinant exact. Hidden activations fp32, or bf16 with `--amp bf16` (stored and the 1x1 GEMM in bf16; the
3x3 convs load them into fp32 and accumulate in fp32; under `use_bf16_dots`, not yet the default, the 3x3 convs
multiply bf16 operands on the tensor cores instead, as bf16 autocast would).

Public API
- `coupling_network_forward(x, w1, b1, w2, b2, w3, b3, logs, logscale_factor, activation_dtype)` -> (h, h1, h2)
- `coupling_network_backward(x, h1, h2, out, grad_out, w1, w2, w3, logs, logscale_factor)` -> grads of
  (x, w1, b1, w2, b2, w3, b3, logs)
- `CouplingNetworkFunction` / `apply_coupling_network(net, x, activation_dtype)`: autograd for a
  `glowfast.reference.coupling.CouplingNetwork` (saves x, h1, h2 and the output).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._utils import (
    MAX_BATCH,
    cdiv,
    check_device,
    conv_allows_tf32,
    is_interpret,
    next_power_of_2,
    on_device_of,
    reduction_programs,
    refuse_double_backward,
)
from .actnorm_invconv import conv_dot
from .precompile import launch

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _pixel_coords(m, HW, W):
    """(sample, pixel within the sample, row, column) of flattened pixel indices m = b * HW + y * W + x."""
    b = m // HW
    p = m % HW
    return b, p, p // W, p % W


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32: stored to bf16 memory it converts exactly.
    Why: the Triton interpreter's fp32 -> bf16 cast truncates (Triton 3.8, checked), a GPU's rounds to nearest;
    rounding here first makes the interpreter (CI) store what the GPU stores. NaN kept as is."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def for_store(x, ptr):
    """x (fp32) converted to ptr's element type, bf16 by round to nearest even (`round_to_bf16`)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def net_dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for operands loaded in their storage dtype (fp32 or bf16). "ieee" / "tf32": in fp32
    (`conv_dot`). "bf16": a tensor-core bf16 product with fp32 accumulation, operands rounded to bf16 first where
    stored in fp32 (as autocast rounds a conv's input and weight). "bf16_emulated": the same rounded operands
    multiplied on the fp32 units, for the interpreter (CI), whose bf16 tl.dot is wrong: a product of two bf16 values
    is exact in fp32, so this computes what the tensor cores do, up to summation order."""
    if PREC == "bf16":
        acc = tl.dot(as_bf16(a), as_bf16(b), acc)
    elif PREC == "bf16_emulated":
        acc = tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = conv_dot(a.to(tl.float32), b.to(tl.float32), acc, PREC)
    return acc


@triton.jit
def as_bf16(x):
    """x as bf16: itself if stored so, else rounded to nearest even (`round_to_bf16`)."""
    if x.dtype.is_bf16():
        return x
    return round_to_bf16(x.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _conv3x3_kernel(
    in_ptr, w_ptr, bias_ptr, scale_ptr, mask_ptr, out_ptr, colsum_ptr,
    M, H, W, CIN, COUT,
    s_ib, s_ic, s_ip, s_ob, s_oc, s_op,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, RELU: tl.constexpr, MASK: tl.constexpr,
    COLSUM: tl.constexpr, PREC: tl.constexpr, FLAT_K: tl.constexpr,
):
    HW = H * W
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < COUT
    b, p, y, x = _pixel_coords(m, HW, W)
    in_base = b * s_ib
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # K runs over (tap, channel) pairs, 9 * CIN of them, BLOCK_K at a time (a step may span taps): for a thin
        # input (conv1's C_a = 6 at BLOCK_K = 16) 4 steps instead of 9 mostly-padding ones. The weight's packed
        # (9, CIN, COUT) layout is already that (9 * CIN, COUT) matrix.
        KT = 9 * CIN
        for k0 in range(0, KT, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kk_ok = kk < KT
            tap = kk // CIN
            yy = y[:, None] + (tap // 3 - 1)[None, :]
            xx = x[:, None] + (tap % 3 - 1)[None, :]
            ok = m_ok[:, None] & kk_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a = tl.load(in_ptr + in_base[:, None] + (yy * W + xx) * s_ip + (kk % CIN)[None, :] * s_ic, mask=ok,
                        other=0.0)
            w = tl.load(w_ptr + kk[:, None] * COUT + n[None, :], mask=kk_ok[:, None] & n_ok[None, :], other=0.0)
            acc = net_dot(a, w, acc, PREC)
    else:
        n_k = tl.cdiv(CIN, BLOCK_K)
        # one flat loop over (K step, tap), not 9 unrolled copies of the K loop: the unrolled form kept several taps'
        # gather addresses live and spilled registers at every tile tried on sm_90. Taps innermost: the 9 shifted
        # reads of one channel chunk follow each other and hit the cache. Tap-outer, a wide input (conv3: 512
        # hidden channels) was re-read from memory for every tap: 9 x 128 MB at CIFAR-10's first level, B256,
        # 289 us on the H200 (benchmarks/RESULTS.md).
        for it in range(0, 9 * n_k):
            tap = it % 9
            k = (it // 9) * BLOCK_K + tl.arange(0, BLOCK_K)
            yy = y + (tap // 3 - 1)
            xx = x + (tap % 3 - 1)
            ok = m_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            row = in_base + (yy * W + xx) * s_ip
            k_ok = k < CIN
            a = tl.load(in_ptr + row[:, None] + k[None, :] * s_ic, mask=ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + (tap * CIN + k)[:, None] * COUT + n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = net_dot(a, w, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_offs = (b * s_ob + p * s_op)[:, None] + n[None, :] * s_oc
    out_mask = m_ok[:, None] & n_ok[None, :]
    if MASK:  # ReLU's backward: keep the gradient where the ReLU's output (same layout as out) is positive
        keep = tl.load(mask_ptr + out_offs, mask=out_mask, other=0.0) > 0
        acc = tl.where(keep, acc, 0.0)
    tl.store(out_ptr + out_offs, for_store(acc, out_ptr), mask=out_mask)
    if COLSUM:  # this tile's share of sum over pixels of out (a bias gradient), without another pass over out
        tl.store(colsum_ptr + tl.program_id(0) * COUT + n, tl.sum(tl.where(out_mask, acc, 0.0), axis=0), mask=n_ok)


@triton.jit
def _relu_backward_kernel(
    g_ptr, h_ptr, colsum_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """g <- g where h > 0 else 0 (ReLU's backward, in place, h the ReLU's output), and per-tile column sums of the
    result (the preceding bias's gradient); g and h are (M, N) row-major."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (m < M)[:, None] & (n < N)[None, :]
    offs = m[:, None] * N + n[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    g = tl.where(h > 0, g.to(tl.float32), 0.0)
    tl.store(g_ptr + offs, for_store(g, g_ptr), mask=mask)
    tl.store(colsum_ptr + tl.program_id(0) * N + n, tl.sum(g, axis=0), mask=n < N)


@triton.jit
def _conv3x3_wgrad_kernel(
    in_ptr, dout_ptr, part_ptr,
    M, H, W, CIN, COUT, n_mtiles, G,
    s_ib, s_ic, s_ip, s_db, s_dc, s_dp,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, PREC: tl.constexpr,
    FLAT_K: tl.constexpr,
):
    n_co = tl.cdiv(COUT, BLOCK_CO)
    tile = tl.program_id(0)
    g = tl.program_id(2)
    kk = (tile // n_co) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (tile % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    if FLAT_K:
        # columns are (channel, tap) pairs, column kk = 9 * channel + tap, 9 * CIN of them (one grid row,
        # program_id(1) == 0): a program covers every tap of its channels, so neither operand is re-read per tap
        # (the wide dout of conv1's weight; the wide hidden input of conv3's, whose 9 shifted reads per channel
        # now come from one load)
        ci = kk // 9
        tap = kk % 9
        ci_ok = kk < 9 * CIN
    else:
        ci = kk
        tap = tl.program_id(1)  # one tap per grid row
        ci_ok = ci < CIN
    dy = tap // 3 - 1  # per column when flat, one shift otherwise
    dx = tap % 3 - 1
    HW = H * W
    # acc[o, c]: the (COUT, CIN) slice of each column's tap, in the order the weight stores it
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for mt in range(g, n_mtiles, G):
        m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        b, p, y, x = _pixel_coords(m, HW, W)
        if FLAT_K:
            yy = y[:, None] + dy[None, :]
            xx = x[:, None] + dx[None, :]
            ok = m_ok[:, None] & ci_ok[None, :] & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a = tl.load(in_ptr + (b * s_ib)[:, None] + (yy * W + xx) * s_ip + ci[None, :] * s_ic, mask=ok,
                        other=0.0)
        else:
            yy = y + dy
            xx = x + dx
            ok = m_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            src = b * s_ib + (yy * W + xx) * s_ip
            a = tl.load(in_ptr + src[:, None] + ci[None, :] * s_ic, mask=ok[:, None] & ci_ok[None, :], other=0.0)
        dst = b * s_db + p * s_dp
        d = tl.load(dout_ptr + dst[None, :] + co[:, None] * s_dc, mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        acc = net_dot(d, a, acc, PREC)
    # partial g of the gradient in the weight's own (COUT, CIN, 3, 3) layout: summed over g it is the gradient
    offs = (g * COUT + co)[:, None] * (CIN * 9) + (ci * 9 + tap)[None, :]
    tl.store(part_ptr + offs, acc, mask=co_ok[:, None] & ci_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------------------


def _gpu_conv_tile(cin: int, cout: int) -> tuple[int, int, int, int, int]:
    """GPU (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of `_conv3x3_kernel`, from the block-size sweep on an H200
    (`python -m glowfast.kernels.tune --networks`, CIFAR-10's three levels at batch 256; benchmarks/RESULTS.md).
    More than 64 output channels (the hidden layer's 512 from a thin input): 128 pixels x 64 channels, K steps of
    up to 32 input channels, 8 warps: 1.7-1.9x faster than the first rule's 64 x 128 (4 warps, up to 12% faster
    still, spilled 8-160 B under Triton 3.8). Up to 64 (thin output, e.g. conv3): K steps of 64 on 64 pixels,
    4 warps up to 32 channels and 8 above (1.3x / 1.5x at 24 / 48 channels); up to 16 channels the first rule's
    128 pixels, K steps of 32, 8 warps stay the fastest.
    Every default compiles without register spills on sm_90 (tests/test_triton_compile_sm90.py). One pipeline
    stage (no prefetch of the next (tap, K step)'s loads): the only depth measured so far (`_GPU_STAGES`)."""
    if cout > 64:
        return 128, 64, max(16, min(32, next_power_of_2(cin))), 8, _GPU_STAGES
    bn = max(16, next_power_of_2(cout))
    if bn == 16:
        return 128, 16, 32, 8, _GPU_STAGES
    return 64, bn, 64, 4 if bn <= 32 else 8, _GPU_STAGES


def _gpu_wgrad_tile(cin: int, cout: int) -> tuple[int, int, int, int, int]:
    """GPU (BLOCK_M, BLOCK_CI, BLOCK_CO, num_warps, num_stages) of `_conv3x3_wgrad_kernel`, from the same sweep,
    all on 4 warps. Thin input, 512 outputs (conv1's weight): up to 64 input channels x 64 output channels, 64
    pixels per step where the input side is 16 wide, else 32 (1.1-1.3x faster than the first rule's 8 warps). 512
    hidden inputs, thin output (conv3's weight): 128 hidden channels x up to 32 outputs, 16 pixels per step up to
    32 outputs, else 32 (1.4-1.65x; the sweep's best above 32 outputs, 64 pixels, spilled 112-640 B)."""
    if cin > cout:
        return (16 if cout <= 32 else 32), 128, max(16, min(32, next_power_of_2(cout))), 4, _GPU_STAGES
    bci = max(16, min(64, next_power_of_2(cin)))
    return (64 if bci == 16 else 32), bci, 64, 4, _GPU_STAGES


def _gpu_flat_wgrad_tile(cin: int, cout: int) -> tuple[int, int, int, int, int]:
    """GPU tile of the flat weight gradient (`uses_flat_wgrad`), chosen without a GPU (spill-free on sm_90 under
    Triton 3.6, 3.8 and 3.9, tests/test_triton_compile_sm90.py); to be swept. Up to 128 (channel, tap) columns.
    Thin input (conv1's weight, 512 outputs): all 9 x cin columns in one tile where they fit, the accumulator at 4K
    elements (64 or 32 output channels), 64 pixels per step, 8 warps from 64 columns (4 spilled 160-1,440 B there:
    each column carries its own gather address). Wide input (conv3's weight, 512 hidden inputs, few outputs): 128
    columns x up to 32 outputs; at 16 outputs 32 pixels per step on 4 warps, at 32 outputs 16 pixels on 8 warps
    (4 warps spilled 72 B; 32 pixels on 8 warps sat at 128 registers and spilled 8 B under Triton 3.9, TF32 dots on
    bf16 data; 16 pixels: 80-128 registers under all three)."""
    cols = min(128, max(16, next_power_of_2(9 * cin)))
    if cin > cout:
        return (32, cols, 16, 4, _GPU_STAGES) if cout <= 16 else (16, cols, 32, 8, _GPU_STAGES)
    return 64, cols, 4096 // max(64, cols), 8 if cols >= 64 else 4, _GPU_STAGES


# Software-pipelining depth (Triton's num_stages) of the conv and weight-gradient kernels on a GPU: how many
# (tap, K step)s of loads are in flight. 1 is what the H200 sweep measured; deeper pipelines are among the
# candidates of `python -m glowfast.kernels.tune --networks` (its second phase) and change this once measured.
_GPU_STAGES = 1


def _interpreter_tile(a: int, b: int, m: int) -> tuple[int, int, int, int, int]:
    """The interpreter's cost is per program instance: as few as possible."""
    return (max(16, min(1024, next_power_of_2(m))), max(16, min(512, next_power_of_2(a))),
            max(16, min(512, next_power_of_2(b))), 4, 1)


# Tiles forced by `tile_override` (the block-size sweep, `python -m glowfast.kernels.tune --networks`)
_TILE_OVERRIDE: dict[str, tuple[int, int, int, int, int]] = {}


@contextlib.contextmanager
def tile_override(conv: tuple[int, ...] | None = None, wgrad: tuple[int, ...] | None = None,
                  flat_k: bool | None = None):
    """Inside, every `_conv3x3_kernel` launch uses tile `conv` = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps[,
    num_stages]) and every `_conv3x3_wgrad_kernel` launch `wgrad` = (BLOCK_M, BLOCK_CI, BLOCK_CO, num_warps[,
    num_stages]), where given: each block size a power of two >= 16 (tl.dot's smallest), warps a power of two up
    to 16, stages 1 to 4 (default 1); and `flat_k`, where given, decides both kernels' K order instead of
    `uses_flat_k` / `uses_flat_wgrad`. Restored on exit."""
    tiles = {} if flat_k is None else {"flat_k": bool(flat_k)}
    for name, tile in (("conv", conv), ("wgrad", wgrad)):
        if tile is None:
            continue
        tile = tuple(tile) + (1,) * (len(tile) == 4)
        if len(tile) != 5 or any(b < 16 or b & (b - 1) for b in tile[:3]) or tile[3] not in (1, 2, 4, 8, 16) \
                or tile[4] not in (1, 2, 3, 4):
            raise ValueError(f"{name} tile must be 3 powers of two >= 16, a warp count in 1..16 (a power of two) "
                             f"and optionally 1 to 4 pipeline stages, got {tile}")
        tiles[name] = tile
    saved = dict(_TILE_OVERRIDE)
    _TILE_OVERRIDE.update(tiles)
    try:
        yield
    finally:
        _TILE_OVERRIDE.clear()
        _TILE_OVERRIDE.update(saved)


def conv_tile(cin: int, cout: int, m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of `_conv3x3_kernel` for cin -> cout channels over m
    pixels."""
    if "conv" in _TILE_OVERRIDE:
        return _TILE_OVERRIDE["conv"]
    if is_interpret():
        bm, bk, bn, nw, ns = _interpreter_tile(cin, cout, m)
        return bm, bn, bk, nw, ns
    return _gpu_conv_tile(cin, cout)


def uses_flat_k(cin: int, block_k: int) -> bool:
    """Whether `_conv3x3_kernel` steps K over (tap, channel) pairs (FLAT_K) rather than tap by tap: where that takes
    at most 3/4 of the steps, i.e. where padding cin up to BLOCK_K wastes a quarter of them or more (cin <= 8 at
    BLOCK_K 16: conv1 of CIFAR-10's first level, C_a = 6, takes 4 steps instead of 9). Flat steps compute their
    gather addresses per (pixel, k) element instead of per pixel: not worth it for a small saving. Not yet timed
    on a GPU either way (`tune --networks` compares both at the fastest tile)."""
    if "flat_k" in _TILE_OVERRIDE:
        return _TILE_OVERRIDE["flat_k"]
    return 4 * cdiv(9 * cin, block_k) <= 3 * 9 * cdiv(cin, block_k)


def uses_flat_wgrad(cin: int) -> bool:
    """Whether `_conv3x3_wgrad_kernel` runs over (channel, tap) columns (FLAT_K): by default always, since tap by tap
    (9 programs per channel tile, one per tap) the wide operand is read from memory once per tap. On the H200 both
    weight gradients of CIFAR-10's first level, B256, ran at about the copy bandwidth doing that: 9 x 128 MB in
    306 us (conv1's weight: the 512-wide gradient) and 386 us (conv3's: the 512-wide hidden input);
    benchmarks/RESULTS.md. Flat, each pixel tile of it is read once. Not yet timed (`tune --networks` times the
    tap-by-tap kernel at its own tile); `tile_override(flat_k=...)` decides instead where given. `cin` is kept for
    that comparison's callers."""
    if "flat_k" in _TILE_OVERRIDE:
        return _TILE_OVERRIDE["flat_k"]
    return True


def wgrad_tile(cin: int, cout: int, m: int, flat: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_CI, BLOCK_CO, num_warps, num_stages) of `_conv3x3_wgrad_kernel`; with `flat` BLOCK_CI counts
    (channel, tap) columns."""
    if "wgrad" in _TILE_OVERRIDE:
        return _TILE_OVERRIDE["wgrad"]
    if is_interpret():
        return _interpreter_tile(9 * cin if flat else cin, cout, m)
    return _gpu_flat_wgrad_tile(cin, cout) if flat else _gpu_wgrad_tile(cin, cout)


def is_production_spec(kernel_name: str, constexprs: dict, options: dict, data_type: str) -> bool:
    """True for a GPU tile the wrappers launch, fp32 or bf16 activations (the compile check requires those
    spill-free)."""
    if data_type not in ("*fp32", "*bf16"):
        return False
    if kernel_name == "_relu_backward_kernel":
        return (constexprs["BLOCK_M"], constexprs["BLOCK_N"], options["num_warps"]) == _GPU_RELU_TILE
    if kernel_name == "_conv3x3_kernel":
        tiles = {_gpu_conv_tile(cin, cout) for cin, cout in _network_shapes()}
        tile = (constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["BLOCK_K"], options["num_warps"],
                options["num_stages"])
    elif constexprs.get("FLAT_K"):
        tiles = _flat_wgrad_tiles()
        tile = (constexprs["BLOCK_M"], constexprs["BLOCK_CI"], constexprs["BLOCK_CO"], options["num_warps"],
                options["num_stages"])
    else:
        tiles = {_gpu_wgrad_tile(cin, cout) for cin, cout in _network_shapes()}
        tile = (constexprs["BLOCK_M"], constexprs["BLOCK_CI"], constexprs["BLOCK_CO"], options["num_warps"],
                options["num_stages"])
    return tile in tiles


def _flat_wgrad_tiles() -> set[tuple[int, int, int, int, int]]:
    """The GPU tiles of the flat weight gradient: every thin channel count _THIN (their column counts differ from
    the padded ones') into the hidden layer, and out of it."""
    return {_gpu_flat_wgrad_tile(c, _HIDDEN) for c in _THIN} | {_gpu_flat_wgrad_tile(_HIDDEN, c) for c in _THIN}


# (BLOCK_M, BLOCK_N, num_warps) of `_relu_backward_kernel` on a GPU: an elementwise pass, 8K elements per program
# (on 4 warps it spilled on sm_90)
_GPU_RELU_TILE = (64, 128, 8)


def network_precision(device: torch.device, activation_dtype: torch.dtype = torch.float32) -> str:
    """The dots' precision: with bf16 activations under `use_bf16_dots`, "bf16" (tensor cores) on CUDA and
    "bf16_emulated" under the interpreter; else "tf32" where a convolution on `device` would use TF32 (cuDNN's
    flag), and "ieee" (exact fp32) otherwise."""
    if activation_dtype == torch.bfloat16 and _BF16_DOTS:
        return "bf16" if device.type == "cuda" else "bf16_emulated"
    return "tf32" if device.type == "cuda" and conv_allows_tf32(device) else "ieee"


# bf16 tensor-core dots for the 3x3 convolutions when the hidden activations are bf16 (`use_bf16_dots`). Off by
# default until timed against the fp32-operand dots on a GPU (benchmark variants triton_bf16_dots and
# graphed_bf16_triton_dots); numerically it is what bf16 autocast does to the module's convolutions.
_BF16_DOTS = False


@contextlib.contextmanager
def use_bf16_dots(enabled: bool = True):
    """Inside, networks with bf16 hidden activations (`--triton-networks --amp bf16`) run their 3x3 convolutions
    and weight gradients as bf16 x bf16 -> fp32 dots (inputs and weights rounded to bf16, like autocast) instead
    of fp32/TF32 dots on upcast operands. Restored on exit."""
    global _BF16_DOTS
    old = _BF16_DOTS
    _BF16_DOTS = bool(enabled)
    try:
        yield
    finally:
        _BF16_DOTS = old


# ----------------------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------------------

# (batch, channel, pixel) strides of the two layouts
def _nchw_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of an NCHW tensor whose pixels are contiguous per channel (a channel slice of a contiguous tensor
    qualifies, so the network reads z_a in place)."""
    _, _, h, w = t.shape
    if t.stride(3) != 1 or (h > 1 and t.stride(2) != w):
        raise ValueError(f"expected an NCHW tensor with contiguous pixels, got strides {t.stride()}")
    return t.stride(0), t.stride(1), 1


def pixel_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself where `_nchw_strides` can read it (contiguous, or a channel slice of a contiguous tensor), else a
    contiguous copy (channels_last, transposed pixels)."""
    _, _, h, w = t.shape
    return t if t.stride(3) == 1 and (h == 1 or t.stride(2) == w) else t.contiguous()


def _rows_strides(hw: int, c: int) -> tuple[int, int, int]:
    """Strides of pixel rows (B*H*W, c), contiguous."""
    return hw * c, 1, c


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """(cout, cin, 3, 3) -> (9, cin, cout) contiguous: w[tap, c, o] = w[o, c, kh, kw], tap = 3 kh + kw."""
    return w.permute(2, 3, 1, 0).reshape(9, w.shape[1], w.shape[0]).contiguous()


def pack_weight_transposed(w: torch.Tensor) -> torch.Tensor:
    """The packed kernel of the input gradient of a 3x3 conv with kernel w (cout, cin, 3, 3): the conv from cout to
    cin channels with the kernel flipped, (9, cout, cin)."""
    return w.flip(2, 3).permute(2, 3, 0, 1).reshape(9, w.shape[0], w.shape[1]).contiguous()


def conv3x3(inp, in_strides, w_packed, out, out_strides, shape, *, bias=None, scale=None, relu=False, mask=None,
            colsum=False, precision="ieee"):
    """out <- epilogue(3x3 conv of inp); shape = (B, H, W, cin, cout); w_packed (9, cin, cout). Returns out, or
    with `colsum` (out, out summed over pixels: fp32 (cout,))."""
    B, H, W, cin, cout = shape
    m = B * H * W
    bm, bn, bk, nw, ns = conv_tile(cin, cout, m)
    dummy = w_packed  # never read or written: its flag is off
    if m == 0:  # an empty batch: nothing to launch (a CUDA grid of 0 programs is an error)
        return (out, torch.zeros(cout, device=out.device, dtype=torch.float32)) if colsum else out
    parts = torch.empty((cdiv(m, bm), cout), device=out.device, dtype=torch.float32) if colsum else dummy
    with on_device_of(out):
        launch(_conv3x3_kernel, (cdiv(m, bm), cdiv(cout, bn)),
               inp, w_packed, dummy if bias is None else bias, dummy if scale is None else scale,
               dummy if mask is None else mask, out, parts,
               m, H, W, cin, cout, *in_strides, *out_strides,
               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
               RELU=relu, MASK=mask is not None, COLSUM=colsum, PREC=precision, FLAT_K=uses_flat_k(cin, bk),
               num_warps=nw, num_stages=ns)
    return (out, parts.sum(0)) if colsum else out


def relu_backward_(grad: torch.Tensor, relu_out: torch.Tensor) -> torch.Tensor:
    """grad <- ReLU's backward of grad given the ReLU's output (in place, (M, N) contiguous rows); returns grad
    summed over rows (fp32 (N,)), the gradient of the bias before the ReLU."""
    m, n = grad.shape
    bm, bn, nw = (max(16, min(1024, next_power_of_2(m))), max(16, min(512, next_power_of_2(n))), 4) \
        if is_interpret() else _GPU_RELU_TILE
    if m == 0:
        return torch.zeros(n, device=grad.device, dtype=torch.float32)
    parts = torch.empty((cdiv(m, bm), n), device=grad.device, dtype=torch.float32)
    with on_device_of(grad):
        launch(_relu_backward_kernel, (cdiv(m, bm), cdiv(n, bn)), grad, relu_out, parts, m, n,
               BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=1)
    return parts.sum(0)


def conv3x3_weight_grad(inp, in_strides, dout, dout_strides, shape, *, precision="ieee") -> torch.Tensor:
    """The (cout, cin, 3, 3) fp32 weight gradient: sum over pixels of in[p + d_tap, c] * dout[p, o];
    shape = (B, H, W, cin, cout)."""
    B, H, W, cin, cout = shape
    m = B * H * W
    flat = uses_flat_wgrad(cin)
    bm, bci, bco, nw, ns = wgrad_tile(cin, cout, m, flat)
    n_mt = cdiv(m, bm)
    # flat: programs over (channel, tap) column tiles, one grid row; else channel tiles x 9 taps
    taps = 1 if flat else 9
    tiles = cdiv(cin * (9 if flat else 1), bci) * cdiv(cout, bco)
    # pixel-tile groups: ~4 programs per SM in all (reduction_programs' rule with the taps x tiles as "batch")
    G = max(1, min(n_mt, reduction_programs(taps * tiles, n_mt, dout.device)))
    part = torch.empty((G, cout, cin, 3, 3), device=dout.device, dtype=torch.float32)
    if m == 0:
        return part.zero_()[0]
    with on_device_of(dout):
        launch(_conv3x3_wgrad_kernel, (tiles, taps, G),
               inp, dout, part, m, H, W, cin, cout, n_mt, G, *in_strides, *dout_strides,
               BLOCK_M=bm, BLOCK_CI=bci, BLOCK_CO=bco, PREC=precision, FLAT_K=flat, num_warps=nw, num_stages=ns)
    return part.sum(0) if G > 1 else part[0]


def _check_network_inputs(x, w1, b1, w2, b2, w3, b3, logs):
    if x.dim() != 4:
        raise ValueError(f"the coupling network's input must be NCHW (4-d), got shape {tuple(x.shape)}")
    tensors = (x, w1, b1, w2, b2, w3, b3, logs)
    check_device(*tensors)
    if any(t.dtype != torch.float32 for t in tensors):
        raise TypeError("the Triton coupling network computes in fp32: input and parameters must be float32, got "
                        + ", ".join(sorted({str(t.dtype) for t in tensors})))
    B, cin, H, W = x.shape
    hidden = w1.shape[0]
    cout = w3.shape[0]
    expected = {"conv1.weight": (w1, (hidden, cin, 3, 3)), "conv1.bias": (b1, (hidden,)),
                "conv2.weight": (w2, (hidden, hidden, 1, 1)), "conv2.bias": (b2, (hidden,)),
                "conv3.weight": (w3, (cout, hidden, 3, 3)), "conv3.bias": (b3, (cout,)), "conv3.logs": (logs, (cout,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} for an input of {cin} channels")
    if B > MAX_BATCH:
        raise ValueError(f"the Triton coupling network takes at most {MAX_BATCH} images per call, got {B}")
    if B * H * W * max(hidden, cin, cout) >= 2**31 or B * x.stride(0) >= 2**31:  # int32 offsets in the kernels
        raise ValueError(f"{B} images of {H}x{W} pixels x {hidden} hidden channels exceed the kernels' 2^31-element "
                         "activations: split the batch")


def _addmm_relu(bias, a, b):
    """relu(bias + a @ b), with the ReLU in cuBLASLt's epilogue where torch has it (`torch._addmm_activation`,
    private but present since torch 1.13): no separate pass over the (B*H*W, 512) result."""
    fused = getattr(torch, "_addmm_activation", None)
    return fused(bias, a, b) if fused is not None else torch.addmm(bias, a, b).relu_()


def coupling_network_forward(x, w1, b1, w2, b2, w3, b3, logs, logscale_factor: float,
                             activation_dtype: torch.dtype = torch.float32):
    """h = ZeroConv2d(relu(conv1x1(relu(conv3x3(x))))) for NCHW fp32 x (a channel slice is read in place).

    Returns (h NCHW contiguous fp32, h1, h2): the two ReLU outputs as (B*H*W, hidden) pixel rows in
    `activation_dtype` (float32, or bfloat16: half the activation traffic and a bf16 1x1 GEMM; the 3x3 convs still
    accumulate in fp32), kept for backward."""
    from ..amp import _cublas_tf32

    _check_network_inputs(x, w1, b1, w2, b2, w3, b3, logs)
    if activation_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"activation_dtype must be torch.float32 or torch.bfloat16, got {activation_dtype}")
    x = pixel_contiguous(x)
    B, cin, H, W = x.shape
    hidden, cout, hw = w1.shape[0], w3.shape[0], H * W
    prec = network_precision(x.device, activation_dtype)
    rows = _rows_strides(hw, hidden)
    h1 = torch.empty((B * hw, hidden), device=x.device, dtype=activation_dtype)
    conv3x3(x, _nchw_strides(x), pack_weight(w1), h1, rows, (B, H, W, cin, hidden), bias=b1, relu=True,
            precision=prec)
    with _cublas_tf32(prec == "tf32"):
        h2 = _addmm_relu(b2.to(activation_dtype), h1, w2.view(hidden, hidden).t().to(activation_dtype))
    out = torch.empty((B, cout, H, W), device=x.device, dtype=torch.float32)
    scale = torch.exp(logs * logscale_factor)
    conv3x3(h2, rows, pack_weight(w3), out, _nchw_strides(out), (B, H, W, hidden, cout), bias=b3, scale=scale,
            precision=prec)
    return out, h1, h2


def coupling_network_backward(x, h1, h2, out, grad_out, w1, w2, w3, logs, logscale_factor: float,
                              need_dx: bool = True):
    """Gradients (dx or None, dw1, db1, dw2, db2, dw3, db3, dlogs) of the network given its saved activations."""
    from ..amp import _cublas_tf32

    B, cin, H, W = x.shape
    hidden, cout, hw = w1.shape[0], w3.shape[0], H * W
    if tuple(grad_out.shape) != (B, cout, H, W):
        raise ValueError(f"gradient has shape {tuple(grad_out.shape)}, expected {(B, cout, H, W)}")
    check_device(x, grad_out)
    prec = network_precision(x.device, h1.dtype)
    rows = _rows_strides(hw, hidden)
    grad_out = grad_out.contiguous().float()
    scale = torch.exp(logs * logscale_factor)
    # out = (conv3(h2) + b3) * scale: the conv's output gradient is grad_out * scale
    g3 = grad_out * scale.view(1, -1, 1, 1)
    dlogs = logscale_factor * (grad_out * out).sum((0, 2, 3))
    db3 = g3.sum((0, 2, 3))
    g3_strides = _nchw_strides(g3)
    dw3 = conv3x3_weight_grad(h2, rows, g3, g3_strides, (B, H, W, hidden, cout), precision=prec)
    # through conv3 and the second ReLU: d pre-activation of h2, as pixel rows (in the activations' dtype)
    d2 = torch.empty((B * hw, hidden), device=x.device, dtype=h2.dtype)
    _, db2 = conv3x3(g3, g3_strides, pack_weight_transposed(w3), d2, rows, (B, H, W, cout, hidden), mask=h2,
                     colsum=True, precision=prec)
    w2m = w2.view(hidden, hidden).to(h2.dtype)
    with _cublas_tf32(prec == "tf32"):
        dw2 = torch.mm(d2.t(), h1).view_as(w2).to(w2.dtype)
        d1 = torch.mm(d2, w2m)
    db1 = relu_backward_(d1, h1)  # the first ReLU's backward and conv1's bias gradient in one pass
    dw1 = conv3x3_weight_grad(x, _nchw_strides(x), d1, rows, (B, H, W, cin, hidden), precision=prec)
    dx = None
    if need_dx:
        dx = torch.empty((B, cin, H, W), device=x.device, dtype=torch.float32)
        conv3x3(d1, rows, pack_weight_transposed(w1), dx, _nchw_strides(dx), (B, H, W, hidden, cin), precision=prec)
    return dx, dw1, db1, dw2, db2, dw3, db3, dlogs


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------


class CouplingNetworkFunction(torch.autograd.Function):
    """h = CouplingNetwork(x) with explicit parameters. Saves x, the two ReLU outputs (pixel rows) and h."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, logs, logscale_factor, activation_dtype):
        if x.dim() == 4:
            x = pixel_contiguous(x)  # what the kernels read, saved for backward
        out, h1, h2 = coupling_network_forward(x, w1, b1, w2, b2, w3, b3, logs, logscale_factor, activation_dtype)
        ctx.logscale_factor = logscale_factor
        ctx.save_for_backward(x, h1, h2, out, w1, w2, w3, logs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("CouplingNetworkFunction")
        x, h1, h2, out, w1, w2, w3, logs = ctx.saved_tensors
        grads = coupling_network_backward(x, h1, h2, out, grad_out, w1, w2, w3, logs, ctx.logscale_factor,
                                          need_dx=ctx.needs_input_grad[0])
        return (*grads, None, None)


def apply_coupling_network(net, x: torch.Tensor, activation_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`net(x)` for a standard `CouplingNetwork` (3x3 pad 1 with bias, 1x1 with bias, ZeroConv2d 3x3 pad 1),
    computed by the Triton network (differentiable); fp32 output, hidden activations in `activation_dtype`."""
    c1, c2, c3 = net.conv1, net.conv2, net.conv3
    with torch.autocast(x.device.type if x.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        return CouplingNetworkFunction.apply(x, c1.weight, c1.bias, c2.weight, c2.bias, c3.conv.weight,
                                             c3.conv.bias, c3.logs, float(c3.logscale_factor), activation_dtype)


# ----------------------------------------------------------------------------------------------------------
# Compile specs
# ----------------------------------------------------------------------------------------------------------

# The thin channel counts C_a, 2 C_b of the networks of Glows with 2 to 96 channels per level (MNIST 1x32x32: 4, 8,
# 16 channels; CIFAR-10: 12, 24, 48; a 4th level: 96), at hidden 512: each (cin, cout) pair a launch makes.
_THIN = (1, 2, 4, 6, 8, 12, 16, 24, 48, 96)
_HIDDEN = 512


def _network_shapes() -> set[tuple[int, int]]:
    """(cin, cout) of the networks' conv and wgrad launches: thin input (conv1, conv3's input gradient) and thin
    output (conv3, conv1's input gradient), padded channel counts."""
    thin = {max(16, next_power_of_2(c)) for c in _THIN}
    return {(t, _HIDDEN) for t in thin} | {(_HIDDEN, t) for t in thin}


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type): every epilogue branch at small tiles, and the GPU
    tiles of the networks' launches (`_network_shapes`) under both dot precisions."""
    specs = []
    for flags in (dict(HAS_BIAS=True, HAS_SCALE=False, RELU=True, MASK=False, COLSUM=False),
                  dict(HAS_BIAS=True, HAS_SCALE=True, RELU=False, MASK=False, COLSUM=False),
                  dict(HAS_BIAS=False, HAS_SCALE=False, RELU=False, MASK=True, COLSUM=True),
                  dict(HAS_BIAS=False, HAS_SCALE=False, RELU=False, MASK=False, COLSUM=False)):
        for flat in (False, True):
            specs.append((_conv3x3_kernel, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, PREC="ieee", FLAT_K=flat, **flags),
                          dict(num_warps=4, num_stages=1), "*fp32"))
    for flat in (False, True):
        specs.append((_conv3x3_wgrad_kernel, dict(BLOCK_M=32, BLOCK_CI=16, BLOCK_CO=16, PREC="ieee", FLAT_K=flat),
                      dict(num_warps=4, num_stages=1), "*fp32"))
    # the heaviest epilogue of each direction at each production tile: thin input runs bias + ReLU (conv1) or the
    # ReLU mask (conv3's input gradient), thin output bias + scale (conv3) or nothing (conv1's input gradient)
    heavy_in = dict(HAS_BIAS=True, HAS_SCALE=False, RELU=True, MASK=True, COLSUM=True)
    heavy_out = dict(HAS_BIAS=True, HAS_SCALE=True, RELU=False, MASK=False, COLSUM=False)
    bm, bn, nw = _GPU_RELU_TILE
    for data in ("*fp32", "*bf16"):
        specs.append((_relu_backward_kernel, dict(BLOCK_M=bm, BLOCK_N=bn), dict(num_warps=nw, num_stages=1), data))
    # bf16 activations (--amp bf16) with the GPU's default TF32 dots: their bf16 loads and rounded bf16 stores;
    # and with bf16 tensor-core dots (`use_bf16_dots`)
    for prec, data in (("tf32", "*fp32"), ("ieee", "*fp32"), ("tf32", "*bf16"), ("bf16", "*bf16")):
        for cin, cout in sorted(_network_shapes()):
            bm, bn, bk, nw, ns = _gpu_conv_tile(cin, cout)
            flags = heavy_in if cout == _HIDDEN else heavy_out
            # thin inputs (cin here is padded to >= 16) run FLAT_K where cin <= 8 (`uses_flat_k`): both K orders
            for flat in (False, True) if cout == _HIDDEN and cin == 16 else (False,):
                specs.append((_conv3x3_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=prec, FLAT_K=flat,
                                                    **flags), dict(num_warps=nw, num_stages=ns), data))
            bm, bci, bco, nw, ns = _gpu_wgrad_tile(cin, cout)
            specs.append((_conv3x3_wgrad_kernel, dict(BLOCK_M=bm, BLOCK_CI=bci, BLOCK_CO=bco, PREC=prec,
                                                      FLAT_K=False), dict(num_warps=nw, num_stages=ns), data))
        for tile in sorted(_flat_wgrad_tiles()):  # the default weight gradient (`uses_flat_wgrad`)
            bm, bci, bco, nw, ns = tile
            specs.append((_conv3x3_wgrad_kernel, dict(BLOCK_M=bm, BLOCK_CI=bci, BLOCK_CO=bco, PREC=prec,
                                                      FLAT_K=True), dict(num_warps=nw, num_stages=ns), data))
    return list({repr((s[0].__name__, s[1], s[2], s[3])): s for s in specs}.values())  # shared tiles compile once
