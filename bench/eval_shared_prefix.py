"""Shared-prefix letter scoring vs one forward per question, on the Qwen2.5-VL-7B architecture (GPU).

    PYTHONPATH=components python3 bench/eval_shared_prefix.py --out bench/results/eval_shared_prefix.json
    PYTHONPATH=components python3 bench/eval_shared_prefix.py --prep-only     # CPU: preprocessing split only

Random-init 7B weights in bf16 (the architecture and token counts are what matter for speed), one synthetic
75 s clip planned as the recipe's setting A (74 frames at 196x364: 3,367 video tokens), 15 WTS environment
questions. The engines score the same questions:
- plain transformers: one `model(**batch)` per question with full logits (what a script around the HF
  model does; our 3-D positions are passed so its answers are comparable), the HF vision tower;
- `trafficvlm.evaluate.LocalEngine`, shared prefix (one prefill of system prompt + video per clip):
  * expanded cache: the 15 suffixes as a left-padded batch on 15 expanded copies of the prefix's KV cache
    (the former letter path, `branches=False`; generate mode still works this way);
  * branches: the 15 suffixes back to back in one row on the one cache, masked branches (the default);
  each with the HF vision tower, with `trafficvlm.fast_vision` (one attention call per vision layer) and
  with compiled vision blocks (`compile_vision=True`, the default on CUDA; these rows come last, since
  compiling wraps the blocks in place);
  * the language model through transformers' forward (`fast_text=False`, the earlier rows), or through
    `trafficvlm.fast_text.TextRunner` (our decoder loop over a preallocated KV buffer), eager or with its
    layer step compiled (the default on CUDA);
- prefetched: as `trafficvlm eval` runs it, the next clip prepared on the CPU in a thread while the GPU
  scores the current one (`stages.evaluate._prefetched`);
- `--per-question-rows`: our per-question engine and one padded batch of 15 (slow; in earlier JSONs).
Every timed call gets a fresh clip (new frames, as in a real run, so the per-clip patchify counts). Each
row reports ms per clip end to end and, separately, the CPU preprocessing inside it (`Preprocessor.encode`
and `LocalEngine.prepare`: prompts, positions, patchify, dtype cast); for prefetched rows that CPU time runs
in the background thread. `--prep-only` needs no GPU or weights: it times the old per-question encodes
against the prefix-once encoding at setting A. It prints a table and writes JSON (card, versions, config,
times, agreement with the baseline).
"""

from __future__ import annotations

import argparse
import functools
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

from questions import QUESTIONS  # noqa: E402  (bench/ is on sys.path when a bench script runs)


def records() -> list[VideoQARecord]:
    return [VideoQARecord(id=f"q{i}", video="bench.mp4", question=q, answer="a",
                          options={"abcd"[k]: o for k, o in enumerate(opts)}) for i, (q, opts) in enumerate(QUESTIONS)]


def synthetic_clip(seed: int = 0) -> Clip:
    p = plan(75.0, 1920, 1080, 30.0, SETTING_A)
    frames = np.random.default_rng(seed).integers(0, 256, (p.frames, p.height, p.width, 3), dtype=np.uint8)
    return Clip(frames, p.indices, 30.0, p.second_per_grid, p, "synthetic")


class CpuTimer:
    """Wall time spent inside the wrapped preprocessing calls (outermost call only, so nested encodes
    are not counted twice)."""

    def __init__(self):
        self.seconds, self._depth = 0.0, 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed_call

    def instrument(self, engine) -> None:
        engine.pre.encode = self.wrap(engine.pre.encode)
        if hasattr(engine, "prepare"):
            engine.prepare = self.wrap(engine.prepare)


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


def timed(engine, recs, clips: list[Clip], prefetch: bool) -> tuple[float, float, list]:
    """(seconds per clip, CPU preprocessing seconds per clip, answers of the first clip). clips[0] warms up
    (kernels, allocator, compile); the rest are timed, serially or through the eval loop's prefetch."""
    from trafficvlm.stages.evaluate import _prefetched

    timer = CpuTimer()
    timer.instrument(engine)
    engine.score([(recs, clips[0])])
    torch.cuda.synchronize()
    timer.seconds = 0.0
    start = time.perf_counter()
    if prefetch:
        prepared = _prefetched(lambda c: engine.prepare([(recs, c)]), clips[1:])
        answers = [engine.score_prepared(p)[0] for p in prepared]
    else:
        answers = [engine.score([(recs, c)])[0] for c in clips[1:]]
    torch.cuda.synchronize()
    n = len(clips) - 1
    return (time.perf_counter() - start) / n, timer.seconds / n, answers[0]


def breakdown(engine, recs, clip: Clip, repeats: int = 3, kernels: bool = True) -> dict:
    """GPU milliseconds of one clip's parts in the default engine (CUDA events, median of `repeats` after a
    warm-up): the vision tower alone, the prefix forward (vision + LLM), the 15 branches on its cache, and
    the top CUDA kernels of one whole `score_prepared` (torch.profiler)."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    p = engine.prepare([(recs, clip)])[0]
    parts: dict[str, list[float]] = {"vision": [], "prefix (vision + LLM)": [], "branches": []}
    with torch.inference_mode():
        for k in range(repeats + 1):
            vision = {key: v.to("cuda", non_blocking=True) for key, v in p.vision.items()}
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            engine.model.model.get_video_features(vision["pixel_values_videos"], vision["video_grid_thw"])
            events[1].record()
            cache = engine._prefix(p)  # uploads the pixels again: pinned, async, ~1 ms
            events[2].record()
            engine._branches(cache, p.branches[0], recs)
            events[3].record()
            torch.cuda.synchronize()
            if k:
                for name, a, b in zip(parts, events, events[1:]):
                    parts[name].append(a.elapsed_time(b))
    out = {name: statistics.median(v) for name, v in parts.items()}
    out["LLM prefix (prefix - vision)"] = out["prefix (vision + LLM)"] - out["vision"]
    with torch.inference_mode():
        cache = engine._prefix(p)
        torch.cuda.synchronize()
    # the branches' own kernel time (a gap between it and "branches" above is host-side time)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._branches(cache, p.branches[0], recs)
        torch.cuda.synchronize()
    branch_kernels = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    out["branches, CUDA kernel time"] = sum(e.self_device_time_total for e in branch_kernels) / 1e3
    print("top kernels of the branches alone:")
    for e in branch_kernels[:12]:
        print(f"  {e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:100]}")
    if not kernels:
        print("GPU ms per clip: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
        return {"ms": out}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.score_prepared([p])
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
    top = [{"op": e.key[:120], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 3)} for e in events[:20]]
    print("GPU ms per clip, default engine: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items())
          + f"; CUDA kernel time of one clip {kernel_ms:.1f} ms; top kernels:")
    for t in top:
        print(f"  {t['ms']:9.2f} ms {t['calls']:6d}x  {t['op'][:100]}")
    return {"ms": out, "kernel_ms_per_clip": kernel_ms, "top_kernels": top}


def prep_only(repeats: int) -> dict:
    """CPU milliseconds per clip at setting A: patchify, the dtype cast, and the prompts encoded either per
    question in full (the former eval path) or as one prefix plus suffixes (`LocalEngine.prepare` now)."""
    from trafficvlm.processing import Preprocessor, patchify_video

    processor = Processor(build_tokenizer("qwen"), PixelSpec(), chat_template(), "random-init 7B")
    pre, recs = Preprocessor(processor, SETTING_A, SYSTEM_PROMPT), records()
    clips = [synthetic_clip(seed) for seed in range(repeats + 1)]

    def ms(fn, fresh: bool) -> float:
        """Mean ms of fn(clip): fresh frames each call, or the same clip (the pixel memo then hits)."""
        fn(clips[0])
        start = time.perf_counter()
        for k in range(1, repeats + 1):
            fn(clips[k] if fresh else clips[0])
        return (time.perf_counter() - start) / repeats * 1e3

    def prefix_and_suffixes(clip):
        prefix = pre.encode_prefix(recs[0], clip)
        return [pre.encode_suffix(r, prefix) for r in recs]

    pixels = patchify_video(clips[0].frames, pre.pixels)[0]
    figures = {"patchify (once per clip)": ms(lambda c: patchify_video(c.frames, pre.pixels), True),
               "15 full encodes (pixels memoised)": ms(lambda c: [pre.encode(r, c, with_answer=False) for r in recs],
                                                       False),
               "prefix once + 15 suffixes (pixels memoised)": ms(prefix_and_suffixes, False),
               "pixels float32 -> bfloat16": ms(lambda c: pixels.to(torch.bfloat16), False)}
    shared = figures["patchify (once per clip)"] + figures["pixels float32 -> bfloat16"]
    figures["total, every question fully encoded"] = shared + figures["15 full encodes (pixels memoised)"]
    figures["total, prefix once + suffixes"] = \
        shared + figures["prefix once + 15 suffixes (pixels memoised)"]
    print(f"CPU preprocessing per clip, setting A ({clips[0].plan.vision_tokens} video tokens, {len(recs)} "
          f"questions, {torch.get_num_threads()} threads)")
    for name, value in figures.items():
        print(f"  {name:<48} {value:8.1f} ms")
    return {"cpu_threads": torch.get_num_threads(), "ms_per_clip": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/eval_shared_prefix.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="float32 shows the engines agree up to rounding (bf16 reorders sums per batch shape)")
    parser.add_argument("--no-compile-vision", action="store_true", help="skip the compiled-vision rows")
    parser.add_argument("--quick", action="store_true",
                        help="skip the fast-vision-without-compile rows (the history rows; saves ~1 min)")
    parser.add_argument("--profile", action="store_true",
                        help="after the rows: per-part GPU times and top kernels of the default engine")
    parser.add_argument("--per-question-rows", action="store_true",
                        help="also time our per-question and padded-batch engines (slow; measured before)")
    parser.add_argument("--prep-only", action="store_true", help="CPU preprocessing figures only (no GPU)")
    args = parser.parse_args()
    if args.prep_only:
        result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **prep_only(args.repeats)}
        if args.out != parser.get_default("out"):
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return

    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config_7b(), dtype=getattr(torch, args.dtype),
                                                                 attn_implementation="sdpa").eval()
    processor = Processor(build_tokenizer("qwen"), PixelSpec(), chat_template(), "random-init 7B")
    recs = records()
    clips = [synthetic_clip(seed) for seed in range(args.repeats + 1)]  # fresh frames per timed call
    clip = clips[0]
    from trafficvlm.fast_vision import enable_fast_vision, vision_compiled

    # Every LocalEngine row sets compile_vision and fast_text explicitly: the engine's defaults compile on CUDA.
    eager = dict(shared_prefix=True, question_batch=16, compile_vision=False, fast_text=False)
    expanded = {**eager, "branches": False}
    compiled = {**eager, "compile_vision": True}
    # name: (fast-vision backend or None for HF, LocalEngine kwargs or None for plain, prefetch)
    setups = {"plain transformers (per question)": (None, None, False),
              "shared prefix, expanded cache": (None, expanded, False),
              "shared prefix, branches": (None, eager, False)}
    if not args.quick:
        setups["branches + fast vision (sdpa)"] = ("sdpa_batched", eager, False)
        setups["expanded cache + fast vision (sdpa)"] = ("sdpa_batched", expanded, False)
    if args.per_question_rows:
        setups["baseline (per question)"] = (None, dict(shared_prefix=False, question_batch=1,
                                                        compile_vision=False), False)
        setups["padded batch of 15"] = (None, dict(shared_prefix=False, question_batch=15, compile_vision=False),
                                        False)
    if not args.no_compile_vision:  # last: compiling wraps the vision blocks in place
        setups["per question + compiled vision"] = ("sdpa_batched", dict(shared_prefix=False, question_batch=1,
                                                                          compile_vision=True), False)
        if not args.quick:
            setups["expanded cache + compiled vision, prefetched"] = ("sdpa_batched", {**expanded, "compile_vision": True},
                                                                     True)
        setups["branches + compiled vision, transformers' text forward"] = ("sdpa_batched", compiled, False)
        setups["branches + compiled vision, transformers' text forward, prefetched"] = ("sdpa_batched", compiled, True)
        if not args.quick:
            setups["branches + compiled vision + fast_text eager"] = \
                ("sdpa_batched", {**compiled, "fast_text": True, "compile_text": False}, False)
        setups["branches + compiled vision + compiled fast_text, no CUDA graphs"] = \
            ("sdpa_batched", {**compiled, "fast_text": True, "text_graphs": False}, False)
        setups["branches + compiled vision + compiled fast_text + CUDA graphs (default)"] = \
            ("sdpa_batched", {**compiled, "fast_text": True}, False)
        setups["default, prefetched (trafficvlm eval)"] = ("sdpa_batched", {**compiled, "fast_text": True}, True)
    rows = {}
    for name, (vision, kw, prefetch) in setups.items():
        if vision_compiled(model) and vision is None:
            continue  # compiled blocks stay compiled: HF-vision rows must come before the compiled ones
        enable_fast_vision(model, backend=vision or "hf")
        engine = (PlainTransformers(model, processor, SETTING_A, SYSTEM_PROMPT) if kw is None
                  else LocalEngine(model, processor, SETTING_A, SYSTEM_PROMPT, **kw))
        try:
            seconds, cpu_seconds, answers = timed(engine, recs, clips, prefetch)
        except Exception as exc:  # noqa: BLE001 - a failing variant is recorded, the others still run
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            continue
        rows[name] = {"seconds_per_clip": seconds, "questions_per_s": len(recs) / seconds,
                      "cpu_prep_ms_per_clip": cpu_seconds * 1e3, "prefetched": prefetch, "answers": answers}
        torch.cuda.empty_cache()
    base = rows["plain transformers (per question)"]
    print(f"{torch.cuda.get_device_name()} {args.dtype}  clip: {clip.plan.frames} frames {clip.plan.height}x{clip.plan.width}, "
          f"{clip.plan.vision_tokens} video tokens, {len(recs)} questions")
    print(f"{'engine':<58} {'ms/clip':>8} {'cpu ms':>7} {'q/s':>7} {'speedup':>8} {'same argmax':>12} "
          f"{'max |dp|':>9}")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "date": time.strftime("%Y-%m-%d"), "config": {"spec": SETTING_A.to_dict(), "dtype": args.dtype,
                                                            "questions": len(recs), "repeats": args.repeats,
                                                            "cpu_threads": torch.get_num_threads(),
                                                            "video_tokens": clip.plan.vision_tokens},
              "engines": {}}
    for name, r in rows.items():
        same = sum(a.predicted == b.predicted for a, b in zip(r["answers"], base["answers"]))
        dp = max(abs(a.letter_probs[k] - b.letter_probs[k]) for a, b in zip(r["answers"], base["answers"])
                 for k in a.letter_probs)
        speedup = base["seconds_per_clip"] / r["seconds_per_clip"]
        print(f"{name:<58} {r['seconds_per_clip'] * 1e3:>8.1f} {r['cpu_prep_ms_per_clip']:>7.1f} "
              f"{r['questions_per_s']:>7.1f} {speedup:>7.1f}x {same:>8}/{len(recs)} {dp:>9.2e}")
        result["engines"][name] = {"seconds_per_clip": r["seconds_per_clip"], "questions_per_s": r["questions_per_s"],
                                   "ms_per_clip": r["seconds_per_clip"] * 1e3,
                                   "cpu_prep_ms_per_clip": r["cpu_prep_ms_per_clip"], "prefetched": r["prefetched"],
                                   "speedup_vs_baseline": speedup, "same_argmax": same, "max_prob_diff": dp}
    if args.profile:
        result["breakdown"] = breakdown(LocalEngine(model, processor, SETTING_A, SYSTEM_PROMPT, question_batch=16),
                                        recs, clips[1])
    result["cpu_preprocessing"] = prep_only(args.repeats)  # this host's CPU: the split behind "cpu ms"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
