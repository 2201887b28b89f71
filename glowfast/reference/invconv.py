"""Invertible 1x1 convolution (Glow §3.2): plain W or its LU parametrisation."""

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_input, layer_name


def random_orthogonal(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64, generator=generator))
    # Fix the sign ambiguity of QR so the distribution is uniform (Haar) over O(C).
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class InvConv1x1(nn.Module):
    """y[:, :, h, w] = W @ x[:, :, h, w]; logdet = H*W*log|det W|.

    lu=False: W is the parameter `weight`. lu=True: W = P @ L @ (U + diag(sign_s * exp(log_s))) with P a
    fixed permutation, L unit lower-triangular (param `lower`), U strictly upper (param `upper`), so that
    log|det W| = sum(log_s) costs O(C) instead of an O(C^3) factorisation.
    """

    def __init__(self, channels: int, lu: bool = True):
        super().__init__()
        self.channels = channels
        self.lu = lu
        w = random_orthogonal(channels)
        if not lu:
            self.weight = nn.Parameter(w.float())
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight_matrix(self) -> torch.Tensor:
        """The (C, C) matrix W, differentiable w.r.t. the layer's parameters."""
        if not self.lu:
            return self.weight
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def log_abs_det(self) -> torch.Tensor:
        """log|det W| as a 0-d tensor."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: torch.Tensor, w_logabsdet: torch.Tensor | None = None):
        """`w_logabsdet`: log|det W| (a 0-d tensor) computed elsewhere (the model batches them into one op call)."""
        check_input(x, self, self.channels)
        if w_logabsdet is None:
            w_logabsdet = self.log_abs_det()
        elif not isinstance(w_logabsdet, torch.Tensor):
            raise TypeError(f"{layer_name(self)}: w_logabsdet must be a 0-d tensor, "
                            f"got {type(w_logabsdet).__name__}")
        elif w_logabsdet.dim() != 0:
            raise ValueError(f"{layer_name(self)}: w_logabsdet must be a 0-d tensor (one log|det W|), got shape "
                             f"{tuple(w_logabsdet.shape)}")
        h, w = x.shape[-2:]
        y = F.conv2d(x, self.weight_matrix().to(x.dtype).view(self.channels, self.channels, 1, 1))
        return y, (h * w * w_logabsdet).expand(x.shape[0]).to(x.dtype)

    def inverse(self, y: torch.Tensor, w_inverse: torch.Tensor | None = None) -> torch.Tensor:
        check_input(y, self, self.channels)
        if w_inverse is not None:
            if not isinstance(w_inverse, torch.Tensor):
                raise TypeError(f"{layer_name(self)}: w_inverse must be a tensor, got {type(w_inverse).__name__}")
            if w_inverse.shape != (self.channels, self.channels):
                raise ValueError(f"{layer_name(self)}: w_inverse must have shape ({self.channels}, {self.channels}), "
                                 f"got {tuple(w_inverse.shape)}")
        if w_inverse is None:
            w_inverse = torch.linalg.inv(self.weight_matrix().double()).to(y.dtype)
        return F.conv2d(y, w_inverse.to(y.dtype).view(self.channels, self.channels, 1, 1))
