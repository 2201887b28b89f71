"""Input validation shared by layers and the model: clear errors instead of silent NaNs."""

import math
import os

import torch


def is_temperature(t) -> bool:
    """A sampling temperature: a finite real number >= 0 (a bool is not one)."""
    return not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t >= 0


def triton_kernels_run_on(t: torch.Tensor) -> bool:
    """Whether glowfast's Triton kernels can take `t`: a CUDA tensor, or a CPU tensor under TRITON_INTERPRET=1
    (read from the environment, so that asking never imports Triton in a CPU-only process)."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def check_image_batch(x: torch.Tensor, channels: int | None = None, name: str = "input") -> None:
    """Raise TypeError/ValueError naming the problem if `x` is not a finite floating (B, C, H, W) batch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)} ({x.dim()}-D)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels, expected {channels} (shape {tuple(x.shape)})")
    check_finite(x, name)


def can_synchronize(x: torch.Tensor) -> bool:
    """Whether a data-dependent host check on `x` is allowed now: not while torch.compile traces (it would split
    the graph) and not while a CUDA graph is being captured (a device sync there is an error)."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    # One reduction; on CUDA this synchronises, so the model calls it at its boundary only — and skips it
    # while compiling or capturing a CUDA graph (see can_synchronize).
    if not can_synchronize(x):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")


def check_even_spatial(x: torch.Tensor, name: str = "input") -> None:
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"{name} spatial size {h}x{w} is odd; squeezing needs H and W divisible by 2")


def check_device_exists(device: torch.device) -> None:
    """RuntimeError naming the problem when `device` is one this machine does not have: a CUDA device with no CUDA
    at all, or an index beyond the devices present; another accelerator type (mps, xpu ...) this PyTorch build or
    machine lacks; or meta, which computes nothing. Each would otherwise fail later, deep inside torch."""
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise RuntimeError("meta is not a compute device (its tensors hold no data): use cpu or cuda")
    if device.type != "cuda":  # untested by glowfast, but let the reference layers run where torch can
        try:
            torch.empty(1, device=device)
        except Exception as e:  # torch raises RuntimeError or AssertionError, depending on the backend
            why = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:160]  # torch's first sentence
            raise RuntimeError(f"{device.type} is not available on this machine or in this PyTorch build "
                               f"({why})") from None
        return
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine")
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        raise RuntimeError(f"{device} does not exist: this machine has {n} CUDA device{'' if n == 1 else 's'} "
                           f"(cuda:0 to cuda:{n - 1})")
