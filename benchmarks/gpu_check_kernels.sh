#!/usr/bin/env bash
# GPU check of the fused Triton kernels: their equivalence and bad-input tests under compute-sanitizer memcheck
# (out-of-bounds or misaligned global memory accesses, e.g. a mask that misses the last partial pixel tile).
# Run from anywhere on a GPU machine after `pip install --no-build-isolation --no-deps -e .`; extra arguments go
# to pytest (e.g. -k coupling). PyTorch's caching allocator is switched off so that every tensor is its own
# allocation: an overrun into a neighbouring tensor of the same cached block would otherwise go unseen.
#
# One sanitizer process per test file, side by side: a memcheck error ends its process (the CUDA context is
# unusable after it), and in one process for all files the 16th session's report in actnorm_invconv (below) left
# the coupling network's kernels unchecked. Each file's log follows in order; exit 1 if any file failed.
# That report: "Invalid __shared__ read of size 1024 bytes" at the 3xTF32 dot of _actnorm_invconv_bwd_kernel (cp 128),
# whose tile then compiled to a wgmma with N = 8 (an unpadded shared operand read past its end,
# triton-lang/triton#10629; tiles changed since, tests/test_triton_compile_sm90.py keeps N = 8 out). On a
# shared-memory report the failing file runs again with Triton's wgmma off (DISABLE_MMA_V3=1, a fresh kernel cache)
# and the shared-memory sizes of the backward builds are printed: clean without wgmma points at a wgmma shape again.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device image has python3 (its torch); a venv has both
$PY -c "import torch; assert torch.cuda.is_available(), 'gpu_check_kernels.sh needs a CUDA device'" || exit 1
FILES=(tests/test_kernel_bad_input.py tests/test_kernel_coupling.py tests/test_kernel_actnorm_invconv.py
       tests/test_kernel_cross_step.py tests/test_kernel_coupling_net.py)
LOGDIR=$(mktemp -d /tmp/sanitizer_kernels.XXXXXX)

memcheck() {  # memcheck LOG pytest-args...
    local log=$1; shift
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
        --target-processes all $PY -m pytest -q -x -p no:cacheprovider "$@" > "$log" 2>&1
}

pids=()
for f in "${FILES[@]}"; do
    memcheck "$LOGDIR/$(basename "$f" .py).log" "$f" "$@" &
    pids+=($!)
done
status=0 failed=()
for i in "${!FILES[@]}"; do
    wait "${pids[$i]}" || { status=1; failed+=("${FILES[$i]}"); }
done
for f in "${FILES[@]}"; do
    log="$LOGDIR/$(basename "$f" .py).log"
    echo "---- $f: $(grep -m1 'ERROR SUMMARY' "$log" || echo 'no summary')"
    cat "$log"
done

for f in "${failed[@]}"; do
    log="$LOGDIR/$(basename "$f" .py).log"
    grep -q "Invalid __shared__" "$log" || continue
    cache=$(mktemp -d /tmp/triton_cache_nommav3.XXXXXX)
    echo "---- $f again with DISABLE_MMA_V3=1 (Triton without wgmma), kernel cache $cache"
    DISABLE_MMA_V3=1 TRITON_CACHE_DIR=$cache memcheck "$LOGDIR/nommav3.log" "$f" "$@"
    echo "without wgmma: exit $?, $(grep -m1 'ERROR SUMMARY' "$LOGDIR/nommav3.log" || echo 'no summary')"
    tail -5 "$LOGDIR/nommav3.log"
done
(( status == 0 )) || $PY - <<'PY'
# the shared memory each cached kernel build was launched with (Triton's cache metadata), for the report above
import glob, json, os
root = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
for path in sorted(glob.glob(os.path.join(root, "*", "_actnorm_invconv_bwd_kernel.json"))):
    meta = json.load(open(path))
    print("cached build:", os.path.basename(os.path.dirname(path))[:12], "shared", meta.get("shared"),
          "B, num_warps", meta.get("num_warps"))
PY
exit $status
