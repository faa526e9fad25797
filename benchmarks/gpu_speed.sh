#!/usr/bin/env bash
# How fast cardinal trains on one GPU, in one go, each step under its own time limit and with its own log:
#
#   1. bench-eager     python -m cardinal.bench --no-compile: cardinal's eager step (fused SGD) against
#                      torchvision's eager loop, at each of BATCHES and at fast's default batch for 1 epoch
#                      of the full-size data (the budget rule's), for each of ARCHS (bf16, channels_last)
#   2. bench-compiled  python -m cardinal.bench --compile: cardinal's compiled step (the mode cardinal.train
#                      picks: reduce-overhead, i.e. CUDA graphs) against torchvision eager and torchvision
#                      compiled in the same mode; compile/warm-up seconds in their own columns
#   3. profile         python -m cardinal.profile at batch 512 (its CUDA default): where an eager step's
#                      time goes, for before/after tables
#   4. accuracy        cardinal.train compiled and eager, SEEDS each, ACCURACY_EPOCHS epochs on full-size data,
#                      all at once on the GPU (their img/s mean nothing), then python -m cardinal.summary
#   5. epoch-wall      one cardinal.train run alone (compiled unless WALL_FLAGS says otherwise), batch 512,
#                      WALL_EPOCHS epochs on full-size data:
#                      the wall time of each epoch after the first (training + evaluation + checkpoint +
#                      records, from the times its rows are printed) against its training time alone
#   6. checkpoint-stall benchmarks/checkpoint_stall.py: how long a TRAIN_ARCH checkpoint (with a weight average)
#                      holds the loop when written in it and when copied to page-locked memory and written
#                      in the background (what cardinal.train does)
#   7. optimizer-step  benchmarks/optimizer_step.py: one step of each --optimizer (sgd, adamw, muon) alone on
#                      the ARCHS' parameters, to set beside the training step's time
# then summary.txt: the ratios of each, and the goals they are read against.
#
#   benchmarks/gpu_speed.sh [OUTPUT_DIR]        # default: gpu-speed-<date>-<time>/
#   DRY_RUN=1 benchmarks/gpu_speed.sh           # the same steps, tiny, on a CPU (about 10 minutes on 2 cores)
#
# Full-size data: DATA_DIR (the official python layout), else made in OUTPUT_DIR/data by JPEG_TOOL
# (40,000 training + 10,000 held-out images; about 10 s).
#
# Environment (all optional):
#   ARCHS            architectures of the bench and the profile ("resnet50 resnext50_32x4d")
#   BATCHES          bench batch sizes ("128 512")
#   BENCH_STEPS      measured steps per repeat (50); BENCH_REPEATS (3); BENCH_WARMUP (5)
#   TRAIN_ARCH       architecture of the accuracy and epoch-wall runs (resnet50)
#   SEEDS            seeds of the accuracy pair ("0 1");  ACCURACY_EPOCHS (3);  WALL_EPOCHS (3)
#   ACCURACY_LIMIT_S the accuracy runs' time limit (240; the runs stop there and keep their finished epochs)
#   WALL_FLAGS       how the epoch-wall run trains ("--compile"; "--no-compile" for what a short run does
#                    by default)
#   TRAIN_BATCH      batch of the accuracy and epoch-wall runs (512; the fast recipe scales its LR with it)
#   DATA_DIR, JPEG_TOOL (../shared/tools/cifar10_jpeg.py beside the repository)
#   ONLY             run only these steps, e.g. "bench-compiled epoch-wall"
#   TOTAL_S          time budget of the whole script in seconds (690); a step is cut to what is left
#   PYTHON           the Python cardinal is installed in (python)
#   DRY_RUN=1        tiny_resnet, synthetic data, fp32, dynamo's eager backend (CARDINAL_COMPILE_BACKEND=eager)
#                    so that compiling costs seconds: the plumbing, not the speed; runs without a GPU
#
# Sizing, measured on one H200: bench-eager took 30 s and bench-compiled 125 s for resnet50 at batches 512
# and 128 (cardinal's step compiled in 38 and 33 s, torchvision's then in 11 s from inductor's cache), and
# 26 s and 78 s for resnext50_32x4d at 512 alone; so both archs at both batches take about 1 and 4-5
# minutes. A compiled cardinal.train run on full-size data spent 101 s in its first epoch (compiling its
# training shapes and evaluation), so epoch-wall needs about 2.5 minutes and the accuracy runs, compiling at
# once, about 3-4 (estimates); profile about 1 minute.
# shellcheck disable=SC2329  # the steps are called by name, "step_$name"
set -u
set -o pipefail

PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
ALL_STEPS="bench-eager bench-compiled profile accuracy epoch-wall checkpoint-stall optimizer-step"
STEPS=${ONLY:-$ALL_STEPS}
SEEDS=${SEEDS:-0 1}
WALL_EPOCHS=${WALL_EPOCHS:-3}
read -r -a WALL_FLAGS <<< "${WALL_FLAGS:---compile}"

if [ "$DRY_RUN" = 1 ]; then
    ARCHS=${ARCHS:-tiny_resnet}
    BATCHES=${BATCHES:-8 16}
    BENCH_STEPS=${BENCH_STEPS:-2}
    BENCH_REPEATS=${BENCH_REPEATS:-2}
    BENCH_WARMUP=${BENCH_WARMUP:-1}
    TRAIN_ARCH=${TRAIN_ARCH:-tiny_resnet}
    TRAIN_BATCH=${TRAIN_BATCH:-64}
    ACCURACY_EPOCHS=${ACCURACY_EPOCHS:-2}
    ACCURACY_LIMIT_S=900  # four runs at once on a small CPU
    TOTAL_S=${TOTAL_S:-2400}
    PRECISION=no
    DEVICE_FLAGS=(--device cpu)
    PROFILE_FLAGS=(--batch-size 8 --steps 1 --warmup 1)
    export CARDINAL_COMPILE_BACKEND=${CARDINAL_COMPILE_BACKEND:-eager}
    DATA=(--dataset synthetic --synthetic-train 192 --synthetic-test 100 --eval-batch-size 64)
    TRAIN_IMAGES=192
else
    ARCHS=${ARCHS:-resnet50 resnext50_32x4d}
    BATCHES=${BATCHES:-128 512}
    BENCH_STEPS=${BENCH_STEPS:-50}
    BENCH_REPEATS=${BENCH_REPEATS:-3}
    BENCH_WARMUP=${BENCH_WARMUP:-5}
    TRAIN_ARCH=${TRAIN_ARCH:-resnet50}
    TRAIN_BATCH=${TRAIN_BATCH:-512}
    ACCURACY_EPOCHS=${ACCURACY_EPOCHS:-3}
    ACCURACY_LIMIT_S=${ACCURACY_LIMIT_S:-240}
    TOTAL_S=${TOTAL_S:-690}
    PRECISION=bf16
    DEVICE_FLAGS=()
    PROFILE_FLAGS=(--steps 3 --warmup 2)
    DATA=()  # set once the data exist
    TRAIN_IMAGES=40000  # what cifar10_jpeg.py makes
fi
JPEG_TOOL=${JPEG_TOOL:-$REPO/../shared/tools/cifar10_jpeg.py}

SCRIPT=gpu_speed
# shellcheck source=benchmarks/preflight.sh
. "$REPO/benchmarks/preflight.sh"

# --- can this machine run it at all? (one line and exit 2 if not) ---------------------------------------
for name in $STEPS; do
    [[ " $ALL_STEPS " == *" $name "* ]] || refuse "unknown step '$name' in ONLY; choose from: $ALL_STEPS"
done
for value in "$BENCH_STEPS" "$BENCH_REPEATS" "$TOTAL_S" "$ACCURACY_EPOCHS" "$WALL_EPOCHS" "$TRAIN_BATCH"; do
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || refuse "counts and TOTAL_S must be positive integers, got '$value'"
done
GPUS=$(visible_gpus) || exit 2
if [ "$GPUS" -eq 0 ] && [ "$DRY_RUN" != 1 ]; then
    refuse "no CUDA device visible; run this on a GPU machine, or DRY_RUN=1 to exercise it on a CPU"
fi
if [ "$DRY_RUN" != 1 ] && [ -n "${DATA_DIR:-}" ]; then
    [ -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ] || refuse "DATA_DIR $DATA_DIR holds no cifar-10-batches-py/"
fi

OUT=${1:-gpu-speed-$(date +%Y%m%d-%H%M%S)}
fresh_folder "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || refuse "cannot enter $REPO"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# fast's default batch on the training data (the budget rule, the same at every length): bench-eager measures
# it too, for the goal that it trains at >= 0.8x the fastest batch of the benches (runs this short do not compile)
FAST_BATCH=$("$PYTHON" -c "from cardinal.budget import batch_for; print(batch_for($TRAIN_IMAGES))" 2>/dev/null)
EAGER_BATCHES=$BATCHES
[[ " $BATCHES " == *" $FAST_BATCH "* ]] || EAGER_BATCHES="$BATCHES $FAST_BATCH"

# --- how each step is run and recorded ---------------------------------------------------------------
NAMES=() RESULTS=() SECONDS_TAKEN=() NOTES=()
STARTED=$SECONDS
FAILED=0
LAST_RC=0

record() {  # name result seconds note
    NAMES+=("$1") RESULTS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
    if [ "$2" = FAIL ]; then FAILED=1; fi
    printf '%-15s %-4s %4s s  %s\n' "$1" "$2" "$3" "$4"
}

left_s() { echo $((TOTAL_S - (SECONDS - STARTED))); }

run_step() {  # name limit_s command...: under min(limit, what is left), output in <name>.log
    local name=$1 limit=$2 left
    shift 2
    left=$(left_s)
    if [ "$left" -lt 20 ]; then
        LAST_RC=125
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '$ %s\n' "$*" >>"$OUT/$name.log"
    timeout -k 15 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    LAST_RC=$?
    return "$LAST_RC"
}

finish_step() {  # name started_at note: one row of the table
    local name=$1 seconds=$((SECONDS - $2)) note=$3
    if [ "$LAST_RC" -eq 0 ]; then
        record "$name" pass "$seconds" "$note"
    elif [ "$LAST_RC" -eq 125 ]; then
        record "$name" FAIL "$seconds" "not started: the ${TOTAL_S} s budget is spent"
    elif [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then
        record "$name" FAIL "$seconds" "timed out (see $name.log)"
    else
        record "$name" FAIL "$seconds" "exit code $LAST_RC (see $name.log)"
    fi
}

ensure_data() {  # sets DATA to the full-size data's flags, making the data first if needed
    [ "${#DATA[@]}" -gt 0 ] && return 0
    local folder=${DATA_DIR:-$OUT/data}
    if [ ! -f "$folder/cifar-10-batches-py/data_batch_1" ]; then
        [ -f "$JPEG_TOOL" ] || { echo "no DATA_DIR and no $JPEG_TOOL" >>"$OUT/data.log"; LAST_RC=2; return 1; }
        run_step data 120 "$PYTHON" "$JPEG_TOOL" "$folder" || return 1
    fi
    DATA=(--data-dir "$folder" --no-download)
}

TRAIN_FLAGS=(--arch "$TRAIN_ARCH" --recipe fast --batch-size "$TRAIN_BATCH" --mixed-precision "$PRECISION"
             --channels-last --no-export --no-progress)

# --- the steps ---------------------------------------------------------------------------------------------
bench() {  # name compile-flag limit batches
    local started=$SECONDS
    # shellcheck disable=SC2086  # ARCHS and the batches are lists
    run_step "$1" "$3" "$PYTHON" -m cardinal.bench "$2" --archs $ARCHS --batch-sizes $4 \
        --precisions "$PRECISION" --memory-formats channels_last --modes train --steps "$BENCH_STEPS" \
        --warmup "$BENCH_WARMUP" --repeats "$BENCH_REPEATS" "${DEVICE_FLAGS[@]}" --output "$OUT/$1.csv"
    finish_step "$1" "$started" "$1.csv"
}
step_bench_eager() { bench bench-eager --no-compile 120 "$EAGER_BATCHES"; }
step_bench_compiled() { bench bench-compiled --compile 360 "$BATCHES"; }

step_profile() {
    local started=$SECONDS
    # shellcheck disable=SC2086  # ARCHS is a list
    run_step profile 90 "$PYTHON" -m cardinal.profile --archs $ARCHS --precision "$PRECISION" --channels-last \
        "${PROFILE_FLAGS[@]}" "${DEVICE_FLAGS[@]}" --output "$OUT/profile.csv" --plot "$OUT/profile.png"
    finish_step profile "$started" "profile.csv, profile.png"
}

step_accuracy() {  # compiled and eager, every seed at once; then the summary
    local started=$SECONDS pids=() seed how limit rc=0
    ensure_data || { finish_step accuracy "$started" ""; return; }
    limit=$(left_s)
    [ "$limit" -gt "$ACCURACY_LIMIT_S" ] && limit=$ACCURACY_LIMIT_S
    for seed in $SEEDS; do
        for how in compile no-compile; do
            timeout -k 15 "$limit" "$PYTHON" -m cardinal.train "${TRAIN_FLAGS[@]}" "${DATA[@]}" --seed "$seed" \
                --epochs "$ACCURACY_EPOCHS" "--$how" --output-dir "$OUT/accuracy" --run-name "$how-seed$seed" \
                >"$OUT/accuracy-$how-seed$seed.log" 2>&1 &
            pids+=($!)
        done
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done  # 124: a run timed out
    run_step accuracy 60 "$PYTHON" -m cardinal.summary "$OUT/accuracy" --format markdown \
        --output "$OUT/accuracy-summary.md" || true
    [ "$rc" -ne 0 ] && LAST_RC=$rc
    finish_step accuracy "$started" "accuracy-summary.md; runs in accuracy/"
}

stamped() {  # the command's output, each line prefixed by the time it was printed (seconds since the epoch)
    local line
    "$@" 2>&1 | while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done
    return "${PIPESTATUS[0]}"
}

# the time each line of the command's output was printed comes first on the line: see gpu_speed_report.py
step_epoch_wall() {
    local started=$SECONDS
    ensure_data || { finish_step epoch-wall "$started" ""; return; }
    rm -rf "$OUT/wall"
    PYTHONUNBUFFERED=1 TORCH_LOGS=${TORCH_LOGS:-recompiles} run_step epoch-wall 240 bash -c "$(declare -f stamped); stamped \"\$@\"" stamped \
        "$PYTHON" -m cardinal.train "${TRAIN_FLAGS[@]}" "${DATA[@]}" --epochs "$WALL_EPOCHS" "${WALL_FLAGS[@]}" \
        --output-dir "$OUT/wall" --run-name wall
    if [ "$LAST_RC" -eq 0 ]; then
        "$PYTHON" "$REPO/benchmarks/gpu_speed_report.py" wall "$OUT/epoch-wall.log" "$OUT/wall/wall/epochs.csv" \
            >"$OUT/epoch-wall.txt" 2>&1 || LAST_RC=1
    fi
    finish_step epoch-wall "$started" "$(tail -n 1 "$OUT/epoch-wall.txt" 2>/dev/null)"
}

step_checkpoint_stall() {
    local started=$SECONDS
    run_step checkpoint-stall 60 "$PYTHON" "$REPO/benchmarks/checkpoint_stall.py" --arch "$TRAIN_ARCH" --ema \
        --repeats 3 --folder "$OUT/checkpoint-stall"
    finish_step checkpoint-stall "$started" "$(tail -n 1 "$OUT/checkpoint-stall.log" 2>/dev/null)"
}

step_optimizer_step() {
    local started=$SECONDS
    # shellcheck disable=SC2086  # ARCHS is a list
    run_step optimizer-step 60 "$PYTHON" "$REPO/benchmarks/optimizer_step.py" --archs $ARCHS \
        "${DEVICE_FLAGS[@]}"
    finish_step optimizer-step "$started" "$(grep -c '^optimizer_step,' "$OUT/optimizer-step.log" 2>/dev/null) timings"
}

# --- run them, then the summary ------------------------------------------------------------------------
{
    describe_environment
    [ "$DRY_RUN" = 1 ] && echo "DRY_RUN=1: tiny, synthetic, on the CPU, compile backend $CARDINAL_COMPILE_BACKEND"
    echo "steps: $STEPS; budget $TOTAL_S s; output in $OUT"
} | tee "$OUT/environment.txt"

for name in $STEPS; do
    "step_${name//-/_}"
done

{
    echo
    printf '%-15s %-6s %6s  %s\n' step result time_s note
    for i in "${!NAMES[@]}"; do
        printf '%-15s %-6s %6s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
    done
    echo
    "$PYTHON" "$REPO/benchmarks/gpu_speed_report.py" bench ${FAST_BATCH:+--fast-batch "$FAST_BATCH"} \
        "$OUT/bench-eager.csv" "$OUT/bench-compiled.csv" 2>/dev/null
    [ -f "$OUT/epoch-wall.txt" ] && { echo; cat "$OUT/epoch-wall.txt"; }
    [ -f "$OUT/optimizer-step.log" ] && { echo; sed -n '/optimizer step alone/,$p' "$OUT/optimizer-step.log"; }
    [ -f "$OUT/accuracy-summary.md" ] && { echo; cat "$OUT/accuracy-summary.md"; }
    echo
    echo "total: $((SECONDS - STARTED)) s; logs: $OUT/<step>.log"
} | tee "$OUT/summary.txt"
exit "$FAILED"
