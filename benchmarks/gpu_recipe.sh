#!/usr/bin/env bash
# fast against seed on full-size data, and the reference protocol against seed, side by side on one GPU;
# then the summaries. Every run is a plain `python -m cardinal.train` (or `cardinal.reference_run`) writing
# its own epochs.csv, so a run cut short by the time limit still leaves its finished epochs to the summary.
#
#   python ../shared/tools/cifar10_jpeg.py data-full       # 40,000 training + 10,000 held-out images
#   DATA_DIR=data-full benchmarks/gpu_recipe.sh [OUTPUT_DIR]   # default: gpu-recipe-<date>-<time>/
#   DRY_RUN=1 benchmarks/gpu_recipe.sh                      # the same steps, tiny, on a CPU (about 5 minutes)
#
# What runs (the defaults; each list is an environment variable):
#   study/     fast at each of FAST_EPOCHS (its schedule spans the run, so one run per length), seed once for
#              SEED_EPOCHS (constant LR: its epoch-N row is an N-epoch run), for ARCHS x SEEDS; the reference
#              protocol (cardinal.reference_run) for REFERENCE_EPOCHS on REFERENCE_ARCHS x SEEDS; fast at each
#              of LONG_EPOCHS, the first arch and seed only (the shortest run to an accuracy).
#   tune/      with a validation split (--val-images VAL_IMAGES): fast as the budget rule sizes it and each
#              TUNE variant ("ARCH EPOCHS FLAGS...;" ...), compared on val_acc only.
#   sample/    fast and seed at 1 epoch on the CIFAR-10 sample (SAMPLE_DIR, if present) with --val-images 500.
#
# Environment (all optional but DATA_DIR):
#   DATA_DIR          full-size data in the official python layout (required unless DRY_RUN=1)
#   SAMPLE_DIR        the CIFAR-10 sample (default ../shared/data/cifar10-sample; skipped when absent)
#   ARCHS             "resnet50 resnext50_32x4d"          FAST_EPOCHS   "1 5 10"
#   SEEDS             "0 1 2"                             SEED_EPOCHS   10
#   REFERENCE_ARCHS   "resnet50"                          REFERENCE_EPOCHS  5
#   LONG_EPOCHS       "" (none)
#   TUNE_SEEDS        seeds of the tune runs (default: SEEDS)
#   TUNE              "resnet50 5 --optimizer adamw; resnet50 10 --optimizer adamw; resnet50 5 --batch-size 448;
#                     resnet50 10 --batch-size 448; resnet50 10 --batch-size 128; resnet50 10 --lr 0.016;
#                     resnet50 10 --weight-decay 0.005; resnet50 10 --label-smoothing 0" (against the rule's
#                     Muon at batch 256: AdamW, fast's optimizer before; the earlier floor's batch 448 for
#                     fewer, faster steps; then what may lift the underfitting 10-epoch runs: twice the steps,
#                     twice the rule's peak, a tenth of the decay, no smoothing; RECIPE_TUNING.md)
#                     VAL_IMAGES 5000
#   FAST_PASS         flags of every fast run ("--mixed-precision bf16 --channels-last")
#   SEED_PASS         flags of every seed run ("--mixed-precision no": the reference study's fp32; the summary
#                     pairs fast with seed only when both passes name the same precision and memory format)
#   JOBS              runs at once on the GPU (8)         REFERENCE_WORKERS DataLoader workers per reference run (3)
#   TOTAL_S           wall-clock budget for the training (600); what has not finished by then is stopped
#   PYTHON            the Python cardinal is installed in (python)
#   DRY_RUN=1         tiny_resnet on a small synthetic set, 2 steps an epoch, fewer runs, fp32, on any machine
# A list set to "" (FAST_EPOCHS="", REFERENCE_ARCHS="", TUNE="") leaves its runs out.
#
# Sizing it: the defaults plan 96 fast epochs (bf16), 60 seed epochs (fp32) and 15 reference epochs of the
# 40,000 images. From single-run speeds on one H200 (resnet50: 15.8k img/s bf16 at batch 512, 5.6k fp32 at
# batch 128, 1.5k for the PIL protocol), that is more than 10 minutes of GPU; resnext50_32x4d is slower.
# For a slot of about 10 minutes, benchmarks/gpu_session.sh runs a part of it that fits (resnet50 alone,
# seed for 10 epochs in bf16), after the speed measurements; resnext50_32x4d takes a slot of its own.
set -u
set -o pipefail

PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-gpu-recipe-$(date +%Y%m%d-%H%M%S)}
SCRIPT=gpu_recipe
# shellcheck source=benchmarks/preflight.sh
. "$REPO/benchmarks/preflight.sh"
fresh_folder "$OUT"
DRY_RUN=${DRY_RUN:-0}

if [ "$DRY_RUN" = 1 ]; then
    ARCHS=${ARCHS:-tiny_resnet}
    FAST_EPOCHS=${FAST_EPOCHS-1 2}
    SEEDS=${SEEDS:-0 1}
    SEED_EPOCHS=${SEED_EPOCHS-2}
    REFERENCE_ARCHS=${REFERENCE_ARCHS-tiny_resnet}
    LONG_EPOCHS=${LONG_EPOCHS-3}
    REFERENCE_EPOCHS=${REFERENCE_EPOCHS:-2}
    TUNE=${TUNE-tiny_resnet 1 --batch-size 64; tiny_resnet 1 --optimizer sgd --head-lr-scale 0.5}
    VAL_IMAGES=${VAL_IMAGES:-64}
    FAST_PASS=${FAST_PASS:---mixed-precision no --channels-last}
    JOBS=${JOBS:-2}
    REFERENCE_WORKERS=${REFERENCE_WORKERS:-0}
    TOTAL_S=${TOTAL_S:-1200}
    LIMIT=(--limit-batches 2 --limit-eval-batches 1 --eval-batch-size 64)
    FULL_DATA=(--dataset synthetic --synthetic-train 640 --synthetic-test 128 "${LIMIT[@]}")
    REFERENCE_DATA=("${FULL_DATA[@]}")
    TRAIN_DATA=(--no-download "${FULL_DATA[@]}")
    SAMPLE_DATA=("${FULL_DATA[@]}" --no-download)
    SAMPLE_VAL=64
    TRAIN_IMAGES=640
else
    [ -n "${DATA_DIR:-}" ] || { echo "gpu_recipe: set DATA_DIR (python ../shared/tools/cifar10_jpeg.py DIR makes it)" >&2; exit 2; }
    [ -f "$DATA_DIR/cifar-10-batches-py/data_batch_1" ] || [ -f "$DATA_DIR/data_batch_1" ] \
        || { echo "gpu_recipe: no CIFAR-10 python batches in $DATA_DIR" >&2; exit 2; }
    ARCHS=${ARCHS:-resnet50 resnext50_32x4d}
    FAST_EPOCHS=${FAST_EPOCHS-1 5 10}
    SEEDS=${SEEDS:-0 1 2}
    SEED_EPOCHS=${SEED_EPOCHS-10}
    REFERENCE_ARCHS=${REFERENCE_ARCHS-resnet50}
    LONG_EPOCHS=${LONG_EPOCHS-}
    REFERENCE_EPOCHS=${REFERENCE_EPOCHS:-5}
    TUNE=${TUNE-resnet50 5 --optimizer adamw; resnet50 10 --optimizer adamw; resnet50 5 --batch-size 448; resnet50 10 --batch-size 448; resnet50 10 --batch-size 128; resnet50 10 --lr 0.016; resnet50 10 --weight-decay 0.005; resnet50 10 --label-smoothing 0}
    VAL_IMAGES=${VAL_IMAGES:-5000}
    FAST_PASS=${FAST_PASS:---mixed-precision bf16 --channels-last}
    JOBS=${JOBS:-8}
    REFERENCE_WORKERS=${REFERENCE_WORKERS:-3}
    TOTAL_S=${TOTAL_S:-600}
    FULL_DATA=(--data-dir "$DATA_DIR")
    REFERENCE_DATA=(--data-dir "$DATA_DIR")
    TRAIN_DATA=(--no-download "${FULL_DATA[@]}")
    SAMPLE_DIR=${SAMPLE_DIR:-$REPO/../shared/data/cifar10-sample}
    SAMPLE_DATA=(--no-download --data-dir "$SAMPLE_DIR")
    SAMPLE_VAL=500
    TRAIN_IMAGES=""  # counted from the data below
fi
SEED_PASS=${SEED_PASS:---mixed-precision no}
TUNE_SEEDS=${TUNE_SEEDS:-$SEEDS}
read -r -a FAST_FLAGS <<< "$FAST_PASS"
read -r -a SEED_FLAGS <<< "$SEED_PASS"
# Runs share the GPU here, so speed is not measured: none compiles (compiling each of many runs at once
# would spend the device time on compilers; compiled and eager training agree, see gpu_speed.sh).
COMMON=(--no-progress --no-export --no-compile)

mkdir -p "$OUT/jobs" "$OUT/logs" || exit 2
COUNT=0
job() {  # job NAME COMMAND...: one runnable file per run; they start in the order written (longest first)
    local name=$1
    shift
    printf -v file '%s/jobs/%03d-%s.sh' "$OUT" "$COUNT" "$name"
    { printf 'cd %q && ' "$REPO"; printf '%q ' "$@"; echo; } > "$file"
    COUNT=$((COUNT + 1))
}
train() {  # train FOLDER NAME FLAGS...
    local folder=$1 name=$2
    shift 2
    job "$name" "$PYTHON" -m cardinal.train "${COMMON[@]}" --output-dir "$OUT/$folder" --run-name "$name" "$@"
}

# --- the runs, longest first ----------------------------------------------------------------------------
for epochs in $(printf '%s\n' $LONG_EPOCHS | sort -rn); do
    train study "${ARCHS%% *}-fast-e$epochs-seed${SEEDS%% *}" --arch "${ARCHS%% *}" --recipe fast \
        --epochs "$epochs" --seed "${SEEDS%% *}" "${TRAIN_DATA[@]}" "${FAST_FLAGS[@]}"
done
for seed in $SEEDS; do
    for arch in $ARCHS; do
        [ -n "$SEED_EPOCHS" ] || continue
        train study "$arch-seed-e$SEED_EPOCHS-seed$seed" --arch "$arch" --recipe seed --epochs "$SEED_EPOCHS" \
            --seed "$seed" "${TRAIN_DATA[@]}" "${SEED_FLAGS[@]}"
    done
    for arch in $REFERENCE_ARCHS; do
        job "$arch-reference-e$REFERENCE_EPOCHS-seed$seed" "$PYTHON" -m cardinal.reference_run --arch "$arch" \
            --epochs "$REFERENCE_EPOCHS" --seed "$seed" --workers "$REFERENCE_WORKERS" "${REFERENCE_DATA[@]}" \
            --output-dir "$OUT/study" --run-name "$arch-reference-e$REFERENCE_EPOCHS-seed$seed"
    done
done
for epochs in $(printf '%s\n' $FAST_EPOCHS | sort -rn); do
    for seed in $SEEDS; do
        for arch in $ARCHS; do
            train study "$arch-fast-e$epochs-seed$seed" --arch "$arch" --recipe fast --epochs "$epochs" \
                --seed "$seed" "${TRAIN_DATA[@]}" "${FAST_FLAGS[@]}"
        done
    done
done
declare -A TUNED=()
IFS=';' read -r -a VARIANTS <<< "$TUNE"
for variant in "${VARIANTS[@]}"; do
    read -r -a words <<< "$variant"
    [ "${#words[@]}" -ge 2 ] || continue
    arch=${words[0]} epochs=${words[1]} flags=("${words[@]:2}")
    for seed in $TUNE_SEEDS; do
        if [ -z "${TUNED[$arch-$epochs-$seed]:-}" ]; then  # the rule's own choice, once per arch and length
            TUNED[$arch-$epochs-$seed]=1
            train tune "$arch-fast-e$epochs-rule-seed$seed" --arch "$arch" --recipe fast --epochs "$epochs" \
                --seed "$seed" --val-images "$VAL_IMAGES" "${TRAIN_DATA[@]}" "${FAST_FLAGS[@]}"
        fi
        tag=$(printf '%s' "${flags[*]}" | tr -c 'A-Za-z0-9.' '_' | sed 's/^_*//')
        train tune "$arch-fast-e$epochs-${tag}-seed$seed" --arch "$arch" --recipe fast --epochs "$epochs" \
            --seed "$seed" --val-images "$VAL_IMAGES" "${TRAIN_DATA[@]}" "${FAST_FLAGS[@]}" "${flags[@]}"
    done
done
if [ "$DRY_RUN" = 1 ] || [ -f "$SAMPLE_DIR/cifar-10-batches-py/data_batch_1" ]; then
    for seed in $SEEDS; do
        for recipe in fast seed; do
            train sample "${ARCHS%% *}-$recipe-e1-seed$seed" --arch "${ARCHS%% *}" \
                --recipe "$recipe" --epochs 1 --seed "$seed" --val-images "$SAMPLE_VAL" "${SAMPLE_DATA[@]}" \
                "${FAST_FLAGS[@]}"  # RECIPE_TUNING.md's sample table: both recipes in one precision
        done
    done
fi

# --- what the budget rule makes of this data, and the size of the plan -----------------------------------
"$PYTHON" - "$TRAIN_IMAGES" "${FULL_DATA[@]}" <<'EOF' || exit 2
import sys
from cardinal import budget
from cardinal.config import resolve_recipe
count = sys.argv[1]
if not count:
    from cardinal.data import load_cifar
    count = len(load_cifar("cifar10", sys.argv[sys.argv.index("--data-dir") + 1], train=True)[1])
count = int(count)
for epochs in (1, 5, 10):
    r = budget.resolve(resolve_recipe("fast", {"epochs": epochs}), count)
    print(f"gpu_recipe: fast on {count} training images, {epochs} epochs: batch {r.batch_size}, "
          f"peak LR {r.effective_lr():.4g} ({r.lr} per 256), {budget.steps_of(count, r.batch_size, epochs)} steps")
EOF
words() { echo $#; }
sum() { local total=0 n; for n in "$@"; do total=$((total + n)); done; echo "$total"; }
fast_epochs=$(( $(sum $FAST_EPOCHS) * $(words $ARCHS) * $(words $SEEDS) + $(sum $LONG_EPOCHS) ))
seed_epochs=$(( SEED_EPOCHS * $(words $ARCHS) * $(words $SEEDS) ))
reference_epochs=$(( REFERENCE_EPOCHS * $(words $REFERENCE_ARCHS) * $(words $SEEDS) ))
echo "gpu_recipe: planned epochs of the training data: fast $fast_epochs, seed $seed_epochs (fp32 unless" \
     "SEED_PASS says otherwise), reference $reference_epochs (CPU-bound: PIL per sample), plus tune and sample"
echo "gpu_recipe: $COUNT runs, $JOBS at a time, $TOTAL_S s at most; logs in $OUT/logs"

# --- run them side by side, all stopped at the deadline ----------------------------------------------------
export DEADLINE=$(( $(date +%s) + TOTAL_S )) OUT
run_one() {
    local file=$1 name left
    name=$(basename "$file" .sh)
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -le 5 ]; then
        echo "not started (out of time): $name"
        return 0
    fi
    timeout --signal=INT --kill-after=20 "$left" bash "$file" > "$OUT/logs/$name.log" 2>&1
    local code=$?
    echo "exit $code: $name"
}
export -f run_one
started=$(date +%s)
find "$OUT/jobs" -name '*.sh' | sort | xargs -P "$JOBS" -I{} bash -c 'run_one "$1"' _ {} | tee "$OUT/jobs.txt"
echo "gpu_recipe: training took $(( $(date +%s) - started )) s"
failed=$(grep -vc '^exit 0:' "$OUT/jobs.txt")
if [ "$failed" -gt 0 ]; then
    grep -v '^exit 0:' "$OUT/jobs.txt" | while read -r line; do
        name=${line##*: }
        echo "--- $line"
        tail -n 5 "$OUT/logs/$name.log" 2>/dev/null
    done
fi

# --- the summaries -----------------------------------------------------------------------------------------
# the study reads fast's lengths and seed's last (its constant LR makes every row an N-epoch run)
read -r -a report_epochs <<< "$(printf '%s\n' $FAST_EPOCHS $SEED_EPOCHS $LONG_EPOCHS | sort -nu | tr '\n' ' ')"
for part in study tune sample; do
    [ -d "$OUT/$part" ] || continue
    echo
    echo "=== $part ==="
    epochs=()
    [ "$part" = study ] && [ ${#report_epochs[@]} -gt 0 ] && epochs=(--epochs "${report_epochs[@]}")
    "$PYTHON" -m cardinal.summary "$OUT/$part" "${epochs[@]}" --format markdown --output "$OUT/$part-summary.md"
done
[ "$failed" -eq 0 ]
