"""Gaussian priors: the conditional prior of Split2d and the learned (class-conditional) top prior."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import can_synchronize
from ._checks import check_input, layer_name
from .coupling import ZeroConv2d

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of log N(z; mean, exp(log_std)^2)."""
    lp = -0.5 * (LOG_2PI + 2.0 * log_std + (z - mean) ** 2 * torch.exp(-2.0 * log_std))
    return lp.flatten(1).sum(1)


def gaussian_sample(
    mean: torch.Tensor, log_std: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + temperature * torch.exp(log_std) * eps


class Split2d(nn.Module):
    """Factor out half the channels: z -> (z1, z2) with the learned prior p(z2 | z1) (Glow's split2d)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.channels_keep = channels // 2
        self.prior = ZeroConv2d(self.channels_keep, 2 * (channels - self.channels_keep))

    def prior_params(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(z1)
        return h.chunk(2, dim=1)

    def forward(self, z: torch.Tensor):
        """Returns (z1, z2, log p(z2 | z1)) — z2 is the factored-out latent."""
        check_input(z, self, self.channels)
        z1, z2 = z[:, : self.channels_keep], z[:, self.channels_keep :]
        mean, log_std = self.prior_params(z1)
        return z1, z2, gaussian_log_prob(z2, mean, log_std)

    def inverse(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reassemble z; when z2 is None it is drawn from p(z2 | z1) at `temperature`."""
        check_input(z1, self, self.channels_keep, arg="z1")
        if z2 is not None:
            check_input(z2, self, arg="z2")
            expected = (z1.shape[0], self.channels - self.channels_keep, *z1.shape[2:])
            if z2.shape != expected:
                raise ValueError(f"{layer_name(self)}: expected z2 of shape {expected}, got {tuple(z2.shape)}")
        if z2 is None:
            z2 = gaussian_sample(*self.prior_params(z1), temperature, generator)
        return torch.cat([z1, z2], dim=1)


class TopPrior(nn.Module):
    """N(mean, exp(log_std)^2) for the top latent.

    learn_top: a learned per-channel mean/log-std, the same at every position (openai/glow's zero conv over a
    zero input also varies at the border, through its edge-bias padding channel). n_classes: a zero-initialised
    linear map of the one-hot label is added (class-conditional prior), and a linear head on the spatially
    averaged latent predicts the class.
    """

    def __init__(self, shape: tuple[int, int, int], learn_top: bool = True, n_classes: int | None = None):
        super().__init__()
        self.shape = tuple(shape)
        c = shape[0]
        self.learn_top = learn_top
        self.n_classes = n_classes
        self.top = nn.Parameter(torch.zeros(2 * c)) if learn_top else None
        if n_classes:
            self.class_embed = nn.Linear(n_classes, 2 * c)
            nn.init.zeros_(self.class_embed.weight)
            nn.init.zeros_(self.class_embed.bias)
            self.class_head = nn.Linear(c, n_classes)
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype.is_floating_point:
            raise TypeError(f"class labels y must be an integer tensor, got dtype {y.dtype}")
        # Range check on the host for CPU labels only: on CUDA it would synchronise every forward (and fail inside
        # a CUDA-graph capture); there an out-of-range label trips one_hot's device-side assert instead.
        if y.numel() and not y.is_cuda and can_synchronize(y):
            lo, hi = (int(v) for v in torch.aminmax(y))
            if lo < 0 or hi >= self.n_classes:
                raise ValueError(f"class labels must lie in [0, {self.n_classes}), got range [{lo}, {hi}]")
        return F.one_hot(y.long(), self.n_classes)

    def params(self, batch: int, y: torch.Tensor | None, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        out = torch.zeros(batch, 2 * c, device=device, dtype=dtype)
        if self.top is not None:
            out = out + self.top.to(dtype)
        if self.n_classes:
            if y is None:
                raise ValueError("this model is class-conditional (n_classes set): pass class labels y")
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"{layer_name(self)}: class labels y must be an integer torch.Tensor, "
                                f"got {type(y).__name__}")
            if y.shape != (batch,):
                raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
            if y.device != out.device:
                raise ValueError(f"class labels y are on {y.device}, the model is on {out.device}")
            out = out + self.class_embed(self.one_hot(y).to(dtype))
        elif y is not None:
            raise ValueError("y was given but the model is not class-conditional (n_classes=None)")
        mean, log_std = out.view(batch, 2 * c, 1, 1).expand(batch, 2 * c, h, w).chunk(2, dim=1)
        return mean, log_std

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None):
        """(log p(z | y), class logits or None)."""
        return self.log_prob(z, y), self.class_logits(z)

    def _check_z(self, z) -> None:
        check_input(z, self, arg="z")
        if z.shape[1:] != self.shape:
            c, h, w = self.shape
            raise ValueError(f"{layer_name(self)}: expected z of shape (B, {c}, {h}, {w}), got {tuple(z.shape)}")

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_z(z)
        mean, log_std = self.params(z.shape[0], y, z.device, z.dtype)
        return gaussian_log_prob(z, mean, log_std)

    def sample(self, n, y=None, temperature=1.0, generator=None, device=None, dtype=torch.float32):
        mean, log_std = self.params(n, y, device, dtype)
        return gaussian_sample(mean, log_std, temperature, generator)

    def class_logits(self, z: torch.Tensor) -> torch.Tensor | None:
        self._check_z(z)
        return self.class_head(z.mean(dim=(2, 3))) if self.n_classes else None
