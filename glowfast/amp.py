"""Mixed precision for Glow: coupling networks in bf16, the flow itself in fp32.

Only the coupling networks (``coupling.net``: conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d) run under
``torch.autocast(dtype=torch.bfloat16)``; their output is cast back to fp32 before it reaches the coupling's
affine/additive transform. ActNorm, the 1x1 convolutions, the log-determinants, the split/top priors and
the loss all stay in fp32, so log-likelihoods are accumulated exactly as in full precision and only the
networks' outputs (shift/scale) carry bf16 rounding. Invertibility is unaffected: the inverse runs the same
bf16 network on the same input, so ``decode(encode(x))`` still reconstructs ``x`` up to fp32 rounding.

This is applied from outside the reference layers by overriding each network module's ``forward`` on the
instance (no parameters, buffers or state-dict keys change), and works on CPU (bf16 autocast) and CUDA.
It acts wherever a coupling network is *called as a module*; a backend that reads the networks' weights
directly would bypass it.
"""

from __future__ import annotations

import torch
from torch import nn

from .reference.coupling import CouplingNetwork

_ORIG = "_glowfast_fp32_forward"


def _bf16_forward(module: nn.Module, orig_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = orig_forward(x)
        return out.float() if out.dtype != x.dtype and x.is_floating_point() else out

    return forward


def coupling_networks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CouplingNetwork)]


def enable_bf16_networks(model: nn.Module) -> int:
    """Run every coupling network of ``model`` under bf16 autocast; returns how many were wrapped.

    Idempotent. The output of each network is cast back to its input's dtype (fp32).
    """
    n = 0
    for net in coupling_networks(model):
        if hasattr(net, _ORIG):
            continue
        orig = net.forward
        setattr(net, _ORIG, orig)
        net.forward = _bf16_forward(net, orig)
        n += 1
    return n


def disable_bf16_networks(model: nn.Module) -> int:
    """Undo :func:`enable_bf16_networks`; returns how many networks were restored."""
    n = 0
    for net in coupling_networks(model):
        if hasattr(net, _ORIG):
            del net.forward  # the instance attribute; the class's forward shows through again
            delattr(net, _ORIG)
            n += 1
    return n


def bf16_networks_enabled(model: nn.Module) -> bool:
    nets = coupling_networks(model)
    return bool(nets) and all(hasattr(n, _ORIG) for n in nets)
