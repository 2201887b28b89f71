"""Tolerances of the fused-vs-reference equivalence tests — stated here, in one place.

Two regimes:

EXACT — fp32 everywhere: the Triton interpreter (CPU, what CI runs) or a GPU with the kernels' tl.dot forced to
    input_precision="ieee" (`glowfast.kernels.use_dot_precision("ieee")`, and the reference's cuDNN/cuBLAS TF32
    switched off). Fused and reference then differ only by fp32 rounding and summation order, so:
      outputs / inverses      rtol 1e-5, atol 1e-5 · max(1, max|ref|)
      log-determinants        rtol 1e-5, atol 1e-5 · max(1, max|ref|)   (sums over C·H·W terms)
      gradients               rtol 1e-4, atol 1e-5 · max(1, max|ref|)   (sums over B·H·W pixels)
      decode(encode(x)) - x   fused error <= 4 x reference error + 1e-5
      optimiser (FusedAdamax against torch.optim.Adamax, parameters and state after a few steps)
                              rtol 1e-6, atol 1e-6 (elementwise: fused multiply-adds and one division's rounding)

TF32 — a GPU with the default fast tl.dot (TF32 inputs, fp32 accumulation) against a float64 reference, with
    flash-attention's rule: the fast path's error vs float64 must be at most TF32_FACTOR (2) times the error of
    the same-precision PyTorch reference (fp32 with TF32 convolutions) vs float64 — or of the TF32-rounded-operand
    product the kernels compute (TF32Conv1x1), whichever is larger — plus a small absolute slack. Separately, the
    kernels' TF32 dots equal that rounded-operand product within the EXACT tolerances
    (test_tf32_dots_round_operands). This is the opt-in "tf32" dot precision.

TF32X3 — the GPU default (`glowfast.kernels.dot_precision`): every 1x1-conv product as three TF32 products of
    the operands' TF32 halves (`conv_dot`). The kernels equal that split product (TF32x3Conv1x1) within the EXACT
    tolerances, bit for bit where each output is a single product (test_dot_precisions_bit_exact_on_single_products),
    and their error vs float64 is at most TF32X3_FACTOR times the fp32 reference's plus TF32X3_SLACK (the split
    drops ~2^-22 of each product where fp32 rounds at 2^-24; measured 0.6-3.1x over outputs and gradients at C = 12,
    48, 96) — where plain "tf32" errs 580-3,500 times more (test_tf32x3_error_is_fp32_level).

BF16 — the Triton coupling network with bf16 hidden activations (`--triton-networks --amp bf16`), against the
    same network module under torch's bf16 autocast, both vs float64:
      output      max error <= BF16_FACTOR (2, flash-attention's rule) x autocast's + BF16_SLACK (measured: <= 0.97x)
      gradients   relative L2 error <= BF16_GRAD_FACTOR (4) x autocast's + BF16_GRAD_SLACK (1e-2)
    The gradients get a norm and a wider factor because a ReLU whose input lies within bf16 rounding of zero flips
    in one path and not the other, and one flipped unit sets the max error of a small test network: over 24 seeded
    cases the Triton network's activations erred half as much as autocast's, yet its gradients' relative L2 error
    reached 2.6x autocast's where it had one flip more (max error: 3.1x). A wrong gradient formula errs O(1).
"""

from __future__ import annotations

import torch

EXACT = {
    "out": dict(rtol=1e-5, atol=1e-5),
    "logdet": dict(rtol=1e-5, atol=1e-5),
    "grad": dict(rtol=1e-4, atol=1e-5),
    "optim": dict(rtol=1e-6, atol=1e-6),
}
ROUNDTRIP_FACTOR = 4.0
ROUNDTRIP_SLACK = 1e-5

TF32_FACTOR = 2.0
TF32_SLACK = 1e-5

BF16_FACTOR = 2.0
BF16_SLACK = 1e-5
BF16_GRAD_FACTOR = 4.0
BF16_GRAD_SLACK = 1e-2

TF32X3_FACTOR = 4.0
TF32X3_SLACK = 1e-6


def assert_tf32x3(fast: torch.Tensor, ref_fp32: torch.Tensor, ref_fp64: torch.Tensor, name: str = "") -> None:
    """max|fast - ref64| <= TF32X3_FACTOR * max|ref32 - ref64| + TF32X3_SLACK * scale."""
    ref64 = ref_fp64.detach().double()
    scale = max(1.0, float(ref64.abs().max()))
    fast_err = float((fast.detach().double() - ref64).abs().max())
    ref_err = float((ref_fp32.detach().double() - ref64).abs().max())
    assert fast_err <= TF32X3_FACTOR * ref_err + TF32X3_SLACK * scale, (
        f"{name}: 3xTF32 error {fast_err:.3g} > {TF32X3_FACTOR} x fp32 reference error {ref_err:.3g} "
        f"+ {TF32X3_SLACK} x {scale:.3g}")


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, kind: str = "out", name: str = "") -> None:
    """assert_close with the EXACT tolerance of `kind`; atol scales with the reference's magnitude."""
    tol = EXACT[kind]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(expected.dtype), expected.detach(), rtol=tol["rtol"], atol=tol["atol"] * scale,
        msg=lambda m: f"{name} ({kind}): {m}",
    )


def assert_grads_exact(actual, expected, names) -> None:
    for a, e, n in zip(actual, expected, names, strict=True):
        if e is None:
            assert a is None or float(a.abs().max()) == 0.0, f"{n}: reference grad is None, fused is not zero"
            continue
        assert a is not None, f"{n}: fused grad is None"
        assert_exact(a, e, "grad", n)


def assert_roundtrip(fused_err: float, reference_err: float) -> None:
    assert fused_err <= ROUNDTRIP_FACTOR * reference_err + ROUNDTRIP_SLACK, (
        f"decode(encode(x)) error {fused_err:.3g} vs reference {reference_err:.3g}"
    )


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (13 low mantissa bits rounded away, ties away from zero): what the kernels do
    to their tl.dot operands under "tf32" (`glowfast.kernels.actnorm_invconv.round_to_tf32`), the same bit
    arithmetic written in torch. NaN stays NaN."""
    f = t.detach().float().contiguous()
    rounded = ((f.view(torch.int32) + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isnan(f), f, rounded)


class TF32Conv1x1(torch.autograd.Function):
    """y = W u per pixel, computed in float64 from TF32-rounded operands, forward and backward (du = W^T g and
    dW = sum over pixels of g u^T, each from rounded operands): what the fused kernels compute under "tf32", up to
    their fp32 accumulation. Also a TF32 yardstick for assert_tf32 beside cuDNN's TF32 conv."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, w)
        return torch.einsum("oc,bchw->bohw", tf32_round(w).double(), tf32_round(u).double())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, w = ctx.saved_tensors
        g_tf32 = tf32_round(g).double()
        du = torch.einsum("oc,bohw->bchw", tf32_round(w).double(), g_tf32)
        dw = torch.einsum("bohw,bchw->oc", g_tf32, tf32_round(u).double())
        return du.to(u.dtype), dw.to(w.dtype)


def tf32_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 t = hi + lo (up to 2^-22 |t|), both TF32 values: `split_tf32` in the kernels."""
    f = t.detach().float()
    hi = tf32_round(f)
    return hi, tf32_round(f - hi)


def tf32x3_product(a: torch.Tensor, b: torch.Tensor, equation: str) -> torch.Tensor:
    """einsum(equation, a, b) in float64 as 3xTF32 computes it: a_lo b_hi + a_hi b_lo + a_hi b_hi."""
    (a_hi, a_lo), (b_hi, b_lo) = tf32_split(a), tf32_split(b)
    e = lambda x, y: torch.einsum(equation, x.double(), y.double())  # noqa: E731
    return e(a_lo, b_hi) + e(a_hi, b_lo) + e(a_hi, b_hi)


class TF32x3Conv1x1(torch.autograd.Function):
    """y = W u per pixel with every product as 3xTF32 (in float64), forward and backward (du = W^T g, dW = sum over
    pixels of g u^T, each split the same way): what the fused kernels compute under "tf32x3", up to their fp32
    accumulation."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, w)
        return tf32x3_product(w, u, "oc,bchw->bohw")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, w = ctx.saved_tensors
        du = tf32x3_product(w, g, "oc,bohw->bchw")
        dw = tf32x3_product(g, u, "bohw,bchw->oc")
        return du.to(u.dtype), dw.to(w.dtype)


def assert_tf32(fast: torch.Tensor, ref_same_precision: torch.Tensor | list[torch.Tensor], ref_fp64: torch.Tensor,
                name: str = "") -> None:
    """flash-attention rule: max|fast - ref64| <= TF32_FACTOR * max|ref32 - ref64| + TF32_SLACK * scale.

    Several same-precision references may be given (e.g. cuDNN's TF32 conv and the TF32-rounded-operand product
    the kernels compute, TF32Conv1x1); the largest of their errors is the yardstick."""
    refs = ref_same_precision if isinstance(ref_same_precision, list) else [ref_same_precision]
    ref64 = ref_fp64.detach().double()
    scale = max(1.0, float(ref64.abs().max()))
    fast_err = float((fast.detach().double() - ref64).abs().max())
    ref_err = max(float((r.detach().double() - ref64).abs().max()) for r in refs)
    assert fast_err <= TF32_FACTOR * ref_err + TF32_SLACK * scale, (
        f"{name}: TF32 fast-path error {fast_err:.3g} > {TF32_FACTOR} x reference error {ref_err:.3g} "
        f"+ {TF32_SLACK} x {scale:.3g}"
    )


def assert_bf16(fast: torch.Tensor, ref_bf16: torch.Tensor, ref_fp64: torch.Tensor, kind: str = "out",
                name: str = "") -> None:
    """The BF16 rule (module docstring) for an output (`kind` "out": max error) or a gradient ("grad": relative L2
    error); ref_bf16 is the module under bf16 autocast."""
    ref64 = ref_fp64.detach().double()
    fast_d, ref_d = fast.detach().double() - ref64, ref_bf16.detach().double() - ref64
    if kind == "out":
        scale = max(1.0, float(ref64.abs().max()))
        fast_err, ref_err = float(fast_d.abs().max()), float(ref_d.abs().max())
        bound = BF16_FACTOR * ref_err + BF16_SLACK * scale
    else:
        norm = max(float(ref64.norm()), 1e-30)
        fast_err, ref_err = float(fast_d.norm()) / norm, float(ref_d.norm()) / norm
        bound = BF16_GRAD_FACTOR * ref_err + BF16_GRAD_SLACK
    assert fast_err <= bound, f"{name} ({kind}): bf16 fast-path error {fast_err:.3g} > bound {bound:.3g} " \
                              f"(autocast's error {ref_err:.3g})"
