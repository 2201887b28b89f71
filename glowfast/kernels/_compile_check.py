"""GPU-free compile check: compile glowfast's Triton kernels for sm_90 with `triton.compile`.

Run as `python -m glowfast.kernels._compile_check [actnorm_invconv|coupling|cross_step ...]` with
TRITON_INTERPRET unset (under the interpreter `@triton.jit` yields interpreter objects that cannot be
compiled) and TRITON_CACHE_DIR pointing at a scratch folder. Prints one JSON line per compiled spec and exits
non-zero if any spec fails to compile or needs more shared memory than an sm_90 block can have.

Specs come from each kernel module's `compile_specs()`: every kernel with every constexpr branch at small
tiles (fp32 and bf16 data pointers), plus the production tile sizes for the default "tf32" precision.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

MODULES = ("actnorm_invconv", "coupling", "cross_step")
# Pointers that always hold fp32 (parameters, per-sample logdet grads, reduction partials).
_FP32_POINTERS = {"w_ptr", "w_inv_ptr", "bias_ptr", "log_scale_ptr", "dld_ptr"}


def signature(kernel, constexprs: dict, data_type: str = "*fp32") -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if (name in _FP32_POINTERS or "part" in name) else data_type
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, constexprs: dict, options: dict, data_type: str = "*fp32"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs, data_type), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(options))


def main(argv: list[str]) -> int:
    from ._utils import SM90_MAX_SHARED

    failures = 0
    for mod_name in argv or MODULES:
        mod = importlib.import_module(f"glowfast.kernels.{mod_name}")
        for kernel, constexprs, options, data_type in mod.compile_specs():
            rec = dict(module=mod_name, kernel=kernel.__name__, constexprs=constexprs, data=data_type,
                       options=options)
            t0 = time.perf_counter()
            try:
                out = compile_one(kernel, constexprs, options, data_type)
                shared = int(out.metadata.shared)
                rec.update(ok=shared <= SM90_MAX_SHARED, shared=shared)
                if shared > SM90_MAX_SHARED:
                    rec["error"] = f"needs {shared} B of shared memory > {SM90_MAX_SHARED}"
            except Exception:  # noqa: BLE001 - report every failure, not just the first
                rec.update(ok=False, error=traceback.format_exc(limit=3)[-3000:])
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            failures += not rec["ok"]
            print(json.dumps(rec), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
