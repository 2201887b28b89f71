"""How the coupling networks execute: bf16 autocast, and the channels_last or all-GEMM layout.

bf16 (``--amp bf16``): only the coupling networks (``coupling.net``: conv3x3 -> ReLU -> conv1x1 -> ReLU ->
ZeroConv2d) run under ``torch.autocast(dtype=torch.bfloat16)``; their output is cast back to fp32 before it
reaches the coupling's affine/additive transform. ActNorm, the 1x1 convolutions, the log-determinants, the
split/top priors and the loss all stay in fp32, so log-likelihoods are accumulated exactly as in full
precision and only the networks' outputs (shift/scale) carry bf16 rounding. Invertibility is unaffected: the
inverse runs the same bf16 network on the same input, so ``decode(encode(x))`` still reconstructs ``x`` up to
fp32 rounding.

channels_last (``--channels-last``): the networks' weights and activations use the NHWC memory format, cuDNN's
faster layout for these convolutions (measured on an H100, coupling networks forward+backward at CIFAR-10
shapes: 12-17% less time, shared/TOOLCHAIN.md), and their 1x1 convolution runs as one cuBLAS GEMM over the
pixels (`nhwc_network_forward`). The flow itself keeps NCHW (the fused kernels read NCHW): each network's input
is converted to channels_last and its output back to contiguous NCHW, two small copies per step. The function
computed is the same up to floating-point summation order.

gemm (``--gemm-networks``): every convolution of the networks as one GEMM over the pixel rows
(`gemm_network_forward`: im2col for the thin-input 3x3, a GEMM + col2im for the thin-output 3x3), instead of
cuDNN, which runs these thin convolutions far below the GPU's matmul rate. Exclusive with channels_last.

triton (``--triton-networks``): the whole network by glowfast's Triton kernels (`glowfast.kernels.coupling_net`):
each thin 3x3 convolution one implicit-GEMM pass with its bias/scale/ReLU fused, the 1x1 a cuBLAS GEMM, hidden
activations as pixel rows; forward and backward. Exclusive with the two layouts above; with bf16 its hidden
activations and 1x1 GEMM are bf16 (the 3x3 convs accumulate in fp32 from them). It acts where the kernels run (fp32
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); elsewhere, and while torch.compile traces, the network runs
as the plain module (under bf16 autocast if bf16), the same function, so a model trained with it loads and evaluates
anywhere.

compiled (``--compile-networks``): the standard network (`_is_standard_network`, with biases) as one
`torch.compile`d function of its input and weights (`compiled_network_forward`), under bf16 autocast if bf16 and on
channels_last memory if channels_last. The convolutions stay cuDNN's; inductor fuses what lies between them (bias,
ReLU, the output's scale, the bf16 casts, and in the backward the ReLU masks and the bias and scale gradients), the
small kernels that took half of the bf16 channels_last step's device time on the H100 (24th session profile:
35.3 ms of kernels per CIFAR-10 B64 step, 14.9 ms of them convolutions). One function for every network: its graphs
are per input shape (one per level, plus the no-grad ones of sampling), not per network. Exclusive with gemm and
triton. The first call of each shape compiles (seconds to a minute: start-up), and the function is the same up to
summation order. Under bf16 the thin convolutions' channels are zero-padded to multiples of 8 inside the graph
(`network_channel_pad`, `pad_network_channels`; measured faster), the same function. Two more switches, off until
timed: the thin 3x3 convolutions as GEMMs (`thin_convolutions_as_gemms`) and the ReLUs in the GEMMs' epilogues
(`relu_in_gemm_epilogues`).

Precision: the GEMMs of both layouts run at the precision of the convolutions they replace (TF32 iff cuDNN's
convolutions would use it, the rule the fused kernels' dots follow), forward and backward, whatever cuBLAS's own
setting (`conv_precision_linear`); PyTorch defaults cuBLAS to full fp32, which would make the "fast" layouts
compete in fp32 against TF32 convolutions.

All are applied from outside the reference layers by one wrapper around each network module's ``forward``
(on the instance) that reads the network's options on every call; no parameters, buffers or state-dict keys
change. They act wherever a coupling network is *called as a module*; a backend that read the networks'
weights directly would bypass them.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ._checks import triton_kernels_run_on
from .reference.coupling import CouplingNetwork

AMP_MODES = ("none", "bf16")  # the --amp choices of the training CLIs and the experiments' ModelSpec.amp
# per network: {"bf16": bool, "channels_last": bool, "gemm": bool, "triton": bool, "compiled": bool}
_OPTIONS = "_glowfast_net_options"
# options that cannot run together: the three layouts (channels_last, gemm, triton: at most one per network), and
# compiled (the standard forward) with the forwards that replace it
_CONFLICTS = {"channels_last": ("gemm", "triton"), "gemm": ("channels_last", "triton", "compiled"),
              "triton": ("channels_last", "gemm", "compiled"), "compiled": ("gemm", "triton")}


def coupling_networks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CouplingNetwork)]


@contextlib.contextmanager
def _cublas_tf32(enabled: bool):
    """cuBLAS fp32 matmuls inside run in TF32 iff `enabled`; torch's setting is restored on exit. Through the
    per-backend setting (`torch.backends.cuda.matmul.fp32_precision`), saved and put back as it was, which leaves
    torch's legacy getters readable (checked on torch 2.11 and 2.14)."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    want = "tf32" if enabled else "ieee"
    if saved == want:
        yield
        return
    matmul.fp32_precision = want
    try:
        yield
    finally:
        matmul.fp32_precision = saved


class _ConvPrecisionLinear(torch.autograd.Function):
    """a @ w.T (+ bias), forward and backward, with cuBLAS at the precision `tf32` given by the caller."""

    @staticmethod
    def forward(ctx, a, w, bias, tf32):
        ctx.save_for_backward(a, w)
        ctx.tf32, ctx.has_bias = tf32, bias is not None
        with _cublas_tf32(tf32):
            return torch.addmm(bias, a, w.t()) if bias is not None else torch.mm(a, w.t())

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        grad_a = grad_w = grad_bias = None
        with _cublas_tf32(ctx.tf32):
            if ctx.needs_input_grad[0]:
                grad_a = torch.mm(grad, w)
            if ctx.needs_input_grad[1]:
                grad_w = torch.mm(grad.t(), a)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_a, grad_w, grad_bias, None


def conv_precision_linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ w.T + bias for 2-D a (rows = pixels), computed at the precision of the convolution it replaces.

    A GEMM layout of the coupling networks stands in for cuDNN convolutions, which run in TF32 under PyTorch's
    default (`torch.backends.cudnn.allow_tf32`), while cuBLAS matmuls default to full fp32 (several times slower
    on an H100's tensor cores). So forward and backward products here use TF32 exactly when a convolution would
    (`glowfast.kernels._utils.conv_allows_tf32`); `full_fp32` makes them exact.
    Under autocast the product runs in the autocast dtype, as autocast runs `addmm`. While torch.compile traces,
    the plain ops (inductor applies its own precision settings)."""
    if torch.compiler.is_compiling():
        return torch.addmm(bias, a, w.t()) if bias is not None else torch.mm(a, w.t())
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        a, w, bias = a.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _ConvPrecisionLinear.apply(a, w, bias, False)
    from .kernels._utils import conv_allows_tf32  # here, not at import: Triton loads only with the fast paths

    tf32 = a.dtype == torch.float32 and conv_allows_tf32(a.device)
    return _ConvPrecisionLinear.apply(a, w, bias, tf32)


def nhwc_network_forward(net: CouplingNetwork, x: torch.Tensor) -> torch.Tensor:
    """`CouplingNetwork.forward` for channels_last activations, with the 1x1 conv as one matrix product.

    A 1x1 convolution is a product over channels; on NHWC memory it is a single GEMM over the B*H*W pixel rows,
    with no copy (permute to (B, H, W, C) is a view of contiguous memory). cuBLAS runs that GEMM several times
    faster than cuDNN runs the 1x1 conv at the small spatial sizes of a Glow's deeper levels (shared/
    TOOLCHAIN.md, H100, batch 256, 512 -> 512 channels at 8x8: 1.2 ms forward+backward for the conv, vs 154
    TFLOP/s, i.e. ~0.06 ms per forward, for a plain matmul of that size). Same function as the module's
    forward (tested).
    """
    h = _conv1x1_as_gemm(torch.relu(net.conv1(x)), net.conv2.weight, net.conv2.bias)
    return net.conv3(torch.relu(h))


def _conv1x1_as_gemm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     product=conv_precision_linear) -> torch.Tensor:
    """The 1x1 convolution of channels_last `h` as one GEMM over its B*H*W pixel rows (views, no copy), at the
    convolution's precision (`conv_precision_linear`: a plain addmm while torch.compile traces); `product`
    `_gemm_relu`: with the ReLU after it in the GEMM's epilogue."""
    b, c, hgt, wid = h.shape
    rows = h.permute(0, 2, 3, 1).reshape(b * hgt * wid, c)  # a view of channels_last memory
    w = weight.flatten(1)  # (out, in): a view of a 1x1 kernel in either memory format
    return product(rows, w, bias).view(b, hgt, wid, -1).permute(0, 3, 1, 2)


class _GemmReLU(torch.autograd.Function):
    """relu(bias + a @ w.T) with the ReLU in the GEMM's epilogue (`torch._addmm_activation`: on CUDA cuBLASLt's
    RELU_BIAS epilogue, so the activation is written once, instead of written by the GEMM, then read and written
    again by the ReLU); the backward is ReLU's (the mask from the output) and addmm's. torch has no derivative
    for `_addmm_activation`, hence this Function."""

    @staticmethod
    def forward(ctx, a, w, bias):
        out = torch._addmm_activation(bias, a, w.t())
        ctx.save_for_backward(a, w, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, w, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)  # ReLU's own backward
        grad_a = torch.mm(grad, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad.t(), a) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_a, grad_w, grad_bias


def _gemm_relu(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(bias + a @ w.T) as `_GemmReLU` (the ReLU in the GEMM's epilogue). Under autocast the operands are cast
    to its dtype first, as autocast casts addmm's (it does not know `_addmm_activation`); else the product runs
    at cuBLAS's precision, as a plain addmm under torch.compile (the compiled networks' only use of it)."""
    device_type = a.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _GemmReLU.apply(a.to(dtype), w.to(dtype), bias.to(dtype))
    return _GemmReLU.apply(a, w, bias)


def _is_standard_network(net: CouplingNetwork) -> bool:
    c1, c2, c3 = net.conv1, net.conv2, net.conv3.conv
    return (c1.kernel_size == (3, 3) and c1.padding == (1, 1) and c2.kernel_size == (1, 1)
            and c3.kernel_size == (3, 3) and c3.padding == (1, 1)
            and c2.padding == (0, 0)
            and all(c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1 for c in (c1, c2, c3)))


def _has_biases(net: CouplingNetwork) -> bool:
    return all(c.bias is not None for c in (net.conv1, net.conv2, net.conv3.conv))


def gemm_network_forward(net: CouplingNetwork, x: torch.Tensor) -> torch.Tensor:
    """`CouplingNetwork.forward` with every convolution as one GEMM over the B*H*W pixel rows (no cuDNN).

    The coupling network's 3x3 convolutions are thin: few input channels (conv1: C_a -> 512) or few output
    channels (conv3: 512 -> 2*C_b), shapes on which cuDNN runs at 14-35 TFLOP/s (shared/TOOLCHAIN.md, H100).
    Here, with the hidden activations kept as (B*H*W, 512) row matrices:
      conv1: im2col of the small input (unfold: 9*C_a columns), then one GEMM (K = 9*C_a);
      conv2: one GEMM (the 1x1 conv);
      conv3: one GEMM to 9*C_out "tap" channels (each output channel's 3x3 taps, flipped), then `fold` adds
             every tap's contribution at its shifted position (col2im) — no im2col of the 512-channel input.
    Input and output are NCHW, as the flow hands them over. Same function as the module's forward (tested).
    """
    b, _, hgt, wid = x.shape
    c1, c2, c3 = net.conv1, net.conv2, net.conv3.conv
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * hgt * wid, -1)
    h = torch.relu(conv_precision_linear(cols, c1.weight.flatten(1), c1.bias))
    h = torch.relu(conv_precision_linear(h, c2.weight.flatten(1), c2.bias))
    out_ch = c3.out_channels
    taps = c3.weight.flip(2, 3).permute(0, 2, 3, 1).reshape(out_ch * 9, -1)  # rows (o, kh, kw), fold's order
    t = conv_precision_linear(h, taps).view(b, hgt * wid, out_ch * 9).transpose(1, 2)
    y = torch.nn.functional.fold(t, (hgt, wid), 3, padding=1) + c3.bias.view(1, -1, 1, 1)
    return y * torch.exp(net.conv3.logs * net.conv3.logscale_factor).view(1, -1, 1, 1)


def _conv3x3_thin_input_as_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                                relu_epilogue: bool = False) -> torch.Tensor:
    """relu(conv2d(x, w, bias, padding=1)) for few input channels (conv1): im2col of x by padding and nine slices
    (9 * C_in columns in (kh, kw, c) order; one gather kernel under torch.compile), then one GEMM over the B*H*W
    pixel rows to the wide output, returned as a (B, C_out, H, W) view of those rows (channels_last memory). The
    ReLU in the GEMM's epilogue if `relu_epilogue` (`_gemm_relu`)."""
    b, c, hgt, wid = x.shape
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    cols = torch.cat([xp[:, i:i + hgt, j:j + wid] for i in range(3) for j in range(3)], dim=3)
    rows = cols.reshape(b * hgt * wid, 9 * c)
    w_rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], 9 * c)
    out = _gemm_relu(rows, w_rows, bias) if relu_epilogue else torch.relu(torch.addmm(bias, rows, w_rows.t()))
    return out.view(b, hgt, wid, -1).permute(0, 3, 1, 2)


def _conv3x3_thin_output_as_gemm(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv2d(h, w, bias, padding=1) for few output channels (conv3): one GEMM of h's pixel rows to 9 * C_out tap
    channels z (tap (kh, kw) of output o: w[o, :, kh, kw] . h[q]), then each output pixel p sums its nine taps
    z[p + (kh - 1, kw - 1), (kh, kw)], zero outside the image (padding and slices: one kernel under torch.compile;
    the sum in fp32 at least). No im2col of the wide input. Returns (B, C_out, H, W)."""
    b, c, hgt, wid = h.shape
    out_ch = w.shape[0]
    rows = h.permute(0, 2, 3, 1).reshape(b * hgt * wid, c)
    taps = w.permute(2, 3, 0, 1).reshape(9 * out_ch, c)  # rows in (kh, kw, o) order
    z = torch.mm(rows, taps.t())
    acc = torch.promote_types(z.dtype, torch.float32)  # bf16 taps summed in fp32
    zp = torch.nn.functional.pad(z.to(acc).view(b, hgt, wid, 9, out_ch), (0, 0, 0, 0, 1, 1, 1, 1))  # B,H+2,W+2,9,C
    y = bias.to(acc)
    for i in range(3):
        for j in range(3):
            y = y + zp[:, i:i + hgt, j:j + wid, 3 * i + j]
    return y.permute(0, 3, 1, 2)


def _standard_network_math(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                           b2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, logs: torch.Tensor,
                           logscale_factor: float, bf16: bool, channels_last: bool, pad: int = 0,
                           thin_gemms: bool = False, relu_epilogue: bool = False) -> torch.Tensor:
    """`CouplingNetwork.forward` of the standard network as a function of its input and weights: what
    `compiled_network_forward` compiles (the same ops, under the same autocast, as the module under its options).
    `pad` > 0: the thin convolutions' input (conv1) and output (conv3) channels zero-padded to a multiple of it and
    the output sliced back, the same function (`pad_network_channels`). `thin_gemms`: those two 3x3 convolutions
    as GEMMs over the pixel rows instead of cuDNN's (`_conv3x3_thin_input_as_gemm`, `_conv3x3_thin_output_as_gemm`;
    `thin_convolutions_as_gemms`), the same function up to summation order. `relu_epilogue`: the ReLUs after
    the GEMMs (conv2's when it is one, conv1's under thin_gemms) in their epilogues (`_gemm_relu`;
    `relu_in_gemm_epilogues`), the same function."""
    out_channels = w3.shape[0]
    if pad:
        fn = torch.nn.functional
        extra_in, extra_out = -x.shape[1] % pad, -out_channels % pad
        x, w1 = fn.pad(x, (0, 0, 0, 0, 0, extra_in)), fn.pad(w1, (0, 0, 0, 0, 0, extra_in))
        w3 = fn.pad(w3, (0, 0, 0, 0, 0, 0, 0, extra_out))
        b3, logs = fn.pad(b3, (0, extra_out)), fn.pad(logs, (0, extra_out))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        if thin_gemms:
            h = _conv3x3_thin_input_as_gemm(x, w1, b1, relu_epilogue)
        else:
            h = torch.relu(torch.nn.functional.conv2d(x, w1, b1, padding=1))
        # the 1x1 as one GEMM over the pixel rows, as nhwc_network_forward (bf16: no TF32 question; fp32 keeps
        # cuDNN, whose TF32 follows the conv flag, unless the thin convolutions are GEMMs too)
        if (channels_last and bf16) or thin_gemms:
            h = _conv1x1_as_gemm(h, w2, b2, _gemm_relu) if relu_epilogue else torch.relu(_conv1x1_as_gemm(h, w2, b2))
        else:
            h = torch.relu(torch.nn.functional.conv2d(h, w2, b2))
        if thin_gemms:
            out = _conv3x3_thin_output_as_gemm(h, w3, b3)
        else:
            out = torch.nn.functional.conv2d(h, w3, b3, padding=1)
        out = out * torch.exp(logs * logscale_factor).view(1, -1, 1, 1)
    return out[:, :out_channels].to(x.dtype).contiguous()


@functools.cache
def _compiled_network_math():
    # one compiled function for all networks (their weights are its inputs): graphs per input shape, grad mode and
    # options, not per network
    return torch.compile(_standard_network_math)


# Graphs the compiled network may hold: one per (input shape, grad mode, options), i.e. the levels x the batch sizes
# of training (grad), ActNorm's init, evaluation and sampling (no grad). Dynamo's default limit per function (8)
# ran out on the H100 (24th session): the benchmark process's B64 case (3 levels, with and without grad) and then
# its B256 case, whose later levels fell back to eager networks and measured no gain. Raised for this function's
# calls only (torch._dynamo.config.patch around the call); beyond it dynamo warns and runs the network eagerly.
RECOMPILE_LIMIT = 64
_LIMIT_KEY = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

# Compiled networks only: zero-pad the thin convolutions' channels (conv1's input, conv3's output) to a multiple of
# this. cuDNN pads them itself for its bf16 tensor-core kernels, in separate kernels: 512 calls, 1.2 ms of the
# H100's bf16 NHWC B64 step (24th session); padded in the compiled graph, inductor fuses the padding into the casts
# around them. Measured on the H200 (25th session, graphed bf16 NHWC step): 28.5 -> 26.4 ms at B64, 57.0 -> 55.7 ms
# at B256, so bf16 networks pad to 8 by default; fp32 (TF32) networks were not timed and do not (0).
# None: that default; an int (pad_network_channels): that multiple for every compiled network, 0 = off.
BF16_CHANNEL_PAD = 8
_channel_pad: int | None = None


def network_channel_pad(bf16: bool) -> int:
    """The multiple a compiled network pads its thin channel counts to (0: none): `pad_network_channels`'s inside
    it, else BF16_CHANNEL_PAD for bf16 networks and 0 for fp32 ones."""
    if _channel_pad is None:
        return BF16_CHANNEL_PAD if bf16 else 0
    return _channel_pad


@contextlib.contextmanager
def _module_setting(name: str, value):
    """Set this module's global `name` to `value` inside, and restore it after (the compiled networks' switches)."""
    old = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = old


def pad_network_channels(multiple: int | None):
    """Inside (a context manager), compiled networks (`compiled_network_forward`) pad their thin channel counts to a
    multiple of `multiple` (0: no padding; None: the default, `network_channel_pad`); the same function. Graphs
    compiled or captured inside keep it."""
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 0):
        raise ValueError(f"the channel padding must be an int >= 0 or None, got {multiple!r}")
    return _module_setting("_channel_pad", multiple)


# Compiled networks only: the thin 3x3 convolutions as GEMMs over the pixel rows (`_standard_network_math`'s
# thin_gemms). In the H200's B256 profile (25th session) the 3x3 convolutions' cuDNN kernels (forward, data and weight
# gradients) took ~25 of the step's 61 ms of kernels at ~70 TFLOP/s, where the 1x1's GEMMs run near the tensor cores'
# peak: as GEMMs their shapes are wide (K = 9 * C_in for conv1, N = 9 * C_out for conv3) and the im2col / tap sums
# are one fused kernel each under torch.compile. Off until timed (bench variant graphed_bf16_nhwc_compiled_gemm3x3).
# In fp32 the GEMMs run at cuBLAS's precision (full fp32 unless torch.backends.cuda.matmul.allow_tf32), not cuDNN's.
_thin_gemms = False


def thin_convolutions_as_gemms(enabled: bool = True):
    """Inside (a context manager), compiled networks (`compiled_network_forward`) run their thin 3x3 convolutions as
    GEMMs; the same function up to summation order. Graphs compiled or captured inside keep it."""
    if not isinstance(enabled, bool):
        raise ValueError(f"thin_convolutions_as_gemms takes True or False, got {enabled!r}")
    return _module_setting("_thin_gemms", enabled)


# Compiled networks only: the ReLU after each GEMM of the network (conv2's when it is one: bf16 channels_last, or
# thin_gemms; conv1's under thin_gemms) in the GEMM's epilogue (`_gemm_relu`: cuBLASLt's RELU_BIAS). In the compiled
# graph the ReLU is otherwise one more pass over a 512-channel activation per GEMM, read and written: at B256, ~2 of
# the ~10 such passes per network call that inductor's 12.2 ms of kernels make (H200 profile, 25th session).
# Off until timed (bench variants with `_epilogue`).
_relu_epilogue = False


def relu_in_gemm_epilogues(enabled: bool = True):
    """Inside (a context manager), compiled networks (`compiled_network_forward`) compute the ReLU after each of
    their GEMMs in the GEMM's epilogue; the same function. Graphs compiled or captured inside keep it."""
    if not isinstance(enabled, bool):
        raise ValueError(f"relu_in_gemm_epilogues takes True or False, got {enabled!r}")
    return _module_setting("_relu_epilogue", enabled)


_eager_only = False


def eager_networks():
    """Inside (a context manager), compiled networks run their eager options instead (the same function, no
    compile). For one-off passes such as ActNorm's data-dependent init (glowfast.trainer.initialize_actnorm):
    compiled, it would compile graphs for a batch size and grad mode training never uses (a quarter of the start-up
    compile on the CPU), and dynamo, seeing a second batch size, would compile training's graphs for a dynamic one."""
    return _module_setting("_eager_only", True)


def compiled_network_forward(net: CouplingNetwork, x: torch.Tensor, bf16: bool = False,
                             channels_last: bool = False) -> torch.Tensor:
    """`CouplingNetwork.forward` of a standard network by one `torch.compile`d function (the module docstring's
    "compiled"); the output is NCHW-contiguous in x's dtype. Inside a model that torch.compile traces itself, the
    plain function (the outer compile fuses it)."""
    c1, c2, c3 = net.conv1, net.conv2, net.conv3
    args = (x, c1.weight, c1.bias, c2.weight, c2.bias, c3.conv.weight, c3.conv.bias, c3.logs,
            float(c3.logscale_factor), bf16, channels_last, network_channel_pad(bf16), _thin_gemms, _relu_epilogue)
    if torch.compiler.is_compiling():
        return _standard_network_math(*args)
    with torch._dynamo.config.patch(**{_LIMIT_KEY: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, _LIMIT_KEY))}):
        return _compiled_network_math()(*args)


def _triton_network_runs(x: torch.Tensor) -> bool:
    """Whether the Triton network's kernels run on x: fp32 tensors they can take (`triton_kernels_run_on`), not
    while torch.compile traces."""
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return triton_kernels_run_on(x)


def _forward_with_options(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Installed as the network's `forward`, as `functools.partial(_forward_with_options, net)`: copy.deepcopy
    rebinds it to the copy, and pickle (torch.save of a whole model) can store it (a bound MethodType would be
    looked up by name on load, where the network has no such attribute)."""
    opts = getattr(net, _OPTIONS)
    if opts["triton"] and _triton_network_runs(x):
        from .kernels.coupling_net import apply_coupling_network  # here: Triton loads only with the fast paths

        return apply_coupling_network(net, x, torch.bfloat16 if opts["bf16"] else torch.float32)
    # elsewhere a Triton network runs as the plain module (under autocast if bf16), the same function
    # .get: a whole model pickled before the option existed
    if opts.get("compiled") and x.is_floating_point() and not _eager_only:
        return compiled_network_forward(net, x, opts["bf16"], opts["channels_last"])
    if opts["gemm"]:
        forward = gemm_network_forward
    else:
        forward = nhwc_network_forward if opts["channels_last"] else type(net).forward
    h = x.contiguous(memory_format=torch.channels_last) if opts["channels_last"] else x
    if opts["bf16"]:
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = forward(net, h)
        if out.dtype != x.dtype and x.is_floating_point():
            out = out.to(x.dtype)
    else:
        out = forward(net, h)
    return out.contiguous() if opts["channels_last"] else out


def _set_option(model: nn.Module, name: str, value: bool) -> int:
    """Set one option on every coupling network of `model`; returns how many networks changed."""
    n = 0
    nets = coupling_networks(model)
    if value and name in _CONFLICTS:
        for other in _CONFLICTS[name]:
            if any(getattr(net, _OPTIONS, {}).get(other) for net in nets):
                what = "two different layouts" if "compiled" not in (name, other) else \
                    "two different forwards (compiled compiles the standard one)"
                raise ValueError(f"the coupling networks already run with {other}; {name} and {other} are "
                                 f"{what}, enable one of them")
        if name in ("gemm", "triton", "compiled") and not all(_is_standard_network(net) for net in nets):
            raise ValueError(f"{name} networks need the standard coupling network (3x3 pad 1, 1x1, 3x3 pad 1, "
                             "stride 1)")
        if name in ("triton", "compiled") and not all(_has_biases(net) for net in nets):
            raise ValueError(f"{name} networks need the standard coupling network (3x3 pad 1, 1x1, 3x3 pad 1, "
                             "stride 1, with biases)")
    for net in nets:
        opts = getattr(net, _OPTIONS, None)
        if bool(opts and opts.get(name)) == value:
            continue
        if opts is None:
            opts = {"bf16": False, "channels_last": False, "gemm": False, "triton": False, "compiled": False}
            setattr(net, _OPTIONS, opts)
            net.forward = functools.partial(_forward_with_options, net)
        opts[name] = value
        if name == "channels_last":
            net.to(memory_format=torch.channels_last if value else torch.contiguous_format)
        if not any(opts.values()):  # back to the plain module
            del net.forward
            delattr(net, _OPTIONS)
        n += 1
    return n


def _all_set(model: nn.Module, name: str) -> bool:
    nets = coupling_networks(model)
    return bool(nets) and all(getattr(net, _OPTIONS, {}).get(name, False) for net in nets)


def enable_bf16_networks(model: nn.Module) -> int:
    """Run every coupling network of ``model`` under bf16 autocast; returns how many were changed.

    Idempotent. The output of each network is cast back to its input's dtype (fp32).
    """
    return _set_option(model, "bf16", True)


def disable_bf16_networks(model: nn.Module) -> int:
    """Undo :func:`enable_bf16_networks`; returns how many networks were restored."""
    return _set_option(model, "bf16", False)


def bf16_networks_enabled(model: nn.Module) -> bool:
    return _all_set(model, "bf16")


def enable_channels_last_networks(model: nn.Module) -> int:
    """Convert every coupling network's weights to channels_last and run it on channels_last activations
    (input converted, output returned as contiguous NCHW); returns how many were changed. Idempotent.
    Call it after moving the model to its device (``Module.to(device)`` keeps the memory format)."""
    return _set_option(model, "channels_last", True)


def disable_channels_last_networks(model: nn.Module) -> int:
    """Undo :func:`enable_channels_last_networks` (weights back to contiguous NCHW)."""
    return _set_option(model, "channels_last", False)


def channels_last_networks_enabled(model: nn.Module) -> bool:
    return _all_set(model, "channels_last")


def enable_gemm_networks(model: nn.Module) -> int:
    """Run every coupling network's convolutions as GEMMs (`gemm_network_forward`) instead of cuDNN; returns how
    many networks were changed. Idempotent. Exclusive with channels_last (a different layout)."""
    return _set_option(model, "gemm", True)


def disable_gemm_networks(model: nn.Module) -> int:
    return _set_option(model, "gemm", False)


def gemm_networks_enabled(model: nn.Module) -> bool:
    return _all_set(model, "gemm")


def enable_triton_networks(model: nn.Module) -> int:
    """Run every coupling network of ``model`` by glowfast's Triton kernels (glowfast.kernels.coupling_net) where
    they run; returns how many networks were changed. Idempotent. Exclusive with the channels_last and gemm layouts;
    combined with `enable_bf16_networks`, its hidden activations are bf16."""
    return _set_option(model, "triton", True)


def disable_triton_networks(model: nn.Module) -> int:
    return _set_option(model, "triton", False)


def triton_networks_enabled(model: nn.Module) -> bool:
    return _all_set(model, "triton")


def enable_compiled_networks(model: nn.Module) -> int:
    """Run every coupling network of ``model`` as one `torch.compile`d function (`compiled_network_forward`);
    returns how many networks were changed. Idempotent. Combines with bf16 and channels_last; exclusive with the
    gemm and triton networks. The first call of each input shape compiles."""
    return _set_option(model, "compiled", True)


def disable_compiled_networks(model: nn.Module) -> int:
    return _set_option(model, "compiled", False)


def compiled_networks_enabled(model: nn.Module) -> bool:
    return _all_set(model, "compiled")


def apply_network_options(model: nn.Module, config: dict) -> None:
    """The coupling networks' precision and layout options of a run's config (``amp``, ``channels_last``,
    ``gemm_networks``, ``triton_networks``, ``compile_networks``), as training, sampling and evaluation apply them."""
    if config.get("amp", "none") == "bf16":
        enable_bf16_networks(model)
    if config.get("channels_last"):
        enable_channels_last_networks(model)
    if config.get("gemm_networks"):
        enable_gemm_networks(model)
    if config.get("triton_networks"):
        enable_triton_networks(model)
    if config.get("compile_networks"):
        enable_compiled_networks(model)
