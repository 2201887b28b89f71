"""Whole-model benchmarks: one training step (forward, backward, Adamax step) and sampling 64 images.

Variants (extra_info["variant"], what benchmarks/report.py computes ratios between)
- reference: `Glow(..., backend="reference")`, eager PyTorch.
- fused:     `Glow(..., backend="fused")` (Triton flow steps + batched LU); CUDA only.
- memory_saving: the fused model with `memory_saving=True` (`--memory-saving`): backward reconstructs each
             step's input with the inverse kernels instead of storing activations (glowfast.invertible);
             compare its peak GPU memory and step time with `fused`.
- graphed:   the fused model with its forward + backward captured once in a CUDA graph and replayed
             (glowfast.cuda_graph.GraphedStep, what `python -m glowfast.train --cuda-graphs` does); the
             Adamax step stays eager. extra_info["capture_s"]: warm-up + capture, paid once at start-up.
- graphed_bf16_nhwc: `graphed` plus the coupling networks in bf16 (autocast) and channels_last
             (`--cuda-graphs --amp bf16 --channels-last`): the fastest configuration, with bf16's rounding in
             the networks' outputs (the flow and the log-determinants stay fp32).
- graphed_bf16_nhwc_compiled: graphed_bf16_nhwc with each coupling network one torch.compile'd function
             (`--compile-networks`, glowfast.amp.compiled_network_forward: cuDNN convolutions, the small ops between
             them fused by inductor). Its compile happens in the eager step before the capture; extra_info
             ["compile_s"]: that step's time (a warm process: inductor's caches may hold the graphs already).
- graphed_bf16_nhwc_compiled_opt: that with the Adamax step torch.compile'd too (inductor fuses its foreach ops;
             the eager step was 2.35 ms of device time per B64 step on the H100, ~16 passes over the 44M
             parameters where one would do). Its compile is in the timer's warm-up calls (first_call). A
             measurement, not a training option yet (the trainer's learning-rate schedule would recompile it).
- graphed_bf16_nhwc_compiled_pad0: graphed_bf16_nhwc_compiled without the thin convolutions' channel padding
             (pad_network_channels(0)). The compiled bf16 networks zero-pad them to multiples of 8 in the graph by
             default since the 25th session (glowfast.amp.network_channel_pad): this variant, then called `_pad8`
             the other way round, measured 26.4 against 28.5 ms at B64 and 55.7 against 57.0 ms at B256 (H200).
- graphed_bf16_nhwc_compiled_fusedopt: graphed_bf16_nhwc_compiled with glowfast.optim.FusedAdamax (the Adamax
             update as one Triton kernel, 7 passes over the parameters; no compile) instead of torch's foreach step.
- graphed_bf16_nhwc_compiled_gemm3x3: graphed_bf16_nhwc_compiled with the thin 3x3 convolutions as GEMMs in the
             compiled graph (glowfast.amp.thin_convolutions_as_gemms: im2col + GEMM for conv1, GEMM to taps + shifted
             tap sums for conv3); cuDNN's 3x3 kernels ran at ~70 TFLOP/s, ~25 ms of the H200's B256 step.
             `_gemm3x3_fusedopt`: both.
- graphed_bf16_nhwc_compiled_epilogue: graphed_bf16_nhwc_compiled with the ReLU after each GEMM of the networks in
             the GEMM's epilogue (glowfast.amp.relu_in_gemm_epilogues: cuBLASLt's RELU_BIAS instead of one more
             pass over a 512-channel activation). `_epilogue_fusedopt`: with FusedAdamax; `_gemm3x3_epilogue_fusedopt`:
             all three. `_epilogue_fusedopt_exactbwd`: `_epilogue_fusedopt` with the flow's backward kernels at up to
             32 channels on exact-fp32 dots (glowfast.kernels.use_exact_backward_dots: CUDA-core FMAs instead of the
             3xTF32 default; half the backward loop's instructions at 16 and 32 channels in the sm_90 SASS, and the
             cross-step backward was 2.9 ms of the B256 step).
- graphed_gemm / graphed_bf16_gemm: `graphed` with the coupling networks' convolutions as GEMMs over pixels
             (`--gemm-networks`; fp32, or bf16 autocast) instead of cuDNN.
- graphed_triton / graphed_bf16_triton: `graphed` with glowfast's Triton coupling networks (`--triton-networks`:
             each thin 3x3 conv one fused implicit-GEMM kernel; glowfast.kernels.coupling_net), fp32 activations,
             or bf16 ones (`--amp bf16`). graphed_bf16_triton_dots: graphed_bf16_triton with bf16 tensor-core dots
             in the networks' 3x3 convs (glowfast.kernels.coupling_net.use_bf16_dots; fp32-operand dots otherwise).
- compiled:  `torch.compile(Glow(..., backend="reference"))` (default mode; the optimiser step stays eager).
             Its compile time (the first step of a fresh compile: dynamo reset, empty inductor/Triton cache
             dirs unless GLOWFAST_BENCH_COLD_COMPILE=0) is its own benchmark (group `compile/train_step/...`)
             and is also stored as extra_info["compile_s"]. Only with GLOWFAST_BENCH_COMPILE_MODEL=1 (minutes
             per configuration), on CUDA (GLOWFAST_BENCH_COMPILE=all: CPU too). The reference model compiles
             as one graph (ActNorm's init flag is cached on the host; no finite check while tracing).
- peer:      normflows (`pip install --no-deps normflows`) Glow built from GlowBlock + Squeeze + Merge as
             its example does (skipped when normflows is not importable). Differences from glowfast's
             configuration, all in the peer's favour or neutral for speed:
               * the factored-out latents get a learned per-position diagonal Gaussian (DiagGaussian), not
                 glowfast's conditional prior p(z2 | z1) (one ZeroConv2d 3x3 per split level);
               * the coupling network's last conv has no exp(3 * logs) output scale (openai's ZeroConv2d);
               * the scale/shift are interleaved channels (0::2 / 1::2) instead of halves.
             Same: K, L, hidden channels, affine coupling with sigmoid(raw + 2), LU 1x1 conv, actnorm with
             data-dependent init, channel split, unconditional.

Configurations
- cifar10: 3x32x32, K=32, L=3, hidden 512, affine, LU (batch 64 and 256) — CUDA.
- mnist:   1x32x32, K=16 and K=32, L=3, hidden 512, affine, LU — CUDA.
- mnist_K4_h128 (CPU smoke-size): 1x32x32, K=4, L=3, hidden 128, batch 8 (sampling: 64) — runs everywhere,
  so that a CPU-only machine measures the reference/peer step in seconds.

Inputs are random uint8 images (the compute does not depend on the pixel values); the loss is the mean
bits/dim. extra_info: images_per_s, peak_mem_mib (CUDA), ms_per_call, config.
"""

from __future__ import annotations

import gc
import math
import time

import pytest
import torch
from model_configs import LR, adamax, glow_train_step, model_config

HAS_CUDA = torch.cuda.is_available()
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="full-size configuration: CUDA only")


# (config, batch, device)
TRAIN_CASES = [
    pytest.param("mnist_K4_h128", 8, "cpu", id="cpu-mnist_K4_h128_B8"),
    pytest.param("cifar10_K32", 64, "cuda", id="cuda-cifar10_K32_B64", marks=CUDA_ONLY),
    pytest.param("cifar10_K32", 256, "cuda", id="cuda-cifar10_K32_B256", marks=CUDA_ONLY),
    pytest.param("mnist_K16", 64, "cuda", id="cuda-mnist_K16_B64", marks=CUDA_ONLY),
    pytest.param("mnist_K16", 256, "cuda", id="cuda-mnist_K16_B256", marks=CUDA_ONLY),
    pytest.param("mnist_K32", 256, "cuda", id="cuda-mnist_K32_B256", marks=CUDA_ONLY),
]
SAMPLE_CASES = [
    pytest.param("mnist_K4_h128", "cpu", id="cpu-mnist_K4_h128"),
    pytest.param("cifar10_K32", "cuda", id="cuda-cifar10_K32", marks=CUDA_ONLY),
    pytest.param("mnist_K16", "cuda", id="cuda-mnist_K16", marks=CUDA_ONLY),
    pytest.param("mnist_K32", "cuda", id="cuda-mnist_K32", marks=CUDA_ONLY),
]
# graphed_triton early: a time-capped GPU session measures the variants in this order (the GEMM layouts, measured
# slower than cuDNN on the H200, last among the graphed ones)
VARIANTS = ["reference", "fused", "memory_saving", "graphed", "graphed_triton", "graphed_bf16_nhwc",
            "graphed_bf16_nhwc_compiled", "graphed_bf16_triton", "graphed_bf16_triton_dots", "graphed_gemm",
            "graphed_bf16_gemm", "graphed_bf16_nhwc_compiled_opt", "graphed_bf16_nhwc_compiled_pad0",
            "graphed_bf16_nhwc_compiled_fusedopt", "graphed_bf16_nhwc_compiled_gemm3x3",
            "graphed_bf16_nhwc_compiled_gemm3x3_fusedopt", "graphed_bf16_nhwc_compiled_epilogue",
            "graphed_bf16_nhwc_compiled_epilogue_fusedopt", "graphed_bf16_nhwc_compiled_gemm3x3_epilogue_fusedopt",
            "graphed_bf16_nhwc_compiled_epilogue_fusedopt_exactbwd", "compiled",
            "peer"]
N_SAMPLES = 64
# timed rounds / warm-up calls per device (a CPU step of the smoke config takes ~0.5 s)
ROUNDS = {"cpu": 5, "cuda": 10}
WARMUP = {"cpu": 1, "cuda": 3}

_compiled_cache: dict = {}  # (config, batch) -> (step, compile_s, cache mode) built by test_compile_time


def _images(cfg: dict, batch: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (batch, *cfg["image_shape"]), dtype=torch.uint8, device=device)


# ------------------------------------------------------------------------------------------------ glowfast
def _glow(cfg: dict, backend: str, device: str):
    from glowfast import Glow

    torch.manual_seed(0)
    return Glow(**cfg, backend=backend).to(device)


def _check_fused(cuda_timer, device: str) -> None:
    cuda_timer.skip_unless_fused(device)
    fused = cuda_timer.import_or_skip("glowfast.fused", "glowfast.fused (Triton fused path)")
    ok, reason = fused.fused_available(torch.device(device))
    if not ok:
        pytest.skip(f"fused backend cannot run on {device}: {reason}")


def _graphed_train_step(model, x, compile_optimizer: bool = False, fused_optimizer: bool = False):
    """(step, capture seconds, first eager step's seconds): forward + backward replayed from a CUDA graph, Adamax
    step eager (or torch.compile'd: `compile_optimizer`, compiled in the timer's warm-up calls; or glowfast's
    FusedAdamax: `fused_optimizer`)."""
    from glowfast.cuda_graph import GraphedStep

    _init_actnorm(model, x)
    opt = adamax(model.parameters(), fused_optimizer)
    opt_step = torch.compile(opt.step) if compile_optimizer else opt.step

    def loss_and_grads(x):
        loss = model(x).bits_per_dim.mean()
        loss.backward()
        return loss.detach()

    # one eager step before the peak counter starts: cuDNN autotunes this variant's convolutions on their first
    # call (bf16 and channels_last are configurations no earlier case tuned) with trial workspaces, a one-time
    # cost that the eager variants pay in their warm-up calls, outside their peak too
    t0 = time.perf_counter()
    loss_and_grads(x)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    # the peak memory of a graphed step is the capture's: its activations stay in the graph's private pool
    # (reserved, not allocated again by the replays); run_timed(reset_peak=False) keeps this counter
    gc.collect()  # nothing of the previous case may count in this one's peak
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    graphed = GraphedStep(loss_and_grads, (x,), model.parameters())
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0

    def step():
        loss = graphed(x)
        opt_step()
        return loss

    return step, capture_s, first_s


def _init_actnorm(model, x) -> None:
    """Data-dependent actnorm init (the first training batch), eagerly, before any timing or compiling; compiled
    networks run eagerly for it, as in the trainer (glowfast.amp.eager_networks: no graphs for this pass)."""
    from glowfast.amp import eager_networks

    with torch.no_grad(), eager_networks():
        model(x)


def _build_compiled_step(cuda_timer, cfg, batch, device):
    """Fresh (cold) torch.compile of the reference model; returns (step, compile_s = first step's time)."""
    model = _glow(cfg, "reference", device)
    x = _images(cfg, batch, device)
    _init_actnorm(model, x)
    with cuda_timer.fresh_compile_caches(cuda_timer.extra_info):
        step = glow_train_step(torch.compile(model), x)
        compile_s, _ = _first_call(step, device)
    return step, compile_s


def _first_call(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------ peer
def _peer_model(cfg: dict, device: str):
    """normflows' Glow example (GlowBlock + Squeeze per level, Merge between levels), unconditional."""
    nf = pytest.importorskip("normflows", reason="peer library normflows not installed "
                                                 "(pip install --no-deps normflows)")
    torch.manual_seed(0)
    c, h, w = cfg["image_shape"]
    L, K, hidden = cfg["L"], cfg["K"], cfg["hidden_channels"]
    q0, merges, flows = [], [], []
    for i in range(L):  # i = 0 is the top (coarsest) level, as in normflows' example
        level = [nf.flows.GlowBlock(c * 2 ** (L + 1 - i), hidden, split_mode="channel", scale=True,
                                    use_lu=True) for _ in range(K)]
        level += [nf.flows.Squeeze()]
        flows.append(level)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent_shape = (c * 2 ** (L - i), h // 2 ** (L - i), w // 2 ** (L - i))
        else:
            latent_shape = (c * 2 ** (L + 1), h // 2**L, w // 2**L)
        q0.append(nf.distributions.DiagGaussian(latent_shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False).to(device)


def _peer_loss(model, x_uint8):
    """Mean bits/dim of 8-bit images, dequantised to [0, 1) like normflows' example (Scale + Jitter)."""
    x = (x_uint8.float() + torch.rand(x_uint8.shape, device=x_uint8.device)) / 256.0
    d = math.prod(x.shape[1:])
    return (model.forward_kld(x) + d * math.log(256.0)) / (d * math.log(2.0))


def _peer_train_step(model, x):
    opt = torch.optim.Adamax(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _peer_loss(model, x)
        loss.backward()
        opt.step()
        return loss

    return step


# ------------------------------------------------------------------------------------------------ benchmarks
@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_cache():
    yield
    _compiled_cache.clear()


@pytest.mark.parametrize("config_name,batch,device", TRAIN_CASES)
def test_compile_time(cuda_timer, config_name, batch, device):
    """Compile time of torch.compile(reference): the first training step of a fresh compile (cold dynamo; the
    model is built and its actnorm initialised beforehand, untimed). Its compiled step is kept for
    test_train_step's compiled variant, so the configuration is compiled once."""
    if not cuda_timer.compile_model_enabled(device, f"{config_name}_B{batch}"):
        pytest.skip("whole-model torch.compile benchmark off (GLOWFAST_BENCH_COMPILE_MODEL=1 or a case list)")
    cfg = model_config(config_name)
    cuda_timer.benchmark.group = f"compile/train_step/{config_name}_B{batch}"
    built = {}

    def setup():
        model = _glow(cfg, "reference", device)
        x = _images(cfg, batch, device)
        _init_actnorm(model, x)
        return (model, x), {}

    def compile_and_first_step(model, x):
        with cuda_timer.fresh_compile_caches(cuda_timer.extra_info):
            built["step"] = glow_train_step(torch.compile(model), x)
            return built["step"]()

    cuda_timer.once(compile_and_first_step, setup=setup, device=device, variant="compiled",
                    config={**cfg, "batch": batch})
    compile_s = cuda_timer.benchmark.stats.stats.median
    cuda_timer.extra_info["compile_s"] = round(compile_s, 2)
    _compiled_cache[(config_name, batch)] = (built["step"], compile_s, cuda_timer.extra_info["compile_cache"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config_name,batch,device", TRAIN_CASES)
def test_train_step(cuda_timer, config_name, batch, device, variant, monkeypatch):
    """One training step: forward (bits/dim), backward, Adamax step."""
    cfg = model_config(config_name)
    cuda_timer.benchmark.group = f"train_step/{config_name}_B{batch}"
    extra = {}
    # ActNorm's init before the timed calls, as in a training run: the first timed call (its time is
    # `first_call_s`) is then the first real step, the one that compiles the kernels, not the init (which runs
    # the reference path and compiles nothing)
    if variant == "reference":
        model = _glow(cfg, "reference", device)
        x = _images(cfg, batch, device)
        _init_actnorm(model, x)
        step = glow_train_step(model, x)
    elif variant in ("fused", "memory_saving"):
        _check_fused(cuda_timer, device)
        model = _glow(cfg, "fused", device)
        model.memory_saving = variant == "memory_saving"
        x = _images(cfg, batch, device)
        _init_actnorm(model, x)
        step = glow_train_step(model, x)
    elif variant.startswith("graphed"):
        if device != "cuda":
            pytest.skip("CUDA graphs: CUDA only")
        _check_fused(cuda_timer, device)
        model = _glow(cfg, "fused", device)
        from glowfast.amp import (
            enable_bf16_networks,
            enable_channels_last_networks,
            enable_compiled_networks,
            enable_gemm_networks,
            enable_triton_networks,
            pad_network_channels,
            relu_in_gemm_epilogues,
            thin_convolutions_as_gemms,
        )

        if "triton" in variant:
            enable_triton_networks(model)
        if variant.endswith("_dots"):  # restored by monkeypatch after the case
            from glowfast.kernels import coupling_net

            monkeypatch.setattr(coupling_net, "_BF16_DOTS", True)
        if "bf16" in variant:
            enable_bf16_networks(model)
        if "nhwc" in variant:
            enable_channels_last_networks(model)
        if "nhwc_compiled" in variant:
            enable_compiled_networks(model)
        if variant.endswith("gemm"):
            enable_gemm_networks(model)
        # the graphs keep these (no Python in replays)
        from glowfast.kernels import use_exact_backward_dots

        with pad_network_channels(0 if variant.endswith("_pad0") else None), \
                thin_convolutions_as_gemms("_gemm3x3" in variant), relu_in_gemm_epilogues("_epilogue" in variant), \
                use_exact_backward_dots(32 if variant.endswith("_exactbwd") else 0):
            step, capture_s, first_s = _graphed_train_step(model, _images(cfg, batch, device),
                                                           compile_optimizer=variant.endswith("_opt"),
                                                           fused_optimizer="_fusedopt" in variant)
        extra["capture_s"] = round(capture_s, 3)
        if "nhwc_compiled" in variant:
            extra["compile_s"] = round(first_s, 2)
    elif variant == "compiled":
        if not cuda_timer.compile_model_enabled(device, f"{config_name}_B{batch}"):
            pytest.skip("whole-model torch.compile benchmark off (GLOWFAST_BENCH_COMPILE_MODEL=1 or a case list)")
        cached = _compiled_cache.pop((config_name, batch), None)
        if cached:
            step, compile_s, extra["compile_cache"] = cached
        else:
            step, compile_s = _build_compiled_step(cuda_timer, cfg, batch, device)
        extra["compile_s"] = round(compile_s, 2)
    else:
        model = _peer_model(cfg, device)
        step = _peer_train_step(model, _images(cfg, batch, device))
        extra["peer"] = "normflows " + __import__("normflows").__version__
    # no CUDA-event cross-check for whole-model steps (milliseconds each: host timing is exact enough, and it
    # would cost 5 more steps per case of a time-limited GPU session)
    loss = cuda_timer(step, device=device, variant=variant, n_rounds=ROUNDS[device], warmup=WARMUP[device],
                      images=batch, config={**cfg, "batch": batch}, event_check=False,
                      reset_peak=not variant.startswith("graphed"), **extra)
    assert torch.isfinite(loss).item(), f"{variant}: non-finite loss {loss}"


@pytest.mark.parametrize("variant", ["reference", "fused", "peer"])
@pytest.mark.parametrize("config_name,device", SAMPLE_CASES)
def test_sample(cuda_timer, config_name, device, variant):
    """Sampling 64 images at temperature 0.7 (the whole inverse pass, no gradient)."""
    cfg = model_config(config_name)
    cuda_timer.benchmark.group = f"sample{N_SAMPLES}/{config_name}"
    extra = {}
    if variant == "peer":
        model = _peer_model(cfg, device)
        x = _images(cfg, 16, device)
        with torch.no_grad():
            _peer_loss(model, x)  # data-dependent actnorm init, as after training

        @torch.no_grad()
        def sample():
            return model.sample(N_SAMPLES, temperature=0.7)[0]

        extra["peer"] = "normflows " + __import__("normflows").__version__
        extra["note"] = "normflows' sample() also returns log q (the logdets are computed too)"
    else:
        if variant == "fused":
            _check_fused(cuda_timer, device)
        model = _glow(cfg, variant, device)
        _init_actnorm(model, _images(cfg, 16, device))
        model.eval()

        def sample():
            return model.sample(N_SAMPLES, temperature=0.7)

    out = cuda_timer(sample, device=device, variant=variant, n_rounds=ROUNDS[device], warmup=WARMUP[device],
                     images=N_SAMPLES, config=cfg, event_check=False, **extra)
    assert out.shape == (N_SAMPLES, *cfg["image_shape"])
