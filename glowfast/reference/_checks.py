"""Cheap host-side input checks for the reference layers: shape, ndim and dtype only.

No data-dependent reads (no device sync, nothing that splits a torch.compile graph): these run at every call.
"""

import torch


def layer_name(layer) -> str:
    """How error messages name a layer: "AffineCoupling(4)", or the string itself."""
    if isinstance(layer, str):
        return layer
    channels = getattr(layer, "channels", None)
    return type(layer).__name__ if channels is None else f"{type(layer).__name__}({channels})"


def check_input(x, layer, channels: int | None = None, arg: str = "input", floating: bool = True) -> None:
    """Raise TypeError/ValueError naming `layer` unless `x` is a (floating) (B, channels, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer_name(layer)}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{layer_name(layer)}: {arg} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        c = "C" if channels is None else channels
        raise ValueError(f"{layer_name(layer)}: expected {arg} of shape (B, {c}, H, W), got {tuple(x.shape)}")
