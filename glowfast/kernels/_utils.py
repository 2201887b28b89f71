"""Shared helpers of the Triton kernels: interpreter vs GPU, block sizes, grids, tl.dot precision.

Everything that decides *how* a kernel is launched lives here, so tuning for a GPU (done later, on an H100)
touches one file.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
_dot_precision_override: str | None = os.environ.get("GLOWFAST_DOT_PRECISION") or None
if _dot_precision_override not in (None, *_DOT_PRECISIONS):
    raise ValueError(f"GLOWFAST_DOT_PRECISION must be one of {_DOT_PRECISIONS}, got {_dot_precision_override!r}")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as Triton's): `triton.next_power_of_2` for host code. Triton's is a
    ConstexprFunction whose host call costs 2-6 us, and the launch wrappers computed 3-5 of them per call (~200
    wrapper calls per training step; benchmarks/RESULTS.md, "Host-side overhead of the launch wrappers")."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints: `triton.cdiv` for host code (see next_power_of_2)."""
    return -(-a // b)


def is_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool:
    """Whether the kernels were built for the interpreter: TRITON_INTERPRET is read when the @triton.jit
    decorators run, so setting it after glowfast.kernels was imported leaves GPU kernels, which fail on CPU tensors
    with Triton's "0 active drivers"."""
    from .actnorm_invconv import _actnorm_invconv_fwd_kernel

    return type(_actnorm_invconv_fwd_kernel).__name__ == "InterpretedFunction"


def dot_precision(device: torch.device | str | None = None) -> str:
    """Precision of the 1x1 conv's fp32 matrix products in the kernels (`conv_dot` in actnorm_invconv.py):
    "ieee" (exact fp32), "tf32x3" (three TF32 tensor-core products, fp32-level accuracy) or "tf32" (one).

    Default: for CPU tensors (the interpreter) "ieee", as the reference's CPU conv is exact fp32. On a CUDA device
    (or with no device given) "tf32x3" while cuDNN may use TF32 for convolutions (`torch.backends.cudnn.allow_tf32`,
    PyTorch's default), else "ieee". Not plain "tf32", although that is what cuDNN's flag would suggest: cuDNN ran
    the reference's 1x1 convolutions in full fp32 on an H200 anyway, and plain TF32 dots moved the fused model's
    held-out bits/dim by +5.45e-3 against the reference's 4.6e-6 (benchmarks/RESULTS.md) — outside the "at most 2x
    the same-precision reference" rule. 3xTF32 keeps the tensor cores at fp32-level error. Plain "tf32" (fastest,
    biased likelihoods) only on request: the environment variable GLOWFAST_DOT_PRECISION or the
    `use_dot_precision(...)` context manager, which also force "ieee" or "tf32x3" (under the interpreter every mode
    computes with the same TF32-rounded operands the GPU's tensor cores get; see `conv_dot`).
    """
    if _dot_precision_override is not None:
        return _dot_precision_override
    if device is not None and torch.device(device).type != "cuda":
        return "ieee"
    return "tf32x3" if _cudnn_conv_allows_tf32() else "ieee"


def conv_allows_tf32(device: torch.device | str | None = None) -> bool:
    """Whether a convolution the fused path replaces would run in TF32 here: the GEMM network layouts
    (glowfast.amp) follow this, i.e. TF32 unless the dot precision is "ieee" (forced, or cuDNN's TF32 off)."""
    return dot_precision(device) != "ieee"


def _cudnn_conv_allows_tf32() -> bool:
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        # torch >= 2.9 refuses the legacy flag once conv and rnn were given different per-op precisions
        # (torch.backends.cudnn.conv.fp32_precision = ...); then the conv's own setting is the one to mirror
        return torch.backends.cudnn.conv.fp32_precision == "tf32"


def refuse_double_backward(name: str) -> None:
    """Raise in a fused Function's backward when autograd records it (create_graph=True: grad mode is on there).

    The kernels' backward records no graph, so second derivatives (a gradient penalty, Hessian-vector products)
    would silently miss every term through them; `once_differentiable` does not prevent that either, since
    `torch.autograd.grad(..., inputs=params)` prunes its error node. The reference backend supports them."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name}: the fused kernels' backward is not differentiable, so double backward "
                           "(create_graph=True, e.g. a gradient penalty) is not supported on the fused path; "
                           "use backend='reference' for higher-order gradients")


@contextlib.contextmanager
def use_dot_precision(precision: str | None):
    """Temporarily force the 1x1 conv's dot precision ("ieee" / "tf32x3" / "tf32"; None restores the default)."""
    global _dot_precision_override
    if precision is not None and precision not in _DOT_PRECISIONS:
        raise ValueError(f"precision must be one of {_DOT_PRECISIONS}, got {precision!r}")
    old = _dot_precision_override
    _dot_precision_override = precision
    try:
        yield
    finally:
        _dot_precision_override = old


# Exact-fp32 dots in the backward kernels at small channel counts, where the default would be 3xTF32 (opt-in until a
# GPU times it: `use_exact_backward_dots`). In the sm_90 SASS (26th session, Triton 3.8, the default tiles) the
# cross-step backward's pixel loop takes 74.5 warp-instructions per pixel with exact-fp32 dots against 157.6 with
# 3xTF32 at cp 16, in 79 registers against 217 (3 programs of 8 warps per SM against 2 of 4), and 186.5 against 376
# at cp 32; the actnorm + 1x1 conv backward 38.9 against 80.4 at cp 16. At cp 64 exact fp32 is the heavier (530
# against 311), and the forward kernels gain nothing at any cp (cp 16: 62.0 against 58.6). The backward kernels'
# instruction issue, not memory, bounds them (benchmarks/RESULTS.md), and the cross-step backward is most of the
# K-step chain at B256 C12, one of issue 4's three shapes short of 3x. 0 = off; the environment variable
# GLOWFAST_EXACT_BACKWARD_MAX_CP sets it for a process (e.g. 32 for `python -m glowfast.train` on a GPU).
def _max_cp_from_environment() -> int:
    value = os.environ.get("GLOWFAST_EXACT_BACKWARD_MAX_CP") or "0"
    if not value.isdigit():
        raise ValueError(f"GLOWFAST_EXACT_BACKWARD_MAX_CP must be an int >= 0 (a padded channel count), got {value!r}")
    return int(value)


_exact_backward_max_cp = _max_cp_from_environment()


def backward_dot_precision(device: torch.device | str | None, cp: int) -> str:
    """The dot precision of a backward kernel at padded channel count `cp`: `dot_precision(device)`, except
    "ieee" where that is the 3xTF32 default (not forced by `use_dot_precision`) and cp is at most
    `use_exact_backward_dots`'s limit. Exact fp32 is at least as accurate as 3xTF32: the same function."""
    precision = dot_precision(device)
    if precision == "tf32x3" and _dot_precision_override is None and cp <= _exact_backward_max_cp:
        return "ieee"
    return precision


@contextlib.contextmanager
def use_exact_backward_dots(max_cp: int = 32):
    """Inside, the backward kernels at padded channel counts up to `max_cp` (16 = C <= 16, 32 = C <= 32) use
    exact-fp32 dots instead of the 3xTF32 default (`backward_dot_precision`); 0 turns it off. Graphs captured inside
    keep it."""
    global _exact_backward_max_cp
    if isinstance(max_cp, bool) or not isinstance(max_cp, int) or max_cp < 0:
        raise ValueError(f"max_cp must be an int >= 0, got {max_cp!r}")
    old = _exact_backward_max_cp
    _exact_backward_max_cp = max_cp
    try:
        yield
    finally:
        _exact_backward_max_cp = old


# How the backward kernels with a 1x1-conv dot form the weight gradient dL/dW = sum over pixels of dy u^T:
# "kernel" (the default): a 3xTF32 product per pixel tile in the kernel's loop, per-program partials summed after;
# "gemm": the kernel writes u and one fp32 GEMM over all pixels follows (that product is most of the loop's
# instructions and registers, benchmarks/RESULTS.md; which is faster is for a GPU to say). GLOWFAST_WEIGHT_GRAD sets
# it for a process, `use_weight_grad` for a block of code; an explicit `dw_outside=` argument wins over both.
_WEIGHT_GRAD_MODES = ("kernel", "gemm")
_weight_grad_mode: str = os.environ.get("GLOWFAST_WEIGHT_GRAD") or "kernel"
if _weight_grad_mode not in _WEIGHT_GRAD_MODES:
    raise ValueError(f"GLOWFAST_WEIGHT_GRAD must be one of {_WEIGHT_GRAD_MODES}, got {_weight_grad_mode!r}")


def weight_grad_mode() -> str:
    """"kernel" or "gemm": how the backward kernels form the 1x1 conv's weight gradient (see above)."""
    return _weight_grad_mode


def weight_grad_outside(dw_outside: bool | None) -> bool:
    """The backward launchers' `dw_outside` argument resolved: given, it wins; None follows `weight_grad_mode()`."""
    return _weight_grad_mode == "gemm" if dw_outside is None else bool(dw_outside)


@contextlib.contextmanager
def use_weight_grad(mode: str):
    """Temporarily form the weight gradient in the kernel ("kernel") or as one GEMM after it ("gemm")."""
    global _weight_grad_mode
    if mode not in _WEIGHT_GRAD_MODES:
        raise ValueError(f"mode must be one of {_WEIGHT_GRAD_MODES}, got {mode!r}")
    old = _weight_grad_mode
    _weight_grad_mode = mode
    try:
        yield
    finally:
        _weight_grad_mode = old


# The widest channel tile compiled for sm_90 and tested (cp = 128, i.e. C up to 128 per flow step).
MAX_CHANNELS = 128


def check_channels(channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise ValueError(f"the fused kernels support at most {MAX_CHANNELS} channels per flow step, got "
                         f"{channels}; use backend='reference' for such models")


def channel_pad(channels: int) -> int:
    """Channels padded to a power of two >= 16 (tl.arange needs a power of two; tl.dot needs >= 16)."""
    check_channels(channels)
    return max(16, next_power_of_2(channels))


# (BLOCK_P, num_warps, programs per SM) forced by `launch_override` (the block-size sweep, glowfast.kernels.tune);
# None = the rule.
_launch_override: dict[str, int | None] = {"block_p": None, "num_warps": None, "programs_per_sm": None}


@contextlib.contextmanager
def launch_override(block_p: int | None = None, num_warps: int | None = None, programs_per_sm: int | None = None):
    """Launch every kernel inside with this pixel tile, warp count and/or (reducing backward kernels) programs
    per SM instead of the default rule.

    For measuring candidate configurations (`python -m glowfast.kernels.tune`); an explicit `block_p=` or
    `programs_per_sample=` argument of a launch function still wins. BLOCK_P must be a power of two >= 16
    (tl.arange; the K of the grad-W dot). Off a GPU, `programs_per_sm` counts the device as one SM.
    """
    check_block_pixels(block_p)
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps}")
    if programs_per_sm is not None and programs_per_sm < 1:
        raise ValueError(f"programs_per_sm must be >= 1, got {programs_per_sm}")
    old = dict(_launch_override)
    _launch_override.update(block_p=block_p, num_warps=num_warps, programs_per_sm=programs_per_sm)
    try:
        yield
    finally:
        _launch_override.update(old)


def check_block_pixels(block_p: int | None) -> int | None:
    """An explicit pixel tile: None (the rule) or a power of two >= 16 (tl.arange; the K of the grad-W dot). A zero
    or negative tile would launch no programs at all and return the uninitialised output buffer."""
    if block_p is not None and (isinstance(block_p, bool) or not isinstance(block_p, int) or block_p < 16
                                or block_p & (block_p - 1)):
        raise ValueError(f"block_p must be a power of two >= 16, got {block_p!r}")
    return block_p


def overridden_block_pixels() -> int | None:
    return _launch_override["block_p"]


def overridden_num_warps() -> int | None:
    return _launch_override["num_warps"]


# GPU launch configuration per kernel family and padded channel count: cp -> (BLOCK_P, num_warps), for the no-dot
# coupling kernels and the opt-in plain "tf32" dots (the default 3xTF32 dots use GPU_TILES_TF32X3 below, exact fp32
# GPU_TILES_IEEE, where they have an entry). Each entry is a large tile that compiles for sm_90 with no register spills
# at its precision under Triton 3.6 (the GPU machine's), 3.8 and 3.9: a spill sends tile data through local memory on
# every pixel tile of these bandwidth-bound kernels. Entries at the edge (255 registers under one version) were halved,
# since another version's ptxas spilled them. The backward kernels keep ~10 tiles live (inputs, h, the dot operands and
# their gradients), hence their small tiles. Chosen from the compiled cubins' resource usage (2026-11-25, no GPU yet;
# table in benchmarks/RESULTS.md); tests/test_triton_compile_sm90.py keeps every entry spill-free, and `python -m
# glowfast.kernels.tune` times each entry against larger and smaller tiles on a GPU. The previous rule (~8K elements per
# tile, 4 warps below cp 64) spilled in at least 8 of the 12 backward/cross-step configurations, the cross-step backward
# at cp 16 by 10 KB per thread.
GPU_TILES: dict[str, dict[int, tuple[int, int]]] = {
    # actnorm_invconv forward and inverse, step inverse
    "fwd": {16: (256, 4), 32: (256, 8), 64: (128, 8), 128: (64, 8)},
    "cross_step_fwd": {16: (256, 4), 32: (128, 8), 64: (64, 8), 128: (32, 8)},
    "actnorm_invconv_bwd": {16: (64, 4), 32: (32, 4), 64: (32, 8), 128: (16, 8)},
    "cross_step_bwd": {16: (32, 8), 32: (16, 8), 64: (32, 8), 128: (16, 8)},
    # coupling forward / inverse / backward (no tl.dot; cp = next power of two of C, from 2): a tile clipped
    # to a small image below 4K elements runs on 4 warps (coupling._launch_options)
    # cp 16 (C = 12, CIFAR-10's first level): (256, 8), not (512, 8), from the H200 block sweep (22nd session:
    # 1.39x forward, 1.34x backward at 64x12x128x128)
    "coupling": {2: (1024, 4), 4: (1024, 4), 8: (512, 8), 16: (256, 8), 32: (128, 8), 64: (64, 8),
                 128: (32, 8)},
}


# Which GPU_TILES family each Triton kernel launches with (the launch wrappers pass the same kinds).
KERNEL_KINDS = {
    "_actnorm_invconv_fwd_kernel": "fwd", "_actnorm_invconv_inv_kernel": "fwd", "_step_inverse_kernel": "fwd",
    "_actnorm_invconv_bwd_kernel": "actnorm_invconv_bwd", "_cross_step_fwd_kernel": "cross_step_fwd",
    "_cross_step_bwd_kernel": "cross_step_bwd", "_coupling_fwd_kernel": "coupling",
    "_coupling_inv_kernel": "coupling", "_coupling_bwd_kernel": "coupling",
}


# Triton contracts a * b + c into one fused multiply-add (FMA) unless told not to. The kernels, their tolerances
# (tests/tolerances.py) and the 3xTF32 error analysis were all measured with contraction on, Triton's default up to
# 3.9; Triton 3.10 turns that default off (3.9 warns that it will), and TRITON_DEFAULT_FP_FUSION changes it per
# process. So every launch (`precompile.launch`) and the sm_90 compile check pass it explicitly: the kernels compute
# the same thing under every Triton. From Triton 3.9 on, TRITON_FORCE_DISABLE_FP_FUSION=1 still turns it off (its
# debugging switch; Triton 3.6 and 3.8 have none).
FP_FUSION = True


# Exact-fp32 ("ieee") dots are FMA loops, not tensor-core instructions, and need more registers: at the tiles
# above the forward kernels spill up to 8 KB per thread. Likelihood evaluation runs them (glowfast.evaluate.full_fp32),
# so the forward families get their own spill-free tiles (Triton 3.6, 3.8 and 3.9, sm_90; cuobjdump). At cp 128
# every tile tried spills (ptxas falls back to 32 registers and local memory); those keep the tf32 tiles.
GPU_TILES_IEEE: dict[str, dict[int, tuple[int, int]]] = {
    "fwd": {16: (128, 4), 32: (128, 8), 64: (32, 8)},
    "cross_step_fwd": {16: (128, 4), 32: (64, 8), 64: (32, 8)},
    # the backward kernels where `use_exact_backward_dots` runs them exact: GPU_TILES' tiles, listed so that the
    # sm_90 check compiles them (spill-free: 64-128 registers; at cp 64 the exact cross-step backward spills)
    "actnorm_invconv_bwd": {16: (64, 4), 32: (32, 4)},
    "cross_step_bwd": {16: (32, 8), 32: (16, 8)},
}


# 3xTF32 dots (the GPU default, `dot_precision`) hold each operand twice (its two TF32 halves) and run three
# products: at the tf32 tiles the heavier configurations reach 255 registers or spill, so every dot family has its
# own tiles, chosen like GPU_TILES (no spills, entries at the edge halved; Triton 3.6 and 3.8, sm_90, 2026-11-26).
# At cp 128 the backward kernels spill at every tile tried, as under tf32, and so does the cross-step backward at
# cp 64 (64-96 B): the tolerated spills of tests/test_triton_compile_sm90.py. The backward tiles at cp 64 and 128
# are 16 pixels on 4 and 8 warps, not 8 and 16: there a warpgroup's share of the 16-pixel dot was 8 columns, a
# wgmma with N = 8, whose shared-memory operand Triton reads past its end (triton-lang/triton#10629; memcheck
# reported it on the H200, 16th session). Their first tiles spilled less (0-72 B at cp 64, 352-504 B at 128).
# At cp 16 (C = 12) three entries are the H200 block sweep's best (22nd session, tune.md; both sweep shapes,
# 64x12x128x128 and 256x12x16x16): fwd (128, 4) for (256, 4), 1.17x at the large shape; cross_step_fwd (128, 8) for
# (256, 8), 1.50x / 1.07x; cross_step_bwd (32, 4) for (32, 8), 1.40x / 1.29x. The sweep compared every candidate's
# outputs with the default's. Other cp were not swept yet. cross_step_bwd (32, 4) sits at the edge (255 registers
# under Triton 3.8) but spills under none of 3.6, 3.8 and 3.9 (tests/test_triton_compile_sm90.py, each version).
# At cp 64 (C = 48) fwd (32, 4) for (128, 8): the H100 sweep at 64x48x64x64 (24th session, e2022fe, outputs equal
# to the default's): the forward 62.4 µs against 165 µs (20 % -> 54 % of the copy bandwidth; (64, 4) 71.8 µs, 8 warps
# slower at every tile). The (128, 8) tile held one program per SM. The inverse and step-inverse kernels share the
# "fwd" tiles; they were not swept.
GPU_TILES_TF32X3: dict[str, dict[int, tuple[int, int]]] = {
    "fwd": {16: (128, 4), 32: (256, 8), 64: (32, 4), 128: (16, 8)},
    "cross_step_fwd": {16: (128, 8), 32: (64, 8), 64: (32, 8), 128: (16, 8)},
    "actnorm_invconv_bwd": {16: (32, 4), 32: (32, 4), 64: (16, 4), 128: (16, 8)},
    "cross_step_bwd": {16: (32, 4), 32: (16, 8), 64: (16, 4), 128: (16, 8)},
}

# The tiles of each dot precision where they differ from GPU_TILES (the "tf32" tiles, and the no-dot families').
_PRECISION_TILES = {"ieee": GPU_TILES_IEEE, "tf32x3": GPU_TILES_TF32X3}


def gpu_tile(kind: str, cp: int, precision: str | None = None) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of kernel family `kind` at cp padded channels on a GPU (before clipping to the image),
    for the dot precision the launch uses (the launch wrappers pass the one they launch with; default: the
    current `dot_precision()` on CUDA)."""
    tiles = _PRECISION_TILES.get(precision or dot_precision(), {}).get(kind, {})
    return tiles.get(cp) or GPU_TILES[kind][cp]


def block_pixels(cp: int, hw: int, kind: str = "fwd", precision: str | None = None) -> int:
    """Pixels per (cp, BLOCK_P) tile.

    Interpreter: the cost is per program instance, not per element, so tiles are as large as possible.
    GPU: `gpu_tile(kind, cp)` (per dot precision: GPU_TILES, GPU_TILES_TF32X3 or GPU_TILES_IEEE), clipped to the
    image (at least 16: the K of the grad-W `tl.dot`).
    """
    forced = overridden_block_pixels()
    if forced is not None:
        return forced
    if is_interpret():
        return max(16, min(next_power_of_2(hw), 2048))
    return max(16, min(gpu_tile(kind, cp, precision)[0], next_power_of_2(hw)))


# Software pipelining multi-buffers every tile loaded in a loop in shared memory (3 stages of z, h, dy tiles
# overflow the H100's 227 KiB at cp >= 64); these kernels are bandwidth-bound with plenty of programs in
# flight, so they run unpipelined. (A GPU tuning pass may revisit this per kernel.)
NUM_STAGES = 1

# Largest dynamic shared memory per block on sm_90 (H100/H200): 227 KiB.
SM90_MAX_SHARED = 232448


# The kernel families whose 1x1 conv is a tl.dot (the coupling kernels have none).
DOT_KINDS = ("fwd", "cross_step_fwd", "actnorm_invconv_bwd", "cross_step_bwd")


def max_dot_warps(cp: int, block_p: int) -> int:
    """Most warps a dot kernel may run with on a (cp, block_p) tile: each warpgroup's share of the pixels >= 16.

    Why: on sm_90, from cp 64 Triton computes the (cp x cp) @ (cp x block_p) dots as Hopper wgmma instructions,
    giving each warpgroup (4 warps) 64 rows of cp first and then splitting the pixel columns among the rest. A share
    of 8 columns is a wgmma with N = 8, whose shared-memory operand Triton reads past its end (triton-lang/triton
    #10629; memcheck reported it on the H200, 16th session). The H100 tile sweep (24th session) crashed with an
    illegal address on such a tile (cross-step backward, cp 64, 16 pixels on 8 warps). Checked against the PTX of
    every tile in tests/test_triton_compile_sm90.py. Below cp 64 there is no wgmma and no limit."""
    if cp < 64:
        return 16
    return min(16, 4 * (cp // 64) * max(1, block_p // 16))


def launch_options(cp: int, kind: str = "fwd", precision: str | None = None, block_p: int | None = None) -> dict:
    """Keyword launch options of a kernel of family `kind` whose tile has cp (padded) channels and `block_p` pixels.

    A dot kernel's tile clipped to a small image (CIFAR-10's 4x4 level: 16 pixels) runs on fewer warps than its
    GPU_TILES entry (`max_dot_warps`); a forced warp count (`launch_override`) that the tile cannot take is an
    error, not a launch."""
    forced = overridden_num_warps()
    num_warps = forced or gpu_tile(kind, cp, precision)[1]
    if kind in DOT_KINDS and block_p is not None and num_warps > max_dot_warps(cp, block_p):
        if forced:
            raise ValueError(f"num_warps={forced} is too many for a {cp}-channel tile of {block_p} pixels: a "
                             f"warpgroup's share of the pixels would be under 16 (an N=8 wgmma, which Triton "
                             f"miscompiles: triton-lang/triton#10629); at most {max_dot_warps(cp, block_p)} warps")
        num_warps = max_dot_warps(cp, block_p)
    return dict(num_warps=num_warps, num_stages=NUM_STAGES)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(batch: int, n_ptiles: int, device: torch.device) -> int:
    """Programs per sample for kernels that reduce over pixels (logdets, parameter gradients).

    Each program loops over pixel tiles pid, pid + G, ... of one sample and writes one partial, so the partials
    (summed afterwards by torch, no atomics, deterministic) stay small. On a GPU aim for ~4 programs per SM.
    """
    per_sm = _launch_override["programs_per_sm"]
    if per_sm is None and (is_interpret() or device.type != "cuda"):
        return n_ptiles
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    return max(1, min(n_ptiles, cdiv((per_sm or 4) * sms, max(1, batch))))  # an empty batch: no programs


MAX_BATCH = 65535  # the kernels launch one row of programs per image: CUDA's grid y-dimension limit


def check_nchw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"{name} must be NCHW (4-d), got shape {tuple(x.shape)}")
    if x.dtype == torch.float64:  # the kernels load and compute in fp32: a float64 result would carry fp32 error
        raise TypeError(f"{name} is float64, but the glowfast Triton kernels compute in fp32; use the reference "
                        "layers for float64 (glowfast.fused.steps_forward / steps_inverse and Glow switch to them "
                        "by themselves)")
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"{name} holds a batch of {x.shape[0]} images; the fused kernels take at most {MAX_BATCH} "
                         "per call (CUDA's grid limit): split the batch")
    return x.contiguous()


def on_device_of(t: torch.Tensor):
    """Context for a kernel launch on `t`'s GPU: Triton launches on the *current* CUDA device (and its current
    stream), not on the device of its arguments, so a tensor on cuda:1 while cuda:0 is current needs a switch."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_device(*tensors: torch.Tensor) -> None:
    """Floating-point tensors all on one device: CUDA, or CPU only under the interpreter.

    A kernel handed a pointer to another device's memory would read out of bounds instead of failing.
    """
    first = tensors[0]
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"glowfast Triton kernels need floating-point tensors, got dtype {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"glowfast Triton kernels need all tensors on one device, got {first.device} "
                             f"and {t.device}")
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and is_interpret():
            if not kernels_interpreted():
                raise RuntimeError("TRITON_INTERPRET=1 was set after glowfast.kernels was imported; set it before "
                                   "importing glowfast to run the kernels on CPU tensors")
            continue
        raise RuntimeError(
            f"glowfast Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got a tensor on {t.device}"
        )


def check_grads(data: torch.Tensor, grad: torch.Tensor, grad_logdet: torch.Tensor | None = None) -> None:
    """Incoming gradients must match the saved tensors they pair with (a smaller buffer would be overrun)."""
    if grad.shape != data.shape:
        raise ValueError(f"gradient has shape {tuple(grad.shape)}, expected {tuple(data.shape)}")
    check_device(data, grad)
    if grad_logdet is not None:
        if grad_logdet.shape != (data.shape[0],):
            raise ValueError(f"logdet gradient has shape {tuple(grad_logdet.shape)}, expected ({data.shape[0]},)")
        check_device(data, grad_logdet)


def compile_spec_grid(branches: list[dict], heaviest: dict, kind: str) -> list[tuple]:
    """Specs for the sm_90 compile check: (constexprs, launch options, data pointer type) triples.

    Every constexpr branch combination in `branches` at a small tile (every dot precision, fp32 data), the
    `heaviest` branch with bf16 data, and the `heaviest` branch at every production tile of every precision:
    `GPU_TILES[kind]` with "tf32", `GPU_TILES_TF32X3[kind]` with "tf32x3" (the default) and `GPU_TILES_IEEE[kind]`
    with "ieee" (the resource-hungriest configurations that run on a GPU).
    """
    out = []
    for br in branches:
        for prec in _DOT_PRECISIONS:
            out.append((dict(CP=16, BLOCK_P=32, PREC=prec, **br), launch_options(16, kind, prec), "*fp32"))
    out.append((dict(CP=16, BLOCK_P=32, PREC="tf32x3", **heaviest), launch_options(16, kind, "tf32x3"), "*bf16"))
    for prec in _DOT_PRECISIONS:
        tiles = GPU_TILES[kind] if prec == "tf32" else _PRECISION_TILES[prec].get(kind, {})
        for cp, (bp, nw) in tiles.items():
            out.append((dict(CP=cp, BLOCK_P=bp, PREC=prec, **heaviest), dict(num_warps=nw, num_stages=NUM_STAGES),
                        "*fp32"))
            # from cp 64 (wgmma), the tile clipped to smaller images, on the warps launch_options gives it
            clipped = bp // 2
            while cp >= 64 and clipped >= 16:
                out.append((dict(CP=cp, BLOCK_P=clipped, PREC=prec, **heaviest),
                            launch_options(cp, kind, prec, clipped), "*fp32"))
                clipped //= 2
    return out
