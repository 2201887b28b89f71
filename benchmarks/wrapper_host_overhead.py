"""Host time of the fused kernels' launch wrappers, without the kernels (CPU; no GPU needed).

On the GPU the fused per-op times did not depend on the batch size (~80-100 us per forward launch on an H200,
benchmarks/RESULTS.md): the wrappers' host work, not the kernels, set them. This script times that host work
here: each wrapper at the CIFAR-10 level shapes, with the Triton interpreter's launches made compile-only
(`glowfast.kernels.precompile.precompiling()`, where the interpreter's warmup is a no-op), so what remains is the
Python checks, tile and grid arithmetic, output allocations and the partial-sum reductions. It leaves out
Triton's own launch path and the CUDA launch costs of the allocations and reductions, which only a GPU measures.

    TRITON_INTERPRET=1 python benchmarks/wrapper_host_overhead.py     # min over 7 repetitions of 300 calls
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from bench_batched_lu import _min_mean_us  # noqa: E402  (run as a script: benchmarks/ is on sys.path)

from glowfast.kernels import (  # noqa: E402
    actnorm_invconv_backward,
    actnorm_invconv_forward,
    coupling_backward,
    coupling_forward,
    cross_step_backward,
    cross_step_forward,
)
from glowfast.kernels.precompile import precompiling  # noqa: E402


def cases(c: int, s: int) -> dict:
    """Each wrapper's call at batch 64, c channels, s x s pixels."""
    z, h, g = (torch.randn(64, c, s, s) for _ in range(3))
    b, ls, w, dld = torch.zeros(c), torch.zeros(c), torch.eye(c), torch.ones(64)
    return {
        "actnorm_invconv_forward": lambda: actnorm_invconv_forward(z, b, ls, w),
        "actnorm_invconv_backward": lambda: actnorm_invconv_backward(z, g, b, ls, w),
        "coupling_forward": lambda: coupling_forward(z, h, True),
        "coupling_backward": lambda: coupling_backward(z, h, g, dld, True),
        "cross_step_forward": lambda: cross_step_forward(z, h, b, ls, w, True),
        "cross_step_backward": lambda: cross_step_backward(z, h, g, dld, b, ls, w, True),
    }


def main() -> None:
    torch.set_num_threads(1)
    print("| wrapper | B64 C12 16x16 | B64 C24 8x8 | B64 C48 4x4 |")
    print("| --- | ---: | ---: | ---: |")
    rows: dict[str, list[float]] = {}
    for c, s in ((12, 16), (24, 8), (48, 4)):
        with precompiling(max_workers=1):
            for name, fn in cases(c, s).items():
                rows.setdefault(name, []).append(_min_mean_us(fn, calls=300, repeats=7))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f} µs" for v in values) + " |")


if __name__ == "__main__":
    main()
