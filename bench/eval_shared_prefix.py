"""Shared-prefix letter scoring vs one forward per question, on the Qwen2.5-VL-7B architecture (GPU).

    PYTHONPATH=components python3 bench/eval_shared_prefix.py --out bench/results/eval_shared_prefix.json

Random-init 7B weights in bf16 (the architecture and token counts are what matter for speed), one synthetic
75 s clip planned as the recipe's setting A (74 frames at 196x364: 3,367 video tokens), 15 WTS environment
questions. Three engines score the same questions:
- plain transformers: one `model(**batch)` per question with full logits (what a script around the HF
  model does; our 3-D positions are passed so its answers are comparable), the HF vision tower;
- baseline: `trafficvlm.evaluate.LocalEngine` with `--shared-prefix off --question-batch 1`;
- padded:   `--shared-prefix off --question-batch 15` (one padded batch, the video repeated per row);
- shared:   the default (one prefill of system prompt + video, 15 suffixes on copies of its KV cache),
  with the HF vision tower and with `trafficvlm.fast_vision` (one attention call per vision layer).
It prints a table and writes JSON (card, versions, config, times, agreement with the baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from trafficvlm.config import SETTING_A, SYSTEM_PROMPT
from trafficvlm.evaluate import LocalEngine
from trafficvlm.model import PixelSpec, Processor, build_tokenizer, config_7b
from trafficvlm.prompts import chat_template
from trafficvlm.records import VideoQARecord
from trafficvlm.video import Clip, plan

QUESTIONS = [
    ("What is weather in the scenario?", ["Clear", "Cloudy", "Rainy", "Snowy"]),
    ("What is the brightness level in the scene?", ["Bright", "Dim", "Dark"]),
    ("What are road surface conditions?", ["Dry", "Wet"]),
    ("What is the road inclination in the scene?", ["Steep downhill", "Level", "Gentle downhill", "Steep uphill"]),
    ("How many lanes are there?", ["One-way", "Two-way", "Three-way"]),
    ("What is the formation of the road?", ["Single road (right curve)", "Single road (straight line)",
                                            "Intersection (without signal)", "Intersection (with signal)"]),
    ("Where is the sidewalk in the scene?", ["Both sides", "Not both sides", "Only on the left", "Only on the right"]),
    ("Are there street lights in the scene?", ["Yes", "No"]),
    ("What is the volume of the traffic in the scene?", ["Light", "Moderate", "Heavy"]),
    ("What is surface type of the road?", ["Asphalt", "Gravel", "Concrete"]),
    ("What is the type of the road?", ["Main road", "Residential road", "Parking lot"]),
    ("Where is the roadside strip in the scene?", ["Both sides", "Not both sides", "Only on the left",
                                                    "Only on the right"]),
    ("What is the age group of the pedestrian?", ["Child", "Young", "Adult", "Elderly"]),
    ("Is pedestrian wearning a hat?", ["Yes", "No"]),
    ("Is the pedestrian wearing glasses?", ["Yes", "No"]),
]


def records() -> list[VideoQARecord]:
    return [VideoQARecord(id=f"q{i}", video="bench.mp4", question=q, answer="a",
                          options={"abcd"[k]: o for k, o in enumerate(opts)}) for i, (q, opts) in enumerate(QUESTIONS)]


def synthetic_clip(seed: int = 0) -> Clip:
    p = plan(75.0, 1920, 1080, 30.0, SETTING_A)
    frames = np.random.default_rng(seed).integers(0, 256, (p.frames, p.height, p.width, 3), dtype=np.uint8)
    return Clip(frames, p.indices, 30.0, p.second_per_grid, p, "synthetic")


class PlainTransformers:
    """One plain `model(**inputs)` per question (full logits), scored like the letter engine."""

    def __init__(self, model, processor, spec, system_prompt):
        from trafficvlm.evaluate import letter_answer, letter_token_ids
        from trafficvlm.processing import Preprocessor, collate_padded

        self.model, self.pre, self.collate, self.answer = model, Preprocessor(processor, spec, system_prompt), \
            collate_padded, letter_answer
        self.letter_ids = letter_token_ids(processor.tokenizer)

    def score(self, groups):
        out = []
        with torch.inference_mode():
            for records, clip in groups:
                answers = []
                for r in records:
                    batch = self.collate([self.pre.encode(r, clip, with_answer=False)], self.pre.pad_token_id)
                    batch.pop("labels")
                    batch = {k: v.to("cuda") for k, v in batch.items()}
                    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(self.model.dtype)
                    logits = self.model(**batch, use_cache=False).logits
                    answers.append(self.answer(logits[0, -1], r.options, self.letter_ids))
                out.append(answers)
        return out


def timed(engine, groups, repeats: int) -> tuple[float, list]:
    engine.score(groups)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        answers = engine.score(groups)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, answers[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/eval_shared_prefix.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="float32 shows the engines agree up to rounding (bf16 reorders sums per batch shape)")
    args = parser.parse_args()

    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config_7b(), dtype=getattr(torch, args.dtype),
                                                                 attn_implementation="sdpa").eval()
    processor = Processor(build_tokenizer("byte"), PixelSpec(), chat_template(), "random-init 7B")
    clip, recs = synthetic_clip(), records()
    groups = [(recs, clip)]
    from trafficvlm.fast_vision import enable_fast_vision

    setups = {"plain transformers (per question)": (None, None),
              "baseline (per question)": (None, dict(shared_prefix=False, question_batch=1)),
              "padded batch of 15": (None, dict(shared_prefix=False, question_batch=15)),
              "shared prefix": (None, dict(shared_prefix=True, question_batch=16)),
              "shared prefix + fast vision (sdpa)": ("sdpa_batched", dict(shared_prefix=True, question_batch=16)),
              "shared prefix + fast vision (flex)": ("flex", dict(shared_prefix=True, question_batch=16))}
    rows = {}
    for name, (vision, kw) in setups.items():
        enable_fast_vision(model, backend=vision or "hf")
        engine = (PlainTransformers(model, processor, SETTING_A, SYSTEM_PROMPT) if kw is None
                  else LocalEngine(model, processor, SETTING_A, SYSTEM_PROMPT, **kw))
        try:
            seconds, answers = timed(engine, groups, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a failing variant is recorded, the others still run
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            continue
        rows[name] = {"seconds_per_clip": seconds, "questions_per_s": len(recs) / seconds, "answers": answers}
        torch.cuda.empty_cache()
    base = rows["plain transformers (per question)"]
    print(f"{torch.cuda.get_device_name()} {args.dtype}  clip: {clip.plan.frames} frames {clip.plan.height}x{clip.plan.width}, "
          f"{clip.plan.vision_tokens} video tokens, {len(recs)} questions")
    print(f"{'engine':<26} {'s/clip':>8} {'q/s':>8} {'speedup':>8} {'same argmax':>12} {'max |dp|':>9}")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "date": time.strftime("%Y-%m-%d"), "config": {"spec": SETTING_A.to_dict(), "dtype": args.dtype,
                                                            "questions": len(recs), "repeats": args.repeats,
                                                            "video_tokens": clip.plan.vision_tokens},
              "engines": {}}
    for name, r in rows.items():
        same = sum(a.predicted == b.predicted for a, b in zip(r["answers"], base["answers"]))
        dp = max(abs(a.letter_probs[k] - b.letter_probs[k]) for a, b in zip(r["answers"], base["answers"])
                 for k in a.letter_probs)
        speedup = base["seconds_per_clip"] / r["seconds_per_clip"]
        print(f"{name:<26} {r['seconds_per_clip']:>8.3f} {r['questions_per_s']:>8.1f} {speedup:>7.1f}x "
              f"{same:>8}/{len(recs)} {dp:>9.2e}")
        result["engines"][name] = {"seconds_per_clip": r["seconds_per_clip"], "questions_per_s": r["questions_per_s"],
                                   "speedup_vs_baseline": speedup, "same_argmax": same, "max_prob_diff": dp}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
