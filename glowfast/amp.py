"""How the coupling networks execute: bf16 autocast and/or the channels_last memory format.

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

Both are applied from outside the reference layers by one wrapper around each network module's ``forward``
(on the instance) that reads the network's options on every call; no parameters, buffers or state-dict keys
change. They act wherever a coupling network is *called as a module*; a backend that read the networks'
weights directly would bypass them.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .reference.coupling import CouplingNetwork

_OPTIONS = "_glowfast_net_options"  # per network: {"bf16": bool, "channels_last": bool}


def coupling_networks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CouplingNetwork)]


def nhwc_network_forward(net: CouplingNetwork, x: torch.Tensor) -> torch.Tensor:
    """`CouplingNetwork.forward` for channels_last activations, with the 1x1 conv as one matrix product.

    A 1x1 convolution is a product over channels; on NHWC memory it is a single GEMM over the B*H*W pixel rows,
    with no copy (permute to (B, H, W, C) is a view of contiguous memory). cuBLAS runs that GEMM several times
    faster than cuDNN runs the 1x1 conv at the small spatial sizes of a Glow's deeper levels (shared/
    TOOLCHAIN.md, H100, batch 256, 512 -> 512 channels at 8x8: 1.2 ms forward+backward for the conv, vs 154
    TFLOP/s, i.e. ~0.06 ms per forward, for a plain matmul of that size). Same function as the module's
    forward (tested).
    """
    h = torch.relu(net.conv1(x))
    w = net.conv2.weight.flatten(1)  # (out, in): a view of a 1x1 kernel in either memory format
    h = torch.nn.functional.linear(h.permute(0, 2, 3, 1), w, net.conv2.bias).permute(0, 3, 1, 2)
    return net.conv3(torch.relu(h))


def _forward_with_options(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Installed as the network's bound `forward` (a MethodType, so copy.deepcopy rebinds it to the copy)."""
    opts = getattr(net, _OPTIONS)
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
    for net in coupling_networks(model):
        opts = getattr(net, _OPTIONS, None)
        if bool(opts and opts[name]) == value:
            continue
        if opts is None:
            opts = {"bf16": False, "channels_last": False}
            setattr(net, _OPTIONS, opts)
            net.forward = types.MethodType(_forward_with_options, net)
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
