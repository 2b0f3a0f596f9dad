"""GPU benchmark: FP8 W8A8 (compressed-tensors kernels, torchao float8 eager and compiled) vs bf16 on the 7B
architecture, setting A.

    python bench/fp8_eval.py                                  # one H100/H200; writes bench/results/fp8_eval.json
    python bench/fp8_eval.py --workdir /tmp/fp8bench --repeats 7 --out $OUT/fp8_eval.json   # on the device machine
    python bench/fp8_eval.py --rows bf16,torchao,torchao-compiled                            # some rows only
    python bench/fp8_eval.py --tiny --device cpu --repeats 1 --rows bf16,compressed-tensors,emulated  # CPU smoke

What it does, all in one call so every ratio has its baseline beside it:
1. builds Qwen2.5-VL-7B (Cosmos-Reason1-7B's architecture, `model.config_7b`) with random weights in bf16,
   saves it as a checkpoint (tokenizer, processor files, trafficvlm.json with setting A);
2. quantizes it with the pipeline's own code (`trafficvlm.quantize.quantize`: llm-compressor oneshot on the
   GPU, the ignore-list fix, `verify_checkpoint` against the source) and records the size and the check;
3. times, with CUDA events (median of `--repeats` after a warm-up), on setting-A shapes (a 75 s 1080p30
   clip: 74 frames at 196x364, 3,367 video tokens) and 15 questions:
     - `vision`         the vision tower alone (identical weights in every row: a sanity row),
     - `prefill`        one full forward of prompt + video (vision + LLM), last-token logits,
     - `shared_prefix`  our eval engine (`trafficvlm.evaluate.LocalEngine`, letter mode): one prefill per
                        clip, 15 questions batched on the cached prefix -> questions per second,
   for each row of `--rows` (ROWS; `load_quantized(backend=...)`): bf16; FP8 with compressed-tensors'
   kernels (`use_optimized_inference`); torchao float8 eager; torchao float8 with
   `compile_language_model` (compiled in an untimed warm-up: `compile_s`, graphs and graph breaks go
   in the JSON); compressed-tensors' kernels compiled the same way; FP8 emulated (dequantized weights + FP8-rounded activations: what the CPU gate computes).
   Every row gets the fast vision tower with compiled blocks (the eval/serve default on CUDA);
4. parity (PAIRS): each FP8 row vs bf16, and the other FP8 rows vs compressed-tensors: relative L2
   difference of the prefill logits, letter argmax agreement and the largest letter-probability
   difference over the 15 questions.

A row that fails records its `error` and the others still run (exit status 1); the JSON is rewritten
after every row. Random weights make near-flat logits, so argmax agreement understates what a trained
model shows; the relative logits difference is the informative parity figure. vLLM is the serving path.
"""

from __future__ import annotations

import argparse
import datetime
import functools
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


def probes(model, processor, records, clip, device: str, **engine_kw) -> tuple[dict[str, Callable[[], Any]], int]:
    """The timed calls of one model (vision tower, prefill, shared-prefix eval, the eval loop) and the prompt
    length; `engine_kw` go to the LocalEngine."""
    import torch

    from trafficvlm.config import SETTING_A, SYSTEM_PROMPT
    from trafficvlm.evaluate import LocalEngine

    engine = LocalEngine(model, processor, SETTING_A, SYSTEM_PROMPT, mode="letter", shared_prefix=True,
                         question_batch=16, **engine_kw)
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

    clips = fresh_clips(clip, 4)  # made here: generating frames is not part of what is timed

    def eval_loop():
        """`trafficvlm eval`'s loop over 4 fresh clips: the next one prepared on the CPU while the GPU runs."""
        from trafficvlm.stages.evaluate import _prefetched

        for prepared in _prefetched(lambda c: engine.prepare([(records, c)]), clips):
            engine.score_prepared(prepared)

    fns = {"vision": vision, "prefill": prefill, "shared_prefix": shared}
    if device.startswith("cuda"):
        fns["eval_loop_4_clips"] = eval_loop
        fns["breakdown"] = lambda: _breakdown(engine, records, clip)
    return fns, int(sample.input_ids.numel())


def fresh_clips(clip, n: int) -> list:
    """n copies of `clip`'s plan with new random frames (a real run's per-clip CPU work)."""
    import numpy as np

    from trafficvlm.video import Clip

    rng = np.random.default_rng(1)
    return [Clip(rng.integers(0, 256, clip.frames.shape, dtype=np.uint8), clip.indices, clip.video_fps,
                 clip.second_per_grid, clip.plan, clip.path) for _ in range(n)]


def _breakdown(engine, records, clip) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from eval_shared_prefix import breakdown

    return breakdown(engine, records, clip, kernels=False)


def measure(name: str, fns: dict[str, Callable[[], Any]], prompt_tokens: int, questions: int, repeats: int,
            device: str) -> dict[str, Any]:
    """vision / prefill / shared-prefix timings of one model, and what parity needs (logits, letter probs)."""
    split = fns.get("breakdown")
    timed_fns = {k: fn for k, fn in fns.items() if k != "breakdown"}
    for fn in timed_fns.values():  # every path warm (compiles, cuDNN plans, allocator) before any is timed
        fn()
    result = {k: timed(fn, repeats, device) for k, fn in timed_fns.items()}
    result["prompt_tokens"] = prompt_tokens
    result["shared_prefix"]["questions_per_s"] = questions / result["shared_prefix"]["median_s"]
    loop = result.get("eval_loop_4_clips")
    if loop:
        loop["questions_per_s"] = 4 * questions / loop["median_s"]
    if split:
        result["gpu_ms_per_clip"] = split()["ms"]
    print(f"  {name}: prefill {result['prefill']['median_s'] * 1000:.1f} ms, "
          f"{result['shared_prefix']['questions_per_s']:.1f} questions/s (one clip, prepared inline)"
          + (f", {loop['questions_per_s']:.1f} questions/s in the eval loop" if loop else ""), flush=True)
    return {**result, "_logits": fns["prefill"]().cpu(), "_answers": fns["shared_prefix"]()}


def parity(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    from trafficvlm.quantize import rel_diff

    same = sum(x.predicted == y.predicted for x, y in zip(a["_answers"], b["_answers"]))
    diffs = [abs(x.letter_probs[k] - y.letter_probs[k]) for x, y in zip(a["_answers"], b["_answers"])
             for k in x.letter_probs]
    return {"prefill_logits_rel_diff": rel_diff(a["_logits"], b["_logits"]), "same_argmax": same,
            "questions": len(a["_answers"]), "max_letter_prob_diff": max(diffs)}


# --- main -------------------------------------------------------------------------------------------------

# --rows ids -> (row name, backend for load_quantized, compile, LocalEngine kwargs); backend None: the bf16 source
ROWS = {"bf16": ("bf16", None, False, {}),
        "bf16-hf-text": ("bf16, transformers' text forward", None, False, {"fast_text": False}),
        "scaled-mm-hf-text": ("fp8 (scaled_mm), transformers' text forward", "scaled-mm", False, {"fast_text": False}),
        "compressed-tensors": ("fp8 (compressed-tensors kernels)", "compressed-tensors", False, {}),
        "scaled-mm": ("fp8 (trafficvlm scaled_mm, fused quant)", "scaled-mm", False, {}),
        "torchao": ("fp8 (torchao float8, eager)", "torchao", False, {}),
        "torchao-compiled": ("fp8 (torchao float8, compiled)", "torchao", True, {}),
        "compressed-tensors-compiled": ("fp8 (compressed-tensors kernels, compiled)", "compressed-tensors", True, {}),
        "emulated": ("fp8 (emulated, as the CPU gate)", "emulate", False, {})}
# parity pairs (row id, reference row id), computed where both rows ran
PAIRS = [(r, "bf16") for r in ROWS if r != "bf16"] + \
        [(r, "compressed-tensors") for r in ROWS if r not in ("bf16", "bf16-hf-text", "compressed-tensors")]


def row_name(row: str, device: str) -> str:
    # on CPU the compressed-tensors rows run the loader default, which is the emulation: say so
    name, backend = ROWS[row][:2]
    if backend == "compressed-tensors" and not device.startswith("cuda"):
        return f"{name} [CPU: loader default, emulated]"
    return name


def load_row(row: str, src: Path, fp8: Path, device: str):
    """The model of one row, every FP8 row with the fast, compiled vision tower `load_model` and
    `LocalEngine` give bf16 on a GPU (the tower is bf16 in every variant)."""
    import torch

    from trafficvlm.model import load_model
    from trafficvlm.quantize import load_quantized

    from trafficvlm.fast_vision import compile_vision_blocks, enable_fast_vision

    if ROWS[row][1] is None:
        model = load_model(src, dtype=torch.bfloat16, device=device)
    else:
        _, backend, compile_ = ROWS[row][:3]
        # on CPU the compressed-tensors rows run the loader default (the emulation); on a GPU they insist
        if backend == "compressed-tensors" and not device.startswith("cuda"):
            backend = "auto"
        model = load_quantized(fp8, device, dtype=torch.bfloat16, backend=backend, compile=compile_)
        if device.startswith("cuda"):
            enable_fast_vision(model)
    compile_vision_blocks(model)  # what eval and serve run on CUDA (a no-op on CPU); compiled in the warm-up
    return model


def warm_up(fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Compile a compiled row before timing (so compile time stays out of the medians): seconds of two
    passes over every timed call (the second meets the dynamic-shape graphs) and what Dynamo made of it
    (graph breaks mean parts run eagerly)."""
    import time

    import torch
    from torch._dynamo.utils import counters

    counters.clear()
    t0 = time.perf_counter()
    for _ in range(2):
        for fn in fns.values():
            fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"compile_s": round(time.perf_counter() - t0, 2), "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": sorted({k.split("\n")[0] for k in counters["graph_break"]})[:5]}


def run_row(row: str, args, src: Path, fp8: Path, workload_) -> dict[str, Any]:
    """One row: load, (compile,) measure; an exception becomes the row's `error` so the others still run."""
    import traceback

    import torch

    records, clip, processor = workload_
    model = fns = None
    try:
        model = load_row(row, src, fp8, args.device).eval()
        fns, tokens = probes(model, processor, records, clip, args.device, **ROWS[row][3])
        # compiled rows, scaled-mm's activation quantization and the engine's compiled text step (CUDA)
        # compile on their first calls: warm up untimed
        compiled = warm_up(fns) if ROWS[row][2] or ROWS[row][1] == "scaled-mm" or args.device.startswith("cuda") else {}
        return {**measure(row_name(row, args.device), fns, tokens, len(records), args.repeats, args.device), **compiled}
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the next row runs
        traceback.print_exc()
        print(f"  {row_name(row, args.device)}: FAILED {type(exc).__name__}: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        model = fns = None  # noqa: F841 - the probes hold the model too: free both before emptying the cache
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # a compiled row's graphs and recompile counts must not leak into the next


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from trafficvlm.model import load_processor
    from trafficvlm.quantize import FAST_FP8_BACKEND, LOGITS_TOL, quantize

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src = write_random_checkpoint(work / "bf16", tiny=args.tiny, device=args.device)
    print(f"quantizing {src} on {args.device} ...", flush=True)
    # Random weights are not a trained model: verify loosely here and report the default tolerance's verdict.
    report = quantize(src, work / "fp8", device=args.device, scheme=args.scheme, logits_tol=args.logits_tol)
    report["verify"]["within_default_logits_tol"] = report["verify"]["logits_rel_diff"] < LOGITS_TOL
    records, clip, plan = workload()
    on_gpu = args.device.startswith("cuda")
    result = {
        "card": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "torchao": _version("torchao"),
        "date": datetime.date.today().isoformat(), "fast_fp8_backend": FAST_FP8_BACKEND,
        "config": {"model": "tiny" if args.tiny else "Qwen2.5-VL-7B architecture, random init", "scheme": args.scheme,
                   "spec": "setting A (fps 1, max_pixels 81920)", "frames": plan.frames,
                   "frame_size": [plan.height, plan.width], "video_tokens": plan.vision_tokens,
                   "questions": len(records), "repeats": args.repeats, "rows": args.rows},
        "quantize": {k: report[k] for k in ("size_gb", "layers", "verify", "seconds")},
        "engines": {}, "parity": {},
    }
    rows: dict[str, dict[str, Any]] = {}
    workload_ = (records, clip, load_processor(src))
    for row in args.rows:
        rows[row] = run_row(row, args, src, work / "fp8", workload_)
        summarize(result, rows, args.device)
        write(result, Path(args.out))  # after every row: a later row that hangs past the limit loses nothing
    return result


def summarize(result: dict[str, Any], rows: dict[str, dict[str, Any]], device: str) -> None:
    """Fill `engines` (speed-ups where bf16 ran) and `parity` (pairs where both rows ran) from `rows`."""
    ok = {r: row for r, row in rows.items() if "error" not in row}
    for r, row in ok.items():
        if "bf16" in ok:
            row["speedup_vs_bf16"] = {k: ok["bf16"][k]["median_s"] / row[k]["median_s"]
                                      for k in ("vision", "prefill", "shared_prefix", "eval_loop_4_clips")
                                      if k in row and k in ok["bf16"]}
    name = functools.partial(row_name, device=device)
    result["engines"] = {name(r): {k: v for k, v in row.items() if not k.startswith("_")} for r, row in rows.items()}
    result["parity"] = {f"{name(a)} vs {name(b)}": parity(ok[b], ok[a]) for a, b in PAIRS if a in ok and b in ok}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['card']}  {result['config']['model']}, {result['config']['video_tokens']} video tokens, "
             f"{result['config']['questions']} questions",
             f"{'engine':<44}{'vision ms':>11}{'prefill ms':>12}{'q/s shared':>12}{'q/s loop':>10}{'prefill x':>11}"
             f"{'shared x':>10}"]
    for name, row in result["engines"].items():
        if "error" in row:
            lines.append(f"{name:<44}FAILED {row['error'][:120]}")
            continue
        speedup = row.get("speedup_vs_bf16", {"prefill": float("nan"), "shared_prefix": float("nan")})
        lines.append(f"{name:<44}{row['vision']['median_s'] * 1e3:>11.1f}{row['prefill']['median_s'] * 1e3:>12.1f}"
                     f"{row['shared_prefix']['questions_per_s']:>12.2f}"
                     f"{row.get('eval_loop_4_clips', {}).get('questions_per_s', float('nan')):>10.2f}{speedup['prefill']:>11.2f}"
                     f"{speedup['shared_prefix']:>10.2f}"
                     + (f"  (compile {row['compile_s']:.0f} s, {row['graph_breaks']} graph breaks)"
                        if "compile_s" in row else ""))
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
    parser.add_argument("--rows", type=_rows, default=list(ROWS),
                        help=f"comma-separated rows to run, in this order (default all: {','.join(ROWS)})")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    print(f"wrote {args.out}")
    return 1 if any("error" in row for row in result["engines"].values()) else 0


def _rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown or text!r}; choose from {', '.join(ROWS)}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
