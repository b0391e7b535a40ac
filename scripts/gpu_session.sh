#!/usr/bin/env bash
# One device call for issues 5 and 6, everything written to $OUT as it is produced:
#   0. tests/test_fused.py and tests/test_fused_training.py on the GPU (the fused Triton kernels of
#      the hard dynamic shuffle and of its STE training step against the PyTorch path, eager and
#      under torch.compile) and the grouped auto-augment of the memory
#      loader against torchvision, FUSED_TESTS=1 (the default) only; pytest
#      comes from the wheels gpu_prepare.sh carries when the device has none;
#   1. the CUDA benchmark of the issue-5 target (ShuffleNetV2 1.0x, bf16, channels_last, both
#      stems, batch 1024 down to 1) on a quiet GPU: (a) eager, BENCH_BUDGET seconds; (b) the same
#      with --compile reduce-overhead (CUDA graphs take the launch overhead away from every variant
#      alike), COMPILE_BUDGET seconds, skipped when 0 or when it would leave the sweep under
#      SWEEP_MIN seconds; CSVs in $OUT/bench/ ((b) with the suffix _reduce-overhead);
#   2. the CIFAR-10 sweep by WORKERS processes sharing the GPU, worker k running the jobs
#      (seed, run) at positions i % WORKERS == k of the sweep (dyshuffle sweep --shard k/WORKERS;
#      seeds outer, so the first configurations of the sweep file get every seed first), until
#      SESSION_BUDGET seconds after the start. The dynamic model's training is bound by Python and
#      kernel-launch overhead, so more concurrent runs fill the GPU better. Each worker's record
#      file $OUT/worker<k>/cifar10_runs.jsonl starts as a copy of $RECORDS, so a run recorded there
#      (same sweep name, run, seed and device: the card's name) is skipped;
#   3. $OUT/cifar10_runs.jsonl: only the new records of all workers (also appended to
#      MACHINE_RECORDS, so a second call on the same warm machine skips them); $OUT/RESULTS.md:
#      the report of $RECORDS plus the machine's new records;
#   4. `dyshuffle inspect` of this call's seed-0 dynamic/learned/SDS checkpoints into
#      $OUT/inspect/<run>/ (the sweep leaves INSPECT_RESERVE seconds for it);
#   5. everything but the records, the reports, session.log and the bench CSVs packed into
#      $OUT/logs.tgz (a device returns at most 8 files, with plain names).
#
# A 15-minute device lease (start included: about 30-60 s) fits two calls on one warm machine,
# which waits only 30 s for the next one:
#   1. the fused kernel's tests and the benchmarks (EXPECT larger than what is left: the sweep
#      starts no run and the data are not decoded):
#      BENCH_BUDGET=100 COMPILE_BUDGET=100 SWEEP_MIN=0 SESSION_BUDGET=420 EXPECT=9999 \
#        bash scripts/gpu_session.sh           (timeout 440; the tests took 45 s in session 15,
#        before the compiled tests of session 23; the compiled bench starts only with 160 s left)
#   2. at once, the sweep alone with what is left (a run that does not fit is not started),
#      first the runs that decide issue 6 at all three seeds (then sweeps/cifar10_gpu.yaml):
#      BENCH_BUDGET=0 COMPILE_BUDGET=0 FUSED_TESTS=0 SESSION_BUDGET=380 EXPECT=300 \
#        bash scripts/gpu_session.sh sweeps/cifar10_gpu_first.yaml     (timeout 400)
#
#   here:  bash scripts/gpu_prepare.sh          (CIFAR-10 copy, the commit and the sums of the
#          code into .gpu/; records name the commit with -dirty if the tree there differs)
#   there: bash scripts/gpu_session.sh          (device run, carry [".gpu"], timeout 600)
#   here:  cat <files_at>/cifar10_runs.jsonl >> results/cifar10_runs.jsonl && dyshuffle sweep --report
#          cp <files_at>/bench/*.csv results/bench/ && dyshuffle bench --from-csv ... --markdown ...
#
# Environment (defaults): OUT (runs/gpu-out), SESSION_BUDGET (560 s from the start), WORKERS (6),
# SEEDS (the sweep file's; e.g. "0 1 2", passed as --seeds), RECORDS (results/cifar10_runs.jsonl:
# runs recorded there are skipped), RUNS_ROOT (/tmp/sweep-runs: run folders, a run folder left
# with last.pt is resumed), BENCH_DEVICE (cuda), BENCH_BATCHES ("1024 256 32 1"), BENCH_BUDGET
# (100 s; 0: none), COMPILE_BUDGET (120 s; 0: none; killed 60 s after it), COMPILE_BATCHES
# ("1024"), COMPILE_VARIANTS ("fixed dynamic:fused_training=true": the layer with both its fused
# kernels, which torch.compile keeps as operators), COMPILE_MODES ("train infer": session 14 has
# the compiled training step on PyTorch operators, 1.47 at CIFAR b1024), INSPECT_RESERVE
# (40 s), MACHINE_RECORDS (/tmp/dyshuffle-session-records.jsonl),
# SWEEP_MIN (240 s), EXPECT (0 s: start the first run whatever the budget), BENCH_VARIANTS ("fixed
# dynamic dynamic:fused_training=true": the dynamic layer without and with its fused training
# step), FUSED_TESTS
# (1; 0: skip step 0).
#
# Smoke test on a CPU (tiny sizes, about 4 minutes on 2 cores; COMPILE_BUDGET=0 skips the
# compiled bench; RECORDS names another file to check which runs are skipped):
#   OUT=/tmp/gs BENCH_DEVICE=cpu BENCH_BATCHES=2 BENCH_BUDGET=20 COMPILE_BUDGET=0 \
#     SESSION_BUDGET=200 WORKERS=2 SEEDS="0 1" bash scripts/gpu_session.sh sweeps/cifar10_gpu.yaml \
#     --set device=cpu --set amp=none --set channels_last=false --set epochs=1 \
#     --set train_subset=500 --set val_subset=500 --set model=shufflenet_v2_x0_5 \
#     --set batch_size=64 --set threads=1
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-runs/gpu-out}
SESSION_BUDGET=${SESSION_BUDGET:-560}
BENCH_BUDGET=${BENCH_BUDGET:-100}
COMPILE_BUDGET=${COMPILE_BUDGET:-120}
SWEEP_MIN=${SWEEP_MIN:-240}
WORKERS=${WORKERS:-6}
RECORDS=${RECORDS:-results/cifar10_runs.jsonl}
RUNS_ROOT=${RUNS_ROOT:-/tmp/sweep-runs}
# the new records of earlier calls on this (warm) machine: skipped too, as if in $RECORDS
MACHINE_RECORDS=${MACHINE_RECORDS:-/tmp/dyshuffle-session-records.jsonl}
INSPECT_RESERVE=${INSPECT_RESERVE:-40}
# seconds one sweep run is expected to take while WORKERS share the GPU, until one has finished:
# a worker starts no run that would not end inside the budget (a run cut off is lost). On the
# H200, 24 epochs of ShuffleNetV2 1.0x took 100 s (fixed) to 180 s (dynamic) with 3 sharing.
EXPECT=${EXPECT:-0}
DEVICE=${BENCH_DEVICE:-cuda}
read -r -a BATCHES <<<"${BENCH_BATCHES:-1024 256 32 1}"
SEED_ARGS=()
[ -n "${SEEDS:-}" ] && read -r -a SEED_ARGS <<<"--seeds $SEEDS"
SWEEP=${1:-sweeps/cifar10_gpu.yaml}
shift || true
if ! [[ $WORKERS =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_session.sh: WORKERS=$WORKERS is not a positive integer" >&2
    exit 2
fi
mkdir -p "$OUT/bench"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DYSHUFFLE_CACHE=${DYSHUFFLE_CACHE:-/tmp/dyshuffle-cache}
log() { echo "[session $(($(date +%s) - start))s] $*" | tee -a "$OUT/session.log"; }
left() { echo $((SESSION_BUDGET - ($(date +%s) - start))); }

touch "$OUT/session.log.start"  # checkpoints newer than this are this call's
. scripts/gpu_commit.sh
gpu_commit_export 2>"$OUT/commit.warn"  # -dirty when the tree is not the prepared commit
[ -s "$OUT/commit.warn" ] && log "$(cat "$OUT/commit.warn")"
rm -f "$OUT/commit.warn"
log "commit ${DYSHUFFLE_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | tee -a "$OUT/session.log"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/session.log"

# 0. the fused kernel's tests on this GPU (they compare it with the PyTorch path, bit for bit)
if [ "${FUSED_TESTS:-1}" = 1 ]; then
    if ! python3 -c "import pytest" 2>/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site .gpu/whl/*.whl >/dev/null 2>&1
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    # and the memory loader's grouped auto-augment against torchvision per image, on the GPU
    tests="tests/test_fused.py tests/test_fused_training.py"
    tests="$tests tests/test_augment.py::test_grouped_batch_equals_torchvision_per_sample"
    log "$tests on $DEVICE"
    # shellcheck disable=SC2086
    timeout -k 5 240 python3 -m pytest -q -p no:cacheprovider -rs $tests \
        >"$OUT/fused-tests.log" 2>&1
    log "tests on $DEVICE: exit $? ($(tail -n 1 "$OUT/fused-tests.log"))"
fi

# the host time of one layer call on this machine's CPU (the GPU's code path, kernels not run;
# a few seconds): what each dynamic layer adds where the GPU waits for the host
timeout -k 5 60 python3 -m dyshuffle.tools.host_time --calls 500 --rounds 5 \
    >"$OUT/host-time.log" 2>&1
log "host time per layer call: exit $? (host-time.log)"

# 1. benchmark: the target configuration only, on a quiet GPU.
# BENCH_VARIANTS: the variants of the eager bench (the compiled one: COMPILE_VARIANTS). The
# default: the dynamic layer (its fused inference kernel, layers/fused.py, is the default on
# CUDA) and the same layer with its training step fused (layers/fused_training.py, opt-in until
# this measures it), in the same run; three variants, so the ImageNet stem fits the budget. Add
# dynamic:fused=false for the layer without its inference kernel (session 15 on the H200: a third
# slower in inference), static_dynamic for SDS, dynamic:factor_grad=channels for
# DynamicShuffle(factor_grad='channels') (session 14 on the H200: training within the spread of
# the default, 1.13x its memory).
BENCH_VARIANTS=${BENCH_VARIANTS:-fixed dynamic dynamic:fused_training=true}
read -r -a VARIANTS <<<"$BENCH_VARIANTS"
bench=(python3 -m dyshuffle bench --device "$DEVICE" --layout channels_last --precision bf16
    --part model --models shufflenet_v2_x1_0 --stems cifar imagenet --batch "${BATCHES[@]}"
    --variants "${VARIANTS[@]}" --warmup 3 --repeats 10 --min-block-ms 20 --out-dir "$OUT/bench")
[ "$BENCH_BUDGET" -gt 0 ] && log "bench (a) eager: ShuffleNetV2 1.0x bf16 channels_last," \
    "batches ${BATCHES[*]}, variants ${VARIANTS[*]}, budget ${BENCH_BUDGET}s"
if [ "$BENCH_BUDGET" -le 0 ]; then
    log "bench (a) eager: skipped (BENCH_BUDGET=$BENCH_BUDGET)"
else
    "${bench[@]}" --time-budget "$BENCH_BUDGET" >"$OUT/bench.log" 2>&1 \
        || log "bench (a) failed (see bench.log)"
fi
if [ "$COMPILE_BUDGET" -le 0 ]; then
    log "bench (b) compiled: skipped (COMPILE_BUDGET=$COMPILE_BUDGET)"
elif [ $(($(left) - COMPILE_BUDGET - 60)) -lt "$SWEEP_MIN" ]; then
    log "bench (b) compiled: skipped (it would leave the sweep under SWEEP_MIN=${SWEEP_MIN}s)"
else
    # each variant compiles once per shape: only the target ratio, at COMPILE_BATCHES (session
    # 14: 120 s covered the CIFAR stem at batch 1024 only, so 1024 alone: both stems)
    read -r -a CBATCHES <<<"${COMPILE_BATCHES:-1024}"
    # session 15: compiled, the layer took the PyTorch path on the H200 (torch 2.11); since
    # session 23 both fused steps are operators that torch.compile keeps (step 0's
    # test_compiled_* say whether they are kept on the device). Two variants, training first:
    # each compiles per mode, and the budget stops between modes (in inference
    # fused_training=true is the default layer, the fused inference kernel)
    read -r -a CVARIANTS <<<"${COMPILE_VARIANTS:-fixed dynamic:fused_training=true}"
    read -r -a CMODES <<<"${COMPILE_MODES:-train infer}"
    log "bench (b) --compile reduce-overhead: variants ${CVARIANTS[*]}, modes ${CMODES[*]}," \
        "batches ${CBATCHES[*]}," \
        "budget ${COMPILE_BUDGET}s (killed at $((COMPILE_BUDGET + 60))s)"
    # the CSV name does not say the compile mode: the suffix keeps (a)'s CSV. perf_hints: the
    # log says where Inductor skips CUDA graphs ("skipping cudagraphs due to ...")
    TORCH_LOGS=perf_hints timeout -k 10 $((COMPILE_BUDGET + 60)) "${bench[@]}" --batch "${CBATCHES[@]}" \
        --variants "${CVARIANTS[@]}" --modes "${CMODES[@]}" --compile reduce-overhead \
        --suffix _reduce-overhead \
        --time-budget "$COMPILE_BUDGET" >"$OUT/bench-compiled.log" 2>&1 \
        || log "bench (b) failed or was stopped (see bench-compiled.log)"
fi
compgen -G "$OUT/bench/*.csv" >/dev/null \
    && python3 -m dyshuffle bench --from-csv "$OUT"/bench/*.csv >"$OUT/bench.md" 2>>"$OUT/bench.log"

# 2. decode the data once (the workers read the cache), then WORKERS sweep workers; no decoding
# when no run fits (session 15: the minute it took ran the benchmark call past its time limit)
if [ "$EXPECT" -le $(($(left) - INSPECT_RESERVE)) ]; then
    python3 -c "from dyshuffle.data.datasets import load_data; load_data('imagefolder',
'.gpu/cifar10-jpeg.tgz', loader='memory', workers=8, verbose=True)" 2>&1 | tee -a "$OUT/session.log"
else
    log "data: not decoded (EXPECT=${EXPECT}s: no sweep run fits in what is left)"
fi
sweep=(python3 -m dyshuffle sweep "$SWEEP" "${SEED_ARGS[@]}" --set data_dir=.gpu/cifar10-jpeg.tgz
    --output-root "$RUNS_ROOT" "$@")
# every worker's records start as $RECORDS (with a final newline), so its recorded runs are skipped
for ((k = 0; k < WORKERS; k++)); do
    mkdir -p "$OUT/worker$k"
    : >"$OUT/worker$k/cifar10_runs.jsonl"
    for f in "$RECORDS" "$MACHINE_RECORDS"; do
        [ -s "$f" ] && sed -e '$a\' "$f" >>"$OUT/worker$k/cifar10_runs.jsonl"
    done
    rm -f "$OUT/worker$k/RESULTS.md"
    "${sweep[@]}" --shard "$k/$WORKERS" --records "$OUT/worker$k/cifar10_runs.jsonl" --dry-run \
        >"$OUT/worker$k/plan.log" 2>&1 &
done
wait
copied=$(wc -l <"$OUT/worker0/cifar10_runs.jsonl")
busy=()  # the workers with a job to run
njobs=0
for ((k = 0; k < WORKERS; k++)); do
    n=$(grep -c '^\[sweep\] dyshuffle train' "$OUT/worker$k/plan.log")
    njobs=$((njobs + n))
    [ "$n" -gt 0 ] && busy+=("$k")
done
left=$(($(left) - INSPECT_RESERVE))
log "sweep $SWEEP ${SEED_ARGS[*]}: $njobs job(s) not in $RECORDS ($copied lines), workers" \
    "${busy[*]:-none} of $WORKERS have some, ${left}s each"
note="up to ${#busy[@]} sweep runs shared the GPU at a time ($WORKERS workers, dyshuffle sweep"
note="$note --shard k/$WORKERS); train img/s is per run"
for k in "${busy[@]}"; do
    "${sweep[@]}" --shard "$k/$WORKERS" --records "$OUT/worker$k/cifar10_runs.jsonl" \
        --output "$OUT/worker$k/RESULTS.md" --time-budget "$left" --expect "$EXPECT" --note "$note" \
        >"$OUT/worker$k/sweep.log" 2>&1 &
done
wait
log "sweep done"

# 3. the new records only (the lines after the copied ones) and one report with $RECORDS
for ((k = 0; k < WORKERS; k++)); do
    tail -n +$((copied + 1)) "$OUT/worker$k/cifar10_runs.jsonl"
done >"$OUT/cifar10_runs.jsonl"
log "$(wc -l <"$OUT/cifar10_runs.jsonl") new record(s) in $OUT/cifar10_runs.jsonl"
cat "$OUT/cifar10_runs.jsonl" >>"$MACHINE_RECORDS"
report=("$RECORDS")
[ -s "$MACHINE_RECORDS" ] && report+=("$MACHINE_RECORDS")
python3 -m dyshuffle sweep --report --records "${report[@]}" --output "$OUT/RESULTS.md"

# 4. which permutations the dynamic models of this call choose (seed 0, 2,000 test images)
for ckpt in "$RUNS_ROOT"/*/*/seed0/last.pt; do
    [ -f "$ckpt" ] && [ "$ckpt" -nt "$OUT/session.log.start" ] || continue
    run=$(basename "$(dirname "$(dirname "$ckpt")")")
    case $run in *dynamic* | *learned* | *pointwise=sds*) ;; *) continue ;; esac
    [ "$(left)" -gt 10 ] || break
    log "inspect $run"
    timeout -k 5 $(($(left) > 60 ? 60 : $(left))) python3 -m dyshuffle inspect "$ckpt" \
        --data imagefolder --data-dir .gpu/cifar10-jpeg.tgz --max-samples 2000 --examples 0 \
        --output "$OUT/inspect/$run" >"$OUT/inspect-$run.log" 2>&1 || log "inspect $run failed"
done
log "end"
cat "$OUT/bench.md" "$OUT/RESULTS.md" 2>/dev/null

# 5. a device machine returns at most 8 files, named with letters, digits, '.', '_' and '-':
# keep the records, the reports, the session log and the bench CSVs; pack the rest in logs.tgz
(
    cd "$OUT" || exit 1
    keep='^(cifar10_runs\.jsonl|RESULTS\.md|bench\.md|session\.log|bench/[A-Za-z0-9._-]+\.csv)$'
    find . -type f | sed 's|^\./||' | grep -Ev "$keep" | tar czf logs.tgz -T - \
        && find . -mindepth 1 -maxdepth 1 ! -name logs.tgz ! -name bench ! -name cifar10_runs.jsonl \
            ! -name RESULTS.md ! -name bench.md ! -name session.log -exec rm -rf {} +
    find bench -type f ! -name '*.csv' -delete 2>/dev/null
    ls -R .
)
