#!/usr/bin/env bash
# On a GPU machine: run a sweep (default sweeps/cifar10_gpu.yaml) on the carried CIFAR-10 copy and
# leave the run records, the regenerated report and the log in $OUT.
#   here:  bash scripts/gpu_prepare.sh
#   there: bash scripts/gpu_sweep.sh sweeps/cifar10_gpu.yaml --seeds 0 --time-budget 540
#          (device run with carry [".gpu"]; one command may last 10 minutes)
#   here:  cat <files_at>/cifar10_runs.jsonl >> results/cifar10_runs.jsonl && dyshuffle sweep --report
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-out}
mkdir -p "$OUT"
# the device image has pyyaml, matplotlib and tqdm; the carried wheels only stand in when not
if ! python3 -c "import yaml, matplotlib, tqdm" 2>/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# no .git travels to the device: the commit comes from gpu_prepare.sh (-dirty if the tree changed)
. scripts/gpu_commit.sh
gpu_commit_export
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
SWEEP=${1:-sweeps/cifar10_gpu.yaml}
shift || true
python3 -m dyshuffle sweep "$SWEEP" --records "$OUT/cifar10_runs.jsonl" --output "$OUT/RESULTS.md" \
  --set data_dir=.gpu/cifar10-jpeg.tgz --output-root /tmp/sweep-runs "$@" 2>&1 | tee "$OUT/sweep.log"
