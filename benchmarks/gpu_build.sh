#!/usr/bin/env bash
# Build glowfast._C (with its CUDA kernels) for this GPU's architecture, unless the build already here is of the
# same sources: the device machine keeps ignored build outputs between calls, and `pip install -e .` would
# otherwise compile everything again in a fresh temporary folder (about a minute of a 600 s command).
# Used by benchmarks/gpu_check.sh (build stage) and results/gpu_full.sh. Stamp: .glowfast_build_stamp
# (git-ignored): a hash of setup.py, pyproject.toml and csrc/, the architecture and the torch version.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
arch=${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}
torch_version=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null)
want=$( { cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; echo "$arch $torch_version"; } \
       | sha256sum | cut -c1-16)
check='import glowfast._C, torch; from glowfast.ops.batched_lu import has_cuda_kernels
assert has_cuda_kernels() or not torch.cuda.is_available(), "built without the CUDA kernels (nvcc not found?)"
print("glowfast._C:", glowfast._C.__file__, "CUDA kernels:", has_cuda_kernels())'
if [ "$(cat .glowfast_build_stamp 2>/dev/null)" = "$want" ] && $PY -c "$check" 2>/dev/null; then
    echo "glowfast._C is up to date (build stamp $want): not rebuilt"
    exit 0
fi
rm -f .glowfast_build_stamp
TORCH_CUDA_ARCH_LIST=$arch $PY -m pip install --no-build-isolation --no-deps -e . || exit 1
$PY -c "$check" || exit 1
echo "$want" > .glowfast_build_stamp
