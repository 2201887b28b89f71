"""Start-up time of a training run, measured the way a user pays it: a fresh process, empty kernel caches.

    python benchmarks/startup.py --config cifar10_K32 --batch 64 --backend fused --out startup.json

Times (seconds, wall clock, the GPU synchronised at each mark), in the order `python -m glowfast.train` pays
them: `import` (torch + glowfast, CUDA context), `build` (the model on the device), `init` (ActNorm's
data-dependent init: one training-mode forward, which runs the reference path), `precompile` (the fused
kernels of a step compiled in parallel from a dry run, glowfast.fused.precompile_training_step; --precompile on
runs it, off and auto -- the trainer's default -- skip it), `first_step` (the first fused forward + backward +
Adamax: without precompile, Triton compiles every kernel here one after another; cuDNN autotuning, allocator
growth), `second_step` (warm, for comparison)
and `to_first_step` = everything up to the end of the first step, what issue 6's "start-up under 20 s" bounds.
Diagnostics: `construct_s` (the part of `build` that is the model's constructor on the CPU; the H200's 4.4 s
`build` was unexplained), `first_step_compiles` (kernel variants the first step compiled itself: 0 after a
precompile that covered it) and the precompile record's `dry_seconds` (its dry step's own share, before the wait
for the compilations).
(Before 2026-11-26 the init ran inside the "first step", and the kernels compiled in the second, unmeasured.)
Run it with `TRITON_CACHE_DIR` pointing at an empty folder (benchmarks/gpu_check.sh does) or the Triton compile
time is not included (and TORCHINDUCTOR_CACHE_DIR too with `--networks bf16_nhwc_compiled`). `--networks` and
`--fused-optimizer` give the step the training CLI's options of those names. Appends one JSON record per run to
--out (a list).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

T0 = time.perf_counter()
# --networks: the training config's network options each choice sets (glowfast.amp.apply_network_options)
NETWORK_OPTIONS = {"plain": {}, "bf16_nhwc": {"amp": "bf16", "channels_last": True},
                   "bf16_nhwc_compiled": {"amp": "bf16", "channels_last": True, "compile_networks": True}}


def main(argv: list[str] | None = None) -> int:
    # next to this file (on sys.path); it imports torch, which counts in import_s as it would for a user
    from model_configs import CONFIGS, glow_train_step, model_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="cifar10_K32", choices=tuple(CONFIGS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default="fused", choices=("fused", "reference", "auto"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precompile", choices=("auto", "on", "off"), default="auto",
                    help="compile the step's kernels in parallel before it (auto: off, python -m glowfast.train's "
                         "default since the H200 measured it slower)")
    ap.add_argument("--networks", choices=tuple(NETWORK_OPTIONS), default="plain",
                    help="coupling network options: plain (fp32 cuDNN), bf16_nhwc (--amp bf16 --channels-last), "
                         "bf16_nhwc_compiled (+ --compile-networks: the fastest step, whose first step compiles "
                         "the networks; set TORCHINDUCTOR_CACHE_DIR to an empty folder for a cold start)")
    ap.add_argument("--fused-optimizer", action="store_true", help="glowfast.optim.FusedAdamax (--fused-optimizer)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    import glowfast
    from glowfast import Glow

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    t_import = mark()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the benchmarks (and a tuned training run) use it
    model = Glow(**model_config(args.config), backend=args.backend)
    t_construct = time.perf_counter()  # the constructor alone (CPU: random orthogonal W, LU, conv inits)
    model = model.to(device)
    from glowfast.amp import apply_network_options, eager_networks

    apply_network_options(model, NETWORK_OPTIONS[args.networks])
    x = torch.randint(0, 256, (args.batch, *model.image_shape), dtype=torch.uint8, device=device)
    step = glow_train_step(model, x, args.fused_optimizer)
    t_build = mark()

    # ActNorm's data-dependent init, as the trainer's initialize_actnorm runs it before the first step (compiled
    # networks eagerly: the first step compiles them)
    with torch.no_grad(), eager_networks():
        model(x)
    t_init = mark()
    path = model.resolve_backend(device)
    precompile = args.precompile == "on"
    report = None
    if precompile:
        from glowfast.fused import precompile_training_step

        report = precompile_training_step(model, x)
    t_pre = mark()
    from glowfast.kernels.precompile import compiled_variants

    variants_before = compiled_variants()
    loss = step()
    t_first = mark()
    # kernel variants the first step compiled itself: none if the precompile covered the step (a positive count
    # after a precompile means the dry step's keys missed the real ones)
    first_step_compiles = compiled_variants() - variants_before
    step()
    t_second = mark()
    record = {
        "config": args.config, "batch": args.batch, "backend": args.backend, "networks": args.networks,
        "fused_optimizer": args.fused_optimizer, "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "compute_path": path, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "glowfast": glowfast.__version__,
        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
        "precompile": None if report is None else report.as_record(),
        "import_s": round(t_import - T0, 3), "build_s": round(t_build - t_import, 3),
        "construct_s": round(t_construct - t_import, 3),  # of build_s
        "init_s": round(t_init - t_build, 3), "precompile_s": round(t_pre - t_init, 3),
        "first_step_s": round(t_first - t_pre, 3), "first_step_compiles": first_step_compiles,
        "second_step_s": round(t_second - t_first, 4),
        "to_first_step_s": round(t_first - T0, 3), "loss": float(loss.detach()),
    }
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    runs.append(record)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
