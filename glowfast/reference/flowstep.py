"""One step of flow: ActNorm2d -> permutation -> coupling (Glow Figure 2a)."""

import torch
from torch import nn

from ._checks import check_input
from .actnorm import ActNorm2d
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import InvConv1x1
from .permute import Reverse, Shuffle

COUPLINGS = {"affine": AffineCoupling, "additive": AdditiveCoupling}
PERMUTATIONS = ("invconv", "shuffle", "reverse")


def make_permutation(channels: int, permutation: str, lu: bool) -> nn.Module:
    if permutation == "invconv":
        return InvConv1x1(channels, lu=lu)
    if permutation == "shuffle":
        return Shuffle(channels)
    if permutation == "reverse":
        return Reverse(channels)
    raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden_channels: int = 512, coupling: str = "affine",
                 permutation: str = "invconv", lu: bool = True):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {tuple(COUPLINGS)}, got {coupling!r}")
        self.channels = channels
        self.coupling_type = coupling
        self.permutation_type = permutation
        self.actnorm = ActNorm2d(channels)
        self.permute = make_permutation(channels, permutation, lu)
        self.coupling = COUPLINGS[coupling](channels, hidden_channels)

    @property
    def has_plain_invconv(self) -> bool:
        return isinstance(self.permute, InvConv1x1) and not self.permute.lu

    def forward(self, x: torch.Tensor, w_logabsdet: torch.Tensor | None = None):
        check_input(x, self, self.channels)
        x, logdet = self.actnorm(x)
        if isinstance(self.permute, InvConv1x1):
            x, ld = self.permute(x, w_logabsdet)
        else:
            x, ld = self.permute(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def inverse(self, y: torch.Tensor, w_inverse: torch.Tensor | None = None) -> torch.Tensor:
        check_input(y, self, self.channels)
        y = self.coupling.inverse(y)
        y = self.permute.inverse(y, w_inverse) if isinstance(self.permute, InvConv1x1) else self.permute.inverse(y)
        return self.actnorm.inverse(y)


def steps_forward(steps, x: torch.Tensor, w_logabsdets=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a sequence of FlowSteps: (y, summed logdet). `w_logabsdets`: optional per-step log|det W|."""
    check_input(x, "steps_forward")
    if w_logabsdets is not None and len(w_logabsdets) != len(steps):
        raise ValueError(f"steps_forward: w_logabsdets has {len(w_logabsdets)} entries for {len(steps)} steps")
    logdet = x.new_zeros(x.shape[0])
    for k, step in enumerate(steps):
        x, ld = step(x, None if w_logabsdets is None else w_logabsdets[k])
        logdet = logdet + ld
    return x, logdet
