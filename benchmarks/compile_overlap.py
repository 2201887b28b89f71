"""Do Triton compilations overlap on threads on this machine? (Start-up, issue 6; no GPU needed.)

`glowfast.kernels.precompile` compiles a training step's kernel variants on a thread pool, which pays only where
Triton's compiler releases the GIL. On the H200 (Triton 3.6) the 18 variants' precompile took as long as compiling
them one after another (benchmarks/RESULTS.md, start-up). This script compiles the first --specs flow-kernel specs
(the default GPU tiles, fp32) for sm_90 -- `triton.compile`, what the precompile's warm-ups call -- one after
another and then on --threads threads, each time into an empty Triton cache. It also counts how far a pure-Python
thread gets while the specs compile on another, against counting alone for as long: 1.0 = the compiler never held
the GIL (given a free core); 0 = it always did.

    python benchmarks/compile_overlap.py --specs 8 --threads 8 --out compile_overlap.json

Appends one JSON record per run to --out (a list) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FLOW_KERNEL_MODULES = ("actnorm_invconv", "coupling", "cross_step")


def flow_kernel_specs() -> list[tuple]:
    """The production specs (default GPU tiles, fp32 data) of the flow-step kernels, in the modules' order."""
    from glowfast.kernels._compile_check import is_production

    specs = []
    for name in FLOW_KERNEL_MODULES:
        mod = importlib.import_module(f"glowfast.kernels.{name}")
        specs += [s for s in mod.compile_specs() if s[3] == "*fp32" and is_production(s[0].__name__, *s[1:])]
    return specs


@contextlib.contextmanager
def _empty_cache():
    """Point Triton's cache (`triton.knobs.cache.dir`, in every Triton glowfast takes) at a new, empty folder,
    removed on exit."""
    from triton import knobs

    before = knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="glowfast-overlap-") as path:
        knobs.cache.dir = path
        try:
            yield
        finally:
            knobs.cache.dir = before


def compile_all(specs: list[tuple], threads: int) -> float:
    """Seconds to compile every spec from an empty cache, on `threads` threads (1: one after another)."""
    from glowfast.kernels._compile_check import compile_one

    with _empty_cache():
        t0 = time.perf_counter()
        if threads == 1:
            for spec in specs:
                compile_one(*spec)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda spec: compile_one(*spec), specs))
        return time.perf_counter() - t0


def _count_while(work) -> tuple[int, float]:
    """(increments a pure-Python counting thread made, seconds) while `work()` runs on this thread."""
    stop, counts = threading.Event(), []

    def count():
        c = 0
        while not stop.is_set():
            c += 1
        counts.append(c)

    counter = threading.Thread(target=count)
    t0 = time.perf_counter()
    counter.start()
    work()
    stop.set()
    counter.join()
    return counts[0], time.perf_counter() - t0


def counter_speed_while_compiling(specs: list[tuple]) -> float:
    """The counting thread's rate while the specs compile one after another, over its rate alone."""
    c_busy, t_busy = _count_while(lambda: compile_all(specs, 1))
    c_idle, t_idle = _count_while(lambda: time.sleep(t_busy))
    return (c_busy / t_busy) / (c_idle / t_idle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", type=int, default=8, help="flow-kernel specs to compile (default 8)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="threads for the parallel run")
    ap.add_argument("--out", type=Path, help="append the JSON record to this file (a list)")
    args = ap.parse_args(argv)
    if args.specs < 1 or args.threads < 2:
        ap.error("--specs must be >= 1 and --threads >= 2")
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it")

    import torch
    import triton

    specs = flow_kernel_specs()
    if len(specs) < args.specs:
        ap.error(f"--specs {args.specs}: the flow kernels have {len(specs)} production fp32 specs")
    specs = specs[:args.specs]
    compile_all(specs[-1:], 1)  # first-use costs (imports, the backend's set-up) out of the timings
    serial = compile_all(specs, 1)
    threaded = compile_all(specs, args.threads)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cpus": os.cpu_count(), "specs": len(specs), "threads": args.threads,
        "serial_s": round(serial, 3), "threaded_s": round(threaded, 3), "speedup": round(serial / threaded, 2),
        "counter_speed_while_compiling": round(counter_speed_while_compiling(specs), 2),
    }
    print(json.dumps(record))
    if args.out is not None:
        records = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(records + [record], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
