"""Where a training step's device time goes: every kernel of a few eager steps, summed by what it belongs to.

    python benchmarks/profile_step.py --config cifar10_K32 --batch 64 --backend fused [--bf16] [--channels-last]
        [--triton-networks] [--steps 5] --out DIR        # appends to DIR/profile.json, rewrites DIR/profile.md

Why: issue 6's throughput targets are bounded by the whole step's device time, and which part to make faster --
the coupling networks (cuDNN or glowfast's Triton networks), the flow's Triton kernels, the batched LU op, the
optimiser or the small ops around them -- follows from their shares. The steps are eager: a CUDA graph replays
the same kernels (it removes the host's launch overhead, not device time), and torch.profiler sees each kernel of
an eager step. The record also holds the wall time per step, whose excess over the device time is host overhead.

On the CPU (no kernels) the same categories sum the operators' self CPU time instead: a smoke run for CI, not a
measurement anyone should read.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from model_configs import glow_train_step, model_config

# First match wins: kernel (CUDA) or operator (CPU) names to what they belong to. The flow kernels are glowfast's
# Triton launches (glowfast/kernels/*.py), the Triton networks glowfast/kernels/coupling_net.py, the LU op
# csrc/cuda/batched_lu_kernels.cu; cuDNN's and cuBLAS's kernel names carry conv / gemm / their tile families.
CATEGORIES = (
    ("flow kernels (Triton)", r"_actnorm_invconv_\w*kernel|_cross_step_\w*kernel|_coupling_(fwd|inv|bwd)_kernel"
                              r"|_step_inverse_kernel|_lu_weights_\w*kernel"),
    ("coupling networks (Triton)", r"_conv3x3\w*kernel|_relu_backward_kernel"),
    # inductor's generated kernels (triton_poi_fused_..., triton_red_..., triton_per_...): the compiled networks'
    # fused glue (--compile-networks), the only torch.compile'd code in a glowfast step
    ("compiled networks' fused ops (inductor)", r"^triton_(poi|red|per|tem|for)_"),
    ("batched LU op", r"lu_factor\w*_kernel|lu_inverse\w*_kernel|inverse_backward_kernel|glowfast::"),
    ("convolutions and GEMMs (cuDNN, cuBLAS)", r"conv|cudnn|gemm|xmma|cutlass|sm\d+_|implicit|wgrad|dgrad|fprop"
                                              r"|nchwToNhwc|nhwcToNchw|mkldnn|addmm|\bmm\b|matmul"),
    ("optimiser", r"multi_tensor|(?i:adam)|foreach"),
    ("reductions", r"reduce|Reduce|sum|norm"),
)
OTHER = "elementwise and other"


def category(name: str) -> str:
    """The CATEGORIES entry a kernel or operator name belongs to (OTHER if none)."""
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return OTHER


def device_kernel_times_us(events) -> dict[str, tuple[float, int]]:
    """{name: (total µs, count)} of the CUDA kernels among profiler events. Not the GPU-side user annotations
    (e.g. "Optimizer.step#Adamax.step"): they span a range of the device timeline, idle gaps included, and the
    kernels inside them count already (on the H100 the optimiser's annotation alone read 12.9 ms of a 70.8 ms step
    whose real optimiser kernels took 2.3 ms)."""
    out: dict[str, tuple[float, int]] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            t, n = out.get(e.name, (0.0, 0))
            out[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    return out


def _kernel_times_us(prof, on_cuda: bool) -> dict[str, tuple[float, int]]:
    """{name: (total µs, count)}: CUDA kernels' durations, or on the CPU each operator's self time."""
    if on_cuda:
        return device_kernel_times_us(prof.events())
    return {e.key: (float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()
            if e.self_cpu_time_total > 0}


def profile(config: str, batch: int, device: str, backend: str, *, bf16: bool = False, channels_last: bool = False,
            triton_networks: bool = False, compile_networks: bool = False, thin_gemms: bool = False,
            relu_epilogue: bool = False, fused_optimizer: bool = False, exact_backward_dots: bool = False,
            steps: int = 5, warmup: int = 3, top: int = 15) -> dict:
    from glowfast import Glow
    from glowfast.amp import eager_networks, relu_in_gemm_epilogues, thin_convolutions_as_gemms
    from glowfast.kernels import use_exact_backward_dots

    torch.manual_seed(0)
    model = Glow(**model_config(config), backend=backend).to(device)
    if bf16 or channels_last or triton_networks or compile_networks:
        from glowfast.amp import (
            enable_bf16_networks,
            enable_channels_last_networks,
            enable_compiled_networks,
            enable_triton_networks,
        )

        if compile_networks:
            enable_compiled_networks(model)
        if triton_networks:
            enable_triton_networks(model)
        if bf16:
            enable_bf16_networks(model)
        if channels_last:
            enable_channels_last_networks(model)
    x = torch.randint(0, 256, (batch, *model_config(config)["image_shape"]), dtype=torch.uint8, device=device)
    with torch.no_grad(), eager_networks():
        model(x)  # ActNorm's data-dependent init (compiled networks eagerly, as the trainer runs it)
    # read at each call of a compiled network / of a backward kernel's wrapper
    with thin_convolutions_as_gemms(thin_gemms), relu_in_gemm_epilogues(relu_epilogue), \
            use_exact_backward_dots(32 if exact_backward_dots else 0):
        return _profile_step(glow_train_step(model, x, fused_optimizer), device, steps, warmup, top,
                             dict(config=config, batch=batch, backend=backend, bf16=bf16, channels_last=channels_last,
                                  triton_networks=triton_networks, compile_networks=compile_networks,
                                  thin_gemms=thin_gemms, relu_epilogue=relu_epilogue,
                                  fused_optimizer=fused_optimizer, exact_backward_dots=exact_backward_dots))


def _profile_step(step, device: str, steps: int, warmup: int, top: int, options: dict) -> dict:
    on_cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    for _ in range(warmup):  # kernel compiles, cuDNN's autotuner, allocator growth
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    kernels = _kernel_times_us(prof, on_cuda)
    by_cat: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + us
    total_ms = sum(by_cat.values()) / steps / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(
        **options, device=torch.cuda.get_device_name(device) if on_cuda else "cpu", steps=steps,
        torch=torch.__version__, time="device (kernels)" if on_cuda else "CPU (operators' self time)",
        wall_ms_per_step=round(wall_ms, 3), busy_ms_per_step=round(total_ms, 3),
        categories={k: round(v / steps / 1e3, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        top=[dict(name=n[:160], category=category(n), ms_per_step=round(us / steps / 1e3, 4), calls_per_step=c / steps)
             for n, (us, c) in ranked],
    )


def markdown(records: list[dict]) -> str:
    lines = ["# Where a training step's time goes (benchmarks/profile_step.py)", ""]
    for r in records:
        flags = ", ".join(f for f, on in (("bf16 networks", r["bf16"]), ("channels_last", r["channels_last"]),
                                          ("Triton networks", r["triton_networks"]),
                                          ("compiled networks", r.get("compile_networks")),
                                          ("thin 3x3 convs as GEMMs", r.get("thin_gemms")),
                                          ("ReLUs in GEMM epilogues", r.get("relu_epilogue")),
                                          ("FusedAdamax", r.get("fused_optimizer")),
                                          ("exact-fp32 backward dots", r.get("exact_backward_dots"))) if on) \
            or "fp32 networks"
        lines += [f"## {r['config']}, batch {r['batch']}, {r['backend']} ({flags}) on {r['device']}", "",
                  f"{r['time']}: {r['busy_ms_per_step']:.2f} ms per step, wall time {r['wall_ms_per_step']:.2f} ms "
                  f"per eager step ({r['steps']} steps profiled, torch {r['torch']}).", "",
                  "| part | ms / step | share |", "| --- | ---: | ---: |"]
        busy = r["busy_ms_per_step"] or 1.0
        lines += [f"| {k} | {v:.3f} | {v / busy:.0%} |" for k, v in r["categories"].items()]
        lines += ["", "| top kernel | part | ms / step | calls / step |", "| --- | --- | ---: | ---: |"]
        lines += [f"| `{t['name'][:90]}` | {t['category']} | {t['ms_per_step']:.3f} | {t['calls_per_step']:g} |"
                  for t in r["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="cifar10_K32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="fused", choices=["fused", "reference"])
    ap.add_argument("--bf16", action="store_true", help="coupling networks in bf16 (glowfast.amp)")
    ap.add_argument("--channels-last", action="store_true", help="coupling networks in channels_last")
    ap.add_argument("--triton-networks", action="store_true", help="glowfast's Triton coupling networks")
    ap.add_argument("--compile-networks", action="store_true", help="coupling networks torch.compile'd (glowfast.amp)")
    ap.add_argument("--thin-gemms", action="store_true",
                    help="with --compile-networks: the thin 3x3 convs as GEMMs (amp.thin_convolutions_as_gemms)")
    ap.add_argument("--relu-epilogue", action="store_true",
                    help="with --compile-networks: the ReLUs in the GEMMs' epilogues (amp.relu_in_gemm_epilogues)")
    ap.add_argument("--fused-optimizer", action="store_true", help="glowfast.optim.FusedAdamax instead of torch's")
    ap.add_argument("--exact-backward-dots", action="store_true",
                    help="the flow's backward kernels up to 32 channels on exact-fp32 dots (use_exact_backward_dots)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True, help="folder: profile.json (appended) and profile.md")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device (--device cpu profiles operators on the CPU, a smoke run)")
    rec = profile(args.config, args.batch, args.device, args.backend, bf16=args.bf16,
                  channels_last=args.channels_last, triton_networks=args.triton_networks,
                  compile_networks=args.compile_networks, thin_gemms=args.thin_gemms,
                  relu_epilogue=args.relu_epilogue, fused_optimizer=args.fused_optimizer,
                  exact_backward_dots=args.exact_backward_dots, steps=args.steps,
                  warmup=args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "profile.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(rec)
    path.write_text(json.dumps(records, indent=1))
    (out / "profile.md").write_text(markdown(records))
    print(json.dumps({k: rec[k] for k in ("config", "batch", "backend", "busy_ms_per_step", "wall_ms_per_step",
                                          "categories")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
