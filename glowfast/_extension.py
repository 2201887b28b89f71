"""Whether this install's compiled extension (glowfast._C: the batched-LU ops) can run, decided once.

Callers ask before tracing code (Glow's constructor, glowfast.fused at import), so torch.compile never traces the
import. Where the op cannot run -- no glowfast._C, or CUDA tensors with a glowfast._C built without nvcc -- they
use torch.linalg instead, the same function.
"""

from __future__ import annotations

import importlib

_BATCHED_LU: tuple | None = None  # (glowfast.ops or None, whether its CUDA kernels were built)


def batched_lu_ops(device_type: str = "cpu"):
    """glowfast.ops where the batched-LU op runs on `device_type` ("cpu", "cuda", ...), else None."""
    global _BATCHED_LU
    if _BATCHED_LU is None:
        try:
            ops = importlib.import_module(".ops", __package__)
            _BATCHED_LU = (ops, ops.has_cuda_kernels())
        except (ImportError, OSError):  # glowfast._C missing or built against another torch
            _BATCHED_LU = (None, False)
    ops, has_cuda_kernels = _BATCHED_LU
    return None if ops is None or (device_type == "cuda" and not has_cuda_kernels) else ops
