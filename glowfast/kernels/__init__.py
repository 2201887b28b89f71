"""Triton kernels of the fused flow step (one file per op: kernels, launch wrappers, autograd Function, and
the same op as a torch.library custom op with a fake implementation for torch.compile).

- `actnorm_invconv`: y = W @ ((x + bias) * exp(log_scale)) — forward, inverse, backward.
- `coupling`: affine / additive coupling given the network output h — forward (+ logdet), inverse, backward.
- `cross_step`: step k's coupling fused with step k+1's ActNorm + 1x1 conv — forward, backward; and the fused
  inverse of one whole step.
- `coupling_net`: the coupling network itself, its thin 3x3 convolutions as fused implicit-GEMM kernels (opt-in:
  `--triton-networks`, glowfast.amp.enable_triton_networks) — forward, backward.
- `lu_weights`: the parameter side of a level of LU steps, every W = P L U and the summed log-determinant —
  forward, backward (glowfast.fused.level_weights).
- `adamax`: the Adamax update over every parameter tensor (glowfast.optim.FusedAdamax).
"""

from ._utils import (
    dot_precision,
    is_interpret,
    use_dot_precision,
    use_exact_backward_dots,
    use_weight_grad,
    weight_grad_mode,
)
from .actnorm_invconv import (
    ActNormInvConvFunction,
    actnorm_invconv_backward,
    actnorm_invconv_forward,
    actnorm_invconv_inverse,
    apply_actnorm_invconv,
)
from .coupling import CouplingFunction, apply_coupling, coupling_backward, coupling_forward, coupling_inverse
from .coupling_net import CouplingNetworkFunction, apply_coupling_network
from .cross_step import (
    CrossStepFunction,
    apply_cross_step,
    cross_step_backward,
    cross_step_forward,
    step_inverse,
)

if is_interpret():  # the interpreter of triton 3.6 under numpy 2.4 (see _interpreter_compat)
    from . import _interpreter_compat

    _interpreter_compat.apply()

__all__ = [
    "ActNormInvConvFunction", "apply_actnorm_invconv", "actnorm_invconv_backward", "actnorm_invconv_forward",
    "actnorm_invconv_inverse", "CouplingFunction", "apply_coupling", "coupling_backward", "coupling_forward",
    "coupling_inverse", "CouplingNetworkFunction", "apply_coupling_network",
    "CrossStepFunction", "apply_cross_step", "cross_step_backward", "cross_step_forward",
    "step_inverse", "dot_precision", "is_interpret", "use_dot_precision", "use_exact_backward_dots", "use_weight_grad",
    "weight_grad_mode",
]

