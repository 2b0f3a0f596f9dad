#!/usr/bin/env bash
# Run GPU benchmarks on a machine whose python3 already has torch/transformers (e.g. an NVIDIA PyTorch
# image), with the project from this checkout and any extra wheels in .whl/ (installed to /tmp/site).
#
#   bash bench/device.sh vision eval          # one GPU
#   bash bench/device.sh fp8
#   bash bench/device.sh eval-stage          # one GPU: run_eval compiled vs not, quantize + FP8 gate on CUDA
#   bash bench/device.sh eval-stage-dp       # the same + torchrun eval on all visible GPUs vs one GPU
#   bash bench/device.sh train-lora           # one GPU
#   bash bench/device.sh train-full1          # one GPU: full fine-tuning under an 80 GB cap
#   bash bench/device.sh data-wait            # one GPU: loader wait per LoRA step on real synthetic videos
#   bash bench/device.sh train-fsdp           # all visible GPUs (torchrun)
#   bash bench/device.sh demo-sweep           # make-demo learnability grid, many tiny runs sharing the GPU
#
# Logs and JSON go to $OUT (default bench/results/). Each bench has its own time limit so one slow or
# failing bench does not take the others down.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/components:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Never NVLink multicast on shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$OUT/gpu.txt"

run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name exit $? after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

for bench in "$@"; do
  case $bench in
    vision) run vision_7b 180 python3 bench/vision_7b.py --out "$OUT/vision_7b.json" ;;
    eval) run eval_shared_prefix 420 python3 bench/eval_shared_prefix.py --profile --out "$OUT/eval_shared_prefix.json" ;;
    eval-quick) run eval_shared_prefix 360 python3 bench/eval_shared_prefix.py --quick --profile --out "$OUT/eval_shared_prefix.json" ;;
    # the emulated row (CPU gate numerics) and the torchao rows (slower; compiled fails in Dynamo) are
    # in earlier JSONs; the JSON is rewritten after every row, so a row past the limit loses only itself
    fp8) run fp8_eval 420 python3 bench/fp8_eval.py --repeats 3 --workdir /tmp/fp8bench --out "$OUT/fp8_eval.json" --rows scaled-mm,bf16,compressed-tensors ;;
    fp8-quick) run fp8_eval 450 python3 bench/fp8_eval.py --repeats 3 --workdir /tmp/fp8bench --out "$OUT/fp8_eval.json" --rows bf16,scaled-mm,scaled-mm-hf-text ;;
    attn-branches) run attn_branches 120 python3 bench/attn_branches.py --out "$OUT/attn_branches.json" ;;
    eval-stage) run eval_stage_gpu 300 python3 bench/eval_stage_gpu.py --out "$OUT/eval_stage_gpu.json" ;;
    eval-stage-dp) run eval_stage_gpu_dp 360 python3 bench/eval_stage_gpu.py --dp "$NGPU" --out "$OUT/eval_stage_gpu_dp${NGPU}.json" ;;
    gpu-tests) run gpu_tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_processing.py tests/test_model.py tests/test_fast_vision.py tests/test_fast_text.py ;;
    train-lora) run train_lora 320 python3 bench/train_7b.py --iters 4 --warmup 1 --profile --out "$OUT/train_7b_lora.json" ;;
    train-full1) run train_full_1gpu 330 python3 bench/train_7b.py --fsdp --iters 3 --warmup 1 --out "$OUT/train_7b_full_1gpu.json" ;;
    train-fsdp) run train_fsdp 260 torchrun --standalone --nproc-per-node "$NGPU" bench/train_7b.py --fsdp --iters 3 --warmup 1 --out "$OUT/train_7b_fsdp_${NGPU}gpu.json" ;;
    demo-sweep) run demo_sweep 570 taskset -c 0-13 python3 bench/demo_sweep.py --out /tmp/sweep --parallel 12 --device cuda --cpu-timing 14,15 --json "$OUT/demo_sweep.json" ;;
    # the data path at LoRA speed: real synthetic videos through the frame cache and the trainer's loader
    data-wait) run data_wait 270 env NGPU=1 SCENARIOS=6 SIZE=640x360 WORKERS=16 VARIANTS=per-question GLOBAL_BATCH=8 \
      EXTRA_OVERRIDES="train.mode=lora data.num_workers=4" bash bench/recipe_scale.sh --max-steps 10 ;;
    recipe-dry) run recipe_scale 190 env SCENARIOS=6 SIZE=640x360 WORKERS=32 bash bench/recipe_scale.sh --max-steps 4 ;;
    *) echo "unknown bench: $bench"; exit 2 ;;
  esac
done
