"""The Triton kernels (under the interpreter) and the C++ CPU LU op never touch memory outside their tensors.

The interpreter reads and writes tensors through their raw addresses, so an unmasked out-of-bounds access does
not fail on its own: it reads or overwrites a neighbour. Here the kernel and LU test files run again in a child
pytest with tests/guard_pages/guard_malloc.c preloaded: every torch CPU allocation then ends (or starts) exactly
at an inaccessible page, so one element past the end (or before the start) is a segfault. This is the CPU's
counterpart of compute-sanitizer memcheck (benchmarks/gpu_check_kernels.sh, which still has to run on a GPU).
The planted-bug test shows the fence catches an off-by-one mask in a Triton kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "guard_pages" / "guard_malloc.c"
SIGSEGV = -11

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("gcc") is None,
                       reason="needs Linux and gcc (LD_PRELOAD allocator)"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run on CUDA memory: compute-sanitizer"),
]


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    so = tmp_path_factory.mktemp("guard") / "guard_malloc.so"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(so), str(SHIM), "-ldl",
                        "-lpthread"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return so


def guarded(shim: Path, align: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=str(shim), GUARD_ALIGN=align, TRITON_INTERPRET="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


PLANTED = textwrap.dedent("""
    import sys, torch, triton, triton.language as tl

    @triton.jit
    def copy(x_ptr, y_ptr, n, SHIFT: tl.constexpr, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK) + SHIFT
        mask = (offs >= SHIFT) & (offs < n + EXTRA)   # EXTRA = 1: the classic off-by-one
        tl.store(y_ptr + offs - SHIFT, tl.load(x_ptr + offs, mask=mask), mask=offs - SHIFT < n)

    shift, extra = int(sys.argv[1]), int(sys.argv[2])
    x = torch.arange(37, dtype=torch.float32)
    y = torch.empty(37)
    copy[(1,)](x, y, 37, SHIFT=shift, EXTRA=extra, BLOCK=64)
    print("completed", bool((y[: 37 - extra] == x[: 37 - extra]).all()) if shift == 0 else "")
""")


@pytest.mark.parametrize("align, shift, extra, expect", [
    ("end", 0, 0, 0), ("end", 0, 1, SIGSEGV),          # one element past the end
    ("start", 0, 0, 0), ("start", -1, 0, SIGSEGV),     # one element before the start
])
def test_fence_catches_a_planted_out_of_bounds_load(shim, tmp_path, align, shift, extra, expect):
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    r = guarded(shim, align, [str(script), str(shift), str(extra)], timeout=120)
    assert r.returncode == expect, r.stdout + r.stderr[-2000:]
    if expect == 0:
        assert "completed" in r.stdout


KERNEL_TESTS = ["tests/test_kernel_actnorm_invconv.py", "tests/test_kernel_coupling.py",
                "tests/test_kernel_cross_step.py"]


@pytest.mark.parametrize("align, files", [
    ("end", KERNEL_TESTS + ["tests/test_kernel_bad_input.py", "tests/test_batched_lu.py"]),
    ("start", KERNEL_TESTS),
])
def test_kernels_stay_inside_their_tensors(shim, align, files):
    """Every kernel (forward, inverse, backward; all shapes of the equivalence tests: batch 1, odd H·W, C up to
    96, non-square) and the C++ LU op with guard pages after (end) or before (start) every tensor."""
    r = guarded(shim, align, ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", *files])
    assert r.returncode == 0, (f"rc {r.returncode} (-11: an access outside a tensor)\n"
                               + r.stdout[-3000:] + r.stderr[-3000:])
    assert " passed" in r.stdout
