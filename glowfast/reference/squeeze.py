"""Squeeze2d: trade spatial resolution for channels, (B, C, H, W) -> (B, 4C, H/2, W/2)."""

import torch
from torch import nn

from .._checks import check_even_spatial
from ._checks import check_input


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    check_input(x, "squeeze2d", floating=False)
    check_even_spatial(x, "squeeze2d input")
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    check_input(x, "unsqueeze2d", floating=False)
    b, c4, h, w = x.shape
    if c4 % 4:
        raise ValueError(f"unsqueeze needs a channel count divisible by 4, got {c4}")
    c = c4 // 4
    x = x.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, 2 * h, 2 * w)


class Squeeze2d(nn.Module):
    """A reshape: logdet 0."""

    def forward(self, x: torch.Tensor):
        return squeeze2d(x), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze2d(y)
