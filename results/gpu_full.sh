#!/usr/bin/env bash
# The full-config experiments in one budgeted GPU call each (H100; see results/README.md).
#
# On the CPU machine, first pack the datasets small enough to carry (git-ignored folder, ~41 MB):
#   bash results/gpu_full.sh pack            # data/{MNIST,FashionMNIST}/raw/*-ubyte -> gpudata/.../*.gz
# then, with the device tool (carry: ["gpudata"]), one call per half:
#   bash results/gpu_full.sh ablations       # ablation-permutation + ablation-coupling   (~6-7 min est.)
#   bash results/gpu_full.sh main            # samples interpolation attributes ood typicality (~8-9 min est.)
# Each writes results/full/<experiment>/ and packs it (without the model cache) into $OUT/results-*.tgz.
set -euo pipefail
what=${1:?usage: gpu_full.sh pack|ablations|main}
cd "$(dirname "$0")/.."

if [[ $what == pack ]]; then
  for ds in MNIST FashionMNIST; do
    mkdir -p "gpudata/$ds/raw"
    for f in data/$ds/raw/*-ubyte; do gzip -c "$f" > "gpudata/$ds/raw/$(basename "$f").gz"; done
  done
  du -sh gpudata
  exit 0
fi

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || echo "editable install failed (see install.log); running from the tree"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
case $what in
  ablations) names=(ablation-permutation ablation-coupling) ;;
  main) names=(samples interpolation attributes ood typicality) ;;
  *) echo "unknown: $what"; exit 2 ;;
esac
status=0
python -m glowfast.experiments "${names[@]}" --config full --data-dir gpudata --out results/full \
  --cache /tmp/glowfast-models --device cuda --backend auto 2>&1 | tee "$OUT/log-$what.txt" || status=$?
tar czf "$OUT/results-$what.tgz" --exclude=models results/full
exit $status
