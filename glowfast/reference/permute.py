"""Fixed channel permutations (the paper's ablation baselines for the 1x1 convolution)."""

import torch
from torch import nn

from ._checks import check_input


class Permute2d(nn.Module):
    """y = x[:, perm]; logdet 0. `perm` is a buffer so it is saved with the model."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        self.channels = perm.numel()
        self.register_buffer("perm", perm.long())
        self.register_buffer("inv_perm", torch.argsort(perm).long())

    def weight_matrix(self) -> torch.Tensor:
        """The permutation as a (C, C) matrix: (W @ x)[i] = x[perm[i]]."""
        return torch.eye(self.channels, device=self.perm.device)[self.perm]

    def forward(self, x: torch.Tensor):
        check_input(x, self, self.channels)
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_input(y, self, self.channels)
        return y[:, self.inv_perm]


class Shuffle(Permute2d):
    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__(torch.randperm(channels, generator=generator))


class Reverse(Permute2d):
    def __init__(self, channels: int):
        super().__init__(torch.arange(channels - 1, -1, -1))
