#!/usr/bin/env bash
# Every GPU measurement of tract_optax in one prepared command (issue 12).
#
#   bash benchmarks/gpu_check.sh [--smoke] [--parts a,b,c,d] OUT_DIR
#   bash benchmarks/gpu_check.sh --stage-data
#
# Parts, each under its own time limit (a failing part is recorded and the
# others still run):
#   (b) overhead.py --device gpu: ResNet-50 b128 (224 px), ViT-B/16 b64,
#       ResNet-18 CIFAR b128; plain vs TrAct exact and amortised (refresh every
#       10 steps, stats_due), statistic precision default and highest: step-time
#       ratio (medians of interleaved rounds) and peak-memory ratio (XLA).
#   (c) overhead.py --mode scaling at the ResNet-50 stem (batch 128, 224 px,
#       7x7/2, 3 channels): statistic vs the stem's forward + weight gradient.
#   (a) the core, Flax and data-parallel test modules on the device.
#   (d) python -m tract_experiment --preset paper --seeds 2 --epochs 1,2
#       --train-examples 20000: the tuned protocol (each method's lr chosen
#       from 0.03,0.1,0.3 on a 5000-example validation split of the training
#       file, test accuracy of the choice, tuned speedup in epochs and in
#       seconds) on Fashion-MNIST (skipped, with the reason recorded, when the
#       data is not on the machine). The runs of a method and budget (2 seeds x
#       3 lrs) train as one vectorised program (jax.vmap), plain's and TrAct's
#       side by side; one fresh compile per method times the single-run step
#       for the seconds.
#       Estimated (never run on a GPU): about 2 minutes on an H100/H200 (two
#       ResNet-18 compiles of the 6-lane step, ~940 six-lane steps, the timing).
# (b) and (c) run alone, as they time the device; (a) and (d) then run side by
# side; the limits add up to at most 8 minutes. --smoke runs the same parts at
# tiny sizes on the CPU, all side by side, with no time limit (nothing is
# timed for real, and a busy machine must not fail it; set GPU_CHECK_LIMIT_*
# to test the limits themselves).
#
# OUT_DIR receives at most 8 files: a_tests.json, b_overhead.json,
# c_scaling.json, d_main_job.json (part, config, environment, results, wall
# time), summary.md (also printed at the end), gpu_check.log (all output,
# prefixed by part) and main_job/{results.json,accuracy_vs_budget.png} (the
# plot has the lr-robustness panels beside accuracy vs budget).
# Exit status: 0 when every part is ok or skipped, 1 when one failed or ran
# out of time, 2 for bad usage or (without --smoke) no GPU.
#
# The library and the experiment application (experiment/) are used from this
# checkout through PYTHONPATH: nothing is installed (the GPU machine has no
# network; `pip install --no-deps --no-build-isolation -e . -e ./experiment`
# also works offline with setuptools >= 77; the GPU image has it).
#
# Environment:
#   PYTHON               interpreter (default: python3)
#   GPU_CHECK_DATA       folder with Fashion-MNIST for (d), the only place read
#                        when set; else .gpu_data/ in this checkout (made by
#                        --stage-data), $TRACT_OPTAX_DATA, Debian's
#                        /usr/share/datasets/fashion-mnist
#   GPU_CHECK_LIMIT_A .. GPU_CHECK_LIMIT_D   override a part's limit (seconds;
#                        0 = none, the --smoke default)
#
# On the device machine (data staged here first with --stage-data):
#   run(command='bash benchmarks/gpu_check.sh $OUT/gpu_check', carry=['.gpu_data'],
#       timeout_s=540)

set -uo pipefail

# Part (a) runs every library test module, tests/test_*.py (the core, the
# Flax glue, data parallelism; the experiment application's tests live in
# tests/experiment/), so a new module is included by its name. Left out:
# the benchmark's and this script's own tests (CPU-sized; the latter would
# run this script again), the documentation checks and the packaging check
# (it builds a wheel, which may need the network). The parity tests
# skip where torch_tract is missing (as on the GPU machine).
CORE_TESTS_GLOB='tests/test_*.py'
NOT_ON_DEVICE=(test_benchmark.py test_gpu_check.py test_notebook.py test_readme.py test_packaging.py)
# Part (a) under --smoke: the same pipeline on a small selection.
SMOKE_TESTS=(tests/test_transform.py -k "lambda")

# Time limits in seconds. GPU: the probe + (b) + (c) + max((a), (d)), each
# with KILL_AFTER of grace and a few seconds of bookkeeping, stays under 8
# minutes (about 7:46 at worst). --smoke checks the pipeline, not the clock:
# no limit (0), so a loaded machine cannot turn it into a timeout.
GPU_LIMITS=(165 200 45 165)    # a b c d
SMOKE_LIMITS=(0 0 0 0)
PROBE_LIMIT_GPU=30
PROBE_LIMIT_SMOKE=0
KILL_AFTER=5

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
REPORT="$HERE/gpu_check_report.py"

usage() {  # the header comment of this file
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

stage_data() {
  # Copies Fashion-MNIST (where the loader finds it on this machine) into
  # .gpu_data/fashion-mnist, which .gitignore keeps out of commits; the
  # device tool carries it when `carry` names .gpu_data.
  local source
  source="$(PYTHONPATH="$REPO:$REPO/experiment${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPORT" \
             find-data --repo "$REPO" --source-only)" || exit 1
  mkdir -p "$REPO/.gpu_data/fashion-mnist" || exit 1
  cp "$source"/*idx*ubyte* "$REPO/.gpu_data/fashion-mnist/" || exit 1
  du -sh "$REPO/.gpu_data"
  echo "gpu_check: staged $source in .gpu_data/fashion-mnist; name '.gpu_data' in the" \
       "device run's carry"
  exit 0
}

SMOKE=0
PARTS="b,c,a,d"
OUT_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --parts) shift; PARTS="${1:-}" ;;
    --parts=*) PARTS="${1#--parts=}" ;;
    --stage-data) stage_data ;;
    -h|--help) usage 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [[ -z "$OUT_DIR" ]] || usage; OUT_DIR="$1" ;;
  esac
  shift
done
[[ -n "$OUT_DIR" ]] || usage
[[ "$PARTS" =~ ^[abcd](,[abcd])*$ ]] || { echo "gpu_check: --parts takes letters a-d, e.g. b,c" >&2; exit 2; }
want() { [[ ",$PARTS," == *",$1,"* ]]; }

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
for part in a b c d; do  # earlier records of the parts about to run
  want "$part" && rm -f "$OUT_DIR/${part}_"*.json
done
rm -f "$OUT_DIR/summary.md" "$OUT_DIR/gpu_check.log"
LOG="$OUT_DIR/gpu_check.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"

cleanup() {  # stops the parts still running (their `timeout`s pass it on), drops WORK
  local pid_file
  for pid_file in "$WORK"/*.pid; do
    [[ -f "$pid_file" ]] && kill -TERM "$(cat "$pid_file")" 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "gpu_check: interrupted" >&2; exit 130' INT TERM

export PYTHONPATH="$REPO:$REPO/experiment${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# (a) and (d) share the device side by side: they allocate on demand instead
# of taking 75% of its memory up front ((b) and (c) keep JAX's default).
SHARED_DEVICE=(env XLA_PYTHON_CLIENT_PREALLOCATE=false)
if [[ $SMOKE == 1 ]]; then
  MODE=smoke
  export JAX_PLATFORMS=cpu
  LIMITS=("${SMOKE_LIMITS[@]}")
  PROBE_LIMIT=$PROBE_LIMIT_SMOKE
else
  MODE=gpu
  LIMITS=("${GPU_LIMITS[@]}")
  PROBE_LIMIT=$PROBE_LIMIT_GPU
fi
LIMIT_A="${GPU_CHECK_LIMIT_A:-${LIMITS[0]}}"
LIMIT_B="${GPU_CHECK_LIMIT_B:-${LIMITS[1]}}"
LIMIT_C="${GPU_CHECK_LIMIT_C:-${LIMITS[2]}}"
LIMIT_D="${GPU_CHECK_LIMIT_D:-${LIMITS[3]}}"
cd "$REPO" || exit 2
CORE_TESTS=()
for module in $CORE_TESTS_GLOB; do
  [[ " ${NOT_ON_DEVICE[*]} " == *" $(basename "$module") "* ]] || CORE_TESTS+=("$module")
done

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
START="$(now)"
show_limit() { [[ $1 == 0 ]] && echo "no time limit" || echo "limit $1 s"; }
echo "gpu_check: mode $MODE, parts $PARTS, out $OUT_DIR; (a) $(show_limit "$LIMIT_A")," \
     "(b) $(show_limit "$LIMIT_B"), (c) $(show_limit "$LIMIT_C")," \
     "(d) $(show_limit "$LIMIT_D")" | tee -a "$LOG"

# ----------------------------------------------------------- environment
timeout -k "$KILL_AFTER" "$PROBE_LIMIT" "$PY" "$REPORT" env --out "$WORK/env.json" --repo "$REPO" \
  2>&1 | sed -u 's/^/[env] /' | tee -a "$LOG"
PROBE_RC=${PIPESTATUS[0]}
if [[ $MODE == gpu ]]; then
  PLATFORM="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("platform",""))' \
              "$WORK/env.json" 2>/dev/null)"
  if [[ $PROBE_RC != 0 || "$PLATFORM" != gpu ]]; then
    echo "gpu_check: JAX sees no GPU (platform '${PLATFORM:-none}', probe exit $PROBE_RC);" \
         "run with --smoke on a CPU" | tee -a "$LOG" >&2
    exit 2
  fi
fi

# run_part LETTER LIMIT CONFIG_JSON RECORD_ARGS... -- COMMAND...
# Runs COMMAND under `timeout LIMIT`, streams its output (prefixed) to stdout
# and the log, then writes the part's record.
run_part() {
  local part=$1 limit=$2 config=$3
  shift 3
  local record_args=()
  while [[ $1 != -- ]]; do record_args+=("$1"); shift; done
  shift
  local out="$WORK/$part.out" begin rc pid tail_pid
  : > "$out"
  echo "[$part] started ($(show_limit "$limit")): $*" | tee -a "$LOG"
  begin="$(now)"
  timeout -k "$KILL_AFTER" "$limit" "$@" > "$out" 2>&1 &
  pid=$!
  echo "$pid" > "$WORK/$part.pid"
  tail --pid="$pid" -s 0.2 -n +1 -f "$out" | sed -u "s/^/[$part] /" | tee -a "$LOG" &
  tail_pid=$!
  wait "$pid"
  rc=$?
  wait "$tail_pid"
  rm -f "$WORK/$part.pid"
  # A part stopped mid-line (pytest's progress dots) gets its line ended.
  [[ -s "$out" && -n "$(tail -c 1 "$out")" ]] && echo | tee -a "$LOG"
  "$PY" "$REPORT" record --out-dir "$OUT_DIR" --part "$part" --mode "$MODE" \
    --exit-code "$rc" --wall "$(elapsed "$begin")" --limit "$limit" \
    --command "$*" --config "$config" --env "$WORK/env.json" --output "$out" \
    "${record_args[@]}" 2>&1 | sed -u "s/^/[$part] /" | tee -a "$LOG"
}

skip_part() {
  local part=$1 limit=$2 config=$3 reason=$4
  echo "[$part] skipped: $reason" | tee -a "$LOG"
  "$PY" "$REPORT" record --out-dir "$OUT_DIR" --part "$part" --mode "$MODE" --limit "$limit" \
    --config "$config" --env "$WORK/env.json" --skip-reason "$reason" > /dev/null
}

# ------------------------------------------------------------ the parts
if [[ $MODE == gpu ]]; then
  OVERHEAD_ARGS=(--device gpu --models resnet50,vit_b16,resnet18 --rounds 5
                 --steps-per-round 10 --warmup 2 --amortize 10
                 --precision default,highest --compile-workers 4)
  SCALING_ARGS=(--mode scaling --device gpu --batches 128 --sizes 224 --channels 3
                --kernel 7 --stride 2 --precision default,highest --rounds 15)
  TEST_ARGS=("${CORE_TESTS[@]}")
  # 16 cores: eight workers share the GPU (memory on demand, see SHARED_DEVICE).
  "$PY" -c 'import xdist' 2>/dev/null && TEST_ARGS=(-n 8 "${TEST_ARGS[@]}")
  # The tuned protocol, smaller than the preset (budgets 1,2,4,8, 4 seeds, all
  # 55000 training examples) to fit the limit: 24 runs.
  TRAIN_ARGS=(--preset paper --seeds 2 --epochs 1,2 --train-examples 20000
              --dataset fashion_mnist --timing-compiles 1 --timing-steps 20)
else
  OVERHEAD_ARGS=(--device cpu --models cnn --batch 4 --compiles 1 --rounds 3 --steps-per-round 1
                 --warmup 1 --amortize 2 --precision default,highest --compile-workers 2)
  SCALING_ARGS=(--mode scaling --device cpu --batches 2 --sizes 32 --channels 3
                --kernel 7 --stride 2 --precision default,highest --rounds 2)
  TEST_ARGS=("${SMOKE_TESTS[@]}")
  "$PY" -c 'import xdist' 2>/dev/null && TEST_ARGS=(-n 0 "${TEST_ARGS[@]}")
  TRAIN_ARGS=(--preset paper --seeds 1 --epochs 1,2 --dataset fashion_mnist --model cnn
              --lr 0.03,0.3 --train-examples 256 --val-examples 128 --test-examples 256
              --batch-size 64 --eval-batch-size 256 --timing-compiles 1 --timing-steps 2)
fi

part_b() {
  run_part b "$LIMIT_B" '{}' --results "$WORK/b.json" -- \
    "$PY" benchmarks/overhead.py "${OVERHEAD_ARGS[@]}" --out "$WORK/b.json"
}

part_c() {
  run_part c "$LIMIT_C" '{"stem_features": 64}' --results "$WORK/c.json" -- \
    "$PY" benchmarks/overhead.py "${SCALING_ARGS[@]}" --out "$WORK/c.json"
}

part_a() {
  run_part a "$LIMIT_A" "{\"pytest_args\": \"${TEST_ARGS[*]}\"}" --junit "$WORK/a.xml" -- \
    "${SHARED_DEVICE[@]}" "$PY" -m pytest -q -p no:cacheprovider -p no:benchmark \
    --junitxml="$WORK/a.xml" "${TEST_ARGS[@]}"
}

part_d() {
  local config="{\"train_args\": \"${TRAIN_ARGS[*]}\"}" data_dir
  if data_dir="$("$PY" "$REPORT" find-data --repo "$REPO" 2> "$WORK/data.err")"; then
    echo "[d] Fashion-MNIST from $data_dir" | tee -a "$LOG"
    config="{\"train_args\": \"${TRAIN_ARGS[*]}\", \"data_dir\": \"$data_dir\"}"
    run_part d "$LIMIT_D" "$config" --main-job "$OUT_DIR/main_job" -- \
      "${SHARED_DEVICE[@]}" "$PY" -m tract_experiment "${TRAIN_ARGS[@]}" \
      --data-dir "$data_dir" --no-progress --overwrite --out "$OUT_DIR/main_job"
  else
    skip_part d "$LIMIT_D" "$config" "$(tr '\n' ' ' < "$WORK/data.err" | sed 's/ *$//')"
  fi
}

if [[ $MODE == gpu ]]; then
  # (b) and (c) time the device, so they run alone; then (a) and (d) side by side.
  want b && part_b
  want c && part_c
  want a && part_a &
  want d && part_d &
else
  # Nothing is timed for real in a smoke run: all parts side by side.
  for part in b c a d; do
    want "$part" && "part_$part" &
  done
fi
wait

TOTAL="$(elapsed "$START")"
echo | tee -a "$LOG"
"$PY" "$REPORT" summary --out-dir "$OUT_DIR" --parts "$(echo "$PARTS" | tr ',' '\n' | sort | paste -sd,)" \
  --total "$TOTAL" | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
echo "gpu_check: exit $STATUS; files in $OUT_DIR" | tee -a "$LOG"
exit "$STATUS"
