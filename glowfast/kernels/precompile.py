"""Compile the Triton kernels a step launches, all at once and in parallel, before the step first runs.

Triton compiles a kernel the first time it is launched with a new specialisation, on the launching thread, one
after another. A CIFAR-10 Glow's first training step launched 18 kernel variants (6 kernels x 3 channel counts;
counted under the interpreter), 20 since the parameter side's two (glowfast.kernels.lu_weights, one tile for every
level); compiling the 18 for sm_90 took 9.7 s serially on this project's idle 2-core VM, most of issue 6's 20 s
start-up budget. Triton's compiler releases the GIL (2 threads: 5.2 s, 1.87x faster; both in
benchmarks/RESULTS.md), so the variants can compile side by side.

`precompiling()` runs a step *dry*: every glowfast kernel launch inside it (`launch`) becomes
`JITFunction.warmup` with the launch's own arguments -- so the cache key is exactly the one the real launch
computes -- under Triton's `AsyncCompileMode`, which submits each new key's compilation to a thread pool,
deduplicates keys, and on exit waits for them and files them in the kernels' caches. Nothing is launched: the
kernels' outputs stay uninitialised, so whatever the step computes is garbage and must be discarded (the model
helper `glowfast.fused.precompile_training_step` does that, on a forked RNG and without touching `.grad`).

The dry flag is thread-local, and autograd's multithreading is switched off inside the context so that the
backward pass (which the engine otherwise runs on a per-device worker thread) launches on the same thread:
launches on other threads are untouched. Without `AsyncCompileMode` (a private Triton module, present in
Triton 3.6-3.9) or under the interpreter (nothing to compile) the step still runs dry and nothing is compiled:
the kernels then compile at their first real launch, as they would have without this.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import torch

from ._utils import FP_FUSION

_state = threading.local()


@dataclass
class PrecompileReport:
    launches: int = 0  # glowfast kernel launches the dry step made (each became a warm-up)
    compiled: int = 0  # distinct kernel variants submitted for compilation (not already in Triton's caches)
    seconds: float = 0.0  # wall time of the dry step plus the compilations
    dry_seconds: float = 0.0  # of which the dry step itself (its torch ops, cuDNN autotuning, compile submissions)
    skipped: str | None = None  # why nothing was compiled, if nothing could be

    def as_record(self) -> dict:
        """The JSON record the trainer's metrics and the experiments' histories keep."""
        return {"launches": self.launches, "compiled": self.compiled, "seconds": round(self.seconds, 3),
                "dry_seconds": round(self.dry_seconds, 3), "skipped": self.skipped}


def compiled_variants() -> int:
    """How many compiled variants glowfast's Triton kernels hold in their in-process caches (every device). Read
    before and after a step, it says whether the step compiled anything: after `precompiling()` the first real step
    should add none (start-up diagnostics, benchmarks/startup.py). 0 under the interpreter, or where this Triton
    keeps its caches elsewhere."""
    import importlib

    from ._compile_check import MODULES  # every module that holds Triton kernels

    total = 0
    for name in MODULES:
        mod = importlib.import_module(f"{__package__}.{name}")
        for attr in dir(mod):
            caches = getattr(getattr(mod, attr), "device_caches", None) if attr.endswith("_kernel") else None
            for entry in (caches or {}).values():
                total += len(entry[0])  # (kernel_cache, key cache, target, backend, binder) in Triton 3.6-3.9
    return total


def is_dry() -> bool:
    """True inside `precompiling()` on this thread: kernel launches are warm-ups, nothing runs."""
    return getattr(_state, "report", None) is not None


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or inside `precompiling()` the same launch's compilation only; with
    `enable_fp_fusion=FP_FUSION` unless the caller gives it (why: `glowfast.kernels._utils.FP_FUSION`)."""
    kwargs.setdefault("enable_fp_fusion", FP_FUSION)
    report = getattr(_state, "report", None)
    if report is None:
        kernel[grid](*args, **kwargs)
        return
    report.launches += 1
    kernel.warmup(*args, grid=grid, **kwargs)  # the interpreter's warmup is a no-op


def _async_compile_mode():
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return None, None
    return AsyncCompileMode, active_mode


@contextlib.contextmanager
def precompiling(max_workers: int | None = None):
    """Run the body dry (kernel launches become compilations, submitted to `max_workers` threads); on exit, wait
    for every compilation. Yields a `PrecompileReport`. Values computed inside are garbage: discard them."""
    if is_dry():
        raise RuntimeError("precompiling() is already active on this thread")
    report = PrecompileReport()
    t0 = time.perf_counter()
    mode_cls, active_mode = _async_compile_mode()
    from ._utils import is_interpret

    if is_interpret():
        report.skipped = "the Triton interpreter compiles nothing"
    elif mode_cls is None:
        report.skipped = "this Triton has no AsyncCompileMode"
    elif active_mode.get() is not None:
        report.skipped = "another AsyncCompileMode is active"
    workers = max_workers or min(32, os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        if report.skipped is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="glowfast-precompile"))
            # a variant that fails to compile is left out of the cache: its real launch compiles it again and
            # raises there, with the traceback a kernel bug report needs
            mode = stack.enter_context(mode_cls(pool, ignore_errors=True))
        stack.enter_context(torch.autograd.set_multithreading_enabled(False))
        _state.report = report
        stack.callback(setattr, _state, "report", None)
        if report.skipped is None:
            stack.callback(lambda: setattr(report, "compiled", len(getattr(mode, "future_kernels", ()))))
        yield report
        report.dry_seconds = time.perf_counter() - t0  # before the exit waits for the compilations
    report.seconds = time.perf_counter() - t0
