"""Batched LU log-determinants and inverses of many small square matrices, in one op call.

    sign, logabsdet = batched_slogdet(mats)          # mats: (B, n, n) tensor or list of (n_i, n_i) tensors
    inverses = batched_inverse(mats)                  # (B, n, n) tensor, or a list for a list input

A list of matrices of different sizes (e.g. the 96 1x1-convolution weights of a Glow) is packed into one flat
buffer (plus per-matrix offsets and sizes, cached per layout and device) and handled by a single kernel launch:
LU with partial pivoting, one CPU task (``at::parallel_for``) or one CUDA block per matrix (in shared memory for
n <= 64, in global memory above). log|det| is summed in float64 even for float32 input.

Operators (``torch.ops.glowfast``, schemas in csrc/register.cpp; packed layout in csrc/batched_lu.h):
``lu_factor_packed``, ``lu_inverse_packed``, ``inverse_packed``, ``inverse_packed_backward``. Fake (meta)
implementations are registered here, so ``torch.compile(fullgraph=True)`` traces the wrappers, and
``torch.library.opcheck`` passes.

Autograd
    d logabsdet / dW = W^-T, formed from the saved LU factors by ``lu_inverse_packed`` (no second
    factorisation); sign has no gradient. d(W^-1) backward is -W^-T G W^-T (``inverse_packed_backward``).
    Gradients flow to every element of a list input. Double backward is not supported.

Singular matrices
    An exactly singular matrix (an exactly zero pivot) gives sign 0 and logabsdet -inf, never NaN and never an
    error. Its logabsdet gradient does not exist: it is NaN-filled (W^-T of a singular W), except that a zero
    incoming gradient for that matrix gives a zero gradient, so singular matrices whose logabsdet does not
    reach the loss do not poison the others. ``batched_inverse`` of a singular matrix raises ValueError when
    checking (see below) and is NaN-filled otherwise. Nearly singular matrices are factored normally.

Non-finite input and checks (``check`` keyword)
    The kernels themselves detect NaN/Inf entries and write a per-matrix status; such a matrix gets NaN sign,
    logabsdet and inverse (never a crash, never a silent finite value). Turning that status into a Python
    error needs the status on the host, which on CUDA would synchronise the device (torch.linalg.slogdet's
    weakness, which must stay out of the training hot path). So ``check=None`` (default) raises ValueError on
    CPU tensors, where reading the status costs nothing, and does not check on CUDA (the NaN propagates to
    the loss, where it can be caught without a sync per op). ``check=True`` also checks on CUDA (one device
    sync); ``check=False`` never raises. Inside torch.compile the status is never read (no graph break).
    Shape, dtype and device problems always raise ValueError naming the problem (no sync involved).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import glowfast._C  # noqa: F401  (loads the library: registers torch.ops.glowfast.*)

__all__ = ["batched_slogdet", "batched_inverse", "MAX_N_CUDA"]

# Largest matrix the CUDA kernels accept (global-memory path above 64); the CPU path has no limit.
MAX_N_CUDA = 1024
_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_OK, _SINGULAR, _NON_FINITE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Fake (meta) implementations
# ----------------------------------------------------------------------------------------------------------
@torch.library.register_fake("glowfast::lu_factor_packed")
def _lu_factor_packed_fake(packed, offsets, sizes, max_n):
    b = sizes.shape[0]
    return (
        torch.empty_like(packed),
        packed.new_empty((b, max_n), dtype=torch.int32),
        packed.new_empty((b,)),
        packed.new_empty((b,)),
        packed.new_empty((b,), dtype=torch.int32),
    )


@torch.library.register_fake("glowfast::lu_inverse_packed")
def _lu_inverse_packed_fake(lu, pivots, offsets, sizes, max_n, transpose=False, scale=None):
    return torch.empty_like(lu)


@torch.library.register_fake("glowfast::inverse_packed")
def _inverse_packed_fake(packed, offsets, sizes, max_n):
    return torch.empty_like(packed), packed.new_empty((sizes.shape[0],), dtype=torch.int32)


@torch.library.register_fake("glowfast::inverse_packed_backward")
def _inverse_packed_backward_fake(inverse, grad, offsets, sizes, max_n):
    return torch.empty_like(inverse)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
def _factor_setup_context(ctx, inputs, output):
    _, offsets, sizes, max_n = inputs
    lu, pivots, sign, _, info = output
    ctx.save_for_backward(lu, pivots, offsets, sizes)
    ctx.max_n = max_n
    ctx.mark_non_differentiable(lu, pivots, sign, info)


def _factor_backward(ctx, g_lu, g_pivots, g_sign, g_logabsdet, g_info):
    if g_logabsdet is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    lu, pivots, offsets, sizes = ctx.saved_tensors
    # d logabsdet_b / dW_b = W_b^-T, scaled by the incoming gradient of matrix b, in one launch.
    grad = torch.ops.glowfast.lu_inverse_packed(
        lu, pivots, offsets, sizes, ctx.max_n, True, g_logabsdet.contiguous()
    )
    return grad, None, None, None


def _inverse_setup_context(ctx, inputs, output):
    _, offsets, sizes, max_n = inputs
    inverse, info = output
    ctx.save_for_backward(inverse, offsets, sizes)
    ctx.max_n = max_n
    ctx.mark_non_differentiable(info)


def _inverse_backward(ctx, g_inverse, g_info):
    if g_inverse is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    inverse, offsets, sizes = ctx.saved_tensors
    grad = torch.ops.glowfast.inverse_packed_backward(inverse, g_inverse.contiguous(), offsets, sizes, ctx.max_n)
    return grad, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("glowfast batched LU ops do not support double backward")


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "glowfast::lu_factor_packed", _factor_backward, setup_context=_factor_setup_context
)
torch.library.register_autograd("glowfast::inverse_packed", _inverse_backward, setup_context=_inverse_setup_context)
torch.library.register_autograd("glowfast::lu_inverse_packed", _no_double_backward, setup_context=_no_context)
torch.library.register_autograd(
    "glowfast::inverse_packed_backward", _no_double_backward, setup_context=_no_context
)


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------
class _Layout:
    """Static description of a packed batch: sizes, offsets (Python ints) and their device tensors."""

    __slots__ = ("sizes", "offsets", "numels", "total", "max_n", "uniform", "_device_tensors")

    def __init__(self, sizes: tuple[int, ...], uniform: bool):
        self.sizes = sizes
        self.numels = [n * n for n in sizes]
        offsets, acc = [], 0
        for m in self.numels:
            offsets.append(acc)
            acc += m
        self.offsets = offsets
        self.total = acc
        self.max_n = max(sizes)
        self.uniform = uniform
        self._device_tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uniform:
            n, b = self.sizes[0], len(self.sizes)
            offsets = torch.arange(b, dtype=torch.int64, device=device) * (n * n)
            sizes = torch.full((b,), n, dtype=torch.int64, device=device)
            return offsets, sizes
        return (
            torch.tensor(self.offsets, dtype=torch.int64, device=device),
            torch.tensor(self.sizes, dtype=torch.int64, device=device),
        )

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self.make_tensors(device)
        cached = self._device_tensors.get(device)
        if cached is None:
            # Cached tensors outlive this call: keep them normal (not inference) tensors.
            with torch.inference_mode(False), torch.no_grad():
                cached = self.make_tensors(device)
            self._device_tensors[device] = cached
        return cached


@functools.lru_cache(maxsize=256)
def _cached_layout(sizes: tuple[int, ...], uniform: bool) -> _Layout:
    return _Layout(sizes, uniform)


def _layout(sizes: tuple[int, ...], uniform: bool) -> _Layout:
    if torch.compiler.is_compiling():
        return _Layout(sizes, uniform)
    return _cached_layout(sizes, uniform)


def _check_dtype(dtype: torch.dtype, fn: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        kind = "floating-point" if dtype.is_floating_point else "non-floating-point"
        raise ValueError(f"{fn}: dtype must be float32 or float64, got {kind} dtype {dtype}")


class _PackList(torch.autograd.Function):
    """cat of flattened matrices as ONE autograd node (backward: one split), instead of a view node per matrix
    plus a cat node — the per-node cost dominated the list API's host overhead (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, numels, *mats):
        ctx.numels = numels
        ctx.shapes = [m.shape for m in mats]
        return torch.cat([m.reshape(-1) for m in mats])

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.numels)
        return (None, *(part.view(shape) for part, shape in zip(parts, ctx.shapes)))


def _cat_flat(mats, numels) -> torch.Tensor:
    if torch.compiler.is_compiling() or not any(m.requires_grad for m in mats):
        return torch.cat([m.reshape(-1) for m in mats])
    return _PackList.apply(numels, *mats)


def _pack(mats, fn: str) -> tuple[torch.Tensor, _Layout, bool]:
    """Validates `mats` and returns (packed 1-D buffer, layout, is_list)."""
    if isinstance(mats, torch.Tensor):
        if mats.dim() != 3:
            raise ValueError(
                f"{fn}: expected a (B, n, n) batch or a list of square 2-D tensors, got a {mats.dim()}-D "
                f"tensor of shape {tuple(mats.shape)}"
            )
        b, n, m = mats.shape
        if n != m:
            raise ValueError(f"{fn}: matrices must be square, got shape {tuple(mats.shape)} ({n}x{m})")
        if b == 0 or n == 0:
            raise ValueError(f"{fn}: empty input of shape {tuple(mats.shape)}")
        _check_dtype(mats.dtype, fn)
        return mats.reshape(-1), _layout((n,) * b, True), False
    if not isinstance(mats, Sequence) or isinstance(mats, str):
        raise ValueError(f"{fn}: expected a (B, n, n) tensor or a list of square 2-D tensors, got {type(mats)}")
    if len(mats) == 0:
        raise ValueError(f"{fn}: empty list of matrices")
    first = mats[0]
    if not isinstance(first, torch.Tensor):
        raise ValueError(f"{fn}: list element 0 is a {type(first).__name__}, not a tensor")
    dtype, device = first.dtype, first.device
    sizes = []
    for i, w in enumerate(mats):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{fn}: list element {i} is a {type(w).__name__}, not a tensor")
        if w.dim() != 2:
            raise ValueError(
                f"{fn}: list element {i} must be a square 2-D matrix, got a {w.dim()}-D tensor of shape "
                f"{tuple(w.shape)}"
            )
        n, m = w.shape
        if n != m:
            raise ValueError(f"{fn}: list element {i} is not square: shape {tuple(w.shape)}")
        if n == 0:
            raise ValueError(f"{fn}: list element {i} is an empty 0x0 matrix")
        if w.dtype != dtype:
            raise ValueError(f"{fn}: mixed dtypes in the list: element 0 is {dtype}, element {i} is {w.dtype}")
        if w.device != device:
            raise ValueError(
                f"{fn}: mixed devices in the list: element 0 is on {device}, element {i} is on {w.device}"
            )
        sizes.append(n)
    _check_dtype(dtype, fn)
    layout = _layout(tuple(sizes), len(set(sizes)) == 1)
    packed = _cat_flat(mats, layout.numels) if len(mats) > 1 else first.reshape(-1)
    return packed, layout, True


def _check_device(packed: torch.Tensor, layout: _Layout, fn: str) -> None:
    if packed.device.type == "cuda" and layout.max_n > MAX_N_CUDA:
        raise ValueError(
            f"{fn}: matrix size {layout.max_n} exceeds the CUDA kernels' limit n <= {MAX_N_CUDA}; "
            "use torch.linalg for such large matrices"
        )


def _raise_on_status(info: torch.Tensor, check: bool | None, fn: str, singular_is_error: bool) -> None:
    if check is None:
        check = info.device.type == "cpu"
    if not check or torch.compiler.is_compiling():
        return
    bad_status = (info == _NON_FINITE) | (info == _SINGULAR) if singular_is_error else info == _NON_FINITE
    if not bool(bad_status.any()):  # one device sync on CUDA (only with check=True there)
        return
    i = int(bad_status.nonzero()[0, 0])
    if int(info[i]) == _NON_FINITE:
        raise ValueError(f"{fn}: matrix {i} contains non-finite values (NaN or Inf)")
    raise ValueError(f"{fn}: matrix {i} is singular (an exactly zero pivot in its LU factorisation)")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def batched_slogdet(
    mats: torch.Tensor | Sequence[torch.Tensor], *, check: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, log|det|) of every matrix, as two (B,) tensors of the input dtype, in one kernel launch.

    `mats`: a (B, n, n) tensor or a list of square 2-D tensors of varying n (same dtype and device),
    float32 or float64, any strides. Differentiable w.r.t. `mats` (every list element): d logabsdet/dW = W^-T
    from the saved LU factors. `check`: see the module docstring (default: raise on non-finite input on CPU,
    never synchronise on CUDA). Singular: sign 0, logabsdet -inf.
    """
    fn = "batched_slogdet"
    packed, layout, _ = _pack(mats, fn)
    _check_device(packed, layout, fn)
    offsets, sizes = layout.tensors(packed.device)
    _, _, sign, logabsdet, info = torch.ops.glowfast.lu_factor_packed(packed, offsets, sizes, layout.max_n)
    _raise_on_status(info, check, fn, singular_is_error=False)
    return sign, logabsdet


def batched_inverse(
    mats: torch.Tensor | Sequence[torch.Tensor], *, check: bool | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """Inverse of every matrix, in one op call; a (B, n, n) tensor for a tensor input, a list for a list.

    Differentiable w.r.t. `mats` (every list element). `check` (default: on CPU only) raises ValueError for a
    singular or non-finite matrix; without checking such a matrix's inverse is NaN-filled.
    """
    fn = "batched_inverse"
    packed, layout, is_list = _pack(mats, fn)
    _check_device(packed, layout, fn)
    offsets, sizes = layout.tensors(packed.device)
    inverse, info = torch.ops.glowfast.inverse_packed(packed, offsets, sizes, layout.max_n)
    _raise_on_status(info, check, fn, singular_is_error=True)
    if not is_list:
        n = layout.sizes[0]
        return inverse.view(len(layout.sizes), n, n)
    if len(layout.sizes) == 1:
        n = layout.sizes[0]
        return [inverse.view(n, n)]
    return [part.view(n, n) for part, n in zip(torch.split(inverse, layout.numels), layout.sizes)]
