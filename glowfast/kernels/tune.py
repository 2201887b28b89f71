"""Block-size sweep of the fused Triton kernels (issue 4's tuning pass), one GPU command:

    python -m glowfast.kernels.tune --out $OUT/tune          # writes tune.json (every record) and tune.md

For each launch function (forward, inverse, backward of actnorm_invconv, coupling and cross_step, the fused step
inverse, and the two backward kernels without their weight gradient, "bwd_nodw", and with it as one GEMM after the
kernel, "bwd_dwgemm") at each shape, every candidate (BLOCK_P, num_warps) runs under `launch_override`:

1. its outputs are compared with the default configuration's (a tile size may change reduction order, nothing
   else; a candidate that differs by more than `MATCH_RTOL` of the output's scale is reported and never "best"),
   so the sweep also tests every tile size it times on the GPU;
2. it is timed with CUDA events around a CUDA-graph replay of `iterations` calls (median over rounds after
   warm-up): eager calls would time the host's launch overhead, not a small kernel;
3. GB/s = the kernel's compulsory HBM traffic (every input read once, every output written once) / time, and
   its fraction of the measured device-to-device copy bandwidth (issue 4's target: >= 0.70).

Shapes: the bandwidth shapes of issue 4 (batch 64, 12x128x128 and 48x64x64) first, then CIFAR-10's level
shapes at batch 256. Candidates: BLOCK_P = the default /4 ... x8 (powers of two, 512-16K elements per tile,
<= the image) x num_warps {4, 8}. `--budget` stops starting new cases once spent (the files then hold what
finished). `--programs-per-sm` adds grid sizes for the reducing backward kernels, `--precisions` other dot
precisions (e.g. exact fp32, "ieee") for the kernels with a dot. The defaults are the table `GPU_TILES` in
glowfast/kernels/_utils.py: a tuning result is applied there (and must stay spill-free:
tests/test_triton_compile_sm90.py), and measured again.

`--networks` sweeps the coupling network's kernels instead (glowfast/kernels/coupling_net.py, `--triton-networks`):
its four launch kinds (thin-input and thin-output conv, the two weight gradients) at CIFAR-10's level shapes, over
tiles around the wrapper's (`network_candidates`, one pipeline stage), the same output check and timing; then the
`NETWORK_STAGE_TOP` fastest of those again at each deeper software pipeline (`NETWORK_STAGES`), and the other K
order (`coupling_net.uses_flat_k` for the convs, `uses_flat_wgrad` for the weight gradients: `flat_k_candidate`).

Under TRITON_INTERPRET=1 the sweep runs on CPU tensors (tiny shapes; tests/test_kernel_tune.py), where only
the output check means anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import triton

from . import _utils
from .coupling import _launch_options as _coupling_launch
from .coupling import coupling_block_pixels

# "bwd_nodw": the backward without the weight gradient (need_dw=False, as when W needs no gradient): its time is
# what the rest of the loop costs, the bound on moving the weight gradient's product out of it (RESULTS.md).
# "bwd_dwgemm": the backward with the weight gradient moved out of it (dw_outside=True: the kernel writes u, one GEMM
# after it), the experiment that bound is for.
BWD_VARIANTS = {"bwd_nodw": dict(need_dw=False), "bwd_dwgemm": dict(dw_outside=True)}  # the backward's keywords
KERNELS = (
    ("actnorm_invconv", "fwd"), ("actnorm_invconv", "inv"), ("actnorm_invconv", "bwd"),
    ("coupling", "fwd"), ("coupling", "inv"), ("coupling", "bwd"),
    ("cross_step", "fwd"), ("cross_step", "bwd"), ("step_inverse", "fwd"),
    *((k, m) for m in BWD_VARIANTS for k in ("actnorm_invconv", "cross_step")),
)
BANDWIDTH_SHAPES = ((64, 12, 128, 128), (64, 48, 64, 64))
CIFAR_SHAPES = ((256, 12, 16, 16), (256, 24, 8, 8), (256, 48, 4, 4))
NUM_WARPS = (4, 8)
REDUCING = {(k, m) for k in ("actnorm_invconv", "cross_step")
            for m in ("bwd", *BWD_VARIANTS)}  # grid = programs per sample x batch
MATCH_RTOL = 1e-4  # of max |output|: reduction order only (TF32 rounds the same inputs the same way)


def shape_tag(shape) -> str:
    b, c, h, w = shape
    return f"B{b}_C{c}_{h}x{w}"


def _padded_channels(kernel: str, c: int) -> int:
    return _utils.next_power_of_2(c) if kernel == "coupling" else _utils.channel_pad(c)


# GPU_TILES family of each launch function (as the wrappers in actnorm_invconv.py / cross_step.py pass it)
TILE_KIND = {
    ("actnorm_invconv", "fwd"): "fwd", ("actnorm_invconv", "inv"): "fwd", ("step_inverse", "fwd"): "fwd",
    ("actnorm_invconv", "bwd"): "actnorm_invconv_bwd", ("cross_step", "fwd"): "cross_step_fwd",
    ("cross_step", "bwd"): "cross_step_bwd",
}
TILE_KIND.update({(k, m): TILE_KIND[(k, "bwd")] for k in ("actnorm_invconv", "cross_step") for m in BWD_VARIANTS})


def default_config(kernel: str, shape, mode: str = "fwd") -> tuple[int, int]:
    """(BLOCK_P, num_warps) that the launch functions pick for this kernel and shape without an override."""
    _, c, h, w = shape
    cp, hw = _padded_channels(kernel, c), h * w
    if kernel == "coupling":
        bp = coupling_block_pixels(cp, hw)
        return bp, _coupling_launch(cp, bp)["num_warps"]
    kind = TILE_KIND[(kernel, mode)]
    bp = _utils.block_pixels(cp, hw, kind)
    return bp, _utils.launch_options(cp, kind, block_p=bp)["num_warps"]


def candidates(kernel: str, shape, num_warps=NUM_WARPS, block_ps=None, mode: str = "fwd",
               default: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Default first, then BLOCK_P in default/4 ... default*8 (512-16K tile elements, <= image) x num_warps.

    Up to 8x: the spill-free defaults of the backward kernels are far smaller than the tiles they replaced. Down to
    /4: at cp 64 the 3xTF32 forward kernels' default tiles hold one program per SM (185-215 registers x 256
    threads, 48-64 KiB of shared memory: sm_90 cubins, benchmarks/RESULTS.md), and the H100 measured them at 21-28 %
    of the copy bandwidth; a quarter of the actnorm + 1x1 conv tile fits 3 programs per SM (the 24th session's
    sweep: (32, 4) 2.6x faster than (128, 8), now the forward's tile). `default`: the tile to
    start from (default_config's if None). Not the dot kernels' tiles with more warps than `max_dot_warps` (an N=8
    wgmma, which Triton miscompiles: the H100 sweep crashed on one, 24th session)."""
    _, c, h, w = shape
    cp = _padded_channels(kernel, c)
    default = default or default_config(kernel, shape, mode)
    if block_ps is None:
        cap = max(16, _utils.next_power_of_2(h * w))
        block_ps = [bp for bp in (default[0] // 4, default[0] // 2, default[0], default[0] * 2, default[0] * 4,
                                  default[0] * 8)
                    if 16 <= bp <= cap and 512 <= cp * bp <= 16384]
    out = [default]
    out += [(bp, nw) for bp in block_ps for nw in num_warps
            if (bp, nw) != default and (kernel == "coupling" or nw <= _utils.max_dot_warps(cp, bp))]
    return out


def kernel_case(kernel: str, mode: str, shape, device) -> tuple[Callable[[], object], int]:
    """(call, bytes moved) for one raw launch function on fixed random inputs (C split as the model does)."""
    from . import (
        actnorm_invconv_backward,
        actnorm_invconv_forward,
        actnorm_invconv_inverse,
        coupling_backward,
        coupling_forward,
        coupling_inverse,
        cross_step_backward,
        cross_step_forward,
        step_inverse,
    )

    b, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device)

    c_b = c - c // 2
    x, hnet = randn(b, c, h, w), randn(b, 2 * c_b, h, w, scale=0.1)
    bias, log_scale = randn(c, scale=0.1), randn(c, scale=0.1)
    weight = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0].float().to(device)
    gy, gld = randn(b, c, h, w), randn(b)
    n, nh = x.numel() * x.element_size(), hnet.numel() * hnet.element_size()
    kw = BWD_VARIANTS.get(mode, {})  # a backward variant: the backward's call with its keywords, the same
    # compulsory bytes (u's write and re-read under dw_outside are that variant's own cost)
    mode = "bwd" if mode in BWD_VARIANTS else mode
    calls = {
        ("actnorm_invconv", "fwd"): (lambda: actnorm_invconv_forward(x, bias, log_scale, weight), 2 * n),
        ("actnorm_invconv", "inv"): (lambda: actnorm_invconv_inverse(x, bias, log_scale, weight), 2 * n),
        ("actnorm_invconv", "bwd"): (lambda: actnorm_invconv_backward(x, gy, bias, log_scale, weight, **kw), 3 * n),
        ("coupling", "fwd"): (lambda: coupling_forward(x, hnet, True), 2 * n + nh),
        ("coupling", "inv"): (lambda: coupling_inverse(x, hnet, True), 2 * n + nh),
        ("coupling", "bwd"): (lambda: coupling_backward(x, hnet, gy, gld, True), 3 * n + 2 * nh),
        ("cross_step", "fwd"): (lambda: cross_step_forward(x, hnet, bias, log_scale, weight, True), 2 * n + nh),
        ("cross_step", "bwd"): (lambda: cross_step_backward(x, hnet, gy, gld, bias, log_scale, weight, True, **kw),
                                3 * n + 2 * nh),
        ("step_inverse", "fwd"): (lambda: step_inverse(x, hnet, bias, log_scale, weight, True), 2 * n + nh),
    }
    return calls[(kernel, mode)]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def max_rel_diff(out, ref) -> float:
    """max over output tensors of max|out - ref| / (max|ref| + tiny)."""
    worst = 0.0
    for a, b in zip(_tensors(out), _tensors(ref), strict=True):
        if b.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()) / (float(b.abs().max()) + 1e-30))
    return worst


def _graph_of(call: Callable[[], object], iterations: int) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of `iterations` back-to-back calls, or None where the call cannot be captured.

    Why: one call is a Triton launch plus a few torch allocations and reductions, tens of µs of host work; a
    small kernel (e.g. 256x12x16x16, ~3 MB) runs in a few µs, so eager back-to-back calls would time the host.
    A replayed graph issues the same kernels without the host in between."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()  # capture needs one eager call on a side stream first (lazy init, allocator)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iterations):
                call()
        return graph
    except Exception as e:  # noqa: BLE001 - fall back to eager timing, whatever stopped the capture
        torch.cuda.synchronize()
        from glowfast.cuda_graph import clear_failed_capture

        clear_failed_capture(torch.device("cuda"))  # else the next torch.randn on this GPU raises
        # said, not silent: eager calls include the host's launch overhead, so the time is then an upper bound
        # (the bandwidth a lower bound); time_call_graphed reports it, and the benchmarks record it as eager_call_us
        warnings.warn(f"CUDA-graph capture failed ({type(e).__name__}: {e}); timing eager calls instead, which "
                      "include the launch overhead", stacklevel=2)
        return None


def time_call(call: Callable[[], object], device: torch.device, rounds: int, iterations: int,
              warmup: int = 3) -> float:
    """Median seconds per call over `rounds` samples of `iterations` calls: on a GPU, CUDA events around a CUDA
    graph replay of the calls (eager calls if they cannot be captured); on the CPU, perf_counter."""
    return time_call_graphed(call, device, rounds, iterations, warmup)[0]


def time_call_graphed(call: Callable[[], object], device: torch.device, rounds: int, iterations: int,
                      warmup: int = 3) -> tuple[float, bool]:
    """time_call's seconds, and whether they are CUDA-graph replays (False: eager calls, the host's launch
    overhead included -- not the device time a benchmark may label them)."""
    for _ in range(warmup):
        call()
    graph = _graph_of(call, iterations) if device.type == "cuda" else None
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if graph is not None:
                graph.replay()
            else:
                for _ in range(iterations):
                    call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / iterations)
        else:
            t0 = time.perf_counter()
            for _ in range(iterations):
                call()
            samples.append((time.perf_counter() - t0) / iterations)
    return statistics.median(samples), graph is not None


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps(numel: int = 2**28) -> float:
    """Measured HBM bandwidth of this GPU: a 1 GiB device-to-device copy (read + write), best of 10."""
    if "v" not in _COPY_GBPS:
        src = torch.empty(numel, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        _COPY_GBPS["v"] = 2 * src.numel() * 4 / best / 1e9
        del src, dst
    return _COPY_GBPS["v"]


def _measure_candidate(rec: dict, call, override, ref, device, rounds: int, iterations: int, copy_gbps) -> object:
    """Run `call` under `override` (a context manager forcing one candidate configuration), compare its outputs
    with `ref` (None: this candidate is the default, whose outputs become the reference), time it, and fill `rec`
    (match, max_rel_diff, us, GB/s of rec["bytes"], fraction of the copy bandwidth; or the error). Returns the
    reference outputs: None only when the default failed, leaving nothing to compare the others with."""
    try:
        with override:
            out = call()
            if ref is None:
                ref = out
            rec["max_rel_diff"] = max_rel_diff(out, ref)
            rec["match"] = rec["max_rel_diff"] <= MATCH_RTOL
            sec = time_call(call, device, rounds, iterations)
        gbps = rec["bytes"] / sec / 1e9
        rec.update(us=round(sec * 1e6, 2), GBps=round(gbps, 1))
        if copy_gbps:
            rec.update(copy_GBps=round(copy_gbps, 1), fraction_of_copy_bw=round(gbps / copy_gbps, 3))
    except Exception as exc:  # noqa: BLE001 - e.g. out of resources for one tile: record, go on
        rec.update(error=f"{type(exc).__name__}: {str(exc)[:300]}", match=False)
    return ref


def _at_precision(precision: str | None):
    """The dot precision of one candidate: None = the current one (whatever the caller or the environment set)."""
    return contextlib.nullcontext() if precision is None else _utils.use_dot_precision(precision)


def sweep(shapes, kernels=KERNELS, *, device="cuda", budget_s: float = 480.0, rounds: int = 7,
          iterations: int = 10, num_warps=NUM_WARPS, block_ps=None, programs_per_sm=(), precisions=(), log=print,
          records: list[dict] | None = None) -> list[dict]:
    """One record per (kernel, mode, shape, BLOCK_P, num_warps[, programs per SM][, dot precision]), appended to
    `records` as each finishes (so an interrupted sweep keeps what it measured); see the module docstring.

    `precisions`: other dot precisions to try too ("ieee", "tf32x3", "tf32"), for the kernels with a 1x1-conv dot,
    each at its own candidate tiles; their outputs must match the default's within MATCH_RTOL as any candidate's.
    Why: at 16 padded channels the exact-fp32 ("ieee") backward compiles to half the instructions per pixel of the
    3xTF32 default, and half the registers (22nd session, sm_90 SASS), so it may be both exact and faster there."""
    device = torch.device(device)
    copy_gbps = copy_bandwidth_gbps() if device.type == "cuda" else None
    t_start = time.perf_counter()
    records = [] if records is None else records
    for shape in shapes:
        for kernel, mode in kernels:
            if time.perf_counter() - t_start > budget_s:
                log(f"budget of {budget_s:.0f} s spent: stopping before {kernel}/{mode}/{shape_tag(shape)}")
                return records
            call, nbytes = kernel_case(kernel, mode, shape, device)
            ref = None
            per_sm = (None, *(k for k in programs_per_sm if k is not None)) if (kernel, mode) in REDUCING \
                else (None,)
            current = _utils.dot_precision(device)
            precs = (None, *dict.fromkeys(p for p in precisions if p != current)) if kernel != "coupling" \
                else (None,)  # the coupling kernel has no dot
            configs = []
            for prec in precs:
                with _at_precision(prec):  # the candidates around that precision's own default tile
                    configs += [(prec, bp, nw, k) for bp, nw in candidates(kernel, shape, num_warps, block_ps, mode)
                                for k in per_sm]
            for prec, bp, nw, k in configs:
                rec = dict(kernel=kernel, mode=mode, shape=list(shape), block_p=bp, num_warps=nw,
                           programs_per_sm=k, default=ref is None, bytes=nbytes)
                if prec:
                    rec["precision"] = prec
                override = _utils.launch_override(block_p=bp, num_warps=nw, programs_per_sm=k)
                with _at_precision(prec):
                    ref = _measure_candidate(rec, call, override, ref, device, rounds, iterations, copy_gbps)
                records.append(rec)
                if ref is None:  # the default config failed: nothing to compare with
                    break
                log(json.dumps(rec))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (kernel, mode, shape): the default record and the fastest matching record."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["mode"], tuple(r["shape"])), []).append(r)
    rows = []
    for (kernel, mode, shape), recs in groups.items():
        default = next((r for r in recs if r["default"]), None)
        ok = [r for r in recs if r.get("match") and "us" in r]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        rows.append(dict(kernel=kernel, mode=mode, shape=list(shape), default=default, best=best,
                         mismatches=[r for r in recs if not r.get("match")]))
    return rows


def config_text(r: dict) -> str:
    """A record's launch configuration: (BLOCK_P, warps[, programs/SM]) of a flow kernel, or the tile of a coupling
    network kernel, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) or (BLOCK_M, BLOCK_CI, BLOCK_CO, warps, stages)."""
    if "tile" in r:
        flat = "" if "flat_k" not in r else (", flat K" if r["flat_k"] else ", tap-major K")
        return "(" + ", ".join(map(str, r["tile"])) + flat + ")"
    per_sm = f", {r['programs_per_sm']}/SM" if r.get("programs_per_sm") else ""
    prec = f", {r['precision']}" if r.get("precision") else ""
    return f"({r['block_p']}, {r['num_warps']}{per_sm}{prec})"


def markdown(records: list[dict], device_name: str) -> str:
    lines = [f"# Block-size sweep of the fused kernels ({device_name})", "",
             "Default = the current rule; best = the fastest candidate whose outputs match the default's. "
             "GB/s = compulsory bytes / median time; frac = of the measured device-to-device copy bandwidth. "
             "Configurations: (BLOCK_P, warps[, programs/SM][, dot precision]) for the flow kernels; for the "
             "coupling network's (coupling_net/*) (BLOCK_M, BLOCK_N, BLOCK_K, warps, pipeline stages) and, for its "
             "weight gradients, (BLOCK_M, BLOCK_CI, BLOCK_CO, warps, stages).", "",
             "| kernel | shape | default | µs | GB/s | frac | best | µs | GB/s | frac | speed-up |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]

    def cells(r):
        if r is None or "us" not in r:
            return ["-", "-", "-", "-"]
        return [config_text(r), f"{r['us']:.1f}", f"{r['GBps']:.0f}",
                f"{r['fraction_of_copy_bw']:.2f}" if "fraction_of_copy_bw" in r else "-"]

    bad = []
    for row in summarize(records):
        d, b = row["default"], row["best"]
        speed = f"{d['us'] / b['us']:.2f}x" if d and b and "us" in d else "-"
        lines.append("| " + " | ".join([f"{row['kernel']}/{row['mode']}", shape_tag(row["shape"]), *cells(d),
                                        *cells(b), speed]) + " |")
        bad += row["mismatches"]
    if bad:
        lines += ["", "Candidates that failed or did not match the default's outputs:", ""]
        for r in bad:
            why = r.get("error") or f"max rel diff {r['max_rel_diff']:.2e}"
            lines.append(f"- {r['kernel']}/{r['mode']} {shape_tag(r['shape'])} {config_text(r)}: {why}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ the coupling networks' kernels
# Launches of glowfast.kernels.coupling_net at a flow level's shape (B, C, H, W): the network reads C_a = C // 2
# channels and writes 2 C_b, with NETWORK_HIDDEN hidden channels. conv_in = conv1's forward (thin input: C_a ->
# hidden, bias + ReLU), conv_out = conv3's forward (thin output: hidden -> 2 C_b, bias + scale); their input
# gradients run the same kernel at the mirrored channel counts. wgrad_in / wgrad_out = the two weight gradients.
NETWORK_LAUNCHES = ("conv_in", "conv_out", "wgrad_in", "wgrad_out")
NETWORK_HIDDEN = 512
# second phase of the network sweep: the fastest tiles of the first (all at one stage) at deeper pipelines
NETWORK_STAGES = (2, 3, 4)
NETWORK_STAGE_TOP = 3


def network_channels(launch: str, shape, hidden: int = NETWORK_HIDDEN) -> tuple[int, int]:
    """(cin, cout) of a network launch at a flow level's shape."""
    _, c, _, _ = shape
    thin_in, thin_out = c // 2, 2 * (c - c // 2)
    return (thin_in, hidden) if launch.endswith("_in") else (hidden, thin_out)


def network_candidates(launch: str, shape, hidden: int = NETWORK_HIDDEN) -> list[tuple[int, int, int, int, int]]:
    """The wrapper's tile first, then variations of the dimensions that matter for the launch (tiles of up to 16K
    elements for the conv's (BLOCK_M, BLOCK_N) and its (BLOCK_M, BLOCK_K) input tile, 4K for the weight gradient's
    accumulator), on 4 and 8 warps, one pipeline stage."""
    from .coupling_net import conv_tile, uses_flat_wgrad, wgrad_tile

    b, _, h, w = shape
    cin, cout = network_channels(launch, shape, hidden)
    if launch.startswith("conv"):
        default = conv_tile(cin, cout, b * h * w)
        _, bn0, bk0, _, _ = default
        if launch == "conv_in":  # many output channels: the pixel x channel output tile
            grid = [(bm, bn, bk0) for bm in (32, 64, 128) for bn in (64, 128, 256) if bm * bn <= 16384]
        else:  # few output channels: the pixel x K input tile
            grid = [(bm, bn0, bk) for bm in (64, 128, 256) for bk in (16, 32, 64) if bm * bk <= 16384]
    else:
        default = wgrad_tile(cin, cout, b * h * w, uses_flat_wgrad(cin))  # flat: BLOCK_CI counts (channel, tap)s
        _, bci0, bco0, _, _ = default
        if launch == "wgrad_in":  # the wide side is the output channels
            grid = [(bm, bci0, bco) for bm in (16, 32, 64) for bco in (16, 32, 64, 128, 256) if bci0 * bco <= 4096]
        else:
            grid = [(bm, bci, bco0) for bm in (16, 32, 64) for bci in (16, 32, 64, 128) if bci * bco0 <= 4096]
    out = [default]
    out += [(*t, nw, 1) for t in grid for nw in NUM_WARPS if (*t, nw, 1) not in out]
    return out


def flat_k_candidate(timed: list[dict], launch: str, shape, hidden: int = NETWORK_HIDDEN) -> list[tuple[tuple, bool]]:
    """The before/after of the K-order rules. A conv: its fastest matching tile so far with the order `uses_flat_k`
    does not pick. A weight gradient that runs flat (`uses_flat_wgrad`): the tap-by-tap kernel at its own default
    tile (its columns are channels, not (channel, tap) pairs, so the flat tile would not compare)."""
    from .coupling_net import uses_flat_k, uses_flat_wgrad, wgrad_tile

    ok = [r for r in timed if r.get("match") and "us" in r]
    if not ok:
        return []
    b, _, h, w = shape
    cin, cout = network_channels(launch, shape, hidden)
    if launch.startswith("conv"):
        best = min(ok, key=lambda r: r["us"])
        return [(tuple(best["tile"]), not uses_flat_k(cin, best["tile"][2]))]
    return [(wgrad_tile(cin, cout, b * h * w, flat=False), False)] if uses_flat_wgrad(cin) else []


def stage_candidates(timed: list[dict], tried) -> list[tuple[int, int, int, int, int]]:
    """The second phase's tiles: the `NETWORK_STAGE_TOP` fastest matching records of the first, each at every
    depth of `NETWORK_STAGES` not tried already."""
    fastest = sorted((r for r in timed if r.get("match") and "us" in r), key=lambda r: r["us"])[:NETWORK_STAGE_TOP]
    out = []
    for r in fastest:
        for ns in NETWORK_STAGES:
            tile = (*r["tile"][:4], ns)
            if tile not in tried and tile not in out:
                out.append(tile)
    return out


def network_case(launch: str, shape, device, hidden: int = NETWORK_HIDDEN) -> tuple[Callable[[], object], int]:
    """(call, bytes moved) for one network kernel launch on fixed random inputs (a fresh output each call)."""
    from .coupling_net import (
        _nchw_strides,
        _rows_strides,
        conv3x3,
        conv3x3_weight_grad,
        network_precision,
        pack_weight,
    )

    b, _, h, w = shape
    cin, cout = network_channels(launch, shape, hidden)
    m = b * h * w
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device)

    prec = network_precision(torch.device(device))
    rows = _rows_strides(h * w, hidden)
    geometry = (b, h, w, cin, cout)
    if launch == "conv_in":
        x, wp, bias = randn(b, cin, h, w), pack_weight(randn(cout, cin, 3, 3, scale=0.1)), randn(cout)
        return (lambda: conv3x3(x, _nchw_strides(x), wp, torch.empty(m, cout, device=device), rows, geometry,
                                bias=bias, relu=True, precision=prec)), 4 * (x.numel() + m * cout)
    if launch == "conv_out":
        hid, wp = randn(m, cin).relu(), pack_weight(randn(cout, cin, 3, 3, scale=0.05))
        bias, scale = randn(cout), randn(cout).exp()

        def call():
            out = torch.empty(b, cout, h, w, device=device)
            return conv3x3(hid, rows, wp, out, _nchw_strides(out), geometry, bias=bias, scale=scale, precision=prec)

        return call, 4 * (hid.numel() + m * cout)
    if launch == "wgrad_in":
        x, dout = randn(b, cin, h, w), randn(m, cout)
        return (lambda: conv3x3_weight_grad(x, _nchw_strides(x), dout, rows, geometry, precision=prec)), \
            4 * (x.numel() + dout.numel())
    hid, dout = randn(m, cin).relu(), randn(b, cout, h, w)
    return (lambda: conv3x3_weight_grad(hid, rows, dout, _nchw_strides(dout), geometry, precision=prec)), \
        4 * (hid.numel() + dout.numel())


def sweep_networks(shapes, launches=NETWORK_LAUNCHES, *, device="cuda", budget_s: float = 480.0, rounds: int = 7,
                   iterations: int = 10, hidden: int = NETWORK_HIDDEN, log=print,
                   records: list[dict] | None = None) -> list[dict]:
    """`sweep` for the coupling network's kernels: every candidate tile of `network_candidates` under
    `coupling_net.tile_override`, its outputs compared with the default tile's, then timed (CUDA-graph replays);
    then the fastest at deeper pipelines (`stage_candidates`)."""
    from .coupling_net import tile_override

    device = torch.device(device)
    copy_gbps = copy_bandwidth_gbps() if device.type == "cuda" else None
    t_start = time.perf_counter()
    records = [] if records is None else records
    for shape in shapes:
        for launch in launches:
            if time.perf_counter() - t_start > budget_s:
                log(f"budget of {budget_s:.0f} s spent: stopping before coupling_net/{launch}/{shape_tag(shape)}")
                return records
            call, nbytes = network_case(launch, shape, device, hidden)
            ref = None
            case = []
            conv = launch.startswith("conv")
            for phase in (1, 2, 3):
                if phase == 1:
                    configs = [(t, None) for t in network_candidates(launch, shape, hidden)]
                elif phase == 2:
                    configs = [(t, None) for t in stage_candidates(case, {tuple(r["tile"]) for r in case})]
                else:  # the other K order (`coupling_net.uses_flat_k`, `uses_flat_wgrad`)
                    configs = flat_k_candidate(case, launch, shape, hidden)
                for tile, flat_k in configs:
                    rec = dict(kernel="coupling_net", mode=launch, shape=list(shape), tile=list(tile),
                               default=ref is None, bytes=nbytes)
                    if flat_k is not None:
                        rec["flat_k"] = flat_k
                    override = tile_override(**{"conv" if conv else "wgrad": tile}, flat_k=flat_k)
                    ref = _measure_candidate(rec, call, override, ref, device, rounds, iterations, copy_gbps)
                    records.append(rec)
                    case.append(rec)
                    if ref is None:
                        break
                    log(json.dumps(rec))
                if ref is None:
                    break
    return records


def _parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        dims = tuple(int(v) for v in item.lower().split("x"))
        if len(dims) != 4:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxCxHxW")
        shapes.append(dims)
    return shapes


def main(argv: list[str] | None = None) -> int:
    summary = __doc__.split("\n\n")[0].rstrip(":") + "."  # the docstring's first line introduces an example
    ap = argparse.ArgumentParser(prog="python -m glowfast.kernels.tune", description=summary)
    ap.add_argument("--out", default="tune_out", help="folder for tune.json and tune.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", type=_parse_shapes, default=None,
                    help="BxCxHxW,... (default: the bandwidth shapes, then CIFAR-10's at batch 256)")
    ap.add_argument("--kernels", default=None, help="kernel/mode,... e.g. cross_step/bwd (default: all); with "
                                                    "--networks: launches, e.g. conv_in,wgrad_out")
    ap.add_argument("--networks", action="store_true",
                    help="sweep the coupling network's kernels (glowfast.kernels.coupling_net, --triton-networks) "
                         "instead of the flow's; shapes are flow levels (default: CIFAR-10's at batch 256)")
    ap.add_argument("--hidden", type=int, default=NETWORK_HIDDEN, help="--networks: hidden channels (default 512)")
    ap.add_argument("--block-p", default=None, help="BLOCK_P candidates, e.g. 64,128 (default: around the rule)")
    ap.add_argument("--num-warps", default="4,8")
    ap.add_argument("--programs-per-sm", default="",
                    help="also try these programs per SM for the reducing backward kernels, e.g. 2,8 (default rule: 4)")
    ap.add_argument("--precisions", default="",
                    help="also try these dot precisions for the kernels with a dot, e.g. ieee (default: the current "
                         "one only; a candidate's outputs must still match the default's within MATCH_RTOL)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds; no new case starts after this")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=10)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a functional run)")
    kernels = NETWORK_LAUNCHES if args.networks else KERNELS
    if args.kernels:
        kernels = tuple(args.kernels.split(",")) if args.networks else \
            tuple(tuple(k.split("/")) for k in args.kernels.split(","))
        known = NETWORK_LAUNCHES if args.networks else KERNELS
        unknown = [k for k in kernels if k not in known]
        if unknown:
            names = list(known) if args.networks else ['/'.join(k) for k in KERNELS]
            ap.error(f"unknown kernel/mode {unknown}; choose from {names}")
    shapes = args.shapes or ([*CIFAR_SHAPES] if args.networks else [*BANDWIDTH_SHAPES, *CIFAR_SHAPES])
    block_ps = [int(v) for v in args.block_p.split(",")] if args.block_p else None
    num_warps = tuple(int(v) for v in args.num_warps.split(","))
    programs_per_sm = tuple(int(v) for v in args.programs_per_sm.split(",") if v)
    precisions = tuple(v for v in args.precisions.split(",") if v)
    bad = [p for p in precisions if p not in _utils._DOT_PRECISIONS]
    if bad:
        ap.error(f"unknown dot precision {bad}; choose from {list(_utils._DOT_PRECISIONS)}")
    records: list[dict] = []
    try:
        if args.networks:
            sweep_networks(shapes, kernels, device=device, budget_s=args.budget, rounds=args.rounds,
                           iterations=args.iterations, hidden=args.hidden, records=records)
        else:
            sweep(shapes, kernels, device=device, budget_s=args.budget, rounds=args.rounds,
                  iterations=args.iterations, num_warps=num_warps, block_ps=block_ps,
                  programs_per_sm=programs_per_sm, precisions=precisions, records=records)
    except KeyboardInterrupt:  # a time limit's SIGINT: write what finished
        print(f"interrupted: writing the {len(records)} records measured so far")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                dot_precision=_utils.dot_precision(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (out / "tune.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    (out / "tune.md").write_text(markdown(records, name))
    print((out / "tune.md").read_text())
    # failure: a candidate whose outputs differ, or a default tile that fails; a larger candidate tile that runs
    # out of resources is only recorded
    failed = [r for r in records if ("max_rel_diff" in r and not r["match"]) or (r["default"] and "error" in r)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
