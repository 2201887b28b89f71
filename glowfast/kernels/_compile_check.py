"""GPU-free compile check: compile glowfast's Triton kernels for sm_90 with `triton.compile`.

Run as `python -m glowfast.kernels._compile_check [--table] [--loops] [actnorm_invconv|coupling|cross_step|coupling_net
...]`
with TRITON_INTERPRET unset (under the interpreter `@triton.jit` yields interpreter objects that cannot be
compiled) and TRITON_CACHE_DIR pointing at a scratch folder. Prints one JSON line per compiled spec and exits
non-zero if any spec fails to compile or needs more shared memory than an sm_90 block can have.

Specs come from each kernel module's `compile_specs()`: every kernel with every constexpr branch at small
tiles (fp32 and bf16 data pointers), plus the production tile sizes of every dot precision.

Each record also carries the machine-code resources of the cubin Triton built (`cuobjdump
--dump-resource-usage`, Triton's own copy): registers, stack frame and local memory bytes per thread. A
register spill in one of these bandwidth-bound kernels sends tile data through local memory on every pixel
tile, so the records flag the default GPU launch configurations (`production`: the GPU_TILES entries) and
tests/test_triton_compile_sm90.py requires them to be spill-free. The dot kernels' default tiles also carry their
pixel-tile loop's SASS instruction count (`loop_instructions`; `--loops` prints them as a table).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback

MODULES = ("actnorm_invconv", "coupling", "cross_step", "coupling_net", "adamax", "lu_weights")
# Pointers that always hold fp32 (parameters, per-sample logdet grads, reduction partials).
_FP32_POINTERS = {"w_ptr", "w_inv_ptr", "bias_ptr", "log_scale_ptr", "dld_ptr", "scale_ptr", "colsum_ptr", "u_ptr"}


def signature(kernel, constexprs: dict, data_type: str = "*fp32", arg_types: dict | None = None) -> dict:
    """Triton's signature: `arg_types` (a module's ARG_TYPES) for the arguments it names; else data pointers
    `data_type` (fp32 for parameters and partials), other arguments i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif arg_types and name in arg_types:
            sig[name] = arg_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if (name in _FP32_POINTERS or "part" in name) else data_type
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, constexprs: dict, options: dict, data_type: str = "*fp32", arg_types: dict | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._utils import FP_FUSION

    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs, data_type, arg_types), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": FP_FUSION, **options})


def _cuobjdump() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - a Triton without knobs or without its bundled CUDA tools
        return None


def cubin_resources(compiled) -> dict:
    """{regs, stack, local} per thread of the cubin Triton built (`cuobjdump --dump-resource-usage`; {} if unknown).

    Triton's kernels use no local arrays, so a stack frame (or local memory) means ptxas spilled registers."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/k.cubin"
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        r = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=120)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", r.stdout)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3))) if m else {}


def loop_instructions(compiled) -> int | None:
    """SASS instructions (per warp) of the kernel's longest loop -- the pixel-tile loop of the kernels that loop over
    tiles -- or of the whole kernel where it has no loop (one tile per program); None without cuobjdump. Times the
    warps per program over the tile's pixels, that is the kernel's warp-instructions per pixel: what bounds the
    backward kernels with a dot, which are issue-bound, not memory-bound (benchmarks/RESULTS.md)."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/k.cubin"
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=120).stdout
    addresses = []  # (address, backward branch target or None) per instruction
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if m:
            branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", m.group(2))
            addresses.append((int(m.group(1), 16), int(branch.group(1), 16) if branch else None))
    if not addresses:
        return None
    loops = [(at - target) // 16 + 1 for at, target in addresses if target is not None and target < at]
    return max(loops) if loops else len(addresses)


def wgmma_shapes(compiled) -> list[str] | None:
    """The Hopper warpgroup MMA shapes in the kernel's PTX, e.g. "m64n32k8.f32.tf32.tf32" ([] without wgmma; None
    where the build holds no PTX to read).

    Why: with an N of 8 (which Triton emits when a warpgroup's share of a dot is 8 columns wide, e.g. 16 pixels
    over two warpgroups) the wgmma's shared-memory descriptor reads past its unpadded operand
    (triton-lang/triton#10629); compute-sanitizer reported exactly that read in the backward kernel on the H200
    (benchmarks/RESULTS.md, 16th session). tests/test_triton_compile_sm90.py keeps N=8 out of the default tiles."""
    ptx = compiled.asm.get("ptx") if hasattr(compiled.asm, "get") else None
    if not ptx:
        return None
    return sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.[\w.]+?)\s", ptx)))


def is_production(kernel_name: str, constexprs: dict, options: dict, data_type: str) -> bool:
    """True for a launch configuration a GPU runs (fp32 data): the tile `gpu_tile` gives for the spec's dot precision
    (GPU_TILES_TF32X3 for the default "tf32x3", GPU_TILES_IEEE for likelihood evaluation's "ieee", GPU_TILES for
    "tf32" and the no-dot kernels), or a dot kernel's tile clipped to a smaller image (fewer pixels, down to 16) on
    the warps `launch_options` gives it."""
    from ._utils import DOT_KINDS, GPU_TILES, KERNEL_KINDS, gpu_tile, launch_options

    kind, cp, prec = KERNEL_KINDS[kernel_name], constexprs["CP"], constexprs.get("PREC", "tf32")
    if data_type != "*fp32" or cp not in GPU_TILES[kind]:
        return False
    bp, num_warps = gpu_tile(kind, cp, prec)
    if kind not in DOT_KINDS or constexprs["BLOCK_P"] == bp:
        return (constexprs["BLOCK_P"], options["num_warps"]) == (bp, num_warps)
    clipped = constexprs["BLOCK_P"]
    return clipped < bp and options["num_warps"] == launch_options(cp, kind, prec, clipped)["num_warps"]


def resource_table(records: list[dict]) -> str:
    """Markdown table of the default GPU tiles' resources (registers, stack = spills, shared memory); where
    several constexpr branches share a default tile, the row of the branch with the most registers."""
    import triton

    def tile(c: dict) -> str:  # the launch-size constexprs: CP and BLOCK_P, or coupling_net's BLOCK_*
        return ", ".join(f"{k}={v}" for k, v in c.items() if k == "CP" or k.startswith("BLOCK"))

    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["kernel"], tile(r["constexprs"]), r["options"]["num_warps"], r["data"])
        if r.get("production") and r.get("ok") and r.get("regs", -1) >= rows.get(key, {}).get("regs", -1):
            rows[key] = r
    lines = [f"Triton {triton.__version__}, sm_90:", "",
             "| kernel | tile | data | warps | registers | stack (spill) B | shared B |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (kernel, t, warps, data), r in rows.items():
        lines.append(f"| {kernel} | {t} | {data.lstrip('*')} | {warps} | {r.get('regs', '?')} | "
                     f"{r.get('stack', '?')} | {r['shared']} |")
    return "\n".join(lines)


def loop_table(records: list[dict]) -> str:
    """Markdown table of the dot kernels' default tiles per dot precision (the full tile, its heaviest constexpr
    branch): registers, programs per SM (65,536 registers, 64 warps), the pixel-tile loop's SASS instructions per
    warp and warp-instructions per pixel."""
    import triton

    lines = [f"Triton {triton.__version__}, sm_90, the dot kernels' default tiles (fp32 data):", "",
             "| kernel | cp | dot precision | tile (pixels, warps) | registers | programs / SM | loop instructions / "
             "warp | warp-instructions / pixel |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    rows = sorted((r for r in records if r.get("loop_instructions") and r["data"] == "*fp32"),
                  key=lambda r: (r["constexprs"]["CP"], r["kernel"], r["constexprs"]["PREC"],
                                 -r["constexprs"]["BLOCK_P"], -r["loop_instructions"]))
    seen = set()
    for r in rows:
        c, warps = r["constexprs"], r["options"]["num_warps"]
        key = (r["kernel"], c["CP"], c["PREC"])
        if key in seen:  # a clipped tile of the same default, or a lighter constexpr branch: the first is the row
            continue
        seen.add(key)
        programs = min(65536 // (max(r.get("regs", 0), 24) * 32 * warps), 64 // warps)
        per_pixel = r["loop_instructions"] * warps / c["BLOCK_P"]
        lines.append(f"| {r['kernel']} | {c['CP']} | {c['PREC']} | ({c['BLOCK_P']}, {warps}) | {r.get('regs', '?')} "
                     f"| {programs} | {r['loop_instructions']} | {per_pixel:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from ._utils import SM90_MAX_SHARED

    table = "--table" in argv
    loops = "--loops" in argv
    argv = [a for a in argv if a not in ("--table", "--loops")]
    failures = 0
    records = []
    for mod_name in argv or MODULES:
        mod = importlib.import_module(f"glowfast.kernels.{mod_name}")
        for kernel, constexprs, options, data_type in mod.compile_specs():
            production = getattr(mod, "is_production_spec", is_production)  # coupling_net has its own tiles
            rec = dict(module=mod_name, kernel=kernel.__name__, constexprs=constexprs, data=data_type,
                       options=options, production=production(kernel.__name__, constexprs, options, data_type))
            t0 = time.perf_counter()
            try:
                out = compile_one(kernel, constexprs, options, data_type, getattr(mod, "ARG_TYPES", None))
                shared = int(out.metadata.shared)
                shapes = wgmma_shapes(out)
                rec.update(ok=shared <= SM90_MAX_SHARED, shared=shared, fp_fusion=bool(out.metadata.enable_fp_fusion),
                           **cubin_resources(out),
                           **({} if shapes is None else {"wgmma": shapes}))
                if rec["production"] and "PREC" in constexprs:  # the dot kernels' default tiles
                    rec["loop_instructions"] = loop_instructions(out)
                if shared > SM90_MAX_SHARED:
                    rec["error"] = f"needs {shared} B of shared memory > {SM90_MAX_SHARED}"
            except Exception:  # noqa: BLE001 - report every failure, not just the first
                rec.update(ok=False, error=traceback.format_exc(limit=3)[-3000:])
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            failures += not rec["ok"]
            records.append(rec)
            if not (table or loops):
                print(json.dumps(rec), flush=True)
    if table:
        print(resource_table(records))
    if loops:
        print(loop_table(records))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
