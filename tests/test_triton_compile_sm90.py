"""Compile every Triton kernel of glowfast.kernels for sm_90 without a GPU, so GPU-only compile errors
(and tiles needing more shared memory than an sm_90 block has) fail CI; and require every default GPU launch
configuration (glowfast.kernels._utils.GPU_TILES) to compile without register spills (cuobjdump).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` needs real `@triton.jit` functions, which
the interpreter (TRITON_INTERPRET=1, set by conftest) replaces; so the compilation runs in subprocesses
(`python -m glowfast.kernels._compile_check <module>`) with TRITON_INTERPRET unset and TRITON_CACHE_DIR in a
scratch folder. The subprocesses start when this module is imported (at collection), so on CI's two cores
the compilation overlaps the interpreter tests; each test then waits for its module's results.
"""

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

import glowfast.kernels._compile_check as cc
from glowfast.kernels._utils import SM90_MAX_SHARED

MODULES = cc.MODULES
# Under pytest-xdist with --dist loadgroup, one worker runs this whole module (the compile jobs start once).
pytestmark = pytest.mark.xdist_group("sm90_compile")
_ROOT = Path(__file__).resolve().parents[1]
_TIMEOUT_S = 900


def _start_compile_jobs():
    cache = tempfile.mkdtemp(prefix="glowfast-triton-cache-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: the kernels must not depend on it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    # Two workers: the dot-heavy cross_step kernels alone, the other modules together.
    groups = {"cross_step": ["cross_step"],
              "others": ["actnorm_invconv", "coupling", "coupling_net", "adamax", "lu_weights"]}
    jobs = {}
    for name, mods in groups.items():
        out = tempfile.NamedTemporaryFile(prefix=f"glowfast-compile-{name}-", suffix=".log", delete=False)
        proc = subprocess.Popen([sys.executable, "-m", "glowfast.kernels._compile_check", *mods],
                                cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        for m in mods:
            jobs[m] = (proc, out.name)

    def _cleanup():
        for proc, _ in {id(p): (p, f) for p, f in jobs.values()}.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(cache, ignore_errors=True)

    atexit.register(_cleanup)
    return jobs


# Serially, start compiling at collection (it overlaps the interpreter tests). Under pytest-xdist every worker
# collects this module, so there the jobs start at a worker's first test here instead of once per worker.
_JOBS = None if os.environ.get("PYTEST_XDIST_WORKER") else _start_compile_jobs()


def _results(module: str) -> list[dict]:
    global _JOBS
    if _JOBS is None:
        _JOBS = _start_compile_jobs()
    proc, log = _JOBS[module]
    try:
        proc.wait(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sm_90 compilation of {module} did not finish in {_TIMEOUT_S} s")
    text = Path(log).read_text()
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("module") == module:
            records.append(rec)
    if not records:
        pytest.fail(f"no compile results for {module}; exit code {proc.returncode}; output:\n{text[-4000:]}")
    return records


def test_triton_has_gpu_free_compile_api():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource  # noqa: F401

    assert GPUTarget("cuda", 90, 32).arch == 90


@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_compiles_for_sm90(module):
    import importlib

    records = _results(module)
    mod = importlib.import_module(f"glowfast.kernels.{module}")
    expected_kernels = {name for name in dir(mod) if name.startswith("_") and name.endswith("_kernel")}
    compiled_kernels = {r["kernel"] for r in records}
    missing = expected_kernels - compiled_kernels
    assert not missing, f"kernels missing from compile_specs: {missing}"
    failures = [r for r in records if not r["ok"]]
    assert not failures, "sm_90 compile failures:\n" + "\n".join(
        f"{r['kernel']} {r['constexprs']} {r['data']}: {r.get('error')}" for r in failures
    )


# The stated exceptions: both backward kernels at cp 128 hold W^T (64 KB) in registers at the smallest tile the
# grad-W dot allows (16 pixels); since their tl.dot operands are rounded to TF32 in the kernel (round_to_tf32, which
# keeps both an activation tile and its rounded copy live; 3xTF32 keeps two halves of each), ptxas spills 104-304 B
# of them under "tf32" and 376-592 B under "tf32x3" (8 warps; 16 warps spilled 352-504 B but split the 16 pixels
# into a wgmma with N = 8, see test_default_gpu_tiles_emit_no_wgmma_with_n_8) with Triton 3.6 and 3.8. Only
# levels with more than 64 channels use cp 128 (e.g. a 4th level of 96 channels at 4x4): no CIFAR/MNIST
# configuration, and a small share of any model's pixels. One more under "tf32x3": the cross-step backward at cp 64
# (CIFAR-10's 48-channel level) spills 64-96 B at every tile without that wgmma (Triton 3.8 / 3.6); under the opt-in
# "tf32" its (32, 8) tile clipped to a 4x4 image, 16 pixels on 4 warps (8 warps would be that wgmma), spills 8 B
# (Triton 3.8). Training's launch of both backward kernels also adds the next network's input gradient (HAS_DA, the
# compiled "heaviest" branch since it replaced autograd's three kernels per step for that sum): one more load per
# tile, +64 to +112 B in these register-bound configurations (Triton 3.8: cross-step cp 64 3xTF32 56 -> 120 B, cp
# 128 "tf32" 288 -> 376; actnorm + 1x1 conv cp 128 3xTF32 376 -> 488, "tf32" 104 -> 200), none elsewhere. The
# parameter-side backward (lu_weights) at cp 128 spills 488 B on its 16 warps: one program per step of a level wider
# than 64 channels, once per training step. Keyed by (kernel, cp, dot precision).
TOLERATED_STACK_BYTES = {("_lu_weights_bwd_kernel", 128, None): 512,
                         ("_cross_step_bwd_kernel", 128, "tf32"): 400,
                         ("_actnorm_invconv_bwd_kernel", 128, "tf32"): 224,
                         ("_cross_step_bwd_kernel", 128, "tf32x3"): 640,
                         ("_actnorm_invconv_bwd_kernel", 128, "tf32x3"): 512,
                         ("_cross_step_bwd_kernel", 64, "tf32x3"): 136,
                         ("_cross_step_bwd_kernel", 64, "tf32"): 8}


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_with_fused_multiply_adds_whatever_the_default(module):
    """The compile jobs run with TRITON_DEFAULT_FP_FUSION=0 (Triton 3.10's default); the kernels still contract
    a * b + c into FMAs, as validated (glowfast.kernels._utils.FP_FUSION), so these resources are the launches'."""
    unfused = [r for r in _results(module) if r["ok"] and not r["fp_fusion"]]
    assert not unfused, f"{len(unfused)} specs compiled without FP fusion, e.g. {unfused[0]['kernel']}"


@pytest.mark.parametrize("module", MODULES)
def test_default_gpu_tiles_do_not_spill_registers(module):
    """A spill in these bandwidth-bound kernels moves tile data through local memory on every pixel tile.

    Checked by mutation: at the previous rule's tiles (~8K elements) at least 8 backward/cross-step defaults fail."""
    from glowfast.kernels._utils import GPU_TILES, KERNEL_KINDS

    records = [r for r in _results(module) if r["ok"]]
    if not any("stack" in r for r in records):
        pytest.skip("this Triton has no bundled cuobjdump to report registers and spills")
    production = [r for r in records if r["production"]]
    assert production, f"{module}: no default GPU tile among the compiled specs"
    for kernel in {r["kernel"] for r in records} & set(KERNEL_KINDS):  # coupling_net's tiles: its own table
        expected = set(GPU_TILES[KERNEL_KINDS[kernel]])
        covered = {r["constexprs"]["CP"] for r in production if r["kernel"] == kernel}
        assert covered == expected, f"{kernel}: default tiles compiled for cp {sorted(covered)}, " \
                                    f"GPU_TILES has {sorted(expected)}"
    spilled = [r for r in production
               if r["local"] or r["stack"] > TOLERATED_STACK_BYTES.get(
                   (r["kernel"], r["constexprs"].get("CP"), r["constexprs"].get("PREC")), 0)]
    assert not spilled, "default GPU tiles that spill registers on sm_90:\n" + "\n".join(
        f"{r['kernel']} {r['constexprs']} "
        f"num_warps={r['options']['num_warps']}: {r['regs']} registers, {r['stack']} B stack frame (spills)"
        for r in spilled)


@pytest.mark.parametrize("module", MODULES)
def test_default_gpu_tiles_emit_no_wgmma_with_n_8(module):
    """No default tile compiles to a Hopper wgmma with N = 8: Triton emits one when a warpgroup's share of a dot is 8
    columns wide (16 pixels over two warpgroups), and its shared-memory operand is then read past its end
    (triton-lang/triton#10629); compute-sanitizer reported that read in the 3xTF32 backward on the H200 (16th
    session, benchmarks/RESULTS.md). Checked by mutation: the earlier (16 pixels, 8 / 16 warps) backward tiles at
    cp 64 and 128 fail here, and so do the cp-64 tiles clipped to a 4x4 image (16 pixels) when launch_options keeps
    the table's 8 warps (`max_dot_warps` returning 16: the forward kernels of every CIFAR-10 model's third level
    before the 24th session)."""
    records = [r for r in _results(module) if r["ok"] and r["production"]]
    if not any("wgmma" in r for r in records):
        pytest.skip("these builds kept no PTX to read the wgmma shapes from")
    narrow = [r for r in records if any(re.match(r"m\d+n8k", shape) for shape in r["wgmma"])]
    assert not narrow, "default GPU tiles compiling to a wgmma with N=8:\n" + "\n".join(
        f"{r['kernel']} {r['constexprs']} num_warps={r['options']['num_warps']}: {r['wgmma']}" for r in narrow)


# ------------------------------------------------------------------ gaps found by mutation testing (12th session)
def _compiled(shared: int):
    return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=shared, enable_fp_fusion=True), asm={})


def _run(monkeypatch, capsys, compile_one):
    monkeypatch.setattr(cc, "compile_one", compile_one)
    monkeypatch.setattr(cc, "cubin_resources", lambda compiled: {})
    rc = cc.main(["coupling"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return rc, records


def test_exit_code_is_zero_only_when_every_spec_compiles(monkeypatch, capsys):
    rc, records = _run(monkeypatch, capsys, lambda *a, **k: _compiled(1024))
    assert rc == 0 and records and all(r["ok"] for r in records)
    calls = []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("PassManager::run failed")
        return _compiled(1024)

    rc, records = _run(monkeypatch, capsys, second_fails)
    assert rc == 1 and [r["ok"] for r in records].count(False) == 1
    assert "PassManager::run failed" in next(r["error"] for r in records if not r["ok"])


def test_more_shared_memory_than_an_sm90_block_has_is_a_failure(monkeypatch, capsys):
    """227 KiB (SM90_MAX_SHARED) is the most one sm_90 block may use: exactly that compiles, a byte more fails."""
    rc, records = _run(monkeypatch, capsys, lambda *a, **k: _compiled(SM90_MAX_SHARED))
    assert rc == 0 and all(r["ok"] for r in records)
    rc, records = _run(monkeypatch, capsys, lambda *a, **k: _compiled(SM90_MAX_SHARED + 1))
    assert rc == 1 and not any(r["ok"] for r in records)
    assert all(f"needs {SM90_MAX_SHARED + 1} B of shared memory" in r["error"] for r in records)


def test_exact_backward_dots_take_fewer_instructions_up_to_32_channels():
    """The SASS count behind `use_exact_backward_dots` (glowfast.kernels._utils): at the default tiles the cross-step
    backward's loop (cp 16 and 32) and the actnorm + 1x1 conv backward's (cp 16) take at most 3/4 of the 3xTF32
    warp-instructions per pixel with exact-fp32 dots, in fewer registers. Each record's loop count comes from
    cuobjdump -sass (`_compile_check.loop_instructions`)."""
    records = [r for m in ("actnorm_invconv", "cross_step") for r in _results(m)
               if r.get("loop_instructions") and r["data"] == "*fp32"]
    if not records:
        pytest.skip("this Triton has no bundled cuobjdump to read the SASS")
    from glowfast.kernels._utils import gpu_tile

    heaviest = dict(AFFINE=True, NEED_DX=True, NEED_DW=True, STORE_U=False)

    def per_pixel(kernel, kind, cp, prec):
        """(warp-instructions per pixel, registers) of the heaviest branch at the default tile"""
        bp, warps = gpu_tile(kind, cp, prec)
        found = [r for r in records if r["kernel"] == kernel and r["options"]["num_warps"] == warps
                 and r["constexprs"]["CP"] == cp and r["constexprs"]["PREC"] == prec
                 and r["constexprs"]["BLOCK_P"] == bp
                 and all(r["constexprs"].get(k, v) == v for k, v in heaviest.items())]
        assert found, f"{kernel} cp {cp} {prec}: the default tile was not compiled"
        return found[0]["loop_instructions"] * warps / bp, found[0]["regs"]

    for kernel, kind, cps in (("_cross_step_bwd_kernel", "cross_step_bwd", (16, 32)),
                              ("_actnorm_invconv_bwd_kernel", "actnorm_invconv_bwd", (16,))):
        for cp in cps:
            (exact, exact_regs), (split, split_regs) = (per_pixel(kernel, kind, cp, p) for p in ("ieee", "tf32x3"))
            assert exact <= 0.75 * split and exact_regs < split_regs, (kernel, cp, exact, split)


def test_loop_table_shows_each_default_tiles_heaviest_branch():
    """`--loops`: one row per (kernel, cp, precision), from the full default tile's heaviest constexpr branch (most
    loop instructions), not a clipped tile or a lighter branch; warp-instructions per pixel = loop x warps / pixels,
    programs per SM from the registers."""
    def rec(block_p, need_dw, regs, loop):
        return dict(kernel="_k", data="*fp32", options=dict(num_warps=8), regs=regs, loop_instructions=loop,
                    constexprs=dict(CP=16, BLOCK_P=block_p, PREC="ieee", NEED_DW=need_dw))

    table = cc.loop_table([rec(32, False, 64, 200), rec(16, True, 90, 400), rec(32, True, 79, 298),
                           {**rec(32, True, 79, 298), "data": "*bf16"}])
    assert [line for line in table.splitlines() if line.startswith("| _k")] == [
        "| _k | 16 | ieee | (32, 8) | 79 | 3 | 298 | 74.5 |"]
