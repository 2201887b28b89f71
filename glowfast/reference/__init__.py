"""The pure-PyTorch reference Glow layers: the ground truth every fast path is tested against."""

from .actnorm import ActNorm2d
from .coupling import AdditiveCoupling, AffineCoupling, CouplingNetwork, ZeroConv2d, log_sigmoid_shifted
from .flowstep import COUPLINGS, PERMUTATIONS, FlowStep, make_permutation, steps_forward
from .invconv import InvConv1x1, random_orthogonal
from .permute import Permute2d, Reverse, Shuffle
from .prior import Split2d, TopPrior, gaussian_log_prob, gaussian_sample
from .squeeze import Squeeze2d, squeeze2d, unsqueeze2d

__all__ = [
    "ActNorm2d", "AdditiveCoupling", "AffineCoupling", "CouplingNetwork", "ZeroConv2d", "log_sigmoid_shifted",
    "COUPLINGS", "PERMUTATIONS", "FlowStep", "make_permutation", "steps_forward", "InvConv1x1", "random_orthogonal",
    "Permute2d", "Reverse", "Shuffle", "Split2d", "TopPrior", "gaussian_log_prob", "gaussian_sample",
    "Squeeze2d", "squeeze2d", "unsqueeze2d",
]
