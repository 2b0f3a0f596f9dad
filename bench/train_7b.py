"""GPU benchmark of one SFT step on the Qwen2.5-VL-7B architecture: plain transformers vs our trainer.

    .venv/bin/python bench/train_7b.py                            # one GPU: (a) vs (b); bench/results/train_7b.json
    torchrun --nproc-per-node 4 bench/train_7b.py                 # (c) FSDP2 full fine-tuning on 4 GPUs;
                                                                  #     bench/results/train_7b_fsdp4.json
    .venv/bin/python bench/train_7b.py --fsdp                     # (d) full fine-tuning on ONE card, memory
                                                                  #     capped at 79 GB (an 80 GB card);
                                                                  #     bench/results/train_7b_full_1gpu.json
    .venv/bin/python bench/train_7b.py --tiny                     # CPU smoke test: tiny model, fp32, no JSON

Model: `trafficvlm.model.config_7b()` with random weights. Sample: the recipe's setting A shape, 74 frames
at 196x364 -> video grid (37, 14, 26) -> 3,367 video tokens, plus the real prompt (~100 text tokens)
built by `processing.Preprocessor`; pixels random. Variants, each timed with CUDA events after warmup
(median of --iters steps, optimizer step included):

one process
  (a) hf_lora        baseline: plain transformers + peft, LoRA r16 on the LLM, vision frozen, HF gradient
                     checkpointing, bf16 weights, loss over full logits, positions computed by transformers;
  (b) ours_lora      our trainer's step (`trafficvlm.train.wrap_model` + `train_step` + `clip_and_step`, the
                     code train.py runs) with train.py's defaults: LoRA r16, FSDP2 with bf16 compute over fp32
                     master weights, our activation checkpointing, the frozen vision tower compiled, LM head
                     only at labelled positions, explicit 3-D positions, packed batch;
      ours_lora_eager_vision   the same without compiling the vision tower (train.compile_vision=false);
      ours_lora_no_ckpt        the same without activation checkpointing (train.grad_checkpointing=false);
      ours_lora_shared15       shared-prefix training (train.shared_prefix=true): one clip with 15
                     questions as one sequence, prefix once and each question a masked branch
                     (`data.shared_prefix_batch`), no activation checkpointing; samples = questions.
  --profile adds the top CUDA kernels of one ours_lora_no_ckpt step to the JSON.
torchrun, N GPUs, one sample per GPU
  (c) hf_full_fsdp   baseline: transformers model, HF gradient checkpointing, fully_shard per block + root
                     (bf16 compute, fp32 reduce), vision frozen, full-logits loss, AdamW;
      ours_full      our step: full fine-tuning, vision frozen;
      ours_full_vision  our step: full fine-tuning, vision tower trained too.
one process, --fsdp
  (d) full_1gpu_*    full fine-tuning of the LLM (vision frozen) on one card with
                     `torch.cuda.set_per_process_memory_fraction` capping memory at --memory-cap-gb (79):
                     bf16 master weights (torchao AdamW, stochastic rounding) or fp32 (torch AdamW), with and
                     without activation checkpointing; a variant that does not fit records "out of memory".

Memory: every variant builds the whole model on its GPU before sharding (fp32: 33 GB; fits an 80 GB card).

MFU: 4·N·T (LoRA: no weight gradients for frozen weights) or 6·N·T (full), N = all parameters, T = tokens/s,
against 989 TFLOP/s dense bf16 per H100/H200.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "components"))

from trafficvlm.config import TrainConfig, VideoSpec, from_dict  # noqa: E402
from trafficvlm.parallel import DistInfo, close_distributed, init_distributed  # noqa: E402
from trafficvlm.processing import collate_packed, collate_padded  # noqa: E402
from trafficvlm.train import (build_optimizer, clip_and_step, prepare_model, random_model, train_step,  # noqa: E402
                             wrap_model)

from questions import QUESTIONS  # noqa: E402  (bench/questions.py; the first is the one-sample row's)

PEAK = 989e12
RECIPE = dict(frames=74, height=196, width=364, grid=(37, 14, 26))
TINY = dict(frames=8, height=56, width=84, grid=(4, 4, 6))


# --- inputs -----------------------------------------------------------------------------------------------

def make_samples(shape: dict, n: int = 1):
    """n real training Samples (our prompt, labels, positions), different questions about one clip of
    random frames of the given shape; and the Preprocessor."""
    from trafficvlm.model import PixelSpec, Processor, build_tokenizer
    from trafficvlm.prompts import chat_template
    from trafficvlm.processing import Preprocessor
    from trafficvlm.records import VideoQARecord
    from trafficvlm.video import Clip, Plan

    processor = Processor(build_tokenizer("qwen"), PixelSpec(), chat_template(), "synthetic")
    pre = Preprocessor(processor, VideoSpec(fps=1.0, max_pixels=81920))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (shape["frames"], shape["height"], shape["width"], 3), dtype=np.uint8)
    t, h, w = shape["grid"]
    plan = Plan(shape["frames"], shape["height"], shape["width"], t * h * w // 4, (t, h, w), 2.0,
                list(range(shape["frames"])))
    clip = Clip(frames, plan.indices, 30.0, 2.0, plan, "synthetic")
    samples = []
    for i, (question, options) in enumerate(QUESTIONS[:n]):
        rec = VideoQARecord(id=f"bench{i}", video="synthetic.mp4", question=question,
                            options={"abcd"[k]: o for k, o in enumerate(options)}, answer="b")
        samples.append(pre.encode(rec, clip, with_answer=True))
    return samples, pre


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from trafficvlm.model import config_7b, config_tiny

    config = config_tiny() if tiny else config_7b()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def train_cfg(mode: str, freeze_vision: bool = True, **train) -> TrainConfig:
    return from_dict(TrainConfig, {"train": {"mode": mode, "freeze_vision": freeze_vision, "lr": 1e-5,
                                             "grad_checkpointing": True, "global_batch": 1, **train}})


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- timing -----------------------------------------------------------------------------------------------

def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of `step` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --- the variants ----------------------------------------------------------------------------------------

def hf_lora(sample, pre, args, info: DistInfo) -> float:
    """(a) What a transformers + peft user writes."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    model = build_model(args.tiny, info.device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = train_cfg("lora").lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=
                                             rf"model\.language_model\..*\.({'|'.join(lora.target_modules)})"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = to({k: v for k, v in collate_padded([sample], pre.pad_token_id).items() if k != "position_ids"},
               info.device)

    def step():
        model(**batch, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, info.device, args.warmup, args.iters)


def ours(batch: dict, ids: list[str], args, info: DistInfo, mode: str, freeze_vision: bool = True,
         profile: bool = False, **train) -> tuple[float, list | None]:
    """(b) / (c): exactly train.py's path: prepare_model, wrap_model, build_optimizer, train_step; `train`
    overrides train.* keys. Returns (median step seconds, top CUDA kernels of one more step or None)."""
    cfg = train_cfg(mode, freeze_vision, **train)
    cfg.model.random_init = "tiny" if args.tiny else "7b"
    torch.manual_seed(0)
    model, _, _ = prepare_model(random_model(cfg, info.device), cfg)  # train.py's model: fast vision on CUDA
    wrap_model(model, cfg, info)
    opt, sched = build_optimizer(model, cfg, total_steps=10_000, use_cuda=info.device.type == "cuda")
    micro = [(batch, ids)]

    def step():
        train_step(model, micro, info)
        clip_and_step(model, opt, sched, cfg.train.max_grad_norm)

    seconds = time_steps(step, info.device, args.warmup, args.iters)
    return seconds, (top_kernels(step) if profile and info.device.type == "cuda" else None)


def top_kernels(step, n: int = 25) -> list[dict]:
    """The n CUDA kernels with the most self time in one call of `step` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profile: {total:.1f} ms of CUDA kernel time in one step; top {n}:")
    rows = []
    for e in events[:n]:
        rows.append({"op": e.key[:120], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3)})
        print(f"  {rows[-1]['ms']:9.2f} ms {e.count:6d}x  {e.key[:100]}")
    return rows


def hf_full_fsdp(sample, pre, args, info: DistInfo) -> float:
    """(c) baseline: FSDP2 as a plain transformers user wraps it (blocks + root), HF checkpointing and loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trafficvlm.model import apply_freeze

    model = build_model(args.tiny, info.device, torch.float32)
    apply_freeze(model, vision=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if info.device.type == "cuda" else MixedPrecisionPolicy())
    for m in model.modules():
        if type(m).__name__ in model._no_split_modules:
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = to({k: v for k, v in collate_padded([sample], pre.pad_token_id).items() if k != "position_ids"},
               info.device)

    def step():
        model(**batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, info.device, args.warmup, args.iters)


# --- report -----------------------------------------------------------------------------------------------

def row(name: str, seconds: float, tokens: int, n_params: int, k: int, info: DistInfo, baseline: float | None,
        samples: int = 1) -> dict:
    """samples: questions per GPU per step (15 for a shared-prefix row)."""
    tokens = tokens * info.world_size
    peak = peak_gb(info.device)
    if peak is not None and info.world_size > 1:
        t = torch.tensor(peak, device=info.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        peak = float(t)
    return {"variant": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "samples_per_s": samples * info.world_size / seconds, "samples_per_s_per_gpu": samples / seconds,
            "mfu": (k * n_params * tokens / seconds / (PEAK * info.world_size)) if info.device.type == "cuda" else None,
            "peak_mem_gb": peak, "speedup_vs_baseline": (samples * baseline / seconds) if baseline else 1.0}


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':32} {'step s':>8} {'tok/s':>9} {'samples/s':>10} {'MFU':>7} {'peak GB':>8} {'vs base':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:32} {r['error'][:100]} (cap {r['memory_cap_gb']} GB)")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        print(f"{r['variant']:32} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['samples_per_s']:10.3f} "
              f"{mfu:>7} {mem:>8} {r['speedup_vs_baseline']:7.2f}x")


# Full fine-tuning of the LLM (vision frozen) on ONE card: (name, train.* keys). fp32 master weights with
# AdamW states need ~16 B per trainable parameter (122 GB for the 7.6B LLM): expected not to fit 80 GB.
FULL_ONE_GPU = [("full_1gpu_bf16", {"master_dtype": "bfloat16"}),
                ("full_1gpu_bf16_no_ckpt", {"master_dtype": "bfloat16", "grad_checkpointing": False}),
                ("full_1gpu_fp32", {"master_dtype": "float32"})]


def run(args, info: DistInfo):
    from trafficvlm.data import shared_prefix_batch

    shape = TINY if args.tiny else RECIPE
    group, pre = make_samples(shape, 15)
    sample = group[0]
    one = (collate_packed([sample]), [sample.record_id])
    n_params = sum(p.numel() for p in build_model(args.tiny, torch.device("meta"), torch.bfloat16).parameters())
    rows, profiles = [], {}
    if info.world_size == 1 and not args.fsdp:
        base = hf_lora(sample, pre, args, info)
        rows.append(row("hf_lora", base, len(sample), n_params, 4, info, None))
        shared = shared_prefix_batch(group)
        variants = [("ours_lora", one, {}), ("ours_lora_eager_vision", one, {"compile_vision": False}),
                    ("ours_lora_no_ckpt", one, {"grad_checkpointing": False}),
                    ("ours_lora_shared15", (shared, [s.record_id for s in group]), {"grad_checkpointing": False})]
        for name, (batch, ids), train in variants:
            free(info.device)
            seconds, kernels = ours(batch, ids, args, info, "lora", profile=args.profile and name == "ours_lora_no_ckpt",
                                    **train)
            rows.append(row(name, seconds, batch["input_ids"].numel(), n_params, 4, info, base, samples=len(ids)))
            if kernels:
                profiles[name] = kernels
    elif info.world_size == 1:  # --fsdp on one GPU: full fine-tuning of the LLM on one card, under a memory cap
        base = None
        for name, train in FULL_ONE_GPU:
            free(info.device)
            try:
                seconds, _ = ours(*one, args, info, "full", freeze_vision=True, **train)
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON; the next variant runs
                error = ("out of memory" if isinstance(exc, torch.OutOfMemoryError)
                         else f"{type(exc).__name__}: {str(exc)[:300]}")
                print(f"{name}: {error[:200]} (memory cap {args.memory_cap_gb} GB)")
                rows.append({"variant": name, "error": error, "memory_cap_gb": args.memory_cap_gb,
                             "peak_mem_gb": peak_gb(info.device), **train})
                continue
            rows.append({**row(name, seconds, len(sample), n_params, 6, info, None), **train,
                         "memory_cap_gb": args.memory_cap_gb})
    else:  # several GPUs
        base = hf_full_fsdp(sample, pre, args, info)
        rows.append(row("hf_full_fsdp", base, len(sample), n_params, 6, info, None))
        for name, freeze in (("ours_full", True), ("ours_full_vision", False)):
            free(info.device)
            seconds, _ = ours(*one, args, info, "full", freeze_vision=freeze)
            rows.append(row(name, seconds, len(sample), n_params, 6, info, base))
    return rows, sample, profiles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test); no JSON unless --out")
    p.add_argument("--fsdp", action="store_true", help="run the (c) variants even with one process")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="add one profiled ours_lora_no_ckpt step to the JSON")
    p.add_argument("--memory-cap-gb", type=float, default=79.0,
                   help="with --fsdp on one GPU: cap this process's GPU memory (an 80 GB card's usable share), "
                        "so a variant that would not fit one runs out of memory here too")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/train_7b[_fsdpN].json)")
    args = p.parse_args()
    info = init_distributed("cpu" if args.tiny else "cuda")
    if info.world_size == 1 and args.fsdp and info.device.type == "cuda":
        total = torch.cuda.get_device_properties(info.device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb / total), info.device)
    try:
        rows, sample, profiles = run(args, info)
        if info.is_main:
            print_table(rows)
            out = args.out or (None if args.tiny else ROOT / "bench" / "results" /
                               ("train_7b.json" if info.world_size == 1 and not args.fsdp
                                else f"train_7b_fsdp{info.world_size}.json" if info.world_size > 1
                               else "train_7b_full_1gpu.json"))
            if out:
                write_json(out, rows, sample, info, args, profiles)
    finally:
        close_distributed()
    return 0


def write_json(out: Path, rows: list[dict], sample, info: DistInfo, args, profiles: dict) -> None:
    import transformers

    card = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else platform.processor() or "cpu"
    n_video = int((sample.input_ids == 151656).sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "train_7b", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "card": card, "gpus": info.world_size,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shapes": {"frames": (TINY if args.tiny else RECIPE)["frames"], "grid_thw": list(sample.video_grid_thw[0].tolist()),
                   "video_tokens": n_video, "tokens": len(sample), "text_tokens": len(sample) - n_video},
        "iters": args.iters, "warmup": args.warmup, "peak_flops_per_gpu": PEAK, "results": rows,
        "profiles": profiles,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
