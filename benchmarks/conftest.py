"""Shared helpers of the benchmark suite (`pytest benchmarks/ --benchmark-only`).

Timing (`run_timed`)
- CPU: pytest-benchmark's own clock around each call (`benchmark.pedantic`, fixed rounds, warm-up rounds).
- CUDA: kernels are asynchronous, so a host clock around a bare call measures the launch, not the work.
  Each timed round is bracketed by `torch.cuda.synchronize()` (a synchronising timer given to the fixture),
  so a round of `iterations` back-to-back calls is timed from an idle device to an idle device, exactly
  like a training loop that launches step after step. The median over rounds is what the report uses.
  CUDA events around the same rounds give a second median (`extra_info["cuda_event_median_ms"]`) as a
  cross-check of the host-side number.
- Warm-up: `warmup` untimed calls first (cuDNN autotuning, Triton JIT, allocator growth, lazy init).
- Peak memory: after the warm-up, `torch.cuda.reset_peak_memory_stats()`, one call, then
  `torch.cuda.max_memory_allocated()`; stored as `extra_info["peak_mem_mib"]` (CUDA only).

Triton: fused kernels are benchmarked on CUDA only. Under TRITON_INTERPRET=1 (which tests/conftest.py sets
when there is no GPU) they would run in the Triton interpreter, whose timings mean nothing, so
`skip_unless_fused(device)` skips them on CPU and whenever TRITON_INTERPRET=1 is set.

Environment switches (so the CPU suite stays a few minutes and a GPU session fits its time box)
- GLOWFAST_BENCH_COMPILE: "auto" (default: torch.compile variants on CUDA only, per-op at one shape; the
  whole-model compile only if GLOWFAST_BENCH_COMPILE_MODEL=1), "full" (CUDA, per-op at every shape),
  "all" (every shape, CPU too), "0" (never).
- GLOWFAST_BENCH_COMPILE_MODEL: "1" to benchmark torch.compile of the whole reference model (minutes of
  compilation per configuration on an H100 for the CIFAR-10 configuration), or a comma list of cases
  (e.g. "cifar10_K32_B64").
- GLOWFAST_BENCH_COLD_COMPILE: "1" (default): compile times are measured cold, with empty inductor/Triton
  cache directories; "0": with whatever caches exist.
- GLOWFAST_BENCH_SKIP_CPU: "1" skips the CPU cases (a GPU run that only wants the GPU numbers).
- GLOWFAST_BENCH_ROUNDS: override the number of timed rounds (default: per benchmark).
- GLOWFAST_BENCH_THREADS: torch intra-op threads during each benchmark. Default "auto": torch's default,
  except 1 when the machine is oversubscribed (1-minute load average above the core count) — there,
  intra-op thread barriers wait for descheduled threads and tiny CPU ops swing from 0.1 ms to 100 ms.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

#: the variant names the report (benchmarks/report.py) computes ratios between
VARIANTS = ("reference", "compiled", "fused", "peer")


# ------------------------------------------------------------------------------------------------ switches
def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def interpreting_triton() -> bool:
    return _env("TRITON_INTERPRET", "0") == "1"


def compile_enabled(device: str) -> bool:
    """Whether torch.compile variants run on `device` (GLOWFAST_BENCH_COMPILE)."""
    mode = _env("GLOWFAST_BENCH_COMPILE", "auto")
    if mode in ("0", "no", "off", "false"):
        return False
    if mode == "all":  # "full": every shape on CUDA (see bench_flow_ops.py), still CUDA only
        return True
    return device == "cuda"


def compile_model_enabled(device: str, case: str | None = None) -> bool:
    """GLOWFAST_BENCH_COMPILE_MODEL: "1"/"all" every configuration, or a comma list of cases such as
    "cifar10_K32_B64" (each whole-model compile takes minutes on a GPU)."""
    value = _env("GLOWFAST_BENCH_COMPILE_MODEL", "0")
    if not compile_enabled(device) or value in ("", "0", "no", "off", "false"):
        return False
    if value in ("1", "yes", "on", "true", "all"):
        return True
    return case is not None and case.lower() in {v.strip() for v in value.split(",")}


def rounds(default: int) -> int:
    value = os.environ.get("GLOWFAST_BENCH_ROUNDS")
    return max(1, int(value)) if value else default


def bench_threads() -> int:
    value = _env("GLOWFAST_BENCH_THREADS", "auto")
    if value != "auto":
        return max(1, int(value))
    default = torch.get_num_threads()
    try:
        if os.getloadavg()[0] > (os.cpu_count() or 1):
            return 1
    except OSError:
        pass
    return default


@contextlib.contextmanager
def fresh_compile_caches(info: dict | None = None):
    """A cold torch.compile: dynamo reset and, unless GLOWFAST_BENCH_COLD_COMPILE=0, empty inductor / Triton
    cache directories (a user's first start; the warm on-disk cache of an earlier run makes a recompile several
    times faster: 171 s cold vs 14 s warm for the CPU smoke model here). Records the mode in `info`."""
    from torch import _dynamo

    _dynamo.reset()
    cold = _env("GLOWFAST_BENCH_COLD_COMPILE", "1") not in ("0", "no", "off", "false")
    if info is not None:
        info["compile_cache"] = "cold (empty inductor/triton cache dirs)" if cold else "warm (existing caches)"
    if not cold:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="glowfast_compile_") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        try:
            from torch._inductor.codecache import PyCodeCache

            PyCodeCache.cache_clear()
        except Exception:
            pass
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def skip_unless_compile(device: str) -> None:
    if not compile_enabled(device):
        pytest.skip(f"torch.compile variant off on {device} (GLOWFAST_BENCH_COMPILE="
                    f"{os.environ.get('GLOWFAST_BENCH_COMPILE', 'auto')}; set 'all' to run it on CPU)")


def skip_unless_fused(device: str) -> None:
    """Fused (Triton) variants: CUDA only, never under the Triton interpreter."""
    if device != "cuda":
        pytest.skip("fused Triton kernels are benchmarked on CUDA only (interpreter timings are meaningless)")
    if interpreting_triton():
        pytest.skip("TRITON_INTERPRET=1 is set: Triton would run in the interpreter; unset it to benchmark")


def import_or_skip(module: str, what: str | None = None):
    """Import a module another part of the project provides; skip (with the reason) if it isn't there yet."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:  # ImportError, or a missing compiled extension raising something else
        pytest.skip(f"{what or module} not available: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------ collection
def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py as test modules (the project's python_files is pytest's test_*.py).

    This hook lives in benchmarks/conftest.py, so it only applies under benchmarks/; plain `pytest` (testpaths =
    tests) never reaches these files. If python_files already matches bench_*.py, pytest collects them itself.
    """
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


# bench_model.py runs in this order, so that a time-limited stage keeps the headline numbers: configuration
# by configuration (CIFAR-10 first), and within one its compile time, training steps, then sampling; among the
# training steps the reference and fused variants at every batch size first (issue 6's images/s and peak-memory
# targets), then the other variants
MODEL_CONFIG_ORDER = ("cifar10_K32", "mnist_K16", "mnist_K32", "mnist_K4_h128")
MODEL_TEST_ORDER = ("test_compile_time", "test_train_step", "test_sample")
HEADLINE_VARIANTS = ("reference", "fused")


def _model_bench_key(item) -> tuple[int, int, int]:
    params = getattr(getattr(item, "callspec", None), "params", {})
    config = params.get("config_name")
    name = getattr(item, "originalname", item.name)
    return (MODEL_CONFIG_ORDER.index(config) if config in MODEL_CONFIG_ORDER else len(MODEL_CONFIG_ORDER),
            MODEL_TEST_ORDER.index(name) if name in MODEL_TEST_ORDER else len(MODEL_TEST_ORDER),
            0 if name != "test_train_step" or params.get("variant") in HEADLINE_VARIANTS else 1)


def _fused_step_bench_key(item) -> int:
    """bench_fused_step.py: issue 4's targets first -- the K-step chain (3x), then the bandwidth cases (70 %) --
    then the per-op cases (the first GPU run's 90 s stage ended inside the per-op cases, before any bandwidth)."""
    return {"test_step_chain_nonnet": 0, "test_bandwidth": 1}.get(getattr(item, "originalname", item.name), 2)


ORDER_KEYS = {"bench_model.py": _model_bench_key, "bench_fused_step.py": _fused_step_bench_key}


def pytest_collection_modifyitems(config, items):
    """Order bench_model.py's and bench_fused_step.py's cases (ORDER_KEYS), each file in its own slots; then
    GLOWFAST_BENCH_SKIP_CPU=1 (gpu_check.sh sets it): skip every case parametrised with device="cpu"."""
    for file, key in ORDER_KEYS.items():
        slots = [i for i, item in enumerate(items) if item.path.name == file]
        for i, item in zip(slots, sorted((items[i] for i in slots), key=key)):  # a stable sort
            items[i] = item
    if _env("GLOWFAST_BENCH_SKIP_CPU", "0") not in ("1", "yes", "on", "true"):
        return
    skip = pytest.mark.skip(reason="CPU case skipped (GLOWFAST_BENCH_SKIP_CPU=1)")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cpu" and "benchmarks" in str(item.path):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Keep --benchmark-json working after an interrupt (gpu_check.sh stops a stage with SIGINT at its time
    limit): drop the benchmark that was cut off (no timings), which would otherwise make pytest-benchmark fail
    to write the file at all, so the benchmarks completed before the interrupt are saved."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and isinstance(getattr(bs, "benchmarks", None), list):
        bs.benchmarks[:] = [b for b in bs.benchmarks if getattr(getattr(b, "stats", None), "data", None)]
    yield


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))])
def device(request) -> str:
    """cpu always, cuda when present."""
    return request.param


@pytest.fixture(autouse=True)
def _bench_seed():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(bench_threads())
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if HAS_CUDA:
        torch.backends.cudnn.benchmark = True
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    # a failed case's traceback (pytest keeps it in sys.last_*) holds its frames: its model, graph pool and
    # activations would stay allocated and count in the next cases' peak memory
    failed = [name for name in ("last_type", "last_value", "last_traceback", "last_exc")
              if getattr(sys, name, None) is not None]
    for name in failed:
        setattr(sys, name, None)
    if failed:
        gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _synced_timer() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _synchronised(benchmark, fn, iterations: int, info: dict):
    """Make every timed round end on an idle device.

    pytest-benchmark (3.x-5.x) reads its clock through `benchmark._timer` when it builds each round's runner, so
    a clock that synchronises first brackets a round of `iterations` back-to-back calls exactly. Should a
    future version drop that attribute, fall back to synchronising inside every call (one sync per call).
    """
    if hasattr(benchmark, "_timer") and hasattr(benchmark, "_make_runner"):
        benchmark._timer = _synced_timer
        info["cuda_timing"] = "synchronising clock per round"
        return fn, iterations

    def fn_synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    torch.cuda.synchronize()
    info["cuda_timing"] = "synchronize after every call (fallback)"
    return fn_synced, iterations


def _cuda_event_median_ms(fn: Callable[[], object], n_rounds: int, iterations: int) -> float:
    times = []
    for _ in range(n_rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iterations)
    return statistics.median(times)


def run_timed(
    benchmark,
    fn: Callable[[], object],
    *,
    device: str,
    variant: str,
    n_rounds: int = 10,
    warmup: int = 3,
    iterations: int = 1,
    images: int | None = None,
    config: dict | None = None,
    event_check: bool = True,
    reset_peak: bool = True,
    **extra,
):
    """Benchmark `fn()` with warm-up and device synchronisation; record variant, config, images/s, peak memory.

    `images`: images processed per call (for images/s). `event_check`: also time with CUDA events (a cross-check;
    costs half as many calls again). `reset_peak=False`: the peak memory also covers what ran since the caller
    reset the counter (a CUDA graph's capture, whose activations live in the graph's pool and are not allocated
    again by its replays). Returns the result of the last call.
    """
    n_rounds = rounds(n_rounds)
    info = benchmark.extra_info
    if warmup > 0:  # the first call: JIT / autotuning / cuDNN benchmark / allocator — what a start-up pays
        first_s, _ = timed_first_call(fn, device)
        info["first_call_s"] = round(first_s, 4)
        for _ in range(warmup - 1):
            fn()
    sync(device)
    info["variant"] = variant
    info["device"] = device_name(device)
    info["torch_threads"] = torch.get_num_threads()
    if config:
        info["config"] = config
    info.update(extra)
    if device == "cuda":
        gc.collect()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        info["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # what the caching allocator held at its peak: for a graphed step, its private pool (the capture's
        # activations and workspaces) as the GPU sees it, beyond the allocated bytes above
        info["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        fn, iterations = _synchronised(benchmark, fn, iterations, info)
    result = benchmark.pedantic(fn, rounds=n_rounds, iterations=iterations, warmup_rounds=0)
    if device == "cuda" and event_check:
        info["cuda_event_median_ms"] = round(_cuda_event_median_ms(fn, max(3, n_rounds // 2), iterations), 4)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median and images:
        info["images_per_s"] = round(images / median, 1)
        info["ms_per_call"] = round(median * 1e3, 3)
    return result


def run_once(benchmark, fn: Callable[..., object], *, device: str, variant: str, setup=None, **extra):
    """A one-shot measurement (e.g. compile time = first call of a freshly compiled function): one round.

    `setup()` (untimed) may return `(args, kwargs)` for `fn`, as in `benchmark.pedantic`.
    """
    info = benchmark.extra_info
    info["variant"] = variant
    info["device"] = device_name(device)
    info.update(extra)
    if device == "cuda":
        fn, _ = _synchronised(benchmark, fn, 1, info)
    return benchmark.pedantic(fn, setup=setup, rounds=1, iterations=1, warmup_rounds=0)


def timed_first_call(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Seconds of one call (synchronised): a compiled function's first call is its compile time."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------ fixture API
def op_call(fn, inputs, leaves, mode: str, outputs) -> Callable[[], object]:
    """The timed call of a flow op `fn(*inputs) -> (y, logdet)`: "fwd" under no_grad, or "fwdbwd" = forward
    plus backward of fixed random output gradients into `leaves`. `outputs`: an eager (y, logdet) for shapes."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs)[0]

        return call
    for t in leaves:
        t.requires_grad_(True)
    grads = tuple(torch.randn_like(o) for o in outputs)

    def call():
        for t in leaves:
            t.grad = None
        y, ld = fn(*inputs)
        torch.autograd.backward((y, ld), grads)
        return y

    return call


class CudaTimer:
    """What bench files use (fixture `cuda_timer`): `cuda_timer(fn, device=..., variant=..., ...)` times `fn`.

    Bench files import nothing from this conftest (two conftest modules may be on sys.path when tests/ and
    benchmarks/ run together); everything goes through this fixture.
    """

    has_cuda = HAS_CUDA
    variants = VARIANTS

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(self, fn, **kwargs):
        return run_timed(self.benchmark, fn, **kwargs)

    def once(self, fn, **kwargs):
        return run_once(self.benchmark, fn, **kwargs)

    def device_time(self, call, rounds: int, iterations: int) -> float:
        """Seconds per call on the GPU without the host: CUDA events around a CUDA-graph replay of `iterations`
        calls (glowfast.kernels.tune, as tune.md measures). Recorded as `graph_replay_us`, which report.py grades
        (issue 3's LU, issue 4's chains); where the call cannot be captured (tune warns) the eager time is
        recorded as `eager_call_us` instead, never under the replay's name."""
        from glowfast.kernels.tune import time_call_graphed

        seconds, graphed = time_call_graphed(call, torch.device("cuda"), rounds=rounds, iterations=iterations)
        self.extra_info["graph_replay_us" if graphed else "eager_call_us"] = round(seconds * 1e6, 2)
        return seconds

    @property
    def extra_info(self) -> dict:
        return self.benchmark.extra_info

    first_call = staticmethod(timed_first_call)
    fresh_compile_caches = staticmethod(fresh_compile_caches)
    sync = staticmethod(sync)
    compile_enabled = staticmethod(compile_enabled)
    compile_model_enabled = staticmethod(compile_model_enabled)
    skip_unless_compile = staticmethod(skip_unless_compile)
    skip_unless_fused = staticmethod(skip_unless_fused)
    import_or_skip = staticmethod(import_or_skip)
    shape_tag = staticmethod(lambda b, c, h, w: shape_tag(b, c, h, w))
    rounds = staticmethod(rounds)
    op_call = staticmethod(op_call)


@pytest.fixture
def cuda_timer(benchmark) -> CudaTimer:
    """Benchmark helper bound to pytest-benchmark's fixture (see the module docstring for the method)."""
    return CudaTimer(benchmark)


# ------------------------------------------------------------------------------------------------ metadata
def device_name(device: str) -> str:
    if device == "cuda" and HAS_CUDA:
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def shape_tag(b: int, c: int, h: int, w: int) -> str:
    """`B64_C12_16x16`: the shape part of a group name (shared with bench_fused_step.py / bench_batched_lu.py)."""
    return f"B{b}_C{c}_{h}x{w}"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Put torch / triton / CUDA device facts in the JSON so report.py can write its header from it alone."""
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except Exception:
        machine_info["triton"] = None
    machine_info["cuda_available"] = HAS_CUDA
    machine_info["cuda_device"] = torch.cuda.get_device_name() if HAS_CUDA else None
    machine_info["cuda_version"] = torch.version.cuda
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["triton_interpret"] = interpreting_triton()
    machine_info["env"] = {k: os.environ[k] for k in sorted(os.environ) if k.startswith("GLOWFAST_BENCH")}


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
