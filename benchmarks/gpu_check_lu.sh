#!/usr/bin/env bash
# GPU check of the batched LU ops: their tests (CUDA cases included) under compute-sanitizer memcheck.
# Run from anywhere on a GPU machine after `pip install --no-build-isolation --no-deps -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}  # the device image has python3 (its torch); a venv has both
$PY -c "import torch; assert torch.cuda.is_available(), 'gpu_check_lu.sh needs a CUDA device'"
# no caching allocator: each tensor its own allocation, so an overrun into a neighbour in the same block is seen
# LU_SANITIZER_WORKERS (default 4) pytest-xdist workers, each a process that memcheck follows: one process took
# over 95 s for 125 of the 162 tests on an H200 (2026-11-26, cut by its time limit), so they are spread. xdist
# installed or carried on PYTHONPATH (benchmarks/pytest_workers.sh, as gpu_check.sh's tests stage); else serial.
source benchmarks/pytest_workers.sh
read -r -a par <<< "$(pytest_workers "${LU_SANITIZER_WORKERS:-4}")"
echo "pytest workers: ${par[*]:-serial}"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
    --target-processes all \
    $PY -m pytest -q -x -p no:cacheprovider "${par[@]}" tests/test_batched_lu.py -m "not slow" "$@"
