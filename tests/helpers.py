"""Test helpers shared by the correctness tests (no mocks: real layers with randomised parameters)."""

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# (B, C, H, W, block_p) for the kernel tests: batch 1, odd and non-square H*W not a multiple of the pixel
# block, C from 2 to 96 (odd C exercises the uneven coupling split); block_p None = the production choice.
KERNEL_SHAPES = [
    (1, 2, 5, 7, 16),
    (2, 3, 4, 6, None),
    (2, 12, 7, 9, 32),
    (1, 48, 5, 5, 16),
    (2, 96, 3, 7, None),
]


@torch.no_grad()
def randomize_(module: nn.Module, scale: float = 0.1, generator: torch.Generator | None = None) -> nn.Module:
    """Perturb every floating parameter so zero-initialised layers (couplings, priors) are not identities.

    ActNorm buffers are marked initialised so the layer is a fixed function of its parameters.
    """
    for p in module.parameters():
        # drawn on the CPU (also where a test made CUDA the default device): the same values on any device
        p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device))
    for name, buf in module.named_buffers():
        if name.endswith("initialized"):
            buf.fill_(True)
    return module


def jacobian_logabsdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each sample of x (B, ...), computed by autograd on the full Jacobian in float64."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].double()
        jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(-1), xi)
        jac = jac.reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_steps(K, C, coupling, permutation, lu, device, hidden=8, scale=0.2):
    """K reference FlowSteps with random (non-identity) parameters, on `device`."""
    from glowfast.reference import FlowStep

    steps = torch.nn.ModuleList(FlowStep(C, hidden, coupling, permutation, lu) for _ in range(K))
    return randomize_(steps, scale=scale).to(device)


def reference_forward(steps, x):
    """The reference layers' (y, summed logdet) over a sequence of steps."""
    logdet = x.new_zeros(x.shape[0])
    for step in steps:
        x, ld = step(x)
        logdet = logdet + ld
    return x, logdet


def assert_steps_match_reference(steps, x, y, logdet):
    """(y, logdet) computed from x by a fast path over `steps` equals the reference layers' output and logdet,
    and so do the gradients of x and of every parameter (random cotangents), at the exact-fp32 tolerances.
    Returns the reference output."""
    from tolerances import assert_exact, assert_grads_exact

    params = [x, *steps.parameters()]
    names = ["x", *(n for n, _ in steps.named_parameters())]
    y_ref, ld_ref = reference_forward(steps, x)
    assert_exact(y, y_ref, "out", "y")
    assert_exact(logdet, ld_ref, "logdet", "logdet")
    g_y, g_ld = torch.randn_like(y_ref), torch.randn_like(ld_ref)
    expected = torch.autograd.grad((y_ref * g_y).sum() + (ld_ref * g_ld).sum(), params)
    actual = torch.autograd.grad((y * g_y).sum() + (logdet * g_ld).sum(), params)
    assert_grads_exact(actual, expected, names)
    return y_ref


class OpLog(TorchDispatchMode):
    """Every op dispatched inside (forward and backward), with cuBLAS's fp32 setting
    (torch.backends.cuda.matmul.fp32_precision) and the tensor arguments' dtypes at that moment."""

    MATMULS = ("aten.mm", "aten.addmm")

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, cuBLAS fp32 setting, dtypes of the tensor arguments)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), torch.backends.cuda.matmul.fp32_precision,
                           [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> set[str]:
        return {name for name, _, _ in self.calls}

    @property
    def matmul_precisions(self) -> list[str]:
        return [prec for name, prec, _ in self.calls if name in self.MATMULS]

    @property
    def matmul_dtypes(self) -> list[torch.dtype]:
        """The dtype of each product's matrix operands (the last tensor argument: mm's and addmm's right matrix)."""
        return [dtypes[-1] for name, _, dtypes in self.calls if name in self.MATMULS]


# A CUDA device this machine does not have (none at all without a GPU; one past the last one with GPUs) and the
# error every CLI gives for it after "--device NAME: ".
_N_CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0
BEYOND = f"cuda:{_N_CUDA}"
BEYOND_MESSAGE = (f"{BEYOND} does not exist: this machine has {_N_CUDA} CUDA device{'' if _N_CUDA == 1 else 's'} "
                  f"(cuda:0 to cuda:{_N_CUDA - 1})" if _N_CUDA else "CUDA is not available on this machine")


def assert_option_keeps_the_fused_model(device, enable):
    """Enable a network option on a fused Glow: same log-likelihood and every gradient as before. Returns it."""
    from glowfast import Glow
    from glowfast.amp import coupling_networks

    from tolerances import assert_exact

    torch.manual_seed(0)
    m = Glow((1, 8, 8), K=2, L=2, hidden_channels=16, backend="fused").to(device)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, device=device)
    m(x)  # ActNorm init
    with torch.no_grad():
        for net in coupling_networks(m):
            net.conv3.conv.weight.normal_(0, 0.05)
    params = list(m.parameters())
    ref = m(x, dequantize=False).log_prob
    expected = torch.autograd.grad(ref.sum(), params)
    assert enable(m) == 4
    out = m(x, dequantize=False).log_prob
    assert_exact(out, ref, "logdet", "log p")
    for (name, _), a, e in zip(m.named_parameters(), torch.autograd.grad(out.sum(), params), expected, strict=True):
        assert_exact(a, e, "grad", name)
    return m
