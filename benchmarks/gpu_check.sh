#!/usr/bin/env bash
# What a GPU session runs (the lent machine: bare, no network, python3.12, one H100), one device command each:
#
#     bash benchmarks/gpu_check.sh session    # a session's first call (15 min of device time in all, start-up of
#                                             # the machine included): build, the tests, compute-sanitizer and a short
#                                             # training run (+ its TF32 check) side by side, cold start-up, the LU /
#                                             # fused-kernel / CIFAR-10 model benchmarks, RESULTS.md -- every
#                                             # issue-3/4/6 speed target in one 540 s command
#     bash benchmarks/gpu_check.sh extra      # then, on the still-warm machine, with what device time is left
#                                             # (GPU_CHECK_BUDGET=<seconds left - 60>): torch.compile(reference) per
#                                             # op, the MNIST model benchmarks, the block sweep
#     bash benchmarks/gpu_check.sh check      # build, the whole test suite, compute-sanitizer, a short training run
#     bash benchmarks/gpu_check.sh bench      # build, cold start-up, whole-model + per-op benchmarks, block sweep,
#                                             # RESULTS.md (issue 6's and issue 4's target tables)
#     bash benchmarks/gpu_check.sh compile    # torch.compile(reference) compile times + compiled step (minutes)
#     bash benchmarks/gpu_check.sh nets       # the coupling networks only (~5 min): the Triton network's tests, then
#                                             # cuDNN vs glowfast's Triton network, per network (coupling_net/*) and
#                                             # in the graphed CIFAR-10 training step (fp32 and bf16) -- issue 6's
#                                             # throughput question
#     bash benchmarks/gpu_check.sh speed      # issue 6's throughput question (~520 s): the graphed bf16 NHWC CIFAR-10
#                                             # step with compiled networks, B64 and B256, with and without each
#                                             # untimed option (FusedAdamax, ReLU epilogues, thin convs as GEMMs,
#                                             # exact-fp32 backward dots),
#                                             # then the B256 profile of the step with all of them
#     bash benchmarks/gpu_check.sh kernels    # issue 4's open rows (~380 s): the K-step chain (with exact-fp32 dots
#                                             # too), the backward kernels' bandwidth, FusedAdamax's step, a sweep
#     bash benchmarks/gpu_check.sh all        # every stage in one command (a longer GPU_CHECK_BUDGET than 540 s)
#
# ($OUT is set by the device tool; default ./gpu_out.) A session has 15 minutes of device time, the machine's
# start (a minute or more) and every idle second included, and one command may run 600 s: `session` is sized to
# hold the targets the issues are judged by in one command; `check` + `bench` (two full commands) fit only a
# session with more time. The tests, the sanitizer and the training run are functional checks (no timings), so
# they run side by side; every timed stage runs alone. On a machine still warm a second build is skipped
# (benchmarks/gpu_build.sh). The device copy of the tree has no .git: pass GLOWFAST_GIT_COMMIT=<git rev-parse
# HEAD> in the command (summary.md and RESULTS.md name it).
#
# Stages, each under its own timeout and all within one wall-clock budget (GPU_CHECK_BUDGET, default 540 s,
# under the device tool's 600 s per command); a failing or timed-out stage is recorded and the next one runs:
#   env          nvidia-smi, versions
#   build        benchmarks/gpu_build.sh: pip install --no-build-isolation --no-deps -e . for this GPU's architecture
#                (glowfast._C with CUDA), skipped when the sources are unchanged since the last build here; then
#                benchmarks/cpp_exception_probe.py (does a TORCH_CHECK in the extension reach Python as an error?)
#   tests        python -m pytest -q (the whole suite; junit xml)
#   sanitizer    compute-sanitizer memcheck on the CUDA LU op tests and the Triton kernel tests (coupling networks too)
#                (benchmarks/gpu_check_lu.sh, benchmarks/gpu_check_kernels.sh)
#   startup      benchmarks/startup.py in fresh processes with an empty Triton cache: import, build, ActNorm init,
#                first training step of the CIFAR-10 model (fused with its kernels precompiled in parallel, the
#                default; fused compiling them at first launch; reference; the fastest step's options, bf16 NHWC
#                compiled networks and FusedAdamax, with empty inductor and Triton caches) -- issue 6's start-up
#                target; then
#                benchmarks/compile_overlap.py: do Triton compiles overlap on threads here (compile_overlap.json)
#   bench_model  benchmarks/bench_model.py: training step + sampling, reference / fused / peer (CIFAR-10 first)
#   bench_ops    per-op benchmarks: bench_batched_lu.py, bench_fused_step.py, bench_flow_ops.py (in that order)
#   profile      benchmarks/profile_step.py: where the CIFAR-10 B64 fused training step's device time goes (coupling
#                networks, flow kernels, LU op, optimiser, the rest), fp32 and bf16 NHWC networks, eager steps under
#                torch.profiler (logs/profile/, and its table in summary.md) -- what issue 6's speed-up must come from
#   tune         block-size sweep of the fused kernels (python -m glowfast.kernels.tune: the GPU_TILES defaults vs
#                larger/smaller tiles, outputs checked against the default's), the most-used kernels first
#   train        a short real training run (MNIST if data/MNIST or gpudata/MNIST is there, fused backend; else digits); at
#                its time limit it is interrupted (SIGINT), and the trainer still writes its summary
#   tf32         that run's held-out bits/dim with the fused path's default 3xTF32 dots and with plain TF32 dots, the
#                reference at cuDNN's default, and in full fp32, each vs float64 (benchmarks/tf32_rounding.py --run)
#   bench_compile torch.compile(reference) per-op benchmarks (cold compiles; whatever budget is left)
#   report       benchmarks/report.py -> RESULTS.md (always run at the end when there is benchmark JSON)
# Files written to $OUT (the device tool returns at most 8): summary.md, RESULTS.md, results.json (all the
# benchmark JSON merged), junit.xml, train_metrics.jsonl, train_summary.json, tune.md, logs.tar.gz (every log,
# the per-stage JSON, tune.json, the training run's config, curves and samples).
#
# Knobs (environment): GPU_CHECK_STAGES="env build tests ..." (stages, run in the order given after env, build and
# the side-by-side group; the presets' lists above), GPU_CHECK_BUDGET
# (seconds), MAX_<stage> caps (tests, sanitizer, startup, bench_model, bench_ops, profile, tune, train, tf32; preset
# defaults),
# GLOWFAST_GIT_COMMIT, GPU_TESTS (node ids or files instead of the whole suite: a rerun of what failed),
# GPU_TEST_WORKERS (4; session 8), GPU_CHECK_PARALLEL (1: tests, sanitizer and train (then tf32) side by side),
# BENCH_MODEL_SELECT (pytest -k over bench_model's cases; session cifar10, extra mnist), BENCH_OPS_SELECT (pytest -k
# over the per-op cases; session "not ieee and not tf32_plain"), TUNE_BUDGET (75; extra 45), TUNE_SHAPES and
# TUNE_PROGRAMS_PER_SM and TUNE_PRECISIONS and TUNE_KERNELS (the sweep's shapes, BxCxHxW comma-separated, extra
# programs per SM, extra dot precisions, kernel/mode list; tune() below),
# PYTHON (python3), TRAIN_STEPS (default 1000), GLOWFAST_BENCH_COMPILE_MODEL=cifar10_K32_B64 (or 1 for every case:
# adds the whole-model torch.compile benchmark to bench_compile, minutes of compilation per case) with
# GPU_CHECK_COMPILE_MAX (seconds for bench_compile, default 200; 420 under the `compile` preset). A command for the
# compile numbers (a session of its own):
#   GPU_CHECK_STAGES="env build bench_compile report" GLOWFAST_BENCH_COMPILE_MODEL=cifar10_K32_B64 \
#   GPU_CHECK_COMPILE_MAX=480 bash benchmarks/gpu_check.sh
# Peer library and test workers: the machine has no network; carry the pure-Python packages from this
# machine's venv (device tool: carry [".venv/lib/python3.11/site-packages/normflows",
# ".venv/lib/python3.11/site-packages/xdist", ".venv/lib/python3.11/site-packages/execnet"]); they are put on
# PYTHONPATH. Without xdist the tests run serially.
# MNIST: carry ["data/MNIST"] (torchvision's raw IDX layout) or ["gpudata"] (gzipped, from results/gpu_full.sh pack).

set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
# this script's outputs from an earlier run into the same $OUT would be quoted as this run's (the device tool
# empties $OUT before each command; a rerun elsewhere may not)
(cd "$OUT" && rm -f summary.md RESULTS.md results.json junit.xml train_metrics.jsonl train_summary.json tune.md \
    logs.tar.gz)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
BUDGET=${GPU_CHECK_BUDGET:-540}
PRESET=${1:-all}
case $PRESET in
    # caps that leave every stage of a preset a slot in the 540 s (cold build ~70 s est.; stages finishing early
    # leave the rest to the next ones)
    session) PRESET_STAGES="env build tests sanitizer train tf32 startup bench_ops bench_model report"
             # tests, sanitizer and a short training run (then its TF32 check) side by side (one slot of 200 s);
             # the whole-model cases: CIFAR-10 only
             MAX_tests=${MAX_tests:-200}; MAX_sanitizer=${MAX_sanitizer:-200}; MAX_train=${MAX_train:-120}
             MAX_tf32=${MAX_tf32:-40}; MAX_bench_ops=${MAX_bench_ops:-90}
             MAX_bench_model=${MAX_bench_model:-150}; GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-8}
             # (not the Triton / GEMM networks and the memory-saving step: measured slower, not what the targets
             # need; the compiled networks are: 2,424 img/s at B64 on the H200 with padded channels, 4,598 at B256;
             # their variants with FusedAdamax and with the thin 3x3 convs as GEMMs, `_fusedopt` and `_gemm3x3`, are
             # untimed; the compiled optimiser, `_opt`, compiled for 220 s on the H200, and the unpadded channels,
             # `_pad0`, were slower: BENCH_MODEL_SELECT="cifar10 and nhwc_compiled" times them too)
             BENCH_MODEL_SELECT=${BENCH_MODEL_SELECT-cifar10 and not triton and not (gemm and not gemm3x3) and \
not memory_saving and not _opt and not _pad0}
             # the exact-fp32 bandwidth cases are information, not a target (report.py): kept out of the 90 s slot
             BENCH_OPS_SELECT=${BENCH_OPS_SELECT-not ieee and not tf32_plain} ;;
    extra)   PRESET_STAGES="env build profile bench_compile bench_model tune report"
             # the rest of a session after `session` (set GPU_CHECK_BUDGET to the device time left, less a minute):
             # torch.compile(reference) per op (issue 6's per-op fused/compiled ratios; the whole-model compile, minutes
             # of it, is the `compile` preset's own session), the MNIST models, the block sweep
             GPU_CHECK_COMPILE_MAX=${GPU_CHECK_COMPILE_MAX:-110}; MAX_bench_model=${MAX_bench_model:-90}
             MAX_tune=${MAX_tune:-60}; TUNE_BUDGET=${TUNE_BUDGET:-45}; BENCH_MODEL_SELECT=${BENCH_MODEL_SELECT-mnist} ;;
    check)   PRESET_STAGES="env build tests sanitizer train tf32"
             # the whole suite in one slot: the H100 (16 cores) ran 844 of its ~1,370 tests in 200 s on 12 workers
             # (24th session), so 330 s; the sanitizer and the training run beside it
             MAX_tests=${MAX_tests:-330}; MAX_sanitizer=${MAX_sanitizer:-200}; MAX_train=${MAX_train:-75}
             MAX_tf32=${MAX_tf32:-40}; GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-12} ;;
    bench)   PRESET_STAGES="env build startup bench_model bench_ops profile tune report"
             MAX_bench_model=${MAX_bench_model:-200}; MAX_bench_ops=${MAX_bench_ops:-120}; MAX_tune=${MAX_tune:-90} ;;
    compile) PRESET_STAGES="env build bench_compile report"
             export GLOWFAST_BENCH_COMPILE_MODEL=${GLOWFAST_BENCH_COMPILE_MODEL:-cifar10_K32_B64}
             GPU_CHECK_COMPILE_MAX=${GPU_CHECK_COMPILE_MAX:-420} ;;
    nets)    PRESET_STAGES="env build tests bench_ops bench_model report"
             # the Triton network's own tests first (its numbers mean nothing if it is wrong on this GPU); then per
             # network: the cuDNN module, channels_last (+ bf16), the Triton network (+ bf16); whole model: the
             # graphed fused step with cuDNN or Triton networks, fp32 and bf16 (the GEMM layouts were slower already)
             # caps: ~350 s with a cold build, so a 15-minute session keeps room for the functional stages after it
             GPU_TESTS=${GPU_TESTS:-tests/test_kernel_coupling_net.py}; MAX_tests=${MAX_tests:-75}
             MAX_bench_ops=${MAX_bench_ops:-90}; MAX_bench_model=${MAX_bench_model:-120}
             BENCH_OPS_SELECT=${BENCH_OPS_SELECT-coupling_network and not gemm and not compiled}
             BENCH_MODEL_SELECT=${BENCH_MODEL_SELECT-cifar10 and graphed and not gemm} ;;
    speed)   PRESET_STAGES="env build bench_model profile report"
             # issue 6's throughput question in one call (~520 s with a cold build): the graphed bf16 NHWC CIFAR-10
             # step with compiled networks at B64 and B256 as measured before (the baseline, on this machine) and
             # with the options written since and not timed: FusedAdamax (`_fusedopt`), the ReLUs in the GEMMs'
             # epilogues (`_epilogue`), both, both with the thin 3x3 convs as GEMMs (`_gemm3x3_epilogue_fusedopt`),
             # and both with the flow's backward kernels on exact-fp32 dots up to 32 channels
             # (`_epilogue_fusedopt_exactbwd`: use_exact_backward_dots); twelve cases, three network graphs per batch
             # size. Then the B256 profile of the step with every option.
             MAX_bench_model=${MAX_bench_model:-330}; MAX_profile=${MAX_profile:-80}
             PROFILE_BATCHES=${PROFILE_BATCHES:-256}
             PROFILE_FLAGS=${PROFILE_FLAGS:---bf16 --channels-last --compile-networks --thin-gemms --relu-epilogue \
--fused-optimizer --exact-backward-dots}
             BENCH_MODEL_SELECT=${BENCH_MODEL_SELECT-cifar10 and nhwc_compiled and not _opt and not _pad0 and \
not (gemm3x3 and not epilogue)} ;;
    kernels) PRESET_STAGES="env build bench_ops tune report"
             # issue 4's open rows (~380 s with a cold build): the K-step chain at the six CIFAR-10 shapes (reference,
             # fused, and the ungraded fused_ieee and fused_exactbwd: exact-fp32 dots everywhere, or in the backward
             # kernels up to 32 channels, whose loops take half the 3xTF32 instructions there), the bandwidth of the
             # backward kernels with a dot at 3xTF32 and exact fp32, the FusedAdamax step, and the parameter side of
             # all 96 steps (step_params: the lu_weights kernels against the batched torch ops); 40 cases. Then the
             # block sweep of those backward kernels with exact-fp32 candidates too (their default tiles were chosen
             # for the 3xTF32 registers; exact, they hold 64-128), at C = 12 and 24 (~60 s; cut first)
             MAX_bench_ops=${MAX_bench_ops:-200}; MAX_tune=${MAX_tune:-75}; TUNE_BUDGET=${TUNE_BUDGET:-60}
             TUNE_KERNELS=${TUNE_KERNELS:-cross_step/bwd,actnorm_invconv/bwd}; TUNE_PRECISIONS=${TUNE_PRECISIONS-ieee}
             TUNE_SHAPES=${TUNE_SHAPES:-64x12x128x128,256x12x16x16,256x24x8x8}
             BENCH_OPS_SELECT=${BENCH_OPS_SELECT-(step_chain and not dwgemm) or (step_params and cuda) or adamax or \
(bandwidth and bwd and not coupling- and not tf32_plain and not nodw and not dwgemm)} ;;
    all)     PRESET_STAGES="env build tests sanitizer startup bench_model bench_ops profile tune train tf32 bench_compile report" ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [session|extra|check|bench|compile|nets|speed|kernels|all]"; exit 2 ;;
esac
STAGES=${GPU_CHECK_STAGES:-$PRESET_STAGES}
ALL_STAGES="env build tests sanitizer startup bench_model bench_ops profile tune train tf32 bench_compile report"
for name in $STAGES; do
    [[ " $ALL_STAGES " == *" $name "* ]] || { echo "unknown stage '$name' (stages: $ALL_STAGES)"; exit 2; }
done
TRAIN_STEPS=${TRAIN_STEPS:-1000}
START=$(date +%s)
# the commit: the device machine gets a copy of the working tree without .git, so the caller passes it
# (GLOWFAST_GIT_COMMIT=$(git rev-parse HEAD) in the device command); else git, when there is a repository
# (a given commit is the caller's word: a .git the device copy may hold is stale, and its diff meaningless)
if [ -n "${GLOWFAST_GIT_COMMIT:-}" ]; then
    COMMIT=$GLOWFAST_GIT_COMMIT
else
    COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo '?')
    if git rev-parse HEAD > /dev/null 2>&1 && ! git diff --quiet 2>/dev/null; then COMMIT="$COMMIT (dirty tree)"; fi
fi
export GLOWFAST_GIT_COMMIT=$COMMIT
PY=${PYTHON:-python3}  # the device image has python3 (its torch); a venv has both
source benchmarks/pytest_workers.sh
SUMMARY_ROWS=$WORK/stages.tsv
: > "$SUMMARY_ROWS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# the CPU benchmark cases are measured on the CPU machines (benchmarks/RESULTS.md); here only the GPU ones
export GLOWFAST_BENCH_SKIP_CPU=${GLOWFAST_BENCH_SKIP_CPU:-1}

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
want() { [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME MAX_SECONDS MIN_SECONDS -- command...   (runs under min(MAX, remaining - 15 s reserve))
stage() {
    local name=$1 max=$2 min=$3; shift 4
    if ! want "$name"; then echo -e "$name\tnot selected\t0\t" >> "$SUMMARY_ROWS"; return 0; fi
    local left=$(( $(remaining) - 15 ))
    local limit=$(( max < left ? max : left ))
    if (( limit < min )); then
        echo -e "$name\tskipped (budget: ${left}s left, needs ≥ ${min}s)\t0\t" >> "$SUMMARY_ROWS"
        echo "== $name: skipped, budget"; return 0
    fi
    echo "== $name (limit ${limit}s, $(elapsed)s elapsed)"
    local t0 rc status
    t0=$(date +%s)
    # SIGINT first: pytest then still writes its junit / benchmark JSON for what finished (see conftest.py)
    timeout -s INT -k 20 "$limit" bash -c '"$@"' _ "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        75) status="UNAVAILABLE on this machine (see its log)" ;;  # the sanitizer stage only
        *) status="FAIL (rc=$rc)" ;;
    esac
    local dt=$(( $(date +%s) - t0 ))
    local note
    note=$(grep -E "passed|failed|error|Error" "$LOGS/$name.log" | tail -1 | tr '\t|' '  ' | cut -c1-160)
    # else the log's last line (e.g. the tf32 stage's "no training run checkpoint")
    [ -n "$note" ] || note=$(tail -1 "$LOGS/$name.log" | tr '\t|' '  ' | cut -c1-160)
    echo -e "$name\t$status\t$dt\t$note" >> "$SUMMARY_ROWS"
    echo "   $status in ${dt}s  $note"
    return 0
}

# ------------------------------------------------------------------------------------------------ carried packages
# Pure-Python packages the bare machine lacks, carried from this checkout's venv (device tool carry list):
# normflows (the peer library), pytest-xdist + execnet (parallel test workers: the tests stage is bound by
# Triton compiling one kernel configuration after another). Put on PYTHONPATH when not importable already.
for pkg in normflows xdist execnet; do
    if ! $PY -c "import $pkg" 2>/dev/null; then
        for cand in "$ROOT"/.venv/lib/python3*/site-packages/$pkg; do
            if [ -d "$cand" ]; then
                mkdir -p "$WORK/peer" && ln -s "$cand" "$WORK/peer/$pkg"
                [[ ":${PYTHONPATH:-}:" == *":$WORK/peer:"* ]] || export PYTHONPATH="$WORK/peer${PYTHONPATH:+:$PYTHONPATH}"
                break
            fi
        done
    fi
done

# ------------------------------------------------------------------------------------------------ stages
# `pymod MODULE args...` = python -m MODULE args, with SIGINT restored to KeyboardInterrupt (a process started in
# the background by a non-interactive shell inherits SIGINT ignored, and the time-limit SIGINT would do nothing)
pymod() {
    $PY -c 'import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
mod = sys.argv.pop(1)
sys.argv[0] = mod
runpy.run_module(mod, run_name="__main__", alter_sys=True)' "$@"
}

env_info() {
    nvidia-smi || true
    $PY - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "numpy", "pytest", "pytest_benchmark", "normflows"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "not importable:", exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    which compute-sanitizer nvcc ncu || true
}

build() {
    # only this GPU's architecture (setup.py's default builds 8.0 and 9.0: twice the nvcc time), and not again
    # when the previous call on this machine built the same sources (benchmarks/gpu_build.sh)
    bash benchmarks/gpu_build.sh || return 1
    # does a TORCH_CHECK in the extension reach Python here? (it segfaulted on the first GPU machine; the probe
    # prints compilers, ABI and a gdb backtrace when it does not); informational: the build stage stands
    timeout 150 $PY benchmarks/cpp_exception_probe.py > "$LOGS/cpp_exception_probe.log" 2>&1
    head -1 "$LOGS/cpp_exception_probe.log"; grep -m1 "^toolchain:" "$LOGS/cpp_exception_probe.log"
    return 0
}

tests() {
    # the tests that exercise the GPU first (kernels, fused path, CUDA LU op, CUDA graphs, models), then the rest
    # (CPU-only tests that CI already runs): if the stage's time limit cuts the run, it cuts the latter
    local first=(tests/test_kernel_*.py tests/test_fused_*.py tests/test_batched_lu.py tests/test_cuda_graph.py
                 tests/test_amp.py tests/test_model*.py tests/test_triton_compile_sm90.py)
    local files=("${first[@]}") f par=()
    for f in tests/test_*.py; do [[ " ${first[*]} " == *" $f "* ]] || files+=("$f"); done
    # GPU_TESTS: pytest node ids or files instead of the whole suite (a rerun of what failed, in the time left)
    [ -n "${GPU_TESTS:-}" ] && read -r -a files <<< "$GPU_TESTS"
    # GPU_TEST_WORKERS (default 4) pytest-xdist workers when xdist loads (benchmarks/pytest_workers.sh); else serial
    read -r -a par <<< "$(pytest_workers "${GPU_TEST_WORKERS:-4}")"
    if (( ${#par[@]} )); then par+=(--dist loadgroup); fi
    echo "pytest workers: ${par[*]:-serial}"
    pymod pytest -q -p no:cacheprovider -rfE --durations=25 --junitxml="$OUT/junit.xml" "${par[@]}" "${files[@]}"
}

sanitizer() {
    # the CUDA LU op and the fused Triton kernels side by side (each script: compute-sanitizer memcheck over its
    # tests, one process each); the LU log follows the kernels' in this stage's log
    local rc=0 lu_pid
    bash benchmarks/gpu_check_lu.sh > "$LOGS/sanitizer_lu.log" 2>&1 &
    lu_pid=$!
    bash benchmarks/gpu_check_kernels.sh 2>&1 | tee "$WORK/sanitizer_kernels.log"
    (( PIPESTATUS[0] == 0 )) || { rc=1; echo "gpu_check_kernels.sh: FAILED"; }
    wait "$lu_pid" || { rc=1; echo "gpu_check_lu.sh: FAILED"; }
    echo "---- gpu_check_lu.sh"; cat "$LOGS/sanitizer_lu.log"
    # Some lent machines (gVisor-run ones, device tool KINDS.md) refuse compute-sanitizer ("Device not supported"):
    # that is no memcheck verdict either way, and the summary says so instead of a plain FAIL
    if (( rc )) && grep -qi "device not supported" "$WORK/sanitizer_kernels.log" "$LOGS/sanitizer_lu.log"; then
        echo "compute-sanitizer cannot run on this machine (Device not supported): no memcheck verdict"
        return 75
    fi
    return $rc
}

bench() {  # bench NAME pytest-args...
    local name=$1; shift
    pymod pytest -p no:cacheprovider -q -rs --benchmark-only --benchmark-json="$WORK/bench_$name.json" \
        --benchmark-columns=min,median,iqr,rounds,iterations "$@"
}

startup() {
    # fresh processes, each with an empty Triton cache: what a user's first `python -m glowfast.train` pays
    # (issue 6: < 20 s). The fused path with its kernels precompiled in parallel (`--precompile`; its cache is the
    # one the later stages reuse), then as it runs by default, without the precompile (the serial compiles it
    # would replace: before/after), then the reference; last the fastest step's options (bf16 NHWC compiled
    # networks, FusedAdamax) with empty Triton and inductor caches: the networks compile in its first step
    rm -rf "$WORK/triton_cache_startup" "$WORK/triton_cache_serial" "$WORK/triton_cache_compiled" \
        "$WORK/inductor_cache_startup"
    local rc=0 run
    for run in "fused on triton_cache_startup" "fused off triton_cache_serial" "reference off triton_cache_serial" \
               "fused off triton_cache_compiled bf16_nhwc_compiled"; do
        set -- $run
        local options=()
        [ -n "${4:-}" ] && options=(--networks "$4" --fused-optimizer)
        TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache_startup" TRITON_CACHE_DIR="$WORK/$3" \
            $PY benchmarks/startup.py --config cifar10_K32 --batch 64 --backend "$1" --precompile "$2" \
            "${options[@]}" --out "$WORK/startup.json" || rc=1
    done
    # why the H200's parallel precompile took as long as serial compiles: does the compiler overlap on threads here?
    $PY benchmarks/compile_overlap.py --specs 8 --threads 8 --out "$WORK/compile_overlap.json" || rc=1
    return $rc
}

bench_model_cold() {
    # the Triton cache the startup stage filled (its cold numbers are in startup.json): no second compile here.
    # BENCH_MODEL_SELECT: a pytest -k expression over the cases (the session preset: cifar10), else all of them
    local select=()
    [ -n "${BENCH_MODEL_SELECT:-}" ] && select=(-k "$BENCH_MODEL_SELECT")
    TRITON_CACHE_DIR="$WORK/triton_cache_startup" bench model benchmarks/bench_model.py "${select[@]}"
}

bench_ops_files() {
    # batched LU first (issue 3's targets), then the fused kernels (issue 4), then the reference per-op cases;
    # the compiled per-op variants run in bench_compile. The kernels startup/bench_model compiled are reused.
    local select=()
    [ -n "${BENCH_OPS_SELECT:-}" ] && select=(-k "$BENCH_OPS_SELECT")
    TRITON_CACHE_DIR="$WORK/triton_cache_startup" GLOWFAST_BENCH_COMPILE=0 bench ops benchmarks/bench_batched_lu.py benchmarks/bench_fused_step.py \
        benchmarks/bench_flow_ops.py "${select[@]}"
}

bench_compile() {
    # bench_model.py first: with GLOWFAST_BENCH_COMPILE_MODEL set, the whole-model compile is the priority
    GLOWFAST_BENCH_COMPILE=auto bench compile benchmarks/bench_model.py benchmarks/bench_flow_ops.py \
        -k "compiled or compile_time"
}

profile() {
    # the CIFAR-10 step at batch 64 (issue 6's first target): compiled bf16 NHWC networks with their thin 3x3 convs
    # as GEMMs, the ReLUs in the GEMMs' epilogues, FusedAdamax and exact-fp32 backward dots (written in the 25th and
    # 26th sessions for the B256 gap, untimed), then the compiled networks as they are (the fastest measured), then bf16 NHWC networks; the
    # kernels startup/bench_model compiled are reused. PROFILE_BATCHES (default "64") and PROFILE_FLAGS
    # (';'-separated option sets, "none" for the fp32 step) pick other steps
    local rc=0 flags batch sets
    local default="--bf16 --channels-last --compile-networks --thin-gemms --relu-epilogue --fused-optimizer"
    default+=" --exact-backward-dots"
    default+=";--bf16 --channels-last --compile-networks;--bf16 --channels-last"
    IFS=';' read -r -a sets <<< "${PROFILE_FLAGS:-$default}"
    for batch in ${PROFILE_BATCHES:-64}; do
        for flags in "${sets[@]}"; do
            [ "$flags" = none ] && flags=""
            echo "profile_step.py --batch $batch $flags"
            # shellcheck disable=SC2086  # $flags: zero to seven options
            TRITON_CACHE_DIR="$WORK/triton_cache_startup" $PY benchmarks/profile_step.py --config cifar10_K32 \
                --batch "$batch" --backend fused $flags --steps 5 --out "$LOGS/profile" || rc=1
        done
    done
    return $rc
}

tune() {
    # the issue's bandwidth shapes and CIFAR-10's levels, backward kernels first (most changed). cp 64 and 32 first:
    # the 22nd session's sweep covered cp 16 only (its best tiles are the defaults since); the reducing backward
    # kernels also at 16 programs per SM (the rule's 4 left the cross-step backward at 5 % of the copy bandwidth),
    # and the kernels with a dot also at exact fp32 ("ieee": half the instructions per pixel of the 3xTF32 default
    # at cp 16 in the sm_90 SASS, so possibly exact and faster there). The actnorm + 1x1 conv forward leads: its tile
    # family (also the inverse's and the step inverse's) holds one program per SM at cp 64 with the default tile, and
    # the candidates now reach the quarter tiles that hold three (RESULTS.md, fifth run)
    local kernels=actnorm_invconv/fwd,cross_step/bwd,actnorm_invconv/bwd,cross_step/fwd,coupling/bwd,coupling/fwd
    local args=(--budget "${TUNE_BUDGET:-75}" --kernels "${TUNE_KERNELS:-$kernels}"
                --shapes "${TUNE_SHAPES:-64x48x64x64,256x24x8x8,64x12x128x128,256x12x16x16}"
                --programs-per-sm "${TUNE_PROGRAMS_PER_SM-16}" --precisions "${TUNE_PRECISIONS-ieee}")
    echo "glowfast.kernels.tune ${args[*]}"
    TRITON_CACHE_DIR="$WORK/triton_cache_startup" pymod glowfast.kernels.tune --out "$WORK/tune" "${args[@]}"
    local rc=$?
    cp "$WORK/tune/tune.md" "$OUT/tune.md" 2>/dev/null  # also when a candidate failed: the table says which
    return $rc
}

train() {
    local args=(--steps "$TRAIN_STEPS" --log-interval 20 --eval-interval "$TRAIN_STEPS" --no-progress
                --device cuda --run-dir "$WORK/train_run" --seed 0)
    local backend=fused
    if ! $PY -c "import glowfast.fused" 2>/dev/null; then
        backend=auto; echo "glowfast.fused does not import: --backend auto"
    fi
    local data_dir=""
    for d in data gpudata; do [ -d "$d/MNIST" ] && { data_dir=$d; break; }; done
    if [ -n "$data_dir" ]; then
        args+=(--dataset mnist --data-dir "$data_dir" -K 16 -L 3 --hidden-channels 512 --batch-size 64
               --backend "$backend")
    else
        echo "no data/MNIST or gpudata/MNIST: the default digits run on cuda"
        args+=(--dataset digits)
    fi
    echo "python -m glowfast.train ${args[*]}"
    pymod glowfast.train "${args[@]}"
}

tf32_bias() {
    # the training run's model: held-out bits/dim with the fused path at its default (3xTF32) and plain TF32 dots,
    # the reference path at cuDNN's default and the fused path in full fp32, each vs the model in float64
    [ -f "$WORK/train_run/checkpoints/last.pt" ] || { echo "no training run checkpoint: nothing to measure"; return 1; }
    local args=(--run "$WORK/train_run" --device cuda --test-images 2000)
    for d in data gpudata; do [ -d "$d/MNIST" ] && { args+=(--data-dir "$d"); break; }; done
    $PY benchmarks/tf32_rounding.py "${args[@]}"
}

# (pytest_workers too: the tests stage calls it, and each stage runs in a fresh `bash -c`)
export -f pymod env_info build tests sanitizer startup bench bench_model_cold bench_ops_files bench_compile profile tune \
    train tf32_bias pytest_workers
export ROOT OUT WORK LOGS PY TRAIN_STEPS GPU_TESTS=${GPU_TESTS:-} GPU_TEST_WORKERS=${GPU_TEST_WORKERS:-4} TUNE_BUDGET=${TUNE_BUDGET:-75} \
    BENCH_MODEL_SELECT=${BENCH_MODEL_SELECT:-} BENCH_OPS_SELECT=${BENCH_OPS_SELECT:-}
# (a preset's values reach the stages' shells; unset ones stay unset)
export PROFILE_BATCHES PROFILE_FLAGS TUNE_KERNELS TUNE_SHAPES TUNE_PRECISIONS TUNE_PROGRAMS_PER_SM

run_stage() {  # the stage NAME with its cap, minimum and function
    case $1 in
        env)           stage env 30 5 -- env_info ;;
        build)         stage build 240 30 -- build ;;
        tests)         stage tests "${MAX_tests:-170}" 30 -- tests ;;
        sanitizer)     stage sanitizer "${MAX_sanitizer:-150}" 20 -- sanitizer ;;
        startup)       stage startup "${MAX_startup:-170}" 30 -- startup ;;
        bench_model)   stage bench_model "${MAX_bench_model:-170}" 40 -- bench_model_cold ;;
        bench_ops)     stage bench_ops "${MAX_bench_ops:-130}" 20 -- bench_ops_files ;;
        profile)       stage profile "${MAX_profile:-60}" 20 -- profile ;;
        tune)          stage tune "${MAX_tune:-110}" 40 -- tune ;;
        train)         stage train "${MAX_train:-150}" 40 -- train ;;
        tf32)          stage tf32 "${MAX_tf32:-60}" 20 -- tf32_bias ;;
        bench_compile) stage bench_compile "${GPU_CHECK_COMPILE_MAX:-200}" 40 -- bench_compile ;;
    esac
}
# The functional stages (no timings: the tests, compute-sanitizer, the short training run, whose speed is then not
# a benchmark, and its TF32 check after it) run side by side right after the build when more than one is selected
# (GPU_CHECK_PARALLEL=0: in order); every timed stage runs alone after them.
SIDE_BY_SIDE=()
if [ "${GPU_CHECK_PARALLEL:-1}" = 1 ]; then
    for name in tests sanitizer train; do want "$name" && SIDE_BY_SIDE+=("$name"); done
    (( ${#SIDE_BY_SIDE[@]} > 1 )) || SIDE_BY_SIDE=()
    [[ " ${SIDE_BY_SIDE[*]} " == *" train "* ]] && want tf32 && SIDE_BY_SIDE+=(tf32)  # in train's job, after it
fi
run_stage env
run_stage build
if (( ${#SIDE_BY_SIDE[@]} )); then
    echo "== side by side: ${SIDE_BY_SIDE[*]}"
    for name in "${SIDE_BY_SIDE[@]}"; do
        case $name in
            tf32) ;;
            train) { run_stage train; want tf32 && run_stage tf32; } & ;;
            *) run_stage "$name" & ;;
        esac
    done
    wait
fi
# the other selected stages in the order given (a preset's order: the session preset measures the per-op targets
# before the whole-model ones), then a row for each stage not selected
for name in $STAGES; do
    [[ " env build report ${SIDE_BY_SIDE[*]} " == *" $name "* ]] || run_stage "$name"
done
for name in $ALL_STAGES; do
    [[ " env build report " == *" $name "* ]] || want "$name" || run_stage "$name"
done

# ------------------------------------------------------------------------------------------------ report
jsons=()
for n in model ops compile; do [ -s "$WORK/bench_$n.json" ] && jsons+=("$WORK/bench_$n.json"); done
startup_args=()
[ -s "$WORK/startup.json" ] && { startup_args=(--startup "$WORK/startup.json"); cp "$WORK/startup.json" "$LOGS/"; }
[ -s "$WORK/compile_overlap.json" ] && cp "$WORK/compile_overlap.json" "$LOGS/"
if want report && (( ${#jsons[@]} + ${#startup_args[@]} > 0 )); then
    # not through stage(): the budget may be spent, and this is the file the whole session is for (seconds)
    t0=$(date +%s)
    if timeout 60 $PY benchmarks/report.py "${jsons[@]}" "${startup_args[@]}" --out "$OUT/RESULTS.md" \
        --title "GPU run of benchmarks/gpu_check.sh $PRESET" \
        --note "One bare machine, one command (\`bash benchmarks/gpu_check.sh $PRESET\`; stages in summary.md)." \
        > "$LOGS/report.log" 2>&1; then
        echo -e "report\tok\t$(( $(date +%s) - t0 ))\t" >> "$SUMMARY_ROWS"
    else
        echo -e "report\tFAIL\t$(( $(date +%s) - t0 ))\t$(tail -1 "$LOGS/report.log" | cut -c1-160)" >> "$SUMMARY_ROWS"
    fi
    $PY - "$OUT/results.json" "${jsons[@]}" <<'EOF'
import json, sys
out, paths = sys.argv[1], sys.argv[2:]
if not paths:  # start-up records only
    sys.exit(0)
merged = None
for p in paths:
    d = json.load(open(p))
    if merged is None:
        merged = d
    else:
        merged["benchmarks"] += d["benchmarks"]
merged["merged_from"] = paths
json.dump(merged, open(out, "w"), indent=1)
EOF
elif want report; then
    echo -e "report\tskipped (no benchmark JSON)\t0\t" >> "$SUMMARY_ROWS"
else
    echo -e "report\tnot selected\t0\t" >> "$SUMMARY_ROWS"
fi

# ------------------------------------------------------------------------------------------------ outputs
if [ -d "$WORK/train_run" ]; then
    [ -f "$WORK/train_run/metrics.jsonl" ] && cp "$WORK/train_run/metrics.jsonl" "$OUT/train_metrics.jsonl"
    [ -f "$WORK/train_run/summary.json" ] && cp "$WORK/train_run/summary.json" "$OUT/train_summary.json"
    rm -rf "$WORK/train_run/checkpoints"
fi

{
    echo "# gpu_check.sh summary"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit: $COMMIT"
    echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    echo "- total wall time: $(elapsed) s of a ${BUDGET} s budget"
    echo "- peer: $($PY -c 'import normflows; print("normflows", normflows.__version__)' 2>/dev/null || echo 'normflows not importable (peer benchmarks skipped)')"
    workers=$(grep -h '^pytest workers:' "$LOGS/tests.log" 2>/dev/null | head -1)
    echo "- test workers: ${workers:-(the tests did not run)}"
    (( ${#SIDE_BY_SIDE[@]} )) && echo "- side by side (functional, no timings): ${SIDE_BY_SIDE[*]}"
    [ -f "$LOGS/cpp_exception_probe.log" ] && echo "- $(head -1 "$LOGS/cpp_exception_probe.log") (logs/cpp_exception_probe.log); $(grep -m1 "^toolchain:" "$LOGS/cpp_exception_probe.log")"
    echo
    echo "| stage | status | seconds | last result line |"
    echo "| --- | --- | ---: | --- |"
    while IFS=$'\t' read -r n s t note; do echo "| $n | $s | $t | ${note:-} |"; done < "$SUMMARY_ROWS"
    echo
    if [ -f "$OUT/train_summary.json" ]; then
        echo "## Training run (train_summary.json)"; echo; echo '```'; cat "$OUT/train_summary.json"; echo; echo '```'
    elif [ -f "$OUT/train_metrics.jsonl" ]; then
        echo "## Training run: last metrics records"; echo; echo '```'; tail -3 "$OUT/train_metrics.jsonl"; echo '```'
    fi
    if [ -f "$LOGS/profile/profile.md" ]; then
        echo; sed -e '1s/^# /## /' -e '1!s/^## /### /' "$LOGS/profile/profile.md"
    fi
    if grep -q '^| ' "$LOGS/tf32.log" 2>/dev/null; then
        echo; echo "## TF32 vs float64: held-out bits/dim of the training run's model (tf32 stage)"; echo
        grep -E '^(held-out|\| )' "$LOGS/tf32.log"
    fi
    if [ -f "$OUT/RESULTS.md" ]; then
        echo; echo "## Headline (from RESULTS.md)"; echo
        # the targets table, then the whole-model detail rows (images/s, peak memory, first call, compile)
        $PY - "$OUT/RESULTS.md" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
out, on = [], False
for line in lines:
    if line.startswith("**Measured on"):  # report.py's caveat: the targets graded on a GPU other than an H100
        out += [line, ""]
    if line.startswith("### Issue 6 targets"):
        on = True
    elif line.startswith("### ") and on:
        break
    if on:
        out.append(line)
detail_header = next((i for i, l in enumerate(lines) if l.startswith("| group | variant |")), None)
rows = [l for l in lines if re.match(r"\| (train_step|sample64|compile)/[^|:]+\| [a-z]", l)]  # not target rows
if rows and detail_header is not None:
    out += ["", lines[detail_header], lines[detail_header + 1]] + rows
print("\n".join(out))
EOF
    fi
    echo
    echo "## Failures and skips (tails of the logs)"
    for f in "$LOGS"/*.log; do
        if grep -q -E "FAILED|ERROR|Error|Traceback" "$f"; then
            echo; echo "### $(basename "$f")"; echo '```'
            grep -E "^(FAILED|ERROR)|Error" "$f" | head -15
            echo '```'
        fi
    done
} > "$OUT/summary.md"

cp "$WORK"/bench_*.json "$LOGS/" 2>/dev/null
[ -d "$WORK/tune" ] && cp -r "$WORK/tune" "$LOGS/tune"
[ -d "$WORK/train_run" ] && cp -r "$WORK/train_run" "$LOGS/train_run"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
ls -la "$OUT"
cat "$OUT/summary.md"
exit 0
