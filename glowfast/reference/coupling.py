"""Affine and additive coupling layers (Glow §3.3) and their coupling network."""

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_input


class ZeroConv2d(nn.Module):
    """Zero-initialised conv (3x3 by default) whose output is scaled by exp(logscale_factor * logs).

    Starting at zero makes every coupling the identity at initialisation (openai/glow's `conv2d_zeros`, less its
    edge-bias padding channel: here the padding is plain zeros, as in rosinality/glow-pytorch).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor).view(1, -1, 1, 1)


class CouplingNetwork(nn.Module):
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d (3x3).

    rosinality/glow-pytorch's network: convolutions with biases and zero padding. openai/glow's also has an
    actnorm after each hidden conv and an edge-bias padding channel; the flow's likelihood is defined the same
    way either way, but the two networks train to different bits/dim (docs/DESIGN.md).
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.conv3 = ZeroConv2d(hidden_channels, out_channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.05)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


def log_sigmoid_shifted(raw: torch.Tensor) -> torch.Tensor:
    """log sigmoid(raw + 2), stable for any raw: -softplus(-(raw + 2))."""
    return -F.softplus(-(raw + 2.0))


class _Coupling(nn.Module):
    def __init__(self, channels: int, hidden_channels: int, out_factor: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {channels}")
        self.channels = channels
        self.channels_a = channels // 2
        self.channels_b = channels - self.channels_a
        self.net = CouplingNetwork(self.channels_a, hidden_channels, out_factor * self.channels_b)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.channels_a], x[:, self.channels_a :]


class AffineCoupling(_Coupling):
    """y_b = (x_b + shift) * sigmoid(raw + 2), [shift, raw] = NN(x_a); logdet = sum log sigmoid(raw + 2)."""

    def __init__(self, channels: int, hidden_channels: int = 512):
        super().__init__(channels, hidden_channels, 2)

    def forward(self, x: torch.Tensor):
        check_input(x, self, self.channels)
        x_a, x_b = self.split(x)
        h = self.net(x_a)
        shift, raw = h[:, : self.channels_b], h[:, self.channels_b :]
        y_b = (x_b + shift) * torch.sigmoid(raw + 2.0)
        logdet = log_sigmoid_shifted(raw).flatten(1).sum(1)
        return torch.cat([x_a, y_b], dim=1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_input(y, self, self.channels)
        y_a, y_b = self.split(y)
        h = self.net(y_a)
        shift, raw = h[:, : self.channels_b], h[:, self.channels_b :]
        return torch.cat([y_a, y_b / torch.sigmoid(raw + 2.0) - shift], dim=1)


class AdditiveCoupling(_Coupling):
    """y_b = x_b + NN(x_a) (NICE); volume preserving, logdet 0."""

    def __init__(self, channels: int, hidden_channels: int = 512):
        super().__init__(channels, hidden_channels, 1)

    def forward(self, x: torch.Tensor):
        check_input(x, self, self.channels)
        x_a, x_b = self.split(x)
        return torch.cat([x_a, x_b + self.net(x_a)], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_input(y, self, self.channels)
        y_a, y_b = self.split(y)
        return torch.cat([y_a, y_b - self.net(y_a)], dim=1)
