#!/usr/bin/env bash
# GPU check of issue 5: the CUDA part of `dyshuffle bench`, in under 5 minutes on a fresh H100
# machine that has only torch, torchvision, numpy and pillow (no install: PYTHONPATH=src).
#
#   bash scripts/gpu_bench.sh                 # CSVs to results/bench/, or to $OUT when set
#   BENCH_BUDGET=240 bash scripts/gpu_bench.sh
#   BENCH_DEVICE=cpu BENCH_BATCHES=2 BENCH_BUDGET=60 bash scripts/gpu_bench.sh   # smoke test
#
# Order: the issue's target first (ShuffleNetV2 1.0x, bf16, channels_last, batch 1024 down to 1),
# then 0.5x, then the single layers, then fp32 1.0x. Each step starts no new configuration once
# its share of the time budget (seconds, BENCH_BUDGET) is spent, and every CSV is rewritten as it
# grows, so a step cut short keeps what it measured. The markdown tables of all CSVs come last.
# To put them in the docs, copy the CSVs to results/bench/ and run
#   dyshuffle bench --from-csv results/bench/cuda-*.csv --markdown docs/BENCHMARKS.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-results/bench}
BUDGET=${BENCH_BUDGET:-220}
DEVICE=${BENCH_DEVICE:-cuda}
read -r -a BATCHES <<<"${BENCH_BATCHES:-1024 256 32 1}"
mkdir -p "$OUT_DIR"
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }

"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys
import torch
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
EOF

common=(--device "$DEVICE" --layout channels_last --warmup 3 --repeats 10 --min-block-ms 20
        --batch "${BATCHES[@]}" --out-dir "$OUT_DIR")

# 1. bf16 whole models, the target (1.0x) first: 60% of the budget; the model variants, and the
#    dynamic layer with its training step fused (DynamicShuffle(fused_training=True), opt-in until
#    a GPU measures it)
"$PY" -m dyshuffle bench "${common[@]}" --precision bf16 --part model \
    --models shufflenet_v2_x1_0 shufflenet_v2_x0_5 --stems cifar imagenet \
    --variants fixed fixed_native dynamic dynamic:fused_training=true static_dynamic \
    --time-budget $((BUDGET * 6 / 10)) >/dev/null

# 2. bf16 single layers (their own CSV, suffix _layers)
t=$(left)
if [ "$t" -gt 20 ]; then
    "$PY" -m dyshuffle bench "${common[@]}" --precision bf16 --part layer --suffix _layers \
        --time-budget $((t / 3)) >/dev/null
fi

# 3. fp32 whole models, 1.0x, with what is left
t=$(left)
if [ "$t" -gt 30 ]; then
    "$PY" -m dyshuffle bench "${common[@]}" --precision fp32 --part model \
        --models shufflenet_v2_x1_0 --stems cifar imagenet --time-budget $((t - 20)) >/dev/null
fi

echo "elapsed $(($(date +%s) - start)) s of a ${BUDGET} s budget"
# the tables, last
"$PY" -m dyshuffle bench --from-csv "$OUT_DIR"/"$DEVICE"-*.csv
