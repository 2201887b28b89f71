"""Per-op benchmarks of the flow-step pieces: reference (eager PyTorch) and torch.compile(reference).

The fused (Triton) variants of the same ops live in bench_fused_step.py (the kernel engineer's file) under
the same group names, so benchmarks/report.py puts them side by side and computes fused/reference and
fused/compiled. Group names: `<op>/<fwd|fwdbwd>/B<batch>_C<channels>_<H>x<W>`; variants (extra_info) are
`reference` and `compiled` here, except in three groups that hold their own fast variants: `step_params/*` (the
parameter-side ops of all 96 CIFAR-10 steps; `fused` = glowfast.fused.level_weights), `coupling_net/*` (one
coupling network; `fused` / `fused_bf16` = channels_last with the 1x1 as a GEMM, `fused_bf16_compiled` = that as
one torch.compile'd function, `_gemm3x3` with the thin 3x3 convs as GEMMs too, `gemm` / `gemm_bf16` = every conv as
a GEMM over pixels, `triton` = glowfast's Triton network) and `optimizer/adamax/*` (one Adamax update of the
CIFAR-10 model's parameters; `fused` = glowfast.optim.FusedAdamax).

Ops (CIFAR-10 Glow shapes: the three levels after squeezing, 12x16x16, 24x8x8, 48x4x4)
- actnorm_invconv: ActNorm2d -> InvConv1x1 (the reference layers' code) at the kernels' function boundary:
  inputs x, bias, log_scale and the (C, C) matrix W as a leaf tensor (how W is obtained — from its LU factors,
  or log|det W| — is not part of the op, as in glowfast.kernels.actnorm_invconv); y and the logdet.
- coupling: the affine coupling given a precomputed network output h = NN(x_a) (the network's convs are
  cuDNN in every backend): y = cat(x_a, (x_b + shift) * sigmoid(raw + 2)), logdet = sum log sigmoid(raw + 2).
- cross_step: what glowfast.kernels.cross_step does in one pass — the coupling of step k (given h_k) followed
  by the actnorm + 1x1 conv of step k + 1: y = W_{k+1} @ actnorm_{k+1}(coupling_k(z, h_k)); logdets of both.
fwd: forward only; fwdbwd: forward then backward with fixed random output gradients (w.r.t. the input, h
and all parameters).

CPU: batch 64 only, reference only (compiled too with GLOWFAST_BENCH_COMPILE=all). CUDA: batch 64 and 256; the
compiled variant (a cold compile of ~5-20 s per case) only at the largest level, C12_16x16, unless
GLOWFAST_BENCH_COMPILE=full or all (every shape).
"""

from __future__ import annotations

import os

import pytest
import torch

from glowfast.reference import ActNorm2d, InvConv1x1, log_sigmoid_shifted

HAS_CUDA = torch.cuda.is_available()
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="batch 256 shapes: CUDA only")

LEVEL_SHAPES = [(12, 16, 16), (24, 8, 8), (48, 4, 4)]  # CIFAR-10, L=3
SHAPES = [pytest.param((64, *s), "cpu", id=f"cpu-B64_C{s[0]}_{s[1]}x{s[2]}") for s in LEVEL_SHAPES]
SHAPES += [pytest.param((b, *s), "cuda", id=f"cuda-B{b}_C{s[0]}_{s[1]}x{s[2]}",
                        marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))
           for b in (64, 256) for s in LEVEL_SHAPES]
MODES = ["fwd", "fwdbwd"]
VARIANTS = ["reference", "compiled"]
TIMING = {"cpu": dict(n_rounds=10, warmup=2, iterations=3), "cuda": dict(n_rounds=20, warmup=5, iterations=20)}


def _group(op: str, mode: str, shape) -> str:
    b, c, h, w = shape
    return f"{op}/{mode}/B{b}_C{c}_{h}x{w}"


def _actnorm_invconv_layers(c: int, device: str):
    actnorm = ActNorm2d(c).to(device)
    with torch.no_grad():  # trained-looking parameters, initialised (no data-dependent init in the timing)
        actnorm.bias.normal_(0, 0.1)
        actnorm.log_scale.normal_(0, 0.1)
        actnorm.initialized.fill_(True)
    invconv = InvConv1x1(c, lu=False).to(device)  # W is the leaf parameter `weight`
    return actnorm, invconv


def _coupling_tail(x: torch.Tensor, h: torch.Tensor):
    c_a = x.shape[1] // 2
    c_b = x.shape[1] - c_a
    x_a, x_b = x[:, :c_a], x[:, c_a:]
    shift, raw = h[:, :c_b], h[:, c_b:]
    y_b = (x_b + shift) * torch.sigmoid(raw + 2.0)
    return torch.cat([x_a, y_b], dim=1), log_sigmoid_shifted(raw).flatten(1).sum(1)


def _make_op(op: str, shape, device: str):
    """(function of the inputs, inputs, leaf tensors that get gradients)."""
    b, c, h, w = shape
    x = torch.randn(shape, device=device)
    c_b = c - c // 2
    hnet = 0.1 * torch.randn(b, 2 * c_b, h, w, device=device)
    if op == "actnorm_invconv":
        actnorm, invconv = _actnorm_invconv_layers(c, device)

        w_logabsdet = torch.zeros((), device=device)  # given, as the model passes it (batched LU op)

        def fn(x):
            z, ld1 = actnorm(x)
            y, ld2 = invconv(z, w_logabsdet)
            return y, ld1 + ld2

        return fn, (x,), [x, *actnorm.parameters(), *invconv.parameters()]
    if op == "coupling":
        return _coupling_tail, (x, hnet), [x, hnet]
    if op == "cross_step":
        actnorm, invconv = _actnorm_invconv_layers(c, device)
        w_logabsdet = torch.zeros((), device=device)

        def fn(x, hnet):
            z, ld0 = _coupling_tail(x, hnet)
            z, ld1 = actnorm(z)
            y, ld2 = invconv(z, w_logabsdet)
            return y, ld0 + ld1 + ld2

        return fn, (x, hnet), [x, hnet, *actnorm.parameters(), *invconv.parameters()]
    raise ValueError(op)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,device", SHAPES)
@pytest.mark.parametrize("op", ["actnorm_invconv", "coupling", "cross_step"])
def test_flow_op(cuda_timer, op, shape, device, mode, variant):
    cuda_timer.benchmark.group = _group(op, mode, shape)
    fn, inputs, leaves = _make_op(op, shape, device)
    extra = {}
    with torch.no_grad():
        y0, ld0 = fn(*inputs)  # eager, for the output shapes
    if variant == "compiled":
        cuda_timer.skip_unless_compile(device)
        if os.environ.get("GLOWFAST_BENCH_COMPILE", "auto") not in ("full", "all") and shape[1:] != (12, 16, 16):
            pytest.skip("compiled per-op variant: C12_16x16 only by default (GLOWFAST_BENCH_COMPILE=full: all)")
        fn = torch.compile(fn, dynamic=False)
    call = cuda_timer.op_call(fn, inputs, leaves, mode, (y0, ld0))
    if variant == "compiled":  # a cold compile per case (and no recompile-limit fallback to eager)
        with cuda_timer.fresh_compile_caches(extra):
            compile_s, _ = cuda_timer.first_call(call, device)
        extra["compile_s"] = round(compile_s, 2)
    b = shape[0]
    cuda_timer(call, device=device, variant=variant, images=b, config={"op": op, "shape": list(shape),
               "mode": mode}, **TIMING[device], **extra)


# ------------------------------------------------------------------------------------ parameter-side ops
def _cifar10_steps(device: str):
    """The CIFAR-10 model's 96 flow steps (K=32 per level; LU 1x1 convs), with a tiny coupling network: only
    the parameter-side ops are timed, which do not depend on the network or the batch."""
    from glowfast.model import Glow

    model = Glow((3, 32, 32), K=32, L=3, hidden_channels=4, lu=True).to(device)
    return [list(level.steps) for level in model.levels]


def _per_step_params(levels):
    """The reference layers' way: every step builds its own W = P L U and log-determinant (~10 small ops)."""
    weights, ld = [], 0.0
    for steps in levels:
        for s in steps:
            weights.append(s.permute.weight_matrix())
            ld = ld + s.actnorm.log_scale.sum() + s.permute.log_abs_det()
    return weights, ld


def _per_level_params(levels, level_fn):
    """W and the summed log-determinant of every level by `level_fn(steps)` -> (W's, level log-determinant)."""
    weights, ld = [], 0.0
    for steps in levels:
        w, level_ld = level_fn(steps)
        weights += list(w)
        ld = ld + level_ld
    return weights, ld


def _level_weights(steps):
    """glowfast.fused.level_weights: all K steps of a level at once (on a GPU its two lu_weights kernels)."""
    from glowfast.fused import level_weights

    return level_weights(steps)


def _level_weights_torch(steps):
    """The same in a handful of batched torch ops (glowfast.fused.lu_level_weights_torch: level_weights before the
    lu_weights kernels, and still where they do not run)."""
    from glowfast.fused import lu_level_weights_torch

    return lu_level_weights_torch([s.permute for s in steps], [s.actnorm.log_scale for s in steps])


_PARAM_SIDES = {"reference": _per_step_params, "fused": lambda levels: _per_level_params(levels, _level_weights),
                "batched_torch": lambda levels: _per_level_params(levels, _level_weights_torch)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
@pytest.mark.parametrize("variant", list(_PARAM_SIDES))
def test_step_params(cuda_timer, variant, device, mode):
    """W and the parameter log-determinants of all 96 steps: per step (reference), batched per level in torch ops
    (batched_torch), and level_weights (fused: on a GPU the lu_weights kernels, one copy and one kernel per level
    forward, one kernel backward, where batched_torch runs ~18 and ~12 small kernels). Host-bound in eager mode; on
    a GPU the device time of a CUDA-graph replay is recorded too."""
    cuda_timer.benchmark.group = f"step_params/{mode}/cifar10_K32_L3"
    levels = _cifar10_steps(device)
    params = [p for steps in levels for s in steps for p in (*s.actnorm.parameters(), *s.permute.parameters())]
    build = _PARAM_SIDES[variant]

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return build(levels)
        for p in params:
            p.grad = None
        weights, ld = build(levels)
        torch.autograd.backward([ld, *weights], [torch.ones_like(ld), *(torch.ones_like(w) for w in weights)])
        return ld

    cuda_timer(call, device=device, variant=variant, config={"steps": 96, "mode": mode}, **TIMING[device])
    if device == "cuda":
        cuda_timer.device_time(call, rounds=TIMING["cuda"]["n_rounds"], iterations=TIMING["cuda"]["iterations"])


# ------------------------------------------------------------------------------------------ coupling networks
NET_SHAPES = [pytest.param((b, *s), id=f"B{b}_C{s[0]}_{s[1]}x{s[2]}") for b in (64, 256) for s in LEVEL_SHAPES]


@pytest.mark.parametrize("variant", ["reference", "fused", "fused_bf16", "fused_bf16_compiled",
                                     "fused_bf16_compiled_gemm3x3", "fused_bf16_compiled_epilogue",
                                     "fused_bf16_compiled_gemm3x3_epilogue", "gemm", "gemm_bf16", "triton",
                                     "triton_bf16", "triton_bf16_dots", "compiled"])
@pytest.mark.parametrize("shape", NET_SHAPES)
@pytest.mark.skipif(not HAS_CUDA, reason="hidden-512 coupling networks: CUDA only (seconds per call on a CPU)")
def test_coupling_network(cuda_timer, shape, variant, monkeypatch):
    """One coupling network (conv3x3 -> ReLU -> conv1x1 512 -> ReLU -> ZeroConv2d), forward + backward, at a
    CIFAR-10 level's shape: reference = the NCHW module (cuDNN); fused = glowfast's channels_last path with the
    1x1 conv as one GEMM (`--channels-last`, glowfast.amp.nhwc_network_forward); fused_bf16 = that under bf16
    autocast (`--amp bf16`); gemm / gemm_bf16 = every conv as a GEMM over pixels (`--gemm-networks`,
    glowfast.amp.gemm_network_forward); triton / triton_bf16 = glowfast's Triton network (`--triton-networks`,
    glowfast.kernels.coupling_net: thin 3x3 convs as fused implicit-GEMM kernels; fp32 or bf16 activations);
    triton_bf16_dots = triton_bf16 with bf16 tensor-core dots in the 3x3 convs (`use_bf16_dots`); compiled =
    torch.compile of the NCHW module; fused_bf16_compiled = fused_bf16 as one torch.compile'd function
    (`--compile-networks`; the thin channels padded to 8), `_gemm3x3` with its thin 3x3 convs as GEMMs
    (glowfast.amp.thin_convolutions_as_gemms), `_epilogue` with the ReLUs after its GEMMs in their epilogues
    (glowfast.amp.relu_in_gemm_epilogues). Input and output stay NCHW, as the flow hands them over."""
    from glowfast.amp import (
        enable_bf16_networks,
        enable_channels_last_networks,
        enable_compiled_networks,
        enable_gemm_networks,
        enable_triton_networks,
        relu_in_gemm_epilogues,
        thin_convolutions_as_gemms,
    )
    from glowfast.reference.coupling import CouplingNetwork

    b, c, h, w = shape
    device = "cuda"
    cuda_timer.benchmark.group = f"coupling_net/fwdbwd/B{b}_C{c}_{h}x{w}"
    ca, cb = c // 2, c - c // 2
    holder = torch.nn.Module()
    holder.net = CouplingNetwork(ca, 512, 2 * cb).to(device)
    with torch.no_grad():
        holder.net.conv3.conv.weight.normal_(0, 0.01)  # not the all-zero init: a realistic trained network
    if variant.startswith("fused"):
        enable_channels_last_networks(holder)
    if "_compiled" in variant:
        enable_compiled_networks(holder)
    if variant in ("gemm", "gemm_bf16"):
        enable_gemm_networks(holder)
    if variant.startswith("triton"):
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("the Triton network is timed compiled, not under the interpreter")
        enable_triton_networks(holder)
    if variant.endswith("_dots"):  # restored by monkeypatch after the case
        from glowfast.kernels import coupling_net

        monkeypatch.setattr(coupling_net, "_BF16_DOTS", True)
    if "_bf16" in variant:
        enable_bf16_networks(holder)
    net = holder.net
    x = torch.randn(b, ca, h, w, device=device, requires_grad=True)
    fn = torch.compile(net) if variant == "compiled" else net
    if "compiled" in variant:  # the torch.compile'd cases run in gpu_check's bench_compile stage
        cuda_timer.skip_unless_compile(device)
    grad_out = torch.randn(b, 2 * cb, h, w, device=device)
    params = [x, *net.parameters()]

    thin_gemms, relu_epilogue = "_gemm3x3" in variant, variant.endswith("_epilogue")

    def call():
        for p in params:
            p.grad = None
        with thin_convolutions_as_gemms(thin_gemms), relu_in_gemm_epilogues(relu_epilogue):
            out = fn(x)
        out.backward(grad_out)
        return out

    extra = {}
    if "compiled" in variant:
        with cuda_timer.fresh_compile_caches(extra):
            compile_s, _ = cuda_timer.first_call(call, device)
        extra["compile_s"] = round(compile_s, 2)
    cuda_timer(call, device=device, variant=variant, images=b, config={"shape": list(shape), "hidden": 512},
               **TIMING[device], **extra)


# ------------------------------------------------------------------------------------------ the optimiser step
@pytest.mark.parametrize("variant", ["reference", "fused"])
@pytest.mark.skipif(not HAS_CUDA, reason="the CIFAR-10 model's 44M parameters: CUDA only")
def test_adamax_step(cuda_timer, variant):
    """One Adamax update of a CIFAR-10 Glow's parameters (K=32, L=3, hidden 512: ~44M in ~1,350 tensors), the
    gradients given: reference = torch.optim.Adamax's foreach step (what the trainer runs by default); fused =
    glowfast.optim.FusedAdamax (`--fused-optimizer`: one Triton kernel over all tensors, 7 passes over their
    memory). Its time per call is the optimiser's share of every training step."""
    from model_configs import adamax, model_config

    from glowfast import Glow

    device = "cuda"
    if variant == "fused":
        cuda_timer.skip_unless_fused(device)
    cuda_timer.benchmark.group = "optimizer/adamax/cifar10_K32"
    params = list(Glow(**model_config("cifar10_K32"), backend="reference").to(device).parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
    opt = adamax(params, fused=variant == "fused")
    cuda_timer(opt.step, device=device, variant=variant,
               config={"parameters": sum(p.numel() for p in params), "tensors": len(params)}, **TIMING[device])
