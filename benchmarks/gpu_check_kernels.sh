#!/usr/bin/env bash
# GPU check of the fused Triton kernels: their equivalence and bad-input tests under compute-sanitizer memcheck
# (out-of-bounds or misaligned global memory accesses, e.g. a mask that misses the last partial pixel tile).
# Run from anywhere on a GPU machine after `pip install --no-build-isolation --no-deps -e .`; extra arguments go
# to pytest (e.g. -k coupling). PyTorch's caching allocator is switched off so that every tensor is its own
# allocation: an overrun into a neighbouring tensor of the same cached block would otherwise go unseen.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device image has python3 (its torch); a venv has both
$PY -c "import torch; assert torch.cuda.is_available(), 'gpu_check_kernels.sh needs a CUDA device'"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
    --target-processes all \
    $PY -m pytest -q -x -p no:cacheprovider tests/test_kernel_bad_input.py tests/test_kernel_coupling.py \
    tests/test_kernel_actnorm_invconv.py tests/test_kernel_cross_step.py tests/test_kernel_coupling_net.py "$@"
