#!/usr/bin/env bash
# Recipe-scale SFT: one epoch of a WTS-sized job with the command the 8-GPU PyTorchJob runs, timed against
# the reference's 35 min on 8 A100s (docs/perf.md, "Recipe scale (8 GPUs)").
#
#   bash bench/recipe_scale.sh                         # the whole thing, all GPUs, one full epoch per variant
#   bash bench/recipe_scale.sh --max-steps 3           # dry run: 3 steps per variant, epoch time projected
#   SCENARIOS=8 DURATION=30 bash bench/recipe_scale.sh --max-steps 2          # smaller data, same shapes
#   bash bench/recipe_scale.sh --dry-run               # print the commands only (PLAN_ONLY=1 does the same)
#   bash bench/recipe_scale.sh --stages train,summary  # reuse WORK's data and warm cache
#
# Stages (each timed; --stages picks some):
#   synth    `trafficvlm synth`: SCENARIOS main train scenarios (137 -> 342 overhead videos, the WTS train
#            split's ~341), DURATION s at SIZE and FPS (75 s, 1920x1080, 30 fps), rendered on every CPU
#   prepare  `trafficvlm prepare --subsets environment` -> the recipe's environment MCQ LLaVA JSON
#   warm     `trafficvlm cache warm`: decode every clip once at setting A into the frame cache the trainer
#            reads ($TRAFFICVLM_CACHE) - the one-off decode, reported separately
#   train    per VARIANTS (per-question, shared-prefix): the PyTorchJob's container command (env + torchrun
#            + `trafficvlm train`, from trafficvlm.launcher via bench/recipe_scale.py) on NGPU local GPUs,
#            full fine-tuning of the 7B architecture from random weights (model.random_init=7b), setting A,
#            global batch GLOBAL_BATCH questions (per-question) / SP_GLOBAL_BATCH videos (shared-prefix)
#   summary  wall time per epoch (no decode), samples/s, MFU, peak GPU memory: $OUT/recipe_scale.json + table
#
# Environment (defaults): SCENARIOS (137) DURATION (75) SIZE (1920x1080) FPS (30) SEED (0) NGPU (all GPUs)
# TARGET_GPUS (8) GLOBAL_BATCH (128) SP_GLOBAL_BATCH (8) MAX_STEPS (full epoch) VARIANTS WORKERS (nproc)
# EXTRA_OVERRIDES (trainer KEY=VALUE ..., e.g. "train.grad_checkpointing=false"; the cache warm-up sees video.*)
# WORK (runs/recipe_scale: kept between calls on a warm machine) OUT (bench/results) PYTHON (python3)
# TRAFFICVLM_CACHE ($WORK/frame-cache) MASTER_ADDR/MASTER_PORT (127.0.0.1:29500, what the operator sets).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
STAGES=${STAGES:-synth,prepare,warm,train,summary}
PLAN_ONLY=${PLAN_ONLY:-0}
MAX_STEPS=${MAX_STEPS:-0}
while [ $# -gt 0 ]; do
  case $1 in
    --max-steps) MAX_STEPS=$2; shift 2 ;;
    --max-steps=*) MAX_STEPS=${1#*=}; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    --stages=*) STAGES=${1#*=}; shift ;;
    --dry-run|--plan-only) PLAN_ONLY=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "recipe_scale.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
SCENARIOS=${SCENARIOS:-137} DURATION=${DURATION:-75} SIZE=${SIZE:-1920x1080} FPS=${FPS:-30} SEED=${SEED:-0}
GLOBAL_BATCH=${GLOBAL_BATCH:-128} SP_GLOBAL_BATCH=${SP_GLOBAL_BATCH:-8} TARGET_GPUS=${TARGET_GPUS:-8}
VARIANTS=${VARIANTS:-per-question shared-prefix}
WORKERS=${WORKERS:-$(nproc)}
WORK=${WORK:-runs/recipe_scale} OUT=${OUT:-bench/results}
if [ -z "${NGPU:-}" ]; then
  NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NGPU" -gt 0 ] || NGPU=1
fi
export PYTHONPATH=$PWD/components:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TRAFFICVLM_CACHE=${TRAFFICVLM_CACHE:-$(realpath -m "$WORK/frame-cache")}
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
# The job's command is `torchrun`: take the one next to $PYTHON (a virtualenv's), else PATH's.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
unset MLFLOW_TRACKING_URI   # a benchmark logs to files, not to whatever tracking server the shell points at
# Never NVLink multicast on shared hosts (the job's pods set NCCL_NVLS_ENABLE=0 too).
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

COMMON=(--work "$WORK" --ngpu "$NGPU" --target-gpus "$TARGET_GPUS" --global-batch "$GLOBAL_BATCH"
        --sp-global-batch "$SP_GLOBAL_BATCH" --max-steps "$MAX_STEPS")
for kv in ${EXTRA_OVERRIDES:-}; do COMMON+=(--set "$kv"); done
helper() { "$PYTHON" bench/recipe_scale.py "$@"; }
wants() { [[ ",$STAGES," == *",$1,"* ]]; }

run() {  # name, command...: print it; unless PLAN_ONLY, run it with a log and record its seconds
  local name=$1; shift
  echo "+ $(printf '%q ' "$@")"
  [ "$PLAN_ONLY" = 1 ] && return 0
  mkdir -p "$WORK/times" "$OUT"
  local t0 ms rc=0
  t0=$(date +%s%N)
  "$@" 2>&1 | tee "$OUT/recipe_scale_$name.log" || rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%d.%03d\n' $((ms / 1000)) $((ms % 1000)) > "$WORK/times/$name.s"
  echo "=== $name: exit $rc after $(cat "$WORK/times/$name.s") s"
  return "$rc"
}

sample_memory() {  # file: nvidia-smi memory.used of every GPU every 0.5 s, in the background
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$1" &
  MEM_PID=$!
}

FAILED=0
echo "recipe scale: NGPU=$NGPU MAX_STEPS=$MAX_STEPS (0: full epoch) WORK=$WORK cache=$TRAFFICVLM_CACHE"
if [ "$PLAN_ONLY" != 1 ]; then
  mkdir -p "$WORK" "$OUT"
  (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || echo cpu) > "$WORK/gpu.txt"
fi

if wants synth; then
  [ "$PLAN_ONLY" = 1 ] || printf '{"scenarios": %s, "duration": %s, "size": "%s", "fps": %s, "seed": %s}\n' \
    "$SCENARIOS" "$DURATION" "$SIZE" "$FPS" "$SEED" > "$WORK/synth.json"
  run synth "$PYTHON" -m trafficvlm synth "$WORK/wts" --seed "$SEED" --scenarios "$SCENARIOS" --normal 0 --bdd 0 \
    --val-fraction 0 --size "$SIZE" --fps "$FPS" --duration "$DURATION" --workers "$WORKERS"
fi
if wants prepare; then
  run prepare "$PYTHON" -m trafficvlm prepare "$WORK/wts" --out "$WORK/llava" --subsets environment
fi
if wants warm; then
  ARGV=$(helper argv warm "${COMMON[@]}" --workers "$WORKERS" --python "$PYTHON")
  mapfile -t WARM <<< "$ARGV"
  run warm "${WARM[@]}"
fi
if wants train; then
  # The trainer needs a tokenizer and processor only (the weights are random): the tiny checkpoint's.
  [ -d "$WORK/processor" ] || run processor "$PYTHON" -m trafficvlm build-tiny "$WORK/processor"
  for variant in $VARIANTS; do
    ARGV=$(helper argv "$variant" "${COMMON[@]}")
    mapfile -t TRAIN <<< "$ARGV"
    [ "$PLAN_ONLY" = 1 ] || rm -rf "$WORK/runs/recipe-scale-$variant"
    MEM_PID=
    [ "$PLAN_ONLY" = 1 ] || sample_memory "$WORK/mem-$variant.csv"
    rc=0
    run "$variant" "${TRAIN[@]}" || rc=$?
    [ -z "$MEM_PID" ] || kill "$MEM_PID" 2>/dev/null || true
    if [ "$rc" != 0 ]; then
      echo "recipe_scale.sh: $variant failed (exit $rc); see $OUT/recipe_scale_$variant.log" >&2
      FAILED=1
    fi
  done
fi
if wants summary; then
  echo "+ $PYTHON bench/recipe_scale.py summarize ${COMMON[*]} --out $OUT/recipe_scale.json"
  [ "$PLAN_ONLY" = 1 ] || helper summarize "${COMMON[@]}" --out "$OUT/recipe_scale.json"
fi
exit "$FAILED"   # a failed variant still gets its row in the summary, and fails the run
