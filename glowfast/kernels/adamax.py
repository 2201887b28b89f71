"""Fused Adamax update: one Triton kernel over every parameter tensor of a group (a multi-tensor apply).

torch.optim.Adamax's foreach step is six foreach ops (lerp, mul, abs, add, maximum, addcdiv), ~16 passes over
the parameters' memory; it was 2.2-2.4 ms of device time per CIFAR-10 training step (44M fp32 parameters; H100
B64 and H200 B256 profiles, 24th/25th sessions), and `torch.compile` of it compiled for 220 s (H200). This kernel
reads p, g, exp_avg, exp_inf once and writes p, exp_avg, exp_inf once: 7 passes.

Per element, as torch's Adamax (non-capturable, non-differentiable) computes it:
    g = -g if maximize;  g = g + weight_decay * p if weight_decay
    exp_avg = lerp(exp_avg, g, 1 - beta1)      (torch.lerp's two formulas, by the weight)
    exp_inf = max(exp_inf * beta2, |g| + eps)
    p = p + (-clr) * (exp_avg / exp_inf),      clr = lr / (1 - beta1 ** step)

Layout: the tensors stay where they are. A table holds each tensor's four data pointers and its element count;
each program owns BLOCK elements of one tensor (a chunk table maps programs to (tensor, start)). The tables are
built on the host once per set of pointers (`AdamaxTables`) and reused while the pointers stay (CUDA-graphed
gradients, the optimiser state). Every tensor must be a contiguous fp32 tensor on the one device (`check_group`).

Public API
- `check_group(params, grads, exp_avgs, exp_infs)` -> None, or a string naming why the kernel cannot take them.
- `AdamaxTables.for_tensors(params, grads, exp_avgs, exp_infs)`: the device tables (cache them by `key`).
- `adamax_update(tables, neg_clr, beta1, beta2, eps, weight_decay, maximize)`: the in-place update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import check_device, on_device_of
from .precompile import launch

BLOCK = 1024  # elements per program, 8 per thread: 48 registers on sm_90 (2048 on 4 warps took 216, no spill)
NUM_WARPS = 4
# The arguments whose types are not the sm_90 compile check's defaults (fp32 data pointers, i32 scalars)
ARG_TYPES = {"table_ptr": "*i64", "numel_ptr": "*i64", "chunk_tensor_ptr": "*i32", "chunk_start_ptr": "*i64",
             "neg_clr": "fp32", "lerp_weight": "fp32", "beta2": "fp32", "eps": "fp32", "weight_decay": "fp32"}


@triton.jit
def _adamax_kernel(table_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, neg_clr, lerp_weight, beta2, eps,
                   weight_decay, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, LERP_HIGH: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid).to(tl.int64)
    start = tl.load(chunk_start_ptr + pid)
    n = tl.load(numel_ptr + t)
    row = table_ptr + t * 4
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    u_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + offs, mask=mask, other=1.0)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if LERP_HIGH:  # torch.lerp: weight >= 0.5 interpolates from the end
        m = g - (g - m) * (1.0 - lerp_weight)
    else:
        m = m + lerp_weight * (g - m)
    u = tl.maximum(u * beta2, tl.abs(g) + eps)
    p = p + neg_clr * (m / u)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(u_ptr + offs, u, mask=mask)


def check_group(params, grads, exp_avgs, exp_infs) -> str | None:
    """None when the kernel can update these tensors, else why not (the optimiser then runs torch's step)."""
    first = params[0]
    for kind, tensors in (("parameter", params), ("gradient", grads), ("exp_avg", exp_avgs), ("exp_inf", exp_infs)):
        for i, t in enumerate(tensors):
            if t.dtype != torch.float32:
                return f"{kind} {i} is {t.dtype}, not float32"
            if t.device != first.device:
                return f"{kind} {i} is on {t.device}, not {first.device}"
            if t.layout != torch.strided or not t.is_contiguous():
                return f"{kind} {i} is not a contiguous strided tensor"
            if t.numel() != params[i].numel():
                return f"{kind} {i} has {t.numel()} elements, its parameter {params[i].numel()}"
    return None


@dataclass(frozen=True)
class AdamaxTables:
    """The device tables of one set of tensors; `key` identifies the set (its pointers and sizes)."""

    key: tuple
    table: torch.Tensor  # (n_tensors, 4) int64: data pointers of p, g, exp_avg, exp_inf
    numel: torch.Tensor  # (n_tensors,) int64
    chunk_tensor: torch.Tensor  # (n_chunks,) int32: the tensor a program updates
    chunk_start: torch.Tensor  # (n_chunks,) int64: its first element
    tensors: tuple  # the tensors themselves: the pointers stay valid while the tables live

    @staticmethod
    def key_of(params, grads, exp_avgs, exp_infs) -> tuple:
        return tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), u.data_ptr(), p.numel())
                     for p, g, m, u in zip(params, grads, exp_avgs, exp_infs, strict=True))

    @classmethod
    def for_tensors(cls, params, grads, exp_avgs, exp_infs) -> AdamaxTables:
        params, grads, exp_avgs, exp_infs = (list(x) for x in (params, grads, exp_avgs, exp_infs))
        reason = check_group(params, grads, exp_avgs, exp_infs)
        if reason:
            raise ValueError(f"fused Adamax: {reason}")
        check_device(*params, *grads, *exp_avgs, *exp_infs)  # CUDA, or CPU under the interpreter
        key = cls.key_of(params, grads, exp_avgs, exp_infs)
        device = params[0].device
        chunk_tensor, chunk_start = [], []
        for i, n in enumerate(k[4] for k in key):
            starts = range(0, n, BLOCK)
            chunk_tensor += [i] * len(starts)
            chunk_start += starts
        return cls(key=key,
                   table=torch.tensor([k[:4] for k in key], dtype=torch.int64, device=device),
                   numel=torch.tensor([k[4] for k in key], dtype=torch.int64, device=device),
                   chunk_tensor=torch.tensor(chunk_tensor, dtype=torch.int32, device=device),
                   chunk_start=torch.tensor(chunk_start, dtype=torch.int64, device=device),
                   tensors=(tuple(params), tuple(grads), tuple(exp_avgs), tuple(exp_infs)))


def adamax_update(tables: AdamaxTables, neg_clr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float = 0.0, maximize: bool = False) -> None:
    """One Adamax update of every tensor of `tables`, in place (the module docstring's formulas)."""
    n_chunks = tables.chunk_tensor.numel()
    if n_chunks == 0:
        return
    lerp_weight = 1.0 - beta1
    with on_device_of(tables.table):
        launch(_adamax_kernel, (n_chunks,), tables.table, tables.numel, tables.chunk_tensor, tables.chunk_start,
               float(neg_clr), lerp_weight, float(beta2), float(eps), float(weight_decay), MAXIMIZE=bool(maximize),
               WEIGHT_DECAY=weight_decay != 0, LERP_HIGH=lerp_weight >= 0.5, BLOCK=BLOCK, num_warps=NUM_WARPS)


def is_production_spec(kernel_name: str, constexprs: dict, options: dict, data_type: str) -> bool:
    """Every spec is a GPU launch configuration (one block size and warp count; _compile_check's spill test)."""
    return True


def compile_specs():
    """(kernel, constexprs, launch options, data pointer type) for every constexpr branch (_compile_check)."""
    return [(_adamax_kernel, dict(MAXIMIZE=mx, WEIGHT_DECAY=wd, LERP_HIGH=hi, BLOCK=BLOCK),
             dict(num_warps=NUM_WARPS), "*fp32")
            for mx in (False, True) for wd in (False, True) for hi in (False, True)]
