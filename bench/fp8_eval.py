"""GPU benchmark: FP8 (compressed-tensors W8A8, real FP8 matmuls) vs bf16 on the 7B architecture, setting A.

    python bench/fp8_eval.py                                  # one H100/H200; writes bench/results/fp8_eval.json
    python bench/fp8_eval.py --workdir /tmp/fp8bench --repeats 7 --out $OUT/fp8_eval.json   # on the device machine
    python bench/fp8_eval.py --tiny --device cpu --repeats 1  # smoke test of the whole path on CPU (no timings)

What it does, all in one call so every ratio has its baseline beside it:
1. builds Qwen2.5-VL-7B (Cosmos-Reason1-7B's architecture, `model.config_7b`) with random weights in bf16,
   saves it as a checkpoint (tokenizer, processor files, trafficvlm.json with setting A);
2. quantizes it with the pipeline's own code (`trafficvlm.quantize.quantize`: llm-compressor oneshot on the
   GPU, the ignore-list fix, `verify_checkpoint` against the source) and records the size and the check;
3. times, with CUDA events (median of `--repeats` after a warm-up), on setting-A shapes (a 75 s 1080p30
   clip: 74 frames at 196x364, 3,367 video tokens) and 15 questions:
     - `vision`         the vision tower alone (identical weights in both: a sanity row),
     - `prefill`        one full forward of prompt + video (vision + LLM), last-token logits,
     - `shared_prefix`  our eval engine (`trafficvlm.evaluate.LocalEngine`, letter mode): one prefill per
                        clip, 15 questions batched on the cached prefix -> questions per second,
   for bf16, FP8 with FP8 kernels (`load_quantized`, `use_optimized_inference`), and FP8 emulated
   (dequantized weights + FP8-rounded activations: what the CPU gate computes);
4. parity: FP8-kernel vs bf16 and vs emulated: relative L2 difference of the prefill logits, letter
   argmax agreement and the largest letter-probability difference over the 15 questions.

Random weights make near-flat logits, so argmax agreement understates what a trained model shows; the
relative logits difference is the informative parity figure. torchao's float8 linears are the other
in-process route (not measured here); vLLM is the serving path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "components"))

QUESTIONS = [
    ("What is weather in the scenario?", ["Clear", "Cloudy", "Rainy", "Snowy"]),
    ("What is the brightness level in the scene?", ["Bright", "Dark", "Dim"]),
    ("What are road surface conditions?", ["Dry", "Wet", "Snowy", "Icy"]),
    ("How many lanes are there?", ["One", "Two", "Three", "Four or more"]),
    ("What is the formation of the road?", ["Straight", "Curve", "Intersection", "T-junction"]),
    ("Is there guardrail around the road?", ["Yes", "No"]),
    ("Are there street lights in the scene?", ["Yes", "No"]),
    ("Where is the sidewalk in the scene?", ["Both sides", "Left side", "Right side", "None"]),
    ("What is the volume of the traffic in the scene?", ["Light", "Moderate", "Heavy"]),
    ("What is the type of the road?", ["Main road", "Residential road", "Parking lot"]),
    ("What is the color of pedestrian's upper body clothing?", ["Black", "White", "Red", "Blue"]),
    ("What is the age of the pedestrian?", ["Child", "Adult", "Elderly"]),
    ("What is the gender of the pedestrian?", ["Male", "Female"]),
    ("What is the speed of the vehicle?", ["Stopped", "Slow", "Fast"]),
    ("What is the orientation of the pedestrian?", ["Same direction", "Opposite direction", "Perpendicular"]),
]


# --- the checkpoints --------------------------------------------------------------------------------------

def write_random_checkpoint(out: Path, *, tiny: bool, device: str) -> Path:
    """A complete random-init checkpoint: the 7B architecture (or the tiny test model) in bf16."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from trafficvlm.config import SETTING_A, PromptSpec
    from trafficvlm.model import build_tiny, bundle_meta, config_7b, write_bundle_meta

    build_tiny(out, seed=0, spec=SETTING_A)  # tokenizer, processor files, chat template, generation config
    if tiny:
        return out
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config_7b(), dtype=torch.bfloat16)
    for tiny_weights in out.glob("*.safetensors"):  # build_tiny's; the 7B's replace them (and config.json)
        tiny_weights.unlink()
    model.save_pretrained(out)
    write_bundle_meta(out, bundle_meta(SETTING_A, PromptSpec(), base_model="random-init Qwen2.5-VL-7B (bench)"))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# --- timing -----------------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], repeats: int, device: str) -> dict[str, float]:
    """Median / min seconds of `fn` after one warm-up call; CUDA events on GPU, perf_counter on CPU."""
    import time

    import torch

    fn()
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "repeats": repeats}


def workload():
    """Setting A: the records of one clip (15 questions) and a synthetic 75 s 1080p30 clip (74 frames)."""
    import numpy as np

    from trafficvlm.config import SETTING_A
    from trafficvlm.records import VideoQARecord
    from trafficvlm.video import Clip, plan

    p = plan(75.0, 1920, 1080, 30.0, SETTING_A)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(p.frames, p.height, p.width, 3), dtype=np.uint8)
    clip = Clip(frames=frames, indices=p.indices, video_fps=30.0, second_per_grid=p.second_per_grid, plan=p,
                path="synthetic-75s-1080p30")
    records = [VideoQARecord(id=f"q{i}", video="synthetic.mp4", question=q,
                             options={chr(97 + k): o for k, o in enumerate(opts)}, answer="a")
               for i, (q, opts) in enumerate(QUESTIONS)]
    return records, clip, p


def measure(name: str, model, processor, records, clip, repeats: int, device: str) -> dict[str, Any]:
    """vision / prefill / shared-prefix timings of one model, and what parity needs (logits, letter probs)."""
    import torch

    from trafficvlm.config import SETTING_A, SYSTEM_PROMPT
    from trafficvlm.evaluate import LocalEngine

    engine = LocalEngine(model, processor, SETTING_A, SYSTEM_PROMPT, mode="letter", shared_prefix=True,
                         question_batch=16)
    sample = engine.pre.encode(records[0], clip, with_answer=False)
    inputs = dict(input_ids=sample.input_ids[None].to(device), position_ids=sample.position_ids[:, None].to(device),
                  pixel_values_videos=sample.pixel_values_videos.to(device, engine.dtype),
                  video_grid_thw=sample.video_grid_thw.to(device))

    def vision():
        with torch.inference_mode():
            model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    def prefill():
        with torch.inference_mode():
            return model(**inputs, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    def shared():
        return engine.score([(records, clip)])[0]

    result = {"vision": timed(vision, repeats, device), "prefill": timed(prefill, repeats, device),
              "shared_prefix": timed(shared, repeats, device), "prompt_tokens": int(sample.input_ids.numel())}
    result["shared_prefix"]["questions_per_s"] = len(records) / result["shared_prefix"]["median_s"]
    answers = shared()
    print(f"  {name}: prefill {result['prefill']['median_s'] * 1000:.1f} ms, "
          f"{result['shared_prefix']['questions_per_s']:.1f} questions/s", flush=True)
    return {**result, "_logits": prefill().cpu(), "_answers": answers}


def parity(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    from trafficvlm.quantize import rel_diff

    same = sum(x.predicted == y.predicted for x, y in zip(a["_answers"], b["_answers"]))
    diffs = [abs(x.letter_probs[k] - y.letter_probs[k]) for x, y in zip(a["_answers"], b["_answers"])
             for k in x.letter_probs]
    return {"prefill_logits_rel_diff": rel_diff(a["_logits"], b["_logits"]), "same_argmax": same,
            "questions": len(a["_answers"]), "max_letter_prob_diff": max(diffs)}


# --- main -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from trafficvlm.model import load_model, load_processor
    from trafficvlm.quantize import LOGITS_TOL, load_quantized, quantize

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = write_random_checkpoint(work / "bf16", tiny=args.tiny, device=args.device)
    print(f"quantizing {src} on {args.device} ...", flush=True)
    # Random weights are not a trained model: verify loosely here and report the default tolerance's verdict.
    report = quantize(src, work / "fp8", device=args.device, scheme=args.scheme, logits_tol=args.logits_tol)
    report["verify"]["within_default_logits_tol"] = report["verify"]["logits_rel_diff"] < LOGITS_TOL
    processor = load_processor(src)
    records, clip, plan = workload()
    on_gpu = args.device.startswith("cuda")
    kernels = "fp8 (FP8 kernels)" if on_gpu else "fp8 (loader default: emulated on CPU)"
    emulated = "fp8 (emulated, as the CPU gate)"
    def same_vision(model):
        # The vision tower is bf16 in every variant: give the FP8 rows the fast tower `load_model` gives bf16
        # (the 2026-11-26 H100 run lacked this, so its FP8 vision/prefill rows include the slow HF tower).
        if on_gpu:
            from trafficvlm.fast_vision import enable_fast_vision
            enable_fast_vision(model)
        return model

    loaders = {"bf16": lambda: load_model(src, dtype=torch.bfloat16, device=args.device),
               # on a GPU insist on the kernels: an error, never a silent fallback
               kernels: lambda: same_vision(load_quantized(work / "fp8", args.device, dtype=torch.bfloat16,
                                                           fp8_kernels=True if on_gpu else None)),
               emulated: lambda: same_vision(load_quantized(work / "fp8", args.device, dtype=torch.bfloat16,
                                                            fp8_kernels=False))}
    rows: dict[str, dict[str, Any]] = {}
    for name, load in loaders.items():
        model = load().eval()
        rows[name] = measure(name, model, processor, records, clip, args.repeats, args.device)
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    for row in rows.values():
        row["speedup_vs_bf16"] = {k: rows["bf16"][k]["median_s"] / row[k]["median_s"]
                                  for k in ("vision", "prefill", "shared_prefix")}
    return {
        "card": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "config": {"model": "tiny" if args.tiny else "Qwen2.5-VL-7B architecture, random init", "scheme": args.scheme,
                   "spec": "setting A (fps 1, max_pixels 81920)", "frames": plan.frames,
                   "frame_size": [plan.height, plan.width], "video_tokens": plan.vision_tokens,
                   "questions": len(records), "repeats": args.repeats},
        "quantize": {k: report[k] for k in ("size_gb", "layers", "verify", "seconds")},
        "engines": {name: {k: v for k, v in row.items() if not k.startswith("_")} for name, row in rows.items()},
        "parity": {f"{kernels} vs bf16": parity(rows["bf16"], rows[kernels]),
                   f"{kernels} vs emulated": parity(rows[emulated], rows[kernels])},
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['card']}  {result['config']['model']}, {result['config']['video_tokens']} video tokens, "
             f"{result['config']['questions']} questions",
             f"{'engine':<40}{'vision ms':>11}{'prefill ms':>12}{'q/s shared':>12}{'prefill x':>11}{'shared x':>10}"]
    for name, row in result["engines"].items():
        lines.append(f"{name:<40}{row['vision']['median_s'] * 1e3:>11.1f}{row['prefill']['median_s'] * 1e3:>12.1f}"
                     f"{row['shared_prefix']['questions_per_s']:>12.2f}{row['speedup_vs_bf16']['prefill']:>11.2f}"
                     f"{row['speedup_vs_bf16']['shared_prefix']:>10.2f}")
    q = result["quantize"]
    lines.append(f"weights {q['size_gb']['before']:.2f} GB -> {q['size_gb']['after']:.2f} GB; verify: vision rel "
                 f"{q['verify']['vision_rel_diff']:.1e}, logits rel {q['verify']['logits_rel_diff']:.3f}")
    for name, p in result["parity"].items():
        lines.append(f"parity {name}: logits rel {p['prefill_logits_rel_diff']:.3f}, same argmax "
                     f"{p['same_argmax']}/{p['questions']}, max letter-prob diff {p['max_letter_prob_diff']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/trafficvlm-fp8-bench", help="checkpoints go here (~27 GB)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fp8_eval.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scheme", choices=("fp8-dynamic", "fp8-block"), default="fp8-dynamic")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logits-tol", type=float, default=0.5,
                        help="verification tolerance for random weights (default 0.5; quantize's is 0.15)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the 7B (smoke test)")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
