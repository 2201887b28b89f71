"""The fused compute path of a sequence of Glow flow steps, built from the Triton kernels in glowfast.kernels.

A flow step is ActNorm2d -> permutation (InvConv1x1 / Shuffle / Reverse) -> coupling (affine / additive)
(docs/DESIGN.md). The fused path reads the *same* parameters as the reference modules (a list of
`glowfast.reference.FlowStep`), so a state dict is backend-independent; only the compute differs:

    z_0     = actnorm_invconv(x)                         1 kernel   (step 0's ActNorm + 1x1 conv)
    h_k     = step_k.coupling.net(z_k[:, :C_a])          cuDNN      (the coupling network, unchanged)
    z_{k+1} = cross_step(z_k, h_k; step k+1 params)      1 kernel   (step k's coupling + step k+1's
                                                                     ActNorm + 1x1 conv, y_k never stored)
    y       = coupling(z_{K-1}, h_{K-1})                 1 kernel   (last step's coupling)

so K steps cost K + 1 kernels besides the networks (and the level's parameter side, `level_weights`: a copy and
one kernel for LU steps), each a single read/write pass over NCHW data. Shuffle and
Reverse run as a 1x1 conv with their permutation matrix (logdet 0): exact under "ieee" dots; under the default
3xTF32 (or plain TF32) their activations go through the same split (rounding) as the 1x1 conv's — within 2^-22 of
the value (plain TF32: 2^-11) — and an overflowed (inf) entry spreads NaN across the
channels (0 * inf), where the reference's indexing keeps one inf. The log-determinant's parameter-only part,
H*W*(sum(log_scale) + log|det W|), is added in torch; log|det W| comes from `w_logabsdets` (the model's batched
LU op) or from the layer's own `log_abs_det()` (LU: sum(log_s)). The level's W's and that part come from
`level_weights`, differentiable, so gradients reach the LU factors: for LU steps where the kernels run, from
glowfast.kernels.lu_weights (every step's W = P L U and the summed log_scale and log_s in one kernel each way, plus
one copy of the parameters), else from the layers' formulas in batched torch ops. Autograd saves per step only the
kernel inputs z_k and h_k (plus what the network itself saves), never the intermediate activations.

The inverse runs one fused kernel per step, last step first: h_k = NN(y_k[:, :C_a]), then
x_k = actnorm^-1(W^-1 @ coupling^-1(y_k, h_k)) in one pass (`glowfast.kernels.step_inverse`).

torch.compile: eager calls use the kernels' autograd.Functions (the cheapest dispatch); while dynamo traces,
the same kernels are called as torch.library custom ops (`torch.ops.glowfast.actnorm_invconv`, `cross_step`,
`coupling`, `step_inverse`, with fake implementations and registered autograd), so `torch.compile(model,
fullgraph=True)` of a fused Glow gives one graph with the kernels as opaque nodes (tests/test_fused_compile.py).

Special cases (documented behaviour)
- ActNorm data-dependent initialisation: if any step's actnorm still needs its init (training mode, not yet
  initialised), that call runs the reference path (which initialises it from the batch) and returns its result.
- float64 inputs run the reference path (the kernels compute in fp32, and refuse float64 input rather than
  silently drop a float64 model's precision).
- `steps_inverse` is not differentiable on the fused path: when autograd is recording and y or any parameter
  requires grad, it runs the reference inverse instead (wrap sampling in `torch.no_grad()` to use the kernels).
- The fused path runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 (tests); see
  `fused_available`.
- Steps of more than 128 channels (`kernels._utils.MAX_CHANNELS`) are refused here (ValueError); a Glow runs such
  levels on the reference layers and the others here (`Glow.level_backends`).

Extension points (keep these properties when changing this file)
(a) Memory-saving invertible backward (`memory_saving=True`, implemented in glowfast.invertible): a level-wide
    Function stores only the level's output and in backward reconstructs each step's input with the inverse
    kernels (`coupling_inverse`, `actnorm_invconv_inverse`), then runs the same backward kernels. That works
    because every backward is a standalone launch function taking explicit tensors
    (`actnorm_invconv_backward(x, grad_y, bias, log_scale, weight)`,
    `coupling_backward(z, h, grad_y, grad_logdet, affine)`,
    `cross_step_backward(z, h, grad_out, grad_logdet, bias, log_scale, weight, affine)`), separate from the
    autograd Functions that only decide what to save.
(b) Coupling networks faster than cuDNN: the coupling Functions take the network output h as an input tensor
    and never call the network themselves; swapping `step.coupling.net` (or computing h any other way) needs
    no change to the kernels (first instance: glowfast.amp.nhwc_network_forward, the 1x1 conv as a GEMM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ._extension import batched_lu_ops
from .kernels import _utils
from .kernels.actnorm_invconv import ActNormInvConvFunction, actnorm_invconv_op
from .kernels.coupling import CouplingFunction, coupling_op
from .kernels.cross_step import CrossStepFunction, cross_step_op, step_inverse, step_inverse_op
from .kernels.lu_weights import try_lu_level_weights
from .reference import AdditiveCoupling, AffineCoupling, InvConv1x1, Permute2d
from .reference import steps_forward as reference_steps_forward

batched_lu_ops()  # decided at import, outside any code torch.compile traces

__all__ = ["fused_available", "check_fused_available", "precompile_record", "precompile_training_step", "steps_forward",
           "steps_inverse", "step_weights", "level_weights", "level_weight_inverses", "lu_level_weights_torch"]


class _Ops(NamedTuple):
    actnorm_invconv: Callable
    cross_step: Callable
    coupling: Callable
    step_inverse: Callable


# Eager: the autograd.Functions (cheapest dispatch: a torch.library custom op costs ~18 us more per call on the
# host, measured, and a training step makes ~200 such calls). Under torch.compile: the same kernels as custom ops
# with fake implementations, which dynamo records as opaque nodes instead of tracing into Triton's launcher.
_EAGER_OPS = _Ops(ActNormInvConvFunction.apply, CrossStepFunction.apply, CouplingFunction.apply, step_inverse)
_COMPILE_OPS = _Ops(actnorm_invconv_op, cross_step_op, coupling_op, step_inverse_op)


def _ops() -> _Ops:
    return _COMPILE_OPS if torch.compiler.is_compiling() else _EAGER_OPS


@torch.compiler.assume_constant_result
def _compute_capability(index: int) -> int:
    """10 * major + minor of CUDA device `index`. A constant for torch.compile: dynamo cannot trace the driver
    query inside torch.cuda.get_device_capability, and Glow.forward asks it while resolving the backend."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _capability_refusal(capability: int) -> str | None:
    """Why a GPU of this compute capability (10 * major + minor) cannot run the kernels; None when it can."""
    major, minor = divmod(capability, 10)
    if major < 8:
        return f"the fused backend needs a GPU with compute capability >= 8.0, got {major}.{minor}"
    return None


def fused_available(device) -> tuple[bool, str]:
    """Whether the fused (Triton) backend can run on `device`, and if not, why.

    CUDA devices need compute capability >= 8.0 (the kernels' fp32 tl.dot uses TF32 / IEEE fp32 on sm_80+).
    CPU tensors run only under the Triton interpreter: TRITON_INTERPRET=1 set before glowfast.kernels was
    first imported (the tests' conftest does this when there is no GPU).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "the fused backend needs CUDA, and torch.cuda.is_available() is False"
        index = device.index if device.index is not None else torch.cuda.current_device()
        refusal = _capability_refusal(_compute_capability(index))
        return (False, refusal) if refusal else (True, "CUDA")
    if device.type == "cpu":
        if not _utils.is_interpret():
            return False, ("the fused backend runs on CUDA tensors; on CPU only under the Triton interpreter "
                           "(TRITON_INTERPRET=1) — use backend='reference' (or 'auto') on CPU")
        if not _utils.kernels_interpreted():
            return False, ("TRITON_INTERPRET=1 was set after glowfast.kernels was imported; set it before "
                           "importing glowfast to run the fused backend on CPU")
        return True, "CPU under the Triton interpreter"
    return False, f"the fused backend does not support device type {device.type!r}"


def check_fused_available(device) -> None:
    ok, reason = fused_available(device)
    if not ok:
        raise RuntimeError(f"backend='fused' cannot run on {torch.device(device)}: {reason}")


def _is_affine(step) -> bool:
    if isinstance(step.coupling, AffineCoupling):
        return True
    if isinstance(step.coupling, AdditiveCoupling):
        return False
    raise NotImplementedError(f"fused path: unsupported coupling {type(step.coupling).__name__}")


def step_weights(step) -> torch.Tensor:
    """The (C, C) matrix of the step's permutation: InvConv1x1's W (differentiable) or a permutation matrix."""
    if isinstance(step.permute, InvConv1x1 | Permute2d):
        return step.permute.weight_matrix()
    raise NotImplementedError(f"fused path: unsupported permutation {type(step.permute).__name__}")


def _w_logabsdet(step, w_logabsdet) -> torch.Tensor | float:
    """log|det W| of one step's permutation: the given value, InvConv1x1's own, or 0 for Shuffle / Reverse."""
    if not isinstance(step.permute, InvConv1x1):
        return 0.0
    return step.permute.log_abs_det() if w_logabsdet is None else w_logabsdet


def _same_permutations(steps, kind, lu=None) -> bool:
    return all(isinstance(s.permute, kind) and (lu is None or s.permute.lu == lu) for s in steps)


def level_weights(steps: Sequence, w_logabsdets: Sequence[torch.Tensor | None] | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every step's (C, C) matrix W and the steps' summed per-pixel parameter log-determinant
    sum_k (sum(log_scale_k) + log|det W_k|), computed for all steps at once.

    Same values as `step_weights` and the layers' `log_abs_det()` per step, but for all steps at once instead of
    ~10 small ops per step (for the CIFAR-10 model's 96 steps ~1,000 fewer forward and ~2,000 fewer backward ops
    per training step, host time during which a GPU would sit idle: benchmarks/RESULTS.md, "Host-side overhead"):
    LU steps where the kernels run by glowfast.kernels.lu_weights (a copy and one kernel forward, one kernel
    backward), elsewhere (and while torch.compile traces) by a handful of batched torch ops (stack the K steps' LU
    factors, two batched matmuls). Mixed permutation types fall back to the per-step functions.
    """
    steps = list(steps)
    given = [] if w_logabsdets is None else [ld is not None for ld in w_logabsdets]
    lu = _same_permutations(steps, InvConv1x1, lu=True) and not any(given)  # given values: the per-step path
    perms, log_scales = [s.permute for s in steps], [s.actnorm.log_scale for s in steps]
    if lu:
        w, param_ld = try_lu_level_weights(perms, log_scales) or lu_level_weights_torch(perms, log_scales)
        return list(w.unbind(0)), param_ld
    log_scale_sum = torch.stack(log_scales).sum()
    if _same_permutations(steps, Permute2d):
        eye = torch.eye(steps[0].channels, device=log_scale_sum.device)
        w = eye[torch.stack([s.permute.perm for s in steps])]
        return list(w.unbind(0)), log_scale_sum
    if _same_permutations(steps, InvConv1x1, lu=False) and given and all(given):
        return [s.permute.weight for s in steps], log_scale_sum + torch.stack(list(w_logabsdets)).sum()
    w_lds = [None] * len(steps) if w_logabsdets is None else w_logabsdets
    w_ld_sum = sum(_w_logabsdet(s, ld) for s, ld in zip(steps, w_lds, strict=True))
    return [step_weights(s) for s in steps], log_scale_sum + w_ld_sum


def lu_level_weights_torch(perms: Sequence, log_scales: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`glowfast.kernels.lu_weights.lu_level_weights` by batched torch ops: every step's W (K, C, C) of the
    InvConv1x1(lu=True) layers `perms` and sum_k (sum(log_scale_k) + sum(log_s_k)); for devices without the kernels,
    float64, and torch.compile's traces."""
    first = perms[0]
    lower = torch.stack([p.lower for p in perms]) * first.lower_mask + first.eye
    log_s = torch.stack([p.log_s for p in perms])
    diag = torch.diag_embed(torch.stack([p.sign_s for p in perms]) * torch.exp(log_s))
    upper = torch.stack([p.upper for p in perms]) * first.lower_mask.T + diag
    w = torch.stack([p.p for p in perms]) @ lower @ upper
    return w, torch.stack(list(log_scales)).sum() + log_s.sum()


def steps_forward(steps: Sequence, x: torch.Tensor,
                  w_logabsdets: Sequence[torch.Tensor | None] | None = None,
                  memory_saving: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run reference `FlowStep`s `steps` on x (B, C, H, W) with the fused kernels: returns (y, logdet (B,)).

    `w_logabsdets`: optional per-step log|det W| (0-d tensors, e.g. from the batched LU op; entries of
    non-InvConv steps are ignored). When None, each InvConv1x1 step uses its own `log_abs_det()`.
    Differentiable w.r.t. x and every parameter (ActNorm, W or its LU factors, the coupling networks).
    `memory_saving`: keep only the output for backward and reconstruct every step's input with the inverse
    kernels there (glowfast.invertible); same forward values, gradients up to the reconstruction's rounding.
    """
    steps = list(steps)
    if w_logabsdets is not None and len(w_logabsdets) != len(steps):
        raise ValueError(f"w_logabsdets has {len(w_logabsdets)} entries for {len(steps)} steps")
    if not steps:
        return x, x.new_zeros(x.shape[0])
    if x.dtype == torch.float64 or any(step.actnorm.needs_init() for step in steps):
        return reference_steps_forward(steps, x, w_logabsdets)
    check_fused_available(x.device)
    B, C, H, W = x.shape
    for step in steps:
        if step.channels != C:
            raise ValueError(f"step has {step.channels} channels, input has {C}")

    weights, param_ld = level_weights(steps, w_logabsdets)
    if memory_saving and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        from .invertible import invertible_steps

        z, coupling_ld = invertible_steps(steps, x, weights)
    else:
        z, coupling_ld = fused_chain(steps, x, weights, _ops())
    logdet = (H * W * param_ld).to(x.dtype).expand(B)
    if coupling_ld is not None:
        logdet = logdet + coupling_ld.to(x.dtype)
    return z, logdet


def fused_chain(steps: Sequence, x: torch.Tensor, weights: Sequence[torch.Tensor], ops: _Ops = _EAGER_OPS
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel chain of K steps given their W's: (y, sum of the affine couplings' logdets, or None).

    Each network's input z_k[:, :C_a] is a view output of the eager Function that wrote z_k, so its gradient
    reaches that Function's backward kernel, which adds it (ActNormInvConvFunction's `network_channels`), instead
    of autograd adding it in a zero-filled copy and a sum per step; the custom ops (torch.compile) slice z_k."""
    ca = x.shape[1] // 2
    eager = ops is _EAGER_OPS
    network_channels = (ca,) if eager else ()
    first = steps[0]
    out = ops.actnorm_invconv(x, first.actnorm.bias, first.actnorm.log_scale, weights[0], *network_channels)
    z, za = out if eager else (out, out[:, :ca])
    lds = []  # the affine couplings' logdets, summed once at the end (not one add kernel per step)
    for k, step in enumerate(steps):
        affine = _is_affine(step)
        h = step.coupling.net(za)
        if k + 1 < len(steps):
            nxt = steps[k + 1]
            out = ops.cross_step(z, h, nxt.actnorm.bias, nxt.actnorm.log_scale, weights[k + 1], affine,
                                 *network_channels)
            z, ld, za = out if eager else (*out, out[0][:, :ca])
        else:
            z, ld = ops.coupling(z, h, affine)
        if affine:
            lds.append(ld)
    if len(lds) < 2:
        return z, lds[0] if lds else None
    return z, torch.stack(lds).sum(0)


def inverse_float64(mats: torch.Tensor, check: bool) -> torch.Tensor:
    """W^-1 of each of the stacked (K, C, C) matrices, in float64. With the batched LU op where it runs (one launch
    on the current stream, no host read unless `check`: capturable in a CUDA graph), else torch.linalg (a build
    without glowfast._C, or without its CUDA kernels, still runs the LU-parametrised fused path). `check`: a
    singular or non-finite matrix raises instead of giving non-finite entries."""
    ops = batched_lu_ops(mats.device.type)
    if ops is not None:
        return ops.batched_inverse(mats.double(), check=check)
    return torch.linalg.inv(mats.double()) if check else torch.linalg.inv_ex(mats.double())[0]


def level_weight_inverses(steps: Sequence, w_inverses: Sequence[torch.Tensor | None] | None = None
                          ) -> list[torch.Tensor]:
    """Every step's W^-1 (C, C): the given ones (e.g. from the batched LU op), else computed for all steps at
    once — a permutation matrix's transpose, or one batched float64 inverse like the reference's per step."""
    steps = list(steps)
    if w_inverses is not None and all(w is not None for w in w_inverses):
        return list(w_inverses)
    weights, _ = level_weights(steps)
    if _same_permutations(steps, Permute2d):
        inverses = torch.stack(weights).transpose(1, 2)
    else:
        # singular or non-finite W raises, like the reference's inverse
        inverses = inverse_float64(torch.stack(weights), check=True).to(weights[0].dtype)
    inverses = list(inverses.unbind(0))
    if w_inverses is not None:
        inverses = [given if given is not None else own for given, own in zip(w_inverses, inverses, strict=True)]
    return inverses


def steps_inverse(steps: Sequence, y: torch.Tensor,
                  w_inverses: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Inverse of `steps_forward`: x from y, one fused kernel per step (last step first).

    `w_inverses`: optional per-step W^-1 (e.g. from the batched LU op); otherwise inverted in float64 like
    the reference. Not differentiable: with autograd recording and anything requiring grad, this runs the
    reference inverse instead (see the module docstring).
    """
    steps = list(steps)
    if w_inverses is not None and len(w_inverses) != len(steps):
        raise ValueError(f"w_inverses has {len(w_inverses)} entries for {len(steps)} steps")
    needs_graph = torch.is_grad_enabled() and (
        y.requires_grad or any(p.requires_grad for s in steps for p in s.parameters())
    )
    if needs_graph or y.dtype == torch.float64:
        for k in reversed(range(len(steps))):
            step = steps[k]
            wi = None if w_inverses is None else w_inverses[k]
            y = step.inverse(y, wi) if isinstance(step.permute, InvConv1x1) else step.inverse(y)
        return y
    if not steps:
        return y
    check_fused_available(y.device)
    ca = y.shape[1] // 2
    w_invs = level_weight_inverses(steps, w_inverses)
    ops = _ops()
    for k in reversed(range(len(steps))):
        step = steps[k]
        h = step.coupling.net(y[:, :ca])
        y = ops.step_inverse(y, h, step.actnorm.bias, step.actnorm.log_scale, w_invs[k], _is_affine(step))
    return y


def precompile_training_step(model, images: torch.Tensor, y: torch.Tensor | None = None,
                             max_workers: int | None = None):
    """Compile, in parallel, every Triton kernel a training step of `model` on `images` launches (forward and
    backward), so that the first real step does not compile them one after another (issue 6's start-up).

    The step runs dry (glowfast.kernels.precompile): nothing is launched and nothing changes -- parameters,
    gradients (`.grad` is left as it was), buffers, training mode and the RNG states are as before. Same images
    shape, dtype and device as the real step, and the same precision settings (TF32 flags, bf16 networks), or it
    compiles other variants. Needs ActNorm initialised: a dry step would initialise it from garbage, so an
    uninitialised model is refused (ValueError). Returns a `PrecompileReport`; its `skipped` says why nothing
    was compiled (the model runs the reference path on this device, the interpreter, an old Triton).
    """
    from .kernels.precompile import PrecompileReport, precompiling

    if model.resolve_backend(images.device) != "fused":
        return PrecompileReport(skipped=f"the model runs the reference path on {images.device}")
    was_training = model.training
    model.train()
    try:
        if any(step.actnorm.needs_init() for step in model.steps()):
            raise ValueError("precompile_training_step needs ActNorm initialised (a dry step would initialise it "
                             "from garbage): run the data-dependent init first (one training-mode forward, or "
                             "glowfast.trainer.initialize_actnorm)")
        params = [p for p in model.parameters() if p.requires_grad]
        devices = [images.device] if images.is_cuda else []
        with torch.random.fork_rng(devices=devices), precompiling(max_workers) as report:
            loss = model(images, y, dequantize=False).bits_per_dim.mean()
            # autograd.grad, not backward: the garbage gradients are returned and dropped, never accumulated
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    return report


def precompile_record(model, images: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """`precompile_training_step` as the JSON record the trainer's metrics and the experiments' histories keep; a
    failure becomes ``{"error": ...}`` for the caller to report, since a start-up optimisation is never the reason
    a run fails (the kernels then compile at their first launch)."""
    try:
        return precompile_training_step(model, images, y).as_record()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
