#!/usr/bin/env bash
# The full-config experiments in one budgeted GPU call each (H100; see results/README.md).
#
# On the CPU machine, first pack the datasets small enough to carry (git-ignored folder, ~41 MB):
#   bash results/gpu_full.sh pack            # data/{MNIST,FashionMNIST}/raw/*-ubyte -> gpudata/.../*.gz
# then, with the device tool (carry: ["gpudata"]), one call per half:
#   bash results/gpu_full.sh ablations       # ablation-permutation + ablation-coupling   (~6-7 min est.)
#   bash results/gpu_full.sh main            # samples interpolation attributes ood typicality (448 s on an H200)
#   bash results/gpu_full.sh shared          # samples alone: trains the shared MNIST model (~5 min), to try a
#                                            # training option, e.g. GPU_FULL_ARGS="--amp bf16 --channels-last"
#                                            # GPU_FULL_OUT=results/full-bf16
# GPU_FULL_ARGS: extra options for every glowfast.experiments call; GPU_FULL_OUT: the results folder (results/full).
# Each writes results/full/<experiment>/ and packs it (without the model cache) into $OUT/results-*.tgz after
# every group of experiments, one process per group within GPU_FULL_BUDGET (570 s): an overrun loses only the
# group it cuts. The device copy has no .git (and carries uncommitted edits): pass
# GLOWFAST_GIT_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty) so that the results name their
# commit honestly.
set -euo pipefail
what=${1:?usage: gpu_full.sh pack|ablations|main|shared}
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
PY=${PYTHON:-python3}  # the device image has python3 (its torch); a venv has both
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_FULL_BUDGET:-570}  # seconds for everything, under the device tool's 600 s per command
# No build by default: the experiments' models use LU weights, whose log-determinants need no batched-LU op, and
# the fused path inverts W with torch.linalg where glowfast._C is missing (sampling only) -- the ~1 min of nvcc
# stays in the budget. GPU_FULL_BUILD=1 builds it (not again when an earlier call on this machine built the same
# sources: benchmarks/gpu_build.sh).
if [[ ${GPU_FULL_BUILD:-0} == 1 ]]; then
  PYTHON=$PY bash benchmarks/gpu_build.sh > "$OUT/install.log" 2>&1 \
    || echo "the build failed (see install.log); running from the tree"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
case $what in
  ablations) groups=("ablation-permutation" "ablation-coupling") ;;
  main) groups=("samples interpolation attributes" "ood typicality") ;;  # ood and typicality share their scores
  shared) groups=("samples") ;;
  *) echo "unknown: $what"; exit 2 ;;
esac
# One process per group of experiments (the trained models are cached in /tmp/glowfast-models and reused),
# each under the time left, and the results packed after each: an overrun loses at most the group it cut, never
# the finished ones (the device tool returns only what is under $OUT when its limit kills the command).
status=0
base=${GPU_FULL_OUT:-results/full}
for name in "${groups[@]}"; do
  left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if (( left < 20 )); then
    echo "== $name: skipped, $left s left of the ${BUDGET} s budget" | tee -a "$OUT/log-$what.txt"; status=3; continue
  fi
  echo "== $name (limit ${left} s, $(( $(date +%s) - START )) s elapsed)" | tee -a "$OUT/log-$what.txt"
  # shellcheck disable=SC2086  # $name: a group of experiment names
  rc=0
  # one experiment name writes into --out itself, several into --out/<name>: every experiment its own folder
  out=$base; [[ $name == *" "* ]] || out=$base/$name
  # shellcheck disable=SC2086  # GPU_FULL_ARGS: options, split on spaces
  timeout -k 10 "$left" $PY -m glowfast.experiments $name --config full --data-dir gpudata --out "$out" \
    --cache /tmp/glowfast-models --device cuda --backend auto ${GPU_FULL_ARGS:-} 2>&1 \
    | tee -a "$OUT/log-$what.txt" || rc=$?
  (( rc == 0 )) || { echo "== $name: exit $rc$( (( rc == 124 || rc == 137 )) && echo ' (time limit)')" \
    | tee -a "$OUT/log-$what.txt"; status=3; }
  # written aside, then renamed: a kill during this tar leaves the previous group's complete archive in place
  if [ -d "$base" ] && tar czf "$OUT/results-$what.tgz.part" --exclude=models "$base"; then
    mv -f "$OUT/results-$what.tgz.part" "$OUT/results-$what.tgz"
  fi
done
echo "== done in $(( $(date +%s) - START )) s, status $status (3: a group failed or was cut, see above)" \
  | tee -a "$OUT/log-$what.txt"
exit $status  # never the 124 of a cut group: the script itself finished and packed what there is
