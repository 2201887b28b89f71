"""Batched LU log-determinants / inverses (glowfast.ops) against torch.linalg, CPU always and CUDA when present.

Sets
- cifar96: the 96 weights of the CIFAR-10 Glow's invertible 1x1 convolutions (32 each of 12x12, 24x24, 48x48),
  float32, as a list (what the model passes).
- batch4096x48: one (4096, 48, 48) float32 tensor.
Implementations (extra_info["impl"]; variant names as benchmarks/report.py knows them)
- loop (variant "reference"): torch.linalg.slogdet / inv per matrix in a Python loop.
- grouped (variant "peer"): torch.linalg.* once per distinct size on a stacked batch (one call for the batch).
- glowfast (variant "fused"): glowfast.ops.batched_slogdet / batched_inverse, one op call for all.
- packed (variant "packed"): the same op call on a glowfast.ops.PackedMatrices (the matrices already in one
  flat buffer, validated once at construction; gradients go to its one leaf `.data`): the list's per-call
  validation, cat and per-matrix autograd nodes are gone. report.py lists it in the detail table, where its
  "fused speed-up" is t_packed / t_fused (< 1: packed is faster than the list API).
- packed_shared (variant "packed_shared_kernels", CUDA only): packed with GLOWFAST_LU_CUDA_KERNELS=shared, the
  shared-memory kernels instead of the register kernels that serve n <= 64 by default (csrc/cuda).
Modes: slogdet fwd, slogdet fwdbwd (backward of sum(logabsdet) to every matrix), inverse fwd.
Group names: `batched_lu/<op>-<mode>/<set>`. CUDA rounds are synchronised (cuda_timer in conftest.py).
CPU: few rounds (the 4096-matrix loop is ~0.1 s per call here).

Host overhead by hand (benchmarks/RESULTS.md, "Host-side overhead"): `python benchmarks/bench_batched_lu.py`
times list vs packed API on 96 matrices of 1x1 (no arithmetic: pure host overhead) and on the CIFAR-96 set,
1 CPU thread, min over repetitions of the mean of many calls.
"""

from __future__ import annotations

import pytest
import torch

from glowfast.ops import PackedMatrices, batched_inverse, batched_slogdet

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))]
IMPLS = {"loop": "reference", "grouped": "peer", "glowfast": "fused", "packed": "packed",
         "packed_shared": "packed_shared_kernels"}
PACKED = ("packed", "packed_shared")
TIMING = {
    ("cpu", "cifar96"): dict(n_rounds=10, warmup=2, iterations=5),
    ("cpu", "batch4096x48"): dict(n_rounds=3, warmup=1, iterations=1),
    ("cuda", "cifar96"): dict(n_rounds=20, warmup=5, iterations=50),
    ("cuda", "batch4096x48"): dict(n_rounds=20, warmup=3, iterations=10),
}


def _matrices(which: str, device: str):
    gen = torch.Generator().manual_seed(0)

    def well_conditioned(*shape):
        n = shape[-1]
        return torch.randn(*shape, generator=gen) / n**0.5 + torch.eye(n)

    if which == "cifar96":
        return [well_conditioned(n, n).to(device) for n in [12] * 32 + [24] * 32 + [48] * 32]
    return well_conditioned(4096, 48, 48).to(device)


def _groups(mats):
    if isinstance(mats, torch.Tensor):
        return [mats]
    by_size: dict[int, list[torch.Tensor]] = {}
    for m in mats:
        by_size.setdefault(m.shape[0], []).append(m)
    return [torch.stack(g) for g in by_size.values()]


def _slogdet(impl: str, mats):
    if impl in ("glowfast", *PACKED):
        return batched_slogdet(mats)[1]
    if impl == "loop":
        return torch.stack([torch.linalg.slogdet(m)[1] for m in mats])
    return torch.cat([torch.linalg.slogdet(g)[1] for g in _groups(mats)])


def _inverse(impl: str, mats):
    if impl in ("glowfast", *PACKED):
        return batched_inverse(mats)
    if impl == "loop":
        return [torch.linalg.inv(m) for m in mats]
    return [torch.linalg.inv(g) for g in _groups(mats)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("which", ["cifar96", "batch4096x48"])
@pytest.mark.parametrize("mode", ["slogdet-fwd", "slogdet-fwdbwd", "inverse-fwd"])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_lu(cuda_timer, monkeypatch, device, mode, which, impl):
    if impl == "packed_shared":
        if device != "cuda":
            pytest.skip("packed_shared picks the CUDA op's shared-memory kernels: CUDA only")
        monkeypatch.setenv("GLOWFAST_LU_CUDA_KERNELS", "shared")  # read at each launch (and at graph capture)
    benchmark = cuda_timer.benchmark
    benchmark.group = f"batched_lu/{mode}/{which}"
    mats = _matrices(which, device)
    inputs = PackedMatrices.from_list(mats) if impl in PACKED else mats
    if mode == "slogdet-fwd":

        def fn():
            with torch.no_grad():
                return _slogdet(impl, inputs)
    elif mode == "inverse-fwd":

        def fn():
            with torch.no_grad():
                return _inverse(impl, inputs)
    else:
        if impl in PACKED:
            leaves = [inputs.data.requires_grad_()]  # the one leaf of all 96 (or 4096) matrices
        elif isinstance(mats, torch.Tensor):
            leaves = [mats.requires_grad_()]
        else:
            leaves = [m.requires_grad_() for m in mats]

        def fn():
            # Gradients go straight to `leaves` (no .grad accumulation): the backward itself is timed.
            return torch.autograd.grad(_slogdet(impl, inputs).sum(), leaves)

    if mode.startswith("slogdet"):  # all implementations agree before anything is timed
        with torch.no_grad():
            ref = torch.cat([torch.linalg.slogdet(g.double())[1] for g in _groups(mats)])
            torch.testing.assert_close(_slogdet(impl, inputs).double(), ref, rtol=1e-2, atol=1e-2)
    timing = TIMING[(device, which)]
    if device == "cuda" and impl == "loop":
        # one torch call per matrix (and, for inv, a host sync each): ~15-30 ms per call for the 96-matrix set,
        # ~0.5 s for 4096; a few rounds say enough (the default 20 x 50 would take a GPU session's minute)
        timing = dict(n_rounds=5, warmup=2, iterations=3, event_check=False) if which == "cifar96" else \
            dict(n_rounds=3, warmup=1, iterations=1, event_check=False)
    cuda_timer(fn, device=device, variant=IMPLS[impl], impl=impl, set=which, mode=mode, **timing)
    if device == "cuda" and impl in ("glowfast", *PACKED) and which == "cifar96":
        # Device time too: the call replayed from a CUDA graph, without the host's Python, dispatcher and autograd
        # work, which set the eager time of these 96 small matrices on the H200 (RESULTS.md); report.py grades
        # issue 3's 30 / 80 us on both
        cuda_timer.device_time(fn, rounds=timing["n_rounds"], iterations=timing["iterations"])


# ------------------------------------------------------------------------------------------------ by hand
def _min_mean_us(fn, calls: int, repeats: int) -> float:
    """min over `repeats` of the mean time of `calls` back-to-back calls, in µs (after `calls` warm-up calls)."""
    import time

    for _ in range(calls):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def _time_api(call, inp, leaves, calls: int, repeats: int) -> tuple[float, float, float]:
    """(fwd no_grad, fwd with grad, fwd+bwd) µs of `call(inp)` -> logabsdet, gradients into `leaves`."""
    for t in leaves:
        t.requires_grad_(False)

    def fwd_nograd():
        with torch.no_grad():
            return call(inp)

    def fwdbwd():
        for t in leaves:
            t.grad = None
        call(inp).sum().backward()

    t_nograd = _min_mean_us(fwd_nograd, calls, repeats)
    for t in leaves:
        t.requires_grad_(True)
    t_fwd = _min_mean_us(lambda: call(inp), calls, repeats)
    t_fwdbwd = _min_mean_us(fwdbwd, calls, repeats)
    for t in leaves:
        t.requires_grad_(False)
        t.grad = None
    return t_nograd, t_fwd, t_fwdbwd


def _op_only(packed: PackedMatrices):
    """torch.ops.glowfast.lu_factor_packed with index tensors built once: no wrapper, no status read."""
    offsets = torch.tensor(packed.offsets, dtype=torch.int64)
    sizes = torch.tensor(packed.sizes, dtype=torch.int64)
    max_n = max(packed.sizes)
    return lambda x: torch.ops.glowfast.lu_factor_packed(x, offsets, sizes, max_n)[3]


def host_overhead(calls: int = 400, repeats: int = 7) -> list[tuple[str, str, float, float, float]]:
    """(set, api, fwd no_grad µs, fwd with grad µs, fwd+bwd µs) on CPU, 1 thread, float32.

    fwd+bwd = `batched_slogdet(x)[1].sum().backward()` into `.grad` (reset to None before each call, as
    `optimizer.zero_grad(set_to_none=True)` leaves it): the 96 list leaves each get an AccumulateGrad node,
    the packed buffer one. "op only" calls torch.ops.glowfast.lu_factor_packed directly with precomputed
    index tensors (no wrapper, no status read): the floor of one dispatched op with autograd.
    """
    torch.set_num_threads(1)
    sets = {"96 x 1x1": [1] * 96, "cifar96": [12] * 32 + [24] * 32 + [48] * 32}
    rows = []
    for name, sizes in sets.items():
        gen = torch.Generator().manual_seed(0)
        mats = [torch.randn(n, n, generator=gen) / n**0.5 + torch.eye(n) for n in sizes]
        packed = PackedMatrices.from_list(mats)
        n_calls = calls if max(sizes) == 1 else max(20, calls // 8)
        apis = {
            "list": (lambda x: batched_slogdet(x)[1], mats, mats),
            "packed": (lambda x: batched_slogdet(x)[1], packed, [packed.data]),
            "packed, check=False": (lambda x: batched_slogdet(x, check=False)[1], packed, [packed.data]),
            "op only (floor)": (_op_only(packed), packed.data, [packed.data]),
        }
        for api, (call, inp, leaves) in apis.items():
            rows.append((name, api, *_time_api(call, inp, leaves, n_calls, repeats)))
    return rows


if __name__ == "__main__":
    import platform

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, float32")
    print("| set | API | fwd, no_grad | fwd, inputs require grad | fwd+bwd (.backward() into .grad) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, api, a, b, c in host_overhead():
        print(f"| {name} | {api} | {a:.1f} µs | {b:.1f} µs | {c:.1f} µs |")
