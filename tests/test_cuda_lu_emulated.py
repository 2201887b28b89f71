"""The CUDA batched-LU kernels (csrc/cuda/batched_lu_kernels.cu) run on the CPU under an emulated CUDA runtime
(tests/cuda_emulator/cuda_runtime.h: one host thread per CUDA thread, real barriers and warp shuffles, shared
memory of exactly the launch's size), compared with torch.linalg in float64 and with the C++ CPU op.

Why: CI has no GPU, and without this the CUDA kernels' logic — the warp argmax, the row/column tiling, the
shared-memory and global-memory paths, the status codes — would first run on a lent GPU. The same source file
is compiled three ways: plain, with AddressSanitizer + UBSan (out-of-bounds reads and writes of global and
shared memory: what compute-sanitizer memcheck checks on a GPU) and with ThreadSanitizer (a missing
__syncthreads between threads that share data is a data race here). What it cannot check: warp lock-step
behaviour, and anything timing- or hardware-specific — so the GPU tests (tests/test_batched_lu.py on CUDA, and
benchmarks/gpu_check_lu.sh under compute-sanitizer) still have to run on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "batched_lu_kernels.cu"
EMULATOR = Path(__file__).resolve().parent / "cuda_emulator"
H100_SMEM = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
OK, SINGULAR, NONFINITE, BAD_LAYOUT = 0, 1, 2, 3
FACTOR, INVERSE, INVERSE_BACKWARD = 0, 1, 2
SANITIZERS = {
    "plain": ["-O2"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"],
    "tsan": ["-O1", "-fsanitize=thread"],
}

# one pytest-xdist worker for this module (--dist loadgroup): each emulated driver is a g++ build of ~10 s
pytestmark = [pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found"),
              pytest.mark.xdist_group("cuda_lu_emulated")]


def emulated_source(cu: str) -> str:
    """The .cu file as plain C++ for the emulator: `k<<<g, b, s, st>>>(args)` -> `emu::launch(k, g, b, s, st,
    args)`, and dynamic shared memory from the emulated block."""
    out, launches = re.subn(r"(\w+<T(?:, \d+)?>)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", cu, flags=re.S)
    out, smem = re.subn(r"extern __shared__[^;]*?(\w+)\[\];", r"unsigned char* \1 = emu::dynamic_smem();", out)
    assert launches == 7 and smem == 5, f"the kernel source changed shape: {launches} launches, {smem} smem"
    return out


def build_driver(cu_source: str, kind: str, directory: Path) -> Path:
    """Compiles the kernels (as emulated C++) with tests/cuda_emulator/lu_driver.cpp into an executable."""
    tu = directory / "tu.cpp"
    tu.write_text(emulated_source(cu_source) + f'\n#include "{EMULATOR / "lu_driver.cpp"}"\n')
    exe = directory / "lu_driver"
    cmd = ["g++", "-std=c++20", "-g", "-pthread", *SANITIZERS[kind], f"-I{EMULATOR}", f"-I{KERNELS.parent}",
           str(tu), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and kind != "plain" and "cannot find" in r.stderr:
        pytest.skip(f"g++ has no {kind} runtime here")
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


_BUILT: dict[str, Path] = {}


def driver(kind: str, tmp_path_factory) -> Path:
    if kind not in _BUILT:
        _BUILT[kind] = build_driver(KERNELS.read_text(), kind, tmp_path_factory.mktemp(f"cuda_emu_{kind}"))
    return _BUILT[kind]


@dataclass
class Result:
    error: int
    needs_workspace: bool
    arrays: dict[str, np.ndarray]


def run_emulated(exe: Path, op: int, mats: list[np.ndarray] | None = None, *, dtype=np.float64,
                 sizes: list[int] | None = None, offsets: list[int] | None = None, numel: int | None = None,
                 max_n: int | None = None, smem_limit: int = H100_SMEM, flags: int = 0,
                 extra: tuple[np.ndarray, ...] = (), packed: np.ndarray | None = None,
                 kernels: str | None = None) -> Result:
    """Packs `mats` (or takes a hand-made layout), runs one launcher in the emulator, unpacks its outputs.
    kernels: GLOWFAST_LU_CUDA_KERNELS for the launch ("shared": the shared-memory kernels even for max_n <= 64;
    None: the launchers' default, the register kernels there)."""
    if mats is not None:
        sizes = [m.shape[0] for m in mats]
        offsets = packed_offsets(sizes)
        packed = np.concatenate([m.astype(dtype).ravel() for m in mats]) if mats else np.zeros(0, dtype)
        numel = packed.size
    count = len(sizes)
    max_n = max_n if max_n is not None else max(sizes, default=1)
    header = np.array([op, np.dtype(dtype).itemsize, max_n, smem_limit, count, numel, flags, 0], np.int64)
    parts = [header, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), packed.astype(dtype), *extra]
    d = exe.parent
    req, resp = d / f"req{op}.bin", d / f"resp{op}.bin"
    req.write_bytes(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))
    env = {k: v for k, v in os.environ.items() if k != "GLOWFAST_LU_CUDA_KERNELS"}
    if kernels is not None:
        env["GLOWFAST_LU_CUDA_KERNELS"] = kernels
    r = subprocess.run([str(exe), str(req), str(resp)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "Sanitizer" not in r.stderr, f"emulated launch failed:\n{r.stderr[-6000:]}"
    raw = resp.read_bytes()
    status = np.frombuffer(raw[:16], np.int64)
    body, pos, arrays = raw[16:], 0, {}
    fields = ([("lu", dtype, numel), ("piv", np.int32, count * max_n), ("sign", dtype, count),
               ("logabsdet", dtype, count), ("info", np.int32, count)] if op == FACTOR else [("out", dtype, numel)])
    if status[0] == 0:
        for name, t, n in fields:
            nbytes = np.dtype(t).itemsize * n
            arrays[name] = np.frombuffer(body[pos:pos + nbytes], t).copy()
            pos += nbytes
        assert pos == len(body)
    return Result(int(status[0]), bool(status[1]), arrays)


def run_inverse(exe: Path, factors: dict[str, np.ndarray], sizes: list[int], *, dtype, smem_limit: int, flags: int,
                scale: np.ndarray | None = None, kernels: str | None = None) -> Result:
    """The inverse launcher on the outputs of a factor launch (flags: 1 transpose; scale given adds 2)."""
    extra = (factors["piv"],) + ((scale,) if scale is not None else ())
    return run_emulated(exe, INVERSE, None, sizes=sizes, offsets=packed_offsets(sizes), numel=factors["lu"].size,
                        max_n=max(sizes), packed=factors["lu"], dtype=dtype, smem_limit=smem_limit,
                        flags=flags | (2 if scale is not None else 0), extra=extra, kernels=kernels)


def packed_offsets(sizes: list[int]) -> list[int]:
    return [int(v) for v in np.cumsum([0] + [n * n for n in sizes[:-1]])] if sizes else []


# A hand-made layout over a 20-element buffer with max_n 4: (offset, size) per matrix. (0, 3) fits; (9, 0) is empty;
# (12, 5) exceeds max_n; (16, 2) ends exactly at the buffer's end; (-1, 1) has a negative offset; (11, 3) overlaps
# others but stays inside the buffer (allowed: the kernels check bounds, not overlap); (12, 3) ends one element
# past the buffer. The bad ones must give status 3 and touch nothing outside the buffer.
CORRUPT_LAYOUT = [(0, 3), (9, 0), (12, 5), (16, 2), (-1, 1), (11, 3), (12, 3)]
CORRUPT_LAYOUT_STATUS = [OK, BAD_LAYOUT, BAD_LAYOUT, OK, BAD_LAYOUT, OK, BAD_LAYOUT]


def run_corrupt_layout(exe: Path, op: int, rng: np.random.Generator) -> Result:
    extra = {FACTOR: (), INVERSE: (np.tile(np.arange(4, dtype=np.int32), (len(CORRUPT_LAYOUT), 1)),),
             INVERSE_BACKWARD: (rng.standard_normal(20),)}[op]
    return run_emulated(exe, op, None, sizes=[s for _, s in CORRUPT_LAYOUT], offsets=[o for o, _ in CORRUPT_LAYOUT],
                        numel=20, max_n=4, packed=rng.standard_normal(20) + 4 * np.eye(5).ravel()[:20], extra=extra)


def unpack(flat: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, pos = [], 0
    for n in sizes:
        out.append(flat[pos:pos + n * n].reshape(n, n))
        pos += n * n
    return out


def well_conditioned(n: int, rng: np.random.Generator) -> np.ndarray:
    """Q · diag(d) · Q' with d in ±[0.5, 2]: condition number <= 4, both signs of the determinant."""
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    return (q1 * d) @ q2


def needs_pivoting(n: int, rng: np.random.Generator) -> np.ndarray:
    """A well-conditioned matrix with zeros on the diagonal: every step must swap rows."""
    a = well_conditioned(n, rng)
    perm = np.roll(np.arange(n), 1)
    a = a[perm]
    a[np.arange(n), np.arange(n)] = 0.0
    return a + np.eye(n)[perm] * 3.0 if n > 1 else np.array([[2.0]])


def slogdet64(mats: list[np.ndarray], dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """numpy's (sign, log|det|) in float64 of each matrix as rounded to `dtype`."""
    sign, lad = zip(*(np.linalg.slogdet(m.astype(dtype).astype(np.float64)) for m in mats))
    return np.array(sign), np.array(lad)


def cpu_op_factor(mats: list[np.ndarray], dtype) -> tuple[torch.Tensor, ...]:
    import glowfast.ops  # noqa: F401  (registers torch.ops.glowfast)

    sizes = [m.shape[0] for m in mats]
    packed = torch.from_numpy(np.concatenate([m.astype(dtype).ravel() for m in mats]))
    offsets = torch.tensor(packed_offsets(sizes), dtype=torch.int64)
    return torch.ops.glowfast.lu_factor_packed(packed, offsets, torch.tensor(sizes, dtype=torch.int64), max(sizes))


def reconstruct(lu: np.ndarray, piv: np.ndarray) -> np.ndarray:
    """P^T L U from packed factors and LAPACK-style pivots (row k swapped with piv[k], in order)."""
    n = lu.shape[0]
    a = np.tril(lu, -1) + np.eye(n)
    a = a @ np.triu(lu)
    for k in reversed(range(n)):
        a[[k, piv[k]]] = a[[piv[k], k]]
    return a


# ---------------------------------------------------------------------------------------------------------------
# Factorisation and log-determinant
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, smem_limit", [(np.float64, H100_SMEM), (np.float32, H100_SMEM),
                                               (np.float64, 16 * 1024)], ids=["f64_h100", "f32_h100", "f64_16k"])
def test_factor_every_n_1_to_96_and_global_memory_path(tmp_path_factory, dtype, smem_limit):
    """Every n from 1 to 96 plus 130 and 200 (> 64: factored in global memory) in one ragged launch; with 16 KiB of
    shared memory the larger matrices of the shared-memory range fall back to the global-memory path too."""
    rng = np.random.default_rng(0)
    sizes = list(range(1, 97)) + [130, 200]
    mats = [needs_pivoting(n, rng) if n % 3 == 0 else well_conditioned(n, rng) for n in sizes]
    res = run_emulated(driver("plain", tmp_path_factory), FACTOR, mats, dtype=dtype, smem_limit=smem_limit)
    assert res.error == 0
    a = res.arrays
    assert (a["info"] == OK).all()
    ref_sign, ref_lad = slogdet64(mats, dtype)
    np.testing.assert_array_equal(a["sign"], ref_sign)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(a["logabsdet"], ref_lad, rtol=tol, atol=tol * np.maximum(1, np.abs(ref_lad)).max())
    piv = a["piv"].reshape(len(sizes), max(sizes))
    for b, (m, lu) in enumerate(zip(mats, unpack(a["lu"], sizes))):
        n = m.shape[0]
        assert (piv[b, n:] == np.arange(n, max(sizes))).all(), "pivots past n must be the identity"
        np.testing.assert_allclose(reconstruct(lu.astype(np.float64), piv[b, :n]), m.astype(dtype),
                                   atol=50 * np.finfo(dtype).eps * n, rtol=0)
    # Same algorithm as the C++ CPU op (partial pivoting, ties to the smallest row): same pivots, same factors
    lu_cpu, piv_cpu, sign_cpu, lad_cpu, info_cpu = cpu_op_factor(mats, dtype)
    np.testing.assert_array_equal(piv, piv_cpu.numpy())
    np.testing.assert_allclose(a["lu"], lu_cpu.numpy(), rtol=0, atol=1e3 * np.finfo(dtype).eps)
    np.testing.assert_array_equal(a["sign"], sign_cpu.numpy())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("top", [32, 64], ids=["nb32", "nb64"])
def test_register_kernels_do_the_shared_kernels_arithmetic(tmp_path_factory, dtype, top):
    """Every n from 1 to 32 (one warp per matrix) or to 64 (two warps), permutations, a zero column and small
    integers (ties between candidate pivots), in one launch of the register kernels: the factors, pivots and
    log-determinants of the shared-memory kernels bit for bit (the same operations on each element, only where
    the data lives differs), the C++ CPU op's pivots, and inverses (plain, transposed, scaled, one scale zero)
    against numpy."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(9)
    mats = [needs_pivoting(n, rng) if n % 3 == 0 else well_conditioned(n, rng) for n in range(1, top + 1)]
    mats += [np.eye(n)[rng.permutation(n)] for n in (top // 2, top)]
    singular = well_conditioned(top, rng)
    singular[:, top // 3] = 0.0
    mats += [singular, rng.integers(-2, 3, (top, top)).astype(np.float64)]  # the ties last
    sizes = [m.shape[0] for m in mats]
    ours = run_emulated(exe, FACTOR, mats, dtype=dtype).arrays
    theirs = run_emulated(exe, FACTOR, mats, dtype=dtype, kernels="shared").arrays
    for name in ("lu", "piv", "sign", "logabsdet", "info"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert (ours["info"][:-2] == OK).all() and ours["info"][-2] == SINGULAR
    piv = ours["piv"].reshape(len(mats), top)
    np.testing.assert_array_equal(piv[:-1], cpu_op_factor(mats[:-1], dtype)[1].numpy())
    ref_sign, ref_lad = slogdet64(mats[:-2], dtype)
    np.testing.assert_array_equal(ours["sign"][:-2], ref_sign)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(ours["logabsdet"][:-2], ref_lad, rtol=0, atol=tol * max(1, np.abs(ref_lad).max()))
    scale = rng.uniform(0.5, 2, len(mats)).astype(dtype)
    scale[1] = 0.0
    eps = np.finfo(dtype).eps
    for flags, sc in ((0, None), (1, None), (3, scale)):
        res = run_inverse(exe, ours, sizes, dtype=dtype, smem_limit=H100_SMEM, flags=flags, scale=sc)
        assert res.error == 0
        for b, (m, x) in enumerate(zip(mats, unpack(res.arrays["out"], sizes))):
            if sc is not None and sc[b] == 0:
                assert (x == 0).all()
            elif ours["info"][b] == SINGULAR:
                assert np.isnan(x).all()
            else:
                m64 = m.astype(dtype).astype(np.float64)
                ref = np.linalg.inv(m64)
                ref = ref.T if flags & 1 else ref
                ref = ref * np.float64(sc[b]) if sc is not None else ref
                bound = 50 * m.shape[0] * np.linalg.cond(m64) * eps * np.abs(ref).max()
                np.testing.assert_allclose(x, ref, rtol=0, atol=bound, err_msg=f"matrix {b}, flags {flags}")


@pytest.mark.parametrize("big", [70, 40], ids=["shared_kernels", "register_kernels"])
def test_factor_status_codes(tmp_path_factory, big):
    """Singular -> sign 0, -inf, status 1; non-finite input -> NaN, status 2, LU = the input; a corrupt layout
    (size 0, size > max_n, an offset past the buffer) -> NaN, status 3 and identity pivots, never a stray access."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(1)
    singular = well_conditioned(5, rng)
    singular[:, 2] = 0.0
    dup = well_conditioned(big, rng)
    dup[big - 30] = dup[3]  # singular by a repeated row (exactly: elimination gives a zero row); big = 70: the
    # shared-memory kernels (max_n > 64; this one in global memory), big = 40: the register kernels
    nonfinite = well_conditioned(4, rng)
    nonfinite[1, 3] = np.inf
    nan70 = well_conditioned(big, rng)
    nan70[big - 1, 0] = np.nan
    mats = [singular, dup, nonfinite, nan70, np.zeros((1, 1)), well_conditioned(3, rng)]
    a = run_emulated(exe, FACTOR, mats).arrays
    np.testing.assert_array_equal(a["info"], [SINGULAR, SINGULAR, NONFINITE, NONFINITE, SINGULAR, OK])
    np.testing.assert_array_equal(a["sign"][[0, 1, 4]], 0.0)
    assert np.isneginf(a["logabsdet"][[0, 1, 4]]).all()
    assert np.isnan(a["sign"][[2, 3]]).all() and np.isnan(a["logabsdet"][[2, 3]]).all()
    sizes = [m.shape[0] for m in mats]
    lus = unpack(a["lu"], sizes)
    np.testing.assert_array_equal(lus[2], nonfinite)
    np.testing.assert_array_equal(lus[3], nan70)
    np.testing.assert_allclose(a["logabsdet"][5], np.linalg.slogdet(mats[5])[1], rtol=1e-12)
    # finite float32 input whose elimination overflows (2e38 + 2e38): status 2 and NaN, as from the C++ CPU op
    # (the wrapper then names the overflow), not status 0 with log|det| = +inf
    a = run_emulated(exe, FACTOR, [np.array([[2e38, 2e38], [-2e38, 2e38]])], dtype=np.float32).arrays
    assert a["info"][0] == NONFINITE and np.isnan(a["sign"][0]) and np.isnan(a["logabsdet"][0])

    a = run_corrupt_layout(exe, FACTOR, rng).arrays
    np.testing.assert_array_equal(a["info"], CORRUPT_LAYOUT_STATUS)
    piv = a["piv"].reshape(len(CORRUPT_LAYOUT), 4)
    for b in (1, 2, 4, 6):
        assert np.isnan(a["sign"][b]) and np.isnan(a["logabsdet"][b])
        np.testing.assert_array_equal(piv[b], np.arange(4))


# ---------------------------------------------------------------------------------------------------------------
# Inverse from the factors, and the inverse's backward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("smem_limit", [H100_SMEM, 48 * 1024, 16 * 1024], ids=["h100_smem", "48k_smem", "16k_smem"])
def test_inverse_transpose_and_scale(tmp_path_factory, dtype, smem_limit):
    """inverse, inverse transposed and scaled per matrix (the logdet gradient g · W^-T), against numpy; a zero
    scale gives exact zeros. 48 KiB (no opt-in) shrinks the shared-memory tile for float64; 16 KiB forces most
    matrices onto the global-memory path."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(2)
    sizes = [1, 2, 7, 12, 24, 33, 48, 64, 65, 96, 150]
    mats = [needs_pivoting(n, rng) if i % 2 else well_conditioned(n, rng) for i, n in enumerate(sizes)]
    fac = run_emulated(exe, FACTOR, mats, dtype=dtype, smem_limit=smem_limit).arrays
    assert (fac["info"] == OK).all()
    tol = dict(rtol=0, atol=1e-11) if dtype == np.float64 else dict(rtol=0, atol=5e-5)
    scale = rng.uniform(-2, 2, len(sizes)).astype(dtype)
    scale[3] = 0.0
    for flags, sc in ((0, None), (1, None), (3, scale)):
        res = run_inverse(exe, fac, sizes, dtype=dtype, smem_limit=smem_limit, flags=flags, scale=sc)
        assert res.error == 0
        for b, (m, x) in enumerate(zip(mats, unpack(res.arrays["out"], sizes))):
            ref = np.linalg.inv(m.astype(dtype).astype(np.float64))
            ref = ref.T if flags & 1 else ref
            ref = ref * sc[b] if sc is not None else ref
            np.testing.assert_allclose(x, ref, **tol, err_msg=f"matrix {b} (n={m.shape[0]}, flags {flags})")
        if sc is not None:
            assert (unpack(res.arrays["out"], sizes)[3] == 0).all()


@pytest.mark.parametrize("big", [70, 40], ids=["shared_kernels", "register_kernels"])
def test_inverse_of_bad_factors_is_nan(tmp_path_factory, big):
    """Singular factors, non-finite factors and corrupt pivots (p < k or p >= n) -> all-NaN inverse."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(3)
    sizes = [4, 4, 4, 4, big]
    lus = [np.triu(well_conditioned(4, rng)) + np.eye(4) for _ in range(4)] + [np.eye(big) * 2.0]
    lus[0][2, 2] = 0.0
    lus[1][0, 3] = np.nan
    piv = np.tile(np.arange(big, dtype=np.int32), (5, 1))
    piv[2, 1] = 0  # p < k
    piv[3, 0] = 4  # p >= n
    res = run_emulated(exe, INVERSE, lus, extra=(piv,))
    outs = unpack(res.arrays["out"], sizes)
    for b in range(4):
        assert np.isnan(outs[b]).all(), f"matrix {b}"
    np.testing.assert_allclose(outs[4], np.eye(big) / 2.0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inverse_backward_with_and_without_workspace(tmp_path_factory, dtype):
    """out = -(X^T G X^T) per matrix, in shared memory (n <= 64) and with the caller's workspace (n > 64); the
    launcher reports that it needs the workspace and refuses (cudaErrorInvalidValue) to run without it."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(4)
    sizes = [1, 5, 12, 48, 64, 65, 100]
    xs = [rng.standard_normal((n, n)) for n in sizes]
    gs = [rng.standard_normal((n, n)) for n in sizes]
    flat_g = np.concatenate([g.astype(dtype).ravel() for g in gs])
    res = run_emulated(exe, INVERSE_BACKWARD, xs, dtype=dtype, flags=4, extra=(flat_g,))
    assert res.error == 0 and res.needs_workspace
    tol = 1e-10 if dtype == np.float64 else 1e-3
    for x, g, out in zip(xs, gs, unpack(res.arrays["out"], sizes)):
        x64, g64 = x.astype(dtype).astype(np.float64), g.astype(dtype).astype(np.float64)
        ref = -(x64.T @ g64 @ x64.T)
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
    refused = run_emulated(exe, INVERSE_BACKWARD, xs, dtype=dtype, flags=0, extra=(flat_g,))
    assert refused.error == 1  # cudaErrorInvalidValue
    small = run_emulated(exe, INVERSE_BACKWARD, xs[:5], dtype=dtype, flags=0,
                         extra=(np.concatenate([g.astype(dtype).ravel() for g in gs[:5]]),))
    assert small.error == 0 and not small.needs_workspace


def test_matrices_wider_than_the_block(tmp_path_factory):
    """n = 257 and 300 > 256 threads: each thread owns more than one column of a row (the tiling's column
    stride), in global memory; factor, inverse and backward against numpy."""
    exe = driver("plain", tmp_path_factory)
    rng = np.random.default_rng(8)
    sizes = [257, 300]
    mats = [needs_pivoting(257, rng), well_conditioned(300, rng)]
    fac = run_emulated(exe, FACTOR, mats).arrays
    np.testing.assert_array_equal(fac["info"], [OK, OK])
    sign, lad = slogdet64(mats)
    np.testing.assert_array_equal(fac["sign"], sign)
    np.testing.assert_allclose(fac["logabsdet"], lad, rtol=1e-10, atol=1e-9)
    inv = run_inverse(exe, fac, sizes, dtype=np.float64, smem_limit=H100_SMEM, flags=1)
    for m, x in zip(mats, unpack(inv.arrays["out"], sizes)):
        np.testing.assert_allclose(x, np.linalg.inv(m).T, rtol=0, atol=1e-10)
    g = [rng.standard_normal((n, n)) for n in sizes]
    back = run_emulated(exe, INVERSE_BACKWARD, mats, flags=4, extra=(np.concatenate([v.ravel() for v in g]),))
    for m, gv, out in zip(mats, g, unpack(back.arrays["out"], sizes)):
        np.testing.assert_allclose(out, -(m.T @ gv @ m.T), rtol=1e-10, atol=1e-9)


def test_empty_batch_launches_nothing(tmp_path_factory):
    exe = driver("plain", tmp_path_factory)
    for op in (FACTOR, INVERSE, INVERSE_BACKWARD):
        res = run_emulated(exe, op, None, sizes=[], offsets=[], numel=0, max_n=1, packed=np.zeros(0),
                           extra=(np.zeros(0, np.int32),) if op == INVERSE else
                           ((np.zeros(0),) if op == INVERSE_BACKWARD else ()))
        assert res.error == 0


# ---------------------------------------------------------------------------------------------------------------
# Sanitizers: the emulated counterpart of compute-sanitizer memcheck / racecheck
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, limits", [
    ([1, 3, 12, 31, 64, 65, 97], (H100_SMEM, 16 * 1024)),  # max_n > 64: the shared- and global-memory kernels
    ([1, 3, 12, 31, 48, 64], (H100_SMEM, 48 * 1024)),  # the register kernels (NB 64), float64's without an opt-in
    ([1, 3, 12, 31, 5, 32], (H100_SMEM, 48 * 1024)),  # the register kernels on one warp (NB 32)
], ids=["shared_kernels", "register_kernels", "register_kernels_one_warp"])
@pytest.mark.parametrize("kind", ["asan", "tsan"])
def test_kernels_clean_under_sanitizers(tmp_path_factory, kind, sizes, limits):
    """All three kernels on a ragged batch crossing every path (shared memory, global memory, a singular and a
    non-finite matrix), in float32 with the H100's shared-memory limit and in float64 with 16 KiB, and on the
    corrupt layout: no out-of-bounds access, no undefined behaviour, no data race, and the same outputs as the
    plain build."""
    exe, plain = driver(kind, tmp_path_factory), driver("plain", tmp_path_factory)
    rng = np.random.default_rng(5)
    for dtype, smem_limit in zip((np.float32, np.float64), limits):
        mats = [well_conditioned(n, rng) for n in sizes]
        mats[2][:, 5] = 0.0
        mats[3][0, 0] = np.nan
        outs = []
        for e in (exe, plain):
            fac = run_emulated(e, FACTOR, mats, dtype=dtype, smem_limit=smem_limit)
            a = fac.arrays
            inv = run_inverse(e, a, sizes, dtype=dtype, smem_limit=smem_limit, flags=3,
                              scale=np.linspace(0.5, 2, len(sizes)).astype(dtype))
            grad = run_emulated(e, INVERSE_BACKWARD, [np.nan_to_num(m) for m in mats], dtype=dtype,
                                smem_limit=smem_limit, flags=4,
                                extra=(np.concatenate([m.astype(dtype).ravel() for m in mats]),))
            outs.append([a["info"], a["logabsdet"], a["lu"], inv.arrays["out"], grad.arrays["out"]])
        np.testing.assert_array_equal(outs[0][0], [OK, OK, SINGULAR, NONFINITE] + [OK] * (len(sizes) - 4))
        for got, want in zip(outs[0], outs[1]):
            np.testing.assert_array_equal(got, want)
    for op in (FACTOR, INVERSE, INVERSE_BACKWARD):
        res = run_corrupt_layout(exe, op, np.random.default_rng(7))
        assert res.error == 0


@pytest.mark.parametrize("kind, original, mutant, report, kernels", [
    pytest.param("tsan", "    }\n    __syncthreads();\n    if (rstart <= k) rstart += t.rstep;",
                 "    }\n    if (rstart <= k) rstart += t.rstep;", "ThreadSanitizer: data race", "shared",
                 id="missing_barrier"),
    pytest.param("asan", "return align16(sizeof(int32_t) * max_n) + sizeof(T) * s * odd_ld(s);",
                 "return align16(sizeof(int32_t) * max_n) + sizeof(T) * s * s;",
                 "AddressSanitizer: heap-buffer-overflow", "shared", id="shared_memory_too_small"),
    pytest.param("tsan", "    if (kWarps > 1) {\n      __syncthreads();\n    } else {\n      __syncwarp();\n    }\n",
                 "", "ThreadSanitizer: data race", None, id="register_kernel_missing_barrier"),
    pytest.param("asan", "kBytes = kPiv + sizeof(int32_t) * NB;\n};\ntemplate <typename T, int NB>\nstruct Inverse",
                 "kBytes = kPiv;\n};\ntemplate <typename T, int NB>\nstruct Inverse",
                 "AddressSanitizer: heap-buffer-overflow", None, id="register_kernel_shared_memory_too_small"),
])
def test_sanitizers_catch_planted_bugs(tmp_path, kind, original, mutant, report, kernels):
    """The check above can fail: a factorisation without the barrier between the pivot step (warp 0) and the
    trailing update (all threads) is reported as a data race, and a shared-memory buffer sized without the
    padded leading dimension as a heap-buffer-overflow; in the register kernels, a column step without the barrier
    after which each warp reads the other's proposed pivot row, and shared memory sized without the pivots."""
    source = KERNELS.read_text()
    assert source.count(original) == 1, "the planted bug's anchor is gone from the kernel source"
    exe = build_driver(source.replace(original, mutant), kind, tmp_path)
    rng = np.random.default_rng(6)
    with pytest.raises(AssertionError, match=report):
        run_emulated(exe, FACTOR, [well_conditioned(n, rng) for n in (5, 12, 40)], kernels=kernels)
