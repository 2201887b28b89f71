"""Batched LU log-determinants and inverses of many small square matrices, in one op call.

    sign, logabsdet = batched_slogdet(mats)   # mats: (B, n, n) tensor, list of (n_i, n_i) tensors, PackedMatrices
    inverses = batched_inverse(mats)           # (B, n, n) tensor / list / PackedMatrices, like the input

A list of matrices of different sizes (e.g. the 96 1x1-convolution weights of a Glow) is packed into one flat
buffer (plus per-matrix offsets and sizes, cached per layout and device) and handled by a single kernel launch:
LU with partial pivoting, one CPU task (``at::parallel_for``) or one CUDA block per matrix. On CUDA, a batch whose
largest matrix has n <= 64 runs the register kernels (one thread per row to factor, one per column to invert: no
trailing-matrix round trips through shared memory, one barrier per column); larger ones run the shared-memory
kernels (in global memory above n = 64). ``GLOWFAST_LU_CUDA_KERNELS=shared`` selects the shared-memory kernels for
every batch (read at each launch; the tests compare the two). Pivots follow LAPACK (ties: the smallest row) in all
of them. log|det| is summed in float64 even for float32 input.

Packed storage (``PackedMatrices``)
    A list costs host time on every call: each matrix is checked, the list is concatenated, and each list
    element is its own autograd leaf (benchmarks/RESULTS.md, "Host-side overhead": hundreds of µs for 96
    matrices, whatever their size). ``PackedMatrices`` keeps the matrices in ONE flat 1-D buffer ``.data``
    (matrix i row-major at ``offsets[i]``), validated once when it is built (``PackedMatrices.from_list(mats)``
    copies a list; ``PackedMatrices(data, sizes)`` wraps an existing buffer of sum(n_i^2) elements). Passed to
    ``batched_slogdet`` / ``batched_inverse`` it goes straight to the op with the cached layout: no per-matrix
    host work, no copy, and gradients flow into the one tensor ``.data`` (make it an ``nn.Parameter`` to train
    all matrices as one leaf). ``packed[i]`` / ``packed.matrices()`` are (n_i, n_i) views of ``.data``.
    ``batched_inverse(packed)`` returns a PackedMatrices of the inverses (a new buffer, same sizes). Check,
    singular and non-finite semantics are those of the other inputs; torch.compile(fullgraph=True) traces it.

Operators (``torch.ops.glowfast``, schemas in csrc/register.cpp; packed layout in csrc/batched_lu.h):
``lu_factor_packed``, ``lu_inverse_packed``, ``inverse_packed``, ``inverse_packed_backward``. Fake (meta)
implementations are registered here, so ``torch.compile(fullgraph=True)`` traces the wrappers, and
``torch.library.opcheck`` passes.

Autograd
    d logabsdet / dW = W^-T, formed from the saved LU factors by ``lu_inverse_packed`` (no second
    factorisation); sign has no gradient. d(W^-1) backward is -W^-T G W^-T (``inverse_packed_backward``).
    Gradients flow to every element of a list input, and to ``.data`` of a PackedMatrices. Second derivatives
    of logabsdet (Hessian-vector products, gradient penalties: ``create_graph=True``) are exact: that backward
    goes through the differentiable batched inverse instead (one more factorisation). Third derivatives, and
    second derivatives of ``batched_inverse``, raise an error.

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
    CPU tensors, where reading the status costs no sync, and does not check on CUDA (the NaN propagates to
    the loss, where it can be caught without a sync per op). ``check=True`` also checks on CUDA (one device
    sync); ``check=False`` never raises. Inside torch.compile the status is never read (no graph break).
    Shape, dtype and device problems always raise ValueError naming the problem (no sync involved).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch

import glowfast._C  # noqa: F401  (loads the library: registers torch.ops.glowfast.*)

__all__ = ["batched_slogdet", "batched_inverse", "PackedMatrices", "MAX_N_CUDA"]

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
    packed, offsets, sizes, max_n = inputs
    lu, pivots, sign, _, info = output
    ctx.save_for_backward(packed, lu, pivots, offsets, sizes)
    ctx.max_n = max_n
    ctx.mark_non_differentiable(lu, pivots, sign, info)


def _factor_backward(ctx, g_lu, g_pivots, g_sign, g_logabsdet, g_info):
    if g_logabsdet is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    packed, lu, pivots, offsets, sizes = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated (Hessian-vector
        return _differentiable_logdet_grad(packed, offsets, sizes, ctx.max_n, g_logabsdet), None, None, None
    # d logabsdet_b / dW_b = W_b^-T, scaled by the incoming gradient of matrix b, in one launch.
    grad = torch.ops.glowfast.lu_inverse_packed(
        lu, pivots, offsets, sizes, ctx.max_n, True, g_logabsdet.contiguous()
    )
    return grad, None, None, None


def _differentiable_logdet_grad(packed, offsets, sizes, max_n, g):
    """g_b * W_b^-T for every matrix of the packed buffer, built from the differentiable batched inverse (its
    backward is -W^-T G W^-T) so that second derivatives are right: the LU factors are non-differentiable outputs,
    and the one-launch gradient from them would carry no second-order term. A second factorisation, paid only
    when create_graph=True. As in the first-order gradient, a zero incoming gradient masks a singular matrix."""
    inverse, _ = torch.ops.glowfast.inverse_packed(packed, offsets, sizes, max_n)
    transpose = torch.cat([o + torch.arange(n * n, device=packed.device).view(n, n).T.reshape(-1)
                           for o, n in zip(offsets.tolist(), sizes.tolist())])
    g_elem = torch.repeat_interleave(g.to(packed.dtype), sizes * sizes, output_size=packed.numel())
    grad = g_elem * inverse[transpose]
    return torch.where(g_elem == 0, torch.zeros_like(grad), grad)


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
    raise RuntimeError("glowfast batched LU ops: batched_inverse has no second derivative, batched_slogdet no "
                       "third (its second goes through batched_inverse's first)")


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

    __slots__ = ("sizes", "offsets", "numels", "total", "max_n", "uniform", "runs", "_device_tensors")

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
        # runs of consecutive equal sizes, (first index, count, n): a Glow's weights come level by level, so a
        # list of them is a few runs, packed with one stack per run instead of one reshape per matrix
        runs, start = [], 0
        for i in range(1, len(sizes) + 1):
            if i == len(sizes) or sizes[i] != sizes[start]:
                runs.append((start, i - start, sizes[start]))
                start = i
        self.runs = tuple(runs)
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


def _stack_runs(mats, layout: _Layout) -> torch.Tensor:
    """The matrices flattened back to back in a new buffer: one torch.stack per run of equal sizes (a C++ loop)
    instead of a Python-level reshape per matrix (~2-3 µs each on a 2-core CPU, most of the list API's packing)."""
    parts = [torch.stack(mats[i:i + k]).view(-1) if k > 1 else mats[i].reshape(-1) for i, k, _ in layout.runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _PackList(torch.autograd.Function):
    """The packing as ONE autograd node (backward: one unbind per run of equal sizes), instead of a node per
    matrix plus a cat node -- the per-node cost dominated the list API's host overhead (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, layout, *mats):
        ctx.layout = layout
        return _stack_runs(mats, layout)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        grads = []
        for i, k, n in layout.runs:
            start = layout.offsets[i]
            grads.extend(grad[start:start + k * n * n].view(k, n, n).unbind(0))
        return (None, *grads)


def _cat_flat(mats, layout: _Layout) -> torch.Tensor:
    """A new flat buffer holding the flattened matrices back to back (always a copy, differentiable)."""
    if torch.compiler.is_compiling() or not any(m.requires_grad for m in mats):
        return _stack_runs(mats, layout)
    return _PackList.apply(layout, *mats)


def _split_views(flat: torch.Tensor, layout: _Layout) -> list[torch.Tensor]:
    """The (n_i, n_i) views of a flat buffer laid out as `layout` (no copy; differentiable)."""
    if len(layout.sizes) == 1:
        n = layout.sizes[0]
        return [flat.view(n, n)]
    return [part.view(n, n) for part, n in zip(torch.split(flat, layout.numels), layout.sizes)]


def _validate_batch(mats: torch.Tensor, fn: str) -> _Layout:
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
    return _layout((n,) * b, True)


def _validate_list(mats, fn: str) -> _Layout:
    """Checks a list of square 2-D tensors (same dtype and device) element by element; returns its layout."""
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
    return _layout(tuple(sizes), len(set(sizes)) == 1)


@functools.lru_cache(maxsize=256)
def _int_sizes_layout(sizes: tuple[int, ...]) -> _Layout | None:
    """The layout of a tuple of plain ints if they are all positive, else None (the caller explains why)."""
    if not sizes or min(sizes) <= 0:
        return None
    return _cached_layout(sizes, len(set(sizes)) == 1)


def _validate_sizes(sizes, fn: str) -> _Layout:
    # Fast path (PackedMatrices built per call from a stored tuple, e.g. `PackedMatrices(self.weight,
    # self.sizes)` in a forward): a tuple of plain ints (exact type: no float or bool that compares equal)
    # seen before costs one cache lookup instead of a check per size.
    if type(sizes) is tuple and not torch.compiler.is_compiling() and set(map(type, sizes)) == {int}:
        layout = _int_sizes_layout(sizes)
        if layout is not None:
            return layout
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, Sequence) or isinstance(sizes, str):
        raise ValueError(f"{fn}: sizes must be a sequence of positive ints, got {type(sizes).__name__}")
    if len(sizes) == 0:
        raise ValueError(f"{fn}: empty sizes (no matrices)")
    checked = []
    for i, n in enumerate(sizes):
        try:
            if isinstance(n, bool):
                raise TypeError
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"{fn}: sizes[{i}] must be a positive int, got {type(n).__name__} {n!r}") from None
        if n <= 0:
            raise ValueError(f"{fn}: sizes[{i}] must be a positive int, got non-positive size {n}")
        checked.append(n)
    return _layout(tuple(checked), len(set(checked)) == 1)


def _check_data(data, layout: _Layout, fn: str) -> None:
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{fn}: data must be a 1-D tensor, got a {type(data).__name__}")
    if data.dim() != 1:
        raise ValueError(
            f"{fn}: data must be a 1-D (flat) buffer, got a {data.dim()}-D tensor of shape {tuple(data.shape)}"
        )
    _check_dtype(data.dtype, fn)
    if data.numel() != layout.total:
        raise ValueError(
            f"{fn}: data has {data.numel()} elements but the sizes need sum(n_i^2) = {layout.total} "
            f"({len(layout.sizes)} matrices, n from {min(layout.sizes)} to {layout.max_n})"
        )


class PackedMatrices:
    """Many square matrices of varying sizes stored back to back, row-major, in ONE flat 1-D buffer.

        packed = PackedMatrices.from_list([w0, w1, ...])    # validated once, copied into a new buffer
        packed = PackedMatrices(data, sizes)                # an existing flat buffer, sum(n_i^2) elements
        weight = nn.Parameter(packed.data)                  # one leaf for all matrices ...
        packed = PackedMatrices(weight, packed.sizes)       # ... (or assign: packed.data = weight)
        sign, logabsdet = batched_slogdet(packed)           # one op call, no per-matrix work on the host
        inverses = batched_inverse(packed)                  # a PackedMatrices of the inverses

    Matrix i occupies ``data[offsets[i] : offsets[i] + sizes[i]**2]``. ``packed[i]`` and ``packed.matrices()``
    are (n_i, n_i) views of ``data`` (no copy; differentiable, gradients reach ``data``). The layout (sizes,
    offsets and their per-device index tensors) is validated and built once per distinct `sizes` and cached,
    so passing a PackedMatrices to ``batched_slogdet`` / ``batched_inverse`` costs one op call plus O(1) host
    work, whatever the number of matrices. Assigning ``.data`` re-checks the new buffer (1-D, float32 or
    float64, the same number of elements).
    """

    __slots__ = ("_data", "_layout")

    def __init__(self, data: torch.Tensor, sizes: Sequence[int]):
        layout = _validate_sizes(sizes, "PackedMatrices")
        _check_data(data, layout, "PackedMatrices")
        self._data = data
        self._layout = layout

    @classmethod
    def _wrap(cls, data: torch.Tensor, layout: _Layout) -> PackedMatrices:
        """No checks: `data` is known to match `layout` (an op output)."""
        out = cls.__new__(cls)
        out._data = data
        out._layout = layout
        return out

    @classmethod
    def from_list(cls, mats: torch.Tensor | Sequence[torch.Tensor]) -> PackedMatrices:
        """Packs a list of square 2-D tensors (same dtype and device; or a (B, n, n) tensor) into a new
        contiguous buffer, with the list API's checks and messages. The copy is differentiable w.r.t. `mats`;
        to make the buffer the one trainable leaf, wrap it: ``nn.Parameter(PackedMatrices.from_list(ws).data)``.
        """
        fn = "PackedMatrices.from_list"
        if isinstance(mats, torch.Tensor):
            layout = _validate_batch(mats, fn)
            data = mats.clone(memory_format=torch.contiguous_format).view(-1)
        else:
            layout = _validate_list(mats, fn)
            data = _cat_flat(mats, layout)
        return cls._wrap(data, layout)

    @property
    def data(self) -> torch.Tensor:
        """The flat 1-D buffer of all matrices (may be an ``nn.Parameter``)."""
        return self._data

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        _check_data(value, self._layout, "PackedMatrices.data")
        self._data = value

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._layout.sizes

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each matrix in ``data`` (elements)."""
        return tuple(self._layout.offsets)

    @property
    def dtype(self) -> torch.dtype:
        return self._data.dtype

    @property
    def device(self) -> torch.device:
        return self._data.device

    def __len__(self) -> int:
        return len(self._layout.sizes)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Matrix i as an (n_i, n_i) view of ``data``."""
        layout = self._layout
        i = operator.index(i)
        b = len(layout.sizes)
        if not -b <= i < b:
            raise IndexError(f"PackedMatrices index {i} out of range for {b} matrices")
        i %= b
        n = layout.sizes[i]
        return self._data.narrow(0, layout.offsets[i], n * n).view(n, n)

    def matrices(self) -> list[torch.Tensor]:
        """All matrices as (n_i, n_i) views of ``data`` (no copy; one split)."""
        return _split_views(self._data, self._layout)

    def to_list(self) -> list[torch.Tensor]:
        """Independent (n_i, n_i) copies of the matrices (differentiable w.r.t. ``data``)."""
        return [m.clone() for m in self.matrices()]

    def __repr__(self) -> str:
        sizes = self._layout.sizes
        shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
        return (
            f"PackedMatrices({len(sizes)} matrices, sizes=({shown}), dtype={self._data.dtype}, "
            f"device={self._data.device})"
        )


def _pack(mats, fn: str) -> tuple[torch.Tensor, _Layout, str]:
    """Validates `mats` and returns (packed 1-D buffer, layout, kind: "packed", "batch" or "list")."""
    if isinstance(mats, PackedMatrices):  # validated at construction: nothing per matrix here
        return mats.data, mats._layout, "packed"
    if isinstance(mats, torch.Tensor):
        return mats.reshape(-1), _validate_batch(mats, fn), "batch"
    layout = _validate_list(mats, fn)
    packed = _cat_flat(mats, layout) if len(mats) > 1 else mats[0].reshape(-1)
    return packed, layout, "list"


# Decided once, at import: torch.compile cannot trace the dispatcher query (it returns a bool, not a tensor), and
# _check_device runs inside traced code on CUDA tensors (found on the first GPU run: fullgraph compiles failed).
_HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("glowfast::lu_factor_packed", "CUDA")


def has_cuda_kernels() -> bool:
    """Whether glowfast._C was built with its CUDA kernels (it needs nvcc at install time)."""
    return _HAS_CUDA_KERNELS


def _check_device(packed: torch.Tensor, layout: _Layout, fn: str) -> None:
    if packed.device.type != "cuda":
        return
    if not has_cuda_kernels():
        raise RuntimeError(
            f"{fn}: glowfast was installed without its CUDA kernels (nvcc was not found at build time); "
            "reinstall with CUDA_HOME pointing at a CUDA toolkit (pip install --no-build-isolation -e .), "
            "or use backend='reference' / lu=True"
        )
    if layout.max_n > MAX_N_CUDA:
        raise ValueError(
            f"{fn}: matrix size {layout.max_n} exceeds the CUDA kernels' limit n <= {MAX_N_CUDA}; "
            "use torch.linalg for such large matrices"
        )


def _raise_on_status(info: torch.Tensor, check: bool | None, fn: str, singular_is_error: bool,
                     packed: torch.Tensor, layout: _Layout) -> None:
    if check is None:
        check = info.device.type == "cpu"
    if not check or torch.compiler.is_compiling():
        return
    # Fast path, one reduction and one read (a device sync on CUDA, only with check=True there): statuses are
    # ordered _OK < _SINGULAR < _NON_FINITE, so nothing to report when the largest is below the first error.
    if int(info.max()) < (_SINGULAR if singular_is_error else _NON_FINITE):
        return
    bad_status = (info == _NON_FINITE) | (info == _SINGULAR) if singular_is_error else info == _NON_FINITE
    if not bool(bad_status.any()):
        return
    i = int(bad_status.nonzero()[0, 0])
    if int(info[i]) == _NON_FINITE:
        entries = packed[layout.offsets[i]: layout.offsets[i] + layout.numels[i]]
        if bool(torch.isfinite(entries).all()):  # finite input whose elimination left the dtype's range
            raise ValueError(f"{fn}: matrix {i} overflows {packed.dtype} during its LU factorisation (its entries are "
                             f"finite, up to {float(entries.abs().max()):.3g} in magnitude); use float64")
        raise ValueError(f"{fn}: matrix {i} contains non-finite values (NaN or Inf)")
    raise ValueError(f"{fn}: matrix {i} is singular (an exactly zero pivot in its LU factorisation)")


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def batched_slogdet(
    mats: torch.Tensor | Sequence[torch.Tensor] | PackedMatrices, *, check: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign, log|det|) of every matrix, as two (B,) tensors of the input dtype, in one kernel launch.

    `mats`: a (B, n, n) tensor, a list of square 2-D tensors of varying n (same dtype and device), float32 or
    float64, any strides, or a PackedMatrices (validated at construction: no per-matrix host work here).
    Differentiable w.r.t. `mats` (every list element, or the packed ``.data``): d logabsdet/dW = W^-T from the
    saved LU factors. `check`: see the module docstring (default: raise on non-finite input on CPU, never
    synchronise on CUDA). Singular: sign 0, logabsdet -inf.
    """
    fn = "batched_slogdet"
    packed, layout, _ = _pack(mats, fn)
    _check_device(packed, layout, fn)
    offsets, sizes = layout.tensors(packed.device)
    _, _, sign, logabsdet, info = torch.ops.glowfast.lu_factor_packed(packed, offsets, sizes, layout.max_n)
    _raise_on_status(info, check, fn, singular_is_error=False, packed=packed, layout=layout)
    return sign, logabsdet


def batched_inverse(
    mats: torch.Tensor | Sequence[torch.Tensor] | PackedMatrices, *, check: bool | None = None
) -> torch.Tensor | list[torch.Tensor] | PackedMatrices:
    """Inverse of every matrix, in one op call: a (B, n, n) tensor for a tensor input, a list of (n_i, n_i)
    tensors for a list, a PackedMatrices (same sizes, a new flat buffer) for a PackedMatrices.

    Differentiable w.r.t. `mats` (every list element, or the packed ``.data``). `check` (default: on CPU only)
    raises ValueError for a singular or non-finite matrix; without checking such a matrix's inverse is
    NaN-filled. As with torch.linalg.inv, a finite non-singular matrix whose inverse exceeds the dtype's range
    (e.g. 1e-39 * I in float32) gives Inf entries without an error.
    """
    fn = "batched_inverse"
    packed, layout, kind = _pack(mats, fn)
    _check_device(packed, layout, fn)
    offsets, sizes = layout.tensors(packed.device)
    inverse, info = torch.ops.glowfast.inverse_packed(packed, offsets, sizes, layout.max_n)
    _raise_on_status(info, check, fn, singular_is_error=True, packed=packed, layout=layout)
    if kind == "packed":
        return PackedMatrices._wrap(inverse, layout)
    if kind == "batch":
        n = layout.sizes[0]
        return inverse.view(len(layout.sizes), n, n)
    return _split_views(inverse, layout)
