#!/usr/bin/env bash
# One device call for issues 5 and 6, everything written to $OUT as it is produced:
#   1. the CUDA benchmark of the issue-5 target (ShuffleNetV2 1.0x, bf16, channels_last, both
#      stems, batch 1024 down to 1) on a quiet GPU, BENCH_BUDGET seconds;
#   2. the CIFAR-10 sweep, one worker process per seed sharing the GPU (seeds are the split, so
#      the first configurations of the sweep file get every seed), until SESSION_BUDGET seconds
#      after the start; each worker records its runs in $OUT/seed<k>/;
#   3. the records merged into $OUT/cifar10_runs.jsonl and $OUT/RESULTS.md.
#
#   here:  bash scripts/gpu_prepare.sh          (CIFAR-10 copy and the commit into .gpu/)
#   there: bash scripts/gpu_session.sh          (device run, carry [".gpu"], timeout 600)
#   here:  cat <files_at>/cifar10_runs.jsonl >> results/cifar10_runs.jsonl && dyshuffle sweep --report
#          cp <files_at>/bench/*.csv results/bench/ && dyshuffle bench --from-csv ... --markdown ...
#
# Smoke test on a CPU (tiny sizes):
#   BENCH_DEVICE=cpu BENCH_BATCHES=2 BENCH_BUDGET=30 SESSION_BUDGET=150 SEEDS="0 1" \
#     bash scripts/gpu_session.sh sweeps/cifar10_gpu.yaml --set device=cpu --set amp=none ...
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/gpu-out}
SESSION_BUDGET=${SESSION_BUDGET:-560}
BENCH_BUDGET=${BENCH_BUDGET:-100}
DEVICE=${BENCH_DEVICE:-cuda}
read -r -a SEEDS <<<"${SEEDS:-0 1 2}"
read -r -a BATCHES <<<"${BENCH_BATCHES:-1024 256 32 1}"
SWEEP=${1:-sweeps/cifar10_gpu.yaml}
shift || true
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DYSHUFFLE_CACHE=${DYSHUFFLE_CACHE:-/tmp/dyshuffle-cache}
[ -f .gpu/COMMIT ] && export DYSHUFFLE_COMMIT=${DYSHUFFLE_COMMIT:-$(cat .gpu/COMMIT)}
log() { echo "[session $(($(date +%s) - start))s] $*" | tee -a "$OUT/session.log"; }

log "commit ${DYSHUFFLE_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | tee -a "$OUT/session.log"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/session.log"

# 1. benchmark: the target configuration only, on a quiet GPU
log "bench: ShuffleNetV2 1.0x bf16 channels_last, batches ${BATCHES[*]}, budget ${BENCH_BUDGET}s"
python3 -m dyshuffle bench --device "$DEVICE" --layout channels_last --precision bf16 \
    --part model --models shufflenet_v2_x1_0 --stems cifar imagenet --batch "${BATCHES[@]}" \
    --warmup 3 --repeats 10 --min-block-ms 20 --time-budget "$BENCH_BUDGET" \
    --out-dir "$OUT/bench" >"$OUT/bench.log" 2>&1 || log "bench failed (see bench.log)"
python3 -m dyshuffle bench --from-csv "$OUT"/bench/*.csv >"$OUT/bench.md" 2>>"$OUT/bench.log"

# 2. decode the data once (the workers read the cache), then one sweep worker per seed
python3 -c "from dyshuffle.data.datasets import load_data; load_data('imagefolder',
'.gpu/cifar10-jpeg.tgz', loader='memory', workers=8, verbose=True)" 2>&1 | tee -a "$OUT/session.log"
left=$((SESSION_BUDGET - ($(date +%s) - start)))
log "sweep $SWEEP: seeds ${SEEDS[*]} in parallel, ${left}s each"
note="${#SEEDS[@]} sweep runs (one per seed) shared the GPU at a time; train img/s is per run"
for s in "${SEEDS[@]}"; do
    mkdir -p "$OUT/seed$s"
    python3 -m dyshuffle sweep "$SWEEP" --seeds "$s" --time-budget "$left" --note "$note" \
        --records "$OUT/seed$s/cifar10_runs.jsonl" --output "$OUT/seed$s/RESULTS.md" \
        --set data_dir=.gpu/cifar10-jpeg.tgz --output-root /tmp/sweep-runs "$@" \
        >"$OUT/seed$s/sweep.log" 2>&1 &
done
wait
log "sweep done"

# 3. one record file and one report
cat "$OUT"/seed*/cifar10_runs.jsonl >"$OUT/cifar10_runs.jsonl" 2>/dev/null
python3 -m dyshuffle sweep --report --records "$OUT/cifar10_runs.jsonl" --output "$OUT/RESULTS.md"
log "end"
cat "$OUT/bench.md" "$OUT/RESULTS.md"
