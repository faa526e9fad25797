#!/usr/bin/env bash
# A few steps of every GPU code path of cardinal, each under its own time limit and with its own log,
# then one table of pass/fail and img/s. Meant to take under 10 minutes on one modern GPU.
#
#   benchmarks/gpu_check.sh [OUTPUT_DIR]        # default: gpu-check-<date>-<time>/
#
# Checks, in order: fp32, fp16 (GradScaler), bf16 (its run is exported and feeds eval-only, export and
# reload), channels_last, eval-only, export (python -m cardinal.export), reload (the exported files run
# on the GPU and agree with the weights), bench (cardinal vs torchvision), sync-bn (2 processes; skipped
# with fewer than 2 GPUs), profile (python -m cardinal.profile), compile (last: the slowest to start).
# A failing check does not stop the others; the exit code is 1 when any check failed, 2 when the script
# cannot start (no CUDA device, no torch, bad settings).
#
# Environment (all optional):
#   GPU_CHECK_ARCH           architecture of the training, export and bench checks (resnet50)
#   GPU_CHECK_PROFILE_ARCHS  architectures to profile (resnet50 resnext50_32x4d, or GPU_CHECK_ARCH if set)
#   GPU_CHECK_STEPS          training steps per epoch (2 epochs: the first is warm-up) and bench steps (40)
#   GPU_CHECK_BATCH          global batch (128)
#   GPU_CHECK_ONLY           run only these checks, in this order, e.g. "fp32 bench"
#   GPU_CHECK_TOTAL_S        time budget of the whole script in seconds (570)
#   PYTHON                   the Python of the environment cardinal is installed in (python)
#   CARDINAL_GPU_CHECK_ALLOW_CPU=1   run without a CUDA device, to exercise this script itself
# shellcheck disable=SC2329  # the checks are called by name, "check_$name"
set -u
set -o pipefail

PYTHON=${PYTHON:-python}
ARCH=${GPU_CHECK_ARCH:-resnet50}
if [ "$ARCH" = resnet50 ]; then
    PROFILE_ARCHS=${GPU_CHECK_PROFILE_ARCHS:-resnet50 resnext50_32x4d}
else
    PROFILE_ARCHS=${GPU_CHECK_PROFILE_ARCHS:-$ARCH}
fi
STEPS=${GPU_CHECK_STEPS:-40}
BATCH=${GPU_CHECK_BATCH:-128}
TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
ALL_CHECKS="fp32 fp16 bf16 channels_last eval-only export reload bench sync-bn profile compile"
CHECKS=${GPU_CHECK_ONLY:-$ALL_CHECKS}
REPO=$(cd "$(dirname "$0")/.." && pwd)

SCRIPT=gpu_check
# shellcheck source=benchmarks/preflight.sh
. "$REPO/benchmarks/preflight.sh"

# --- can this machine run the checks at all? (one line and exit 2 if not) ---------------------------
for value in "$STEPS" "$BATCH" "$TOTAL_S"; do
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || refuse "GPU_CHECK_STEPS, GPU_CHECK_BATCH and GPU_CHECK_TOTAL_S must be positive integers, got '$value'"
done
for name in $CHECKS; do
    [[ " $ALL_CHECKS " == *" $name "* ]] || refuse "unknown check '$name' in GPU_CHECK_ONLY; choose from: $ALL_CHECKS"
done
GPUS=$(visible_gpus) || exit 2
if [ "$GPUS" -eq 0 ] && [ "${CARDINAL_GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    refuse "no CUDA device visible (torch.cuda.is_available() is False); run this on a GPU machine"
fi
command -v accelerate >/dev/null || refuse "'accelerate' is not on PATH; activate the environment cardinal is installed in"

OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
fresh_folder "$OUT"
mkdir -p "$OUT/runs" 2>/dev/null || refuse "cannot create output folder $OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || refuse "cannot enter $REPO"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

# --- how each check is run and recorded --------------------------------------------------------------
NAMES=() RESULTS=() SECONDS_TAKEN=() RATES=() NOTES=()
STARTED=$SECONDS
FAILED=0

record() {  # name result seconds img/s note
    NAMES+=("$1") RESULTS+=("$2") SECONDS_TAKEN+=("$3") RATES+=("$4") NOTES+=("$5")
    if [ "$2" = FAIL ]; then FAILED=1; fi
    printf '%-13s %-4s %4s s  %9s img/s  %s\n' "$1" "$2" "$3" "$4" "$5"
}

LAST_RC=0 CHECK_SECONDS=0 CHECK_NOTE='' CHILD=''
interrupted() {  # timeout runs its command in a process group of its own: stop it too
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD"; fi
    echo "gpu_check: interrupted; logs so far in $OUT" >&2
    exit 130
}
trap interrupted INT TERM

run_check() {  # name limit_s command...: runs it under its own time limit, its output in <name>.log
    local name=$1 limit=$2 left start
    shift 2
    left=$((TOTAL_S - (SECONDS - STARTED)))
    if [ "$left" -lt 20 ]; then
        record "$name" FAIL 0 - "not started: the ${TOTAL_S} s budget is spent"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '$ %s\n' "$*" >"$OUT/$name.log"
    start=$SECONDS
    timeout -k 15 "$limit" "$@" >>"$OUT/$name.log" 2>&1 &
    CHILD=$!  # in the background, so that Ctrl-C reaches the trap below while it runs
    wait "$CHILD"
    LAST_RC=$?
    CHILD=''
    CHECK_SECONDS=$((SECONDS - start))
    if [ "$LAST_RC" -eq 124 ] || [ "$LAST_RC" -eq 137 ]; then
        CHECK_NOTE="timed out after ${limit} s (see $name.log)"
    elif [ "$LAST_RC" -ne 0 ]; then
        CHECK_NOTE="exit code $LAST_RC: $(last_error_line "$OUT/$name.log")"
    fi
}

last_error_line() {  # the line of a log that most likely says what went wrong, cut to fit the table
    local line
    line=$(grep -E '^(error|[A-Za-z_.]*(Error|Exception)):? ' "$1" | tail -n 1)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1)
    printf '%s' "${line:0:60}"
}

finish_check() {  # name [img/s] [note]: records the check just run
    local name=$1 rate=${2:--} note=${3:-}
    if [ "$LAST_RC" -eq 0 ]; then
        record "$name" pass "$CHECK_SECONDS" "$rate" "$note"
    else
        record "$name" FAIL "$CHECK_SECONDS" - "$CHECK_NOTE"
    fi
}

# img/s of a run's last epoch (the first includes warm-up and compilation), and what the run says it was
LAST_EPOCH_PY='import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
row = rows[-1]
rate, loss, peak = (float(row[key]) for key in ("img_per_s", "train_loss", "peak_mem_mb"))
note = f"%s, %s process(es), loss {loss:.3f}, peak {peak:.0f} MB" % (row["precision"], row["world_size"])
if row["precision"] == "fp16":
    note += ", GradScaler skipped %d step(s)" % sum(int(r["skipped_steps"]) for r in rows)
print(f"{rate:.1f}\t{note}")'

# bench.csv: cardinal's best training img/s, and the ratio to torchvision of each mode
BENCH_PY='import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
rate = float([row for row in rows if row["mode"] == "train"][0]["cardinal_img_per_s"])
ratios = ["%s %.2fx%s" % (row["mode"], float(row["cardinal_vs_torchvision"]), " (noisy)" * (row["noisy"] == "True"))
          for row in rows]
print(f"{rate:.1f}\tvs torchvision: " + ", ".join(ratios))'

read_result() {  # python-program file: sets RATE and NOTE from the program's "img/s<TAB>note" line
    RATE=- NOTE=''
    IFS=$'\t' read -r RATE NOTE < <("$PYTHON" -c "$1" "$2" 2>/dev/null) || true
}

# --- the checks ----------------------------------------------------------------------------------------
TRAIN_ARGS=(--arch "$ARCH" --dataset synthetic --synthetic-train $((STEPS * BATCH)) --synthetic-test "$BATCH"
            --batch-size "$BATCH" --eval-batch-size "$BATCH" --epochs 2 --limit-eval-batches 1
            --output-dir "$OUT/runs" --no-progress --no-compile)  # eager but for the compile check
WEIGHTS="$OUT/runs/bf16/model_state.pt"

train_check() {  # name limit_s launcher... -- extra train flags...: one short training run, 2 epochs
    local name=$1 limit=$2 launcher=()
    shift 2
    while [ "$1" != -- ]; do launcher+=("$1"); shift; done
    shift
    rm -rf "$OUT/runs/$name"
    run_check "$name" "$limit" "${launcher[@]}" -m cardinal.train "${TRAIN_ARGS[@]}" --run-name "$name" "$@" \
        || return
    read_result "$LAST_EPOCH_PY" "$OUT/runs/$name/epochs.csv"
    finish_check "$name" "$RATE" "$NOTE"
}

needs_weights() {  # name: false (and a FAIL row) when the bf16 run left no weights to work on
    [ -f "$WEIGHTS" ] && return 0
    record "$1" FAIL 0 - "needs the bf16 run's $(basename "$WEIGHTS") (run bf16 first)"
    return 1
}

check_fp32() { train_check fp32 120 "$PYTHON" -- --mixed-precision no --no-export; }
# A launch config gives accelerate every value it would otherwise warn about; --quiet (one process) leaves
# out its traceback of a failed run, so the log ends with the run's own error line.
check_fp16() { train_check fp16 120 accelerate launch --quiet --config_file launch/gpu-fp16.yaml -- --no-export; }
check_bf16() { train_check bf16 180 accelerate launch --quiet --config_file launch/gpu-bf16.yaml --; }
check_channels_last() {
    train_check channels_last 120 accelerate launch --quiet --config_file launch/gpu-bf16.yaml -- --channels-last \
        --no-export
}
check_compile() {
    train_check compile 300 accelerate launch --quiet --config_file launch/gpu-bf16.yaml -- --channels-last \
        --compile --no-export
}

check_sync_bn() {
    if [ "$GPUS" -lt 2 ]; then
        record sync-bn skip 0 - "needs 2 CUDA devices, $GPUS visible"
        return
    fi
    train_check sync-bn 180 accelerate launch --config_file launch/multi-gpu-bf16.yaml --num_processes 2 -- \
        --channels-last --sync-bn --no-export
}

check_eval_only() {
    needs_weights eval-only || return
    rm -rf "$OUT/runs/eval-only"
    run_check eval-only 90 "$PYTHON" -m cardinal.train "${TRAIN_ARGS[@]}" --run-name eval-only --eval-only \
        --init-weights "$WEIGHTS" --limit-eval-batches 0 || return
    finish_check eval-only - "test_acc $(json_field "$OUT/runs/eval-only/eval.json" test_acc)% on synthetic"
}

json_field() {
    "$PYTHON" -c 'import json, sys; print(f"{json.load(open(sys.argv[1]))[sys.argv[2]]:.2f}")' "$1" "$2" \
        2>/dev/null || echo -
}

check_export() {
    needs_weights export || return
    rm -rf "$OUT/export"
    run_check export 120 "$PYTHON" -m cardinal.export --arch "$ARCH" --weights "$WEIGHTS" \
        --output-dir "$OUT/export" || return
    finish_check export - "$(cd "$OUT/export" 2>/dev/null && echo *)"
}

# The exported files, loaded without cardinal, run on the check's device and agree with the weights. They
# take images in [0, 1] and normalise inside; the state_dict takes normalised input (mean/std in its .json).
RELOAD_PY='import json, sys, torch
from torch.export.passes import move_to_device_pass
from cardinal import build_model
arch, folder = sys.argv[1], sys.argv[2]
norm = json.load(open(f"{folder}/{arch}_state.json"))
mean, std = (torch.tensor(norm[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
model = build_model(arch).eval()
model.load_state_dict(torch.load(f"{folder}/{arch}_state.pt", weights_only=True))
program = move_to_device_pass(torch.export.load(f"{folder}/{arch}.pt2"), device)
x = torch.rand(4, 3, 32, 32)
with torch.no_grad():
    expected = model((x - mean) / std)
    scale = expected.abs().max().item()
    for name, loaded in (("torchscript", torch.jit.load(f"{folder}/{arch}.ts", map_location=device)),
                         ("program", program.module())):
        error = (loaded(x.to(device)).cpu() - expected).abs().max().item() / scale
        print(f"{name} on {device}: largest difference {error:.1e} of the largest logit")
        assert error < 1e-3, f"{name} differs from the weights by {error:.1e} of the largest logit"'

check_reload() {
    if [ ! -f "$OUT/export/$ARCH.pt2" ]; then
        record reload FAIL 0 - "needs the export check's files (run export first)"
        return
    fi
    run_check reload 90 "$PYTHON" -c "$RELOAD_PY" "$ARCH" "$OUT/export" || return
    finish_check reload - "torchscript and program agree with the weights"
}

check_bench() {
    local warmup=5
    [ "$STEPS" -lt 10 ] && warmup=1
    run_check bench 180 "$PYTHON" -m cardinal.bench --no-compile --archs "$ARCH" --batch-sizes "$BATCH" --precisions bf16 \
        --memory-formats channels_last --steps "$STEPS" --warmup "$warmup" --repeats 3 --output "$OUT/bench.csv" \
        || return
    read_result "$BENCH_PY" "$OUT/bench.csv"
    finish_check bench "$RATE" "$NOTE"
}

check_profile() {
    # shellcheck disable=SC2086  # PROFILE_ARCHS is a list of names
    run_check profile 240 "$PYTHON" -m cardinal.profile --archs $PROFILE_ARCHS --steps 2 --warmup 1 \
        --precision bf16 --channels-last --output "$OUT/profile.csv" || return
    finish_check profile - "$PROFILE_ARCHS"
}

# --- run them, then the table ---------------------------------------------------------------------------
{
    describe_environment
    [ "$GPUS" -eq 0 ] && echo "no CUDA device: CARDINAL_GPU_CHECK_ALLOW_CPU=1, running on the CPU"
    echo "arch $ARCH, batch $BATCH, $STEPS steps per epoch; output in $OUT"
} | tee "$OUT/environment.txt"

for name in $CHECKS; do
    "check_${name//-/_}"
done

{
    echo
    printf '%-13s %-6s %6s %9s  %s\n' check result time_s img/s note
    for i in "${!NAMES[@]}"; do
        printf '%-13s %-6s %6s %9s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}" "${RATES[$i]}" "${NOTES[$i]}"
    done
    echo
    echo "img/s: training checks: the last of 2 epochs in runs/<check>/epochs.csv (the first includes warm-up"
    echo "and compilation); bench: cardinal's best training img/s in bench.csv. Logs: $OUT/<check>.log"
} | tee "$OUT/summary.txt"
exit "$FAILED"
