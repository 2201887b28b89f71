"""Image grids as arrays and PNG files (numpy + matplotlib, both hard dependencies; torchvision is optional)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_save


def image_grid(images: torch.Tensor | np.ndarray, nrow: int, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] (or uint8) -> one (H', W') or (H', W', 3) array, row-major, `nrow` per row."""
    x = torch.as_tensor(images, device="cpu").detach()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs (N, 1 or 3, H, W) images, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    ncol = max(1, nrow)
    nrows = max(1, math.ceil(n / ncol))
    # on x's device (the CPU), not torch's default device: a caller under torch.set_default_device("cuda") too
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, device=x.device)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    g = grid.clamp(0, 1).numpy()
    return g[0] if c == 1 else np.transpose(g, (1, 2, 0))


def save_grid(images: torch.Tensor, path: Path, nrow: int, min_side: int = 32) -> None:
    """Save a grid PNG atomically (a reader never sees a half-written file); images smaller than `min_side` are
    enlarged (nearest) so 8x8 digits stay visible. NaN pixels (`Glow.postprocess`'s overflowed images) are black."""
    from matplotlib.image import imsave  # PIL-backed: no pyplot, no display backend

    images = torch.as_tensor(images, device="cpu").detach()
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    images = images.nan_to_num(nan=0.0)  # NaN (an image the flow could not invert) black, not transparent
    scale = math.ceil(min_side / min(images.shape[-2:]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = image_grid(images, nrow, pad=1, pad_value=0.5)
    # atomic_save: a temporary beside the grid, fsync'ed and renamed; removed if the write fails (a full disk)
    kwargs = dict(cmap="gray", vmin=0.0, vmax=1.0) if grid.ndim == 2 else {}
    atomic_save(grid, path, writer=lambda g, f: imsave(f, g, format="png", **kwargs))
