#!/usr/bin/env bash
# A short, fixed slot on one GPU (a rented quarter of an hour, a shared node's time limit) spent on the
# measurements the README's GPU tables need, in one call: speed first, alone on the GPU, then the accuracy
# runs side by side until the budget's end; everything small enough to keep lands in OUTPUT_DIR.tgz.
#
#   benchmarks/gpu_session.sh OUTPUT_DIR                       # BUDGET_S (560) seconds in all
#   DRY_RUN=1 benchmarks/gpu_session.sh /tmp/gpu-session      # the same steps, tiny, on a CPU (minutes)
#
# In order:
#   data     the full-size data (40,000 training + 10,000 dev-test images) made by JPEG_TOOL in
#            OUTPUT_DIR/data, unless DATA_DIR holds it
#   speed/   benchmarks/gpu_speed.sh, alone on the GPU for SPEED_S seconds: SPEED_STEPS (the eager bench of
#            fast's default batch beside 128 and 512, one eager cardinal.train run's epoch wall against its
#            training time, a checkpoint's stall, the optimizer steps)
#   recipe/  benchmarks/gpu_recipe.sh: fast at 1, 5 and 10 epochs and seed for 10, 3 seeds (the acceptance
#            core), plus TUNE on a validation split if given; at the same time, with PAIR=1, pair/:
#            gpu_speed.sh's compiled-and-eager accuracy pair (PAIR_SEEDS "0 1"). Both stop at the budget's
#            end; finished epochs stay in each epochs.csv.
#   OUTPUT_DIR/summary.txt, and OUTPUT_DIR.tgz: logs, CSVs, config.json and summaries, no data, no checkpoints;
#   both are written once the speed part is done too, so a call cut short still has something to copy
#
# Environment (all optional; the sub-scripts' own variables, e.g. ARCHS, FAST_EPOCHS, SEEDS, TUNE, pass
# through to them):
#   BUDGET_S     seconds for the whole session (560)       SPEED_S   seconds for the speed part (140)
#   SPEED_STEPS  gpu_speed.sh steps run alone ("bench-eager epoch-wall checkpoint-stall optimizer-step")
#   SPEED_ARCHS  architectures of the speed part's benches and profile (default: ARCHS)
#   GIB_PER_RUN  GPU memory planned per training run when sizing JOBS (8.5; 16 runs fitted one H200); where
#                fewer than 16 fit (an H100), FAST_EPOCHS defaults to "1 5" (see Sizing)
#   DATA_DIR, JPEG_TOOL (../shared/tools/cifar10_jpeg.py beside the repository), PYTHON (python)
#   DRY_RUN=1    the sub-scripts' tiny, synthetic, CPU settings
#
# Sizing (an estimate): the default plan trains about 3.1 million resnet50 images (fast 1.9, seed 1.2); 16
# runs side by side on one H200 trained about 11,000 img/s together, so it needs about 285 s of the 340 s or
# so that the default budget leaves after the speed part. The tune (TUNE, 1.2 million images as the README
# sets it) and the pair (0.5 million, and two compilations) do not fit beside it: they take slots of their
# own. A fast run cut short is lost (its schedule spans the run); a seed run keeps its finished epochs. On a
# GPU that holds fewer runs at once (9 on an H100's 80 GB) the 10-epoch fast runs are left out by default.
set -u
set -o pipefail

PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SCRIPT=gpu_session
# shellcheck source=benchmarks/preflight.sh
. "$REPO/benchmarks/preflight.sh"

DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-560}
SPEED_S=${SPEED_S:-140}
SPEED_STEPS=${SPEED_STEPS:-bench-eager epoch-wall checkpoint-stall optimizer-step}
GIB_PER_RUN=${GIB_PER_RUN:-8.5}
PAIR=${PAIR:-$DRY_RUN}  # the pair has a slot of its own; a dry run tries it too
PAIR_SEEDS=${PAIR_SEEDS:-0 1}
JPEG_TOOL=${JPEG_TOOL:-$REPO/../shared/tools/cifar10_jpeg.py}
for value in "$BUDGET_S" "$SPEED_S"; do
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || refuse "BUDGET_S and SPEED_S must be positive integers, got '$value'"
done
[ "$SPEED_S" -lt "$BUDGET_S" ] || refuse "SPEED_S ($SPEED_S) leaves nothing of BUDGET_S ($BUDGET_S) for the accuracy runs"
[ $# -eq 1 ] || refuse "usage: benchmarks/gpu_session.sh OUTPUT_DIR"
GPUS=$(visible_gpus) || exit 2
[ "$GPUS" -gt 0 ] || [ "$DRY_RUN" = 1 ] || refuse "no CUDA device visible; DRY_RUN=1 exercises this script on a CPU"
fresh_folder "$1"
OUT=$(cd "$1" && pwd)
STARTED=$SECONDS
left_s() { echo $((BUDGET_S - (SECONDS - STARTED))); }
write_summary_and_archive() {  # OUTPUT_DIR/summary.txt and OUTPUT_DIR.tgz from what is there now
    {
        cat "$OUT/environment.txt"
        for part in speed pair; do
            [ -f "$OUT/$part/summary.txt" ] && { echo; echo "=== $part ==="; cat "$OUT/$part/summary.txt"; }
        done
        for part in study tune sample; do
            [ -f "$OUT/recipe/$part-summary.md" ] && { echo; echo "=== recipe: $part ==="; cat "$OUT/recipe/$part-summary.md"; }
        done
        echo
        echo "total: $((SECONDS - STARTED)) s"
    } >"$OUT/summary.txt"
    # a whole archive replaces the earlier one, or none does
    tar -czf "$OUT.tgz.partial" -C "$(dirname "$OUT")" --exclude=data --exclude=checkpoint \
        --exclude='.checkpoint.*' --exclude='*.pt' --exclude='*.pt2' --exclude='*.ts' --exclude=.lock \
        "$(basename "$OUT")" && mv "$OUT.tgz.partial" "$OUT.tgz"
}
export PYTHON DRY_RUN

# --- what runs where, and the data ---------------------------------------------------------------------
describe_environment | tee "$OUT/environment.txt"
if [ "$DRY_RUN" != 1 ]; then
    if [ -z "${DATA_DIR:-}" ]; then
        [ -f "$JPEG_TOOL" ] || refuse "no DATA_DIR and no $JPEG_TOOL to make the full-size data with"
        DATA_DIR=$OUT/data
        "$PYTHON" "$JPEG_TOOL" "$DATA_DIR" >"$OUT/data.log" 2>&1 || refuse "making the data failed: see $OUT/data.log"
    fi
    export DATA_DIR
    RUNS_FIT=$("$PYTHON" -c "import torch
print(int(torch.cuda.get_device_properties(0).total_memory / 2**30 / $GIB_PER_RUN))") ||
        refuse "cannot read the GPU's memory with $PYTHON"
    # fast's 10-epoch runs finish in the budget only beside 16 runs at once (an H200's memory); with fewer
    # (an H100's 80 GB holds 9) they would be cut short and lost, so the default plan leaves them out there
    default_fast_epochs="1 5 10"
    [ "$RUNS_FIT" -ge 16 ] || default_fast_epochs="1 5"
    # the study as the README reads it: fast and seed in the same precision, resnet50, one 10-epoch seed run
    export ARCHS=${ARCHS:-resnet50} FAST_EPOCHS=${FAST_EPOCHS-$default_fast_epochs} SEEDS=${SEEDS:-0 1 2}
    export SEED_EPOCHS=${SEED_EPOCHS-10} SEED_PASS=${SEED_PASS:---mixed-precision bf16 --channels-last}
    export REFERENCE_ARCHS=${REFERENCE_ARCHS- } TUNE_SEEDS=${TUNE_SEEDS:-0}
    export TUNE=${TUNE-}
    # runs at once: as many as the GPU's memory holds, less the pair's (two per seed)
    pair_runs=0
    [ "$PAIR" = 1 ] && pair_runs=$((2 * $(wc -w <<< "$PAIR_SEEDS")))
    JOBS=${JOBS:-$(( RUNS_FIT - pair_runs > 2 ? RUNS_FIT - pair_runs : 2 ))}
    export JOBS
    echo "gpu_session: memory for $RUNS_FIT runs at $GIB_PER_RUN GiB; $JOBS at once, fast at '$FAST_EPOCHS' epochs" |
        tee -a "$OUT/environment.txt"
fi
echo "gpu_session: budget $BUDGET_S s (speed $SPEED_S s), output in $OUT" | tee -a "$OUT/environment.txt"

# --- speed, alone on the GPU ---------------------------------------------------------------------------
ARCHS=${SPEED_ARCHS:-${ARCHS:-}} ONLY=$SPEED_STEPS TOTAL_S=$SPEED_S WALL_FLAGS=${WALL_FLAGS:---no-compile} \
    bash "$REPO/benchmarks/gpu_speed.sh" "$OUT/speed" >"$OUT/speed.log" 2>&1
echo "gpu_session: speed exit $? after $((SECONDS - STARTED)) s"
write_summary_and_archive  # what there is so far, should the call be cut short

# --- accuracy, side by side, until the budget's end (less a minute for summaries and the archive) --------
RUNS_S=$(( $(left_s) - 60 ))
[ "$RUNS_S" -gt 30 ] || RUNS_S=30
pair_pid=
if [ "$PAIR" = 1 ]; then
    SEEDS=$PAIR_SEEDS ONLY=accuracy TOTAL_S=$((RUNS_S + 30)) ACCURACY_LIMIT_S=$RUNS_S \
        bash "$REPO/benchmarks/gpu_speed.sh" "$OUT/pair" >"$OUT/pair.log" 2>&1 &
    pair_pid=$!
fi
TOTAL_S=$RUNS_S bash "$REPO/benchmarks/gpu_recipe.sh" "$OUT/recipe" >"$OUT/recipe.log" 2>&1
echo "gpu_session: recipe exit $? after $((SECONDS - STARTED)) s"
if [ -n "$pair_pid" ]; then
    wait "$pair_pid"
    echo "gpu_session: pair exit $? after $((SECONDS - STARTED)) s"
fi

# --- one summary, one archive ----------------------------------------------------------------------------
write_summary_and_archive
echo "gpu_session: $OUT/summary.txt; archive $OUT.tgz ($(du -h "$OUT.tgz" | cut -f1))"
