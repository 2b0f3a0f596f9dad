"""`trafficvlm tokens`: how many vision (and prompt) tokens a video spec costs, before any GPU is involved.

Three ways in, all using `trafficvlm.video`'s arithmetic, so the numbers are the ones training sees:

    # a hypothetical clip: 75 s of 1080p30 at the recipe's setting A -> 74 frames, 364x196, 3367 tokens
    trafficvlm tokens --duration 75 --resolution 1920x1080 --src-fps 30 --fps 1 --max-pixels 81920
    # real files (probed, not decoded)
    trafficvlm tokens videos/val/*.mp4 --fps 1 --total-pixels 6422528 --max-pixels 602112
    # a LLaVA JSON dataset: per-sample tokens with each record's clip span, stats, histogram, long samples
    trafficvlm tokens data/llava/environment_mcq_llava_val.json --media-dir data/wts/videos/val --max-length 8192

With `--json` stdout is a single JSON line (frames, height, width, vision_tokens, grid, second_per_grid for
a planned clip; a summary for files).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

EPILOG = """\
examples:
  trafficvlm tokens --duration 75 --resolution 1920x1080 --src-fps 30 --fps 1 --max-pixels 81920
  trafficvlm tokens --duration 75 --resolution 1920x1080 --src-fps 30 --fps 1 --total-pixels 6422528 --max-pixels 602112
  trafficvlm tokens --duration 20 --resolution 1280x720 --src-fps 25 --nframes 16 --json
  trafficvlm tokens data/wts/videos/val/*.mp4 --fps 2
  trafficvlm tokens data/llava/environment_mcq_llava_val.json --media-dir data/wts/videos/val --max-length 8192

The spec defaults are the recipe's setting A (fps 1, max_pixels 81920); setting B is
--fps 1 --max-pixels 602112 --total-pixels 6422528.
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tokens", help="vision-token budget of a video spec (planned, per video, or over a dataset)",
        description="Plan frames, resized size and vision tokens of clips under a video spec "
                    "(qwen-vl-utils semantics), without decoding.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="VIDEO_OR_LLAVA_JSON",
                   help="video files, or one LLaVA JSON file (needs --media-dir unless videos sit beside it)")
    p.add_argument("--media-dir", type=Path, help="directory the LLaVA records' `video` paths are relative to")
    plan = p.add_argument_group("planning without files")
    plan.add_argument("--duration", type=float, help="clip length in seconds")
    plan.add_argument("--resolution", type=_resolution, help="source WxH, e.g. 1920x1080")
    plan.add_argument("--src-fps", type=float, help="source frame rate")
    plan.add_argument("--start", type=float, help="clip start (s) within --duration")
    plan.add_argument("--end", type=float, help="clip end (s) within --duration")
    spec = p.add_argument_group("video spec (defaults: the recipe's setting A)")
    rate = spec.add_mutually_exclusive_group()
    rate.add_argument("--fps", type=float, help="sample this many frames per second (default 1)")
    rate.add_argument("--nframes", type=int, help="sample exactly this many frames (rounded to even)")
    for name in ("max-pixels", "min-pixels", "total-pixels", "min-frames", "max-frames"):
        spec.add_argument(f"--{name}", type=int)
    p.add_argument("--max-length", type=int, help="flag samples whose prompt exceeds N tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 1920x1080, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"resolution must be positive, got {text!r}")
    return w, h


def spec_from_args(args: argparse.Namespace):
    from trafficvlm.config import VideoSpec

    kw: dict[str, Any] = {k: getattr(args, k) for k in ("max_pixels", "min_pixels", "total_pixels",
                                                         "min_frames", "max_frames")
                          if getattr(args, k) is not None}
    if args.nframes is not None:
        kw.update(fps=None, nframes=args.nframes)
    elif args.fps is not None:
        kw["fps"] = args.fps
    return VideoSpec(**kw)


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
    except ValueError as exc:
        print(f"tokens: {exc}", file=sys.stderr)
        return 2
    if args.duration is not None:
        if args.inputs or args.resolution is None or args.src_fps is None:
            print("tokens: planning needs --duration, --resolution and --src-fps, and no input files",
                  file=sys.stderr)
            return 2
        return _run_plan(args, spec)
    if not args.inputs:
        print("tokens: give --duration/--resolution/--src-fps, video files, or a LLaVA JSON "
              "(see `trafficvlm tokens --help`)", file=sys.stderr)
        return 2
    if len(args.inputs) == 1 and args.inputs[0].endswith(".json"):
        try:
            items, count_text = _dataset_items(Path(args.inputs[0]), args.media_dir)
        except (OSError, ValueError) as exc:
            print(f"tokens: {exc}", file=sys.stderr)
            return 2
        return _run_files(args, spec, items, count_text)
    return _run_files(args, spec, [Item(p, p, None, None) for p in args.inputs], None)


# --- one planned clip -----------------------------------------------------------------------------------

def plan_json(p, spec) -> dict[str, Any]:
    return {"frames": p.frames, "height": p.height, "width": p.width, "vision_tokens": p.vision_tokens,
            "grid": list(p.grid_thw), "second_per_grid": p.second_per_grid,
            "tokens_per_group": p.grid_thw[1] * p.grid_thw[2] // 4, "spec": spec.to_dict()}


def _run_plan(args: argparse.Namespace, spec) -> int:
    from trafficvlm.video import plan

    width, height = args.resolution
    try:
        p = plan(args.duration, width, height, args.src_fps, spec, args.start, args.end)
    except ValueError as exc:
        print(f"tokens: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_json(p, spec)))
        return 0
    t, gh, gw = p.grid_thw
    print(f"{args.duration:g} s of {width}x{height} at {args.src_fps:g} fps, spec {_spec_text(spec)}")
    print(f"  frames          {p.frames}  (source frames {p.indices[0]}..{p.indices[-1]})")
    print(f"  resized (WxH)   {p.width}x{p.height}")
    print(f"  grid (t, h, w)  {t} x {gh} x {gw}  (patches of 14 px, 2 frames per step)")
    print(f"  vision tokens   {p.vision_tokens}  ({gh * gw // 4} per 2-frame group)")
    print(f"  second/grid     {p.second_per_grid:g}")
    return 0


def _spec_text(spec) -> str:
    rate = f"nframes={spec.nframes}" if spec.nframes is not None else f"fps={spec.fps:g}"
    return (f"{rate} max_pixels={spec.max_pixels} min_pixels={spec.min_pixels} "
            f"total_pixels={spec.total_pixels}")


# --- files and datasets ---------------------------------------------------------------------------------

@dataclass
class Item:
    """One sample to size: a video (with an optional clip span) and, for datasets, its record."""

    id: str
    video: str
    start: float | None
    end: float | None
    record: Any = None


def _dataset_items(path: Path, media_dir: Path | None) -> tuple[list[Item], Callable | None]:
    from trafficvlm.records import read_llava

    records = read_llava(path)
    root = media_dir or path.parent
    items = [Item(r.id, str(root / r.video), r.video_start, r.video_end, r) for r in records]
    return items, _prompt_counter()


def _prompt_counter() -> Callable | None:
    """`trafficvlm.prompts.prompt_text_tokens(record)` when that module provides it (text tokens of the
    templated prompt, video pads excluded); None means we can count vision tokens only."""
    try:
        from trafficvlm.prompts import prompt_text_tokens
    except ImportError:
        return None
    return prompt_text_tokens


def _probe_cached(video: str, infos: dict[str, Any]):
    """Probe each video once, however many questions share it; a failure is remembered too."""
    from trafficvlm.video import VideoError, probe

    if video not in infos:
        try:
            infos[video] = probe(video)
        except VideoError as exc:
            infos[video] = exc
    if isinstance(infos[video], VideoError):
        raise infos[video]
    return infos[video]


def _run_files(args: argparse.Namespace, spec, items: list[Item], count_text: Callable | None) -> int:
    from tqdm import tqdm

    from trafficvlm.video import VideoError, plan_frames

    infos: dict[str, Any] = {}
    rows, skipped = [], []
    for item in tqdm(items, desc="probing", unit="sample", disable=len(items) < 20 or None, file=sys.stderr):
        try:
            info = _probe_cached(item.video, infos)
            p = plan_frames(info.num_frames, info.fps, info.width, info.height, spec, item.start, item.end)
        except (VideoError, ValueError) as exc:
            skipped.append({"id": item.id, "video": item.video, "reason": str(exc)})
            continue
        text = count_text(item.record) if count_text and item.record is not None else 0
        rows.append({"id": item.id, "video": item.video, "start": item.start, "end": item.end,
                     "source": f"{info.width}x{info.height}@{info.fps:g}", "duration": info.duration,
                     **plan_json(p, spec), "text_tokens": text, "prompt_tokens": p.vision_tokens + text})
    summary = _summary(rows, skipped, count_text is not None, args.max_length)
    if args.json:
        summary.pop("histogram")
        print(json.dumps({"spec": spec.to_dict(), "summary": summary, "skipped": skipped,
                          "items": [{k: v for k, v in r.items() if k != "spec"} for r in rows]}))
    else:
        _print_files(rows, skipped, summary, spec, args.max_length)
    return 1 if skipped else 0


def _stats(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": int(a.max())}


def _summary(rows: list[dict], skipped: list[dict], has_text: bool, max_length: int | None) -> dict[str, Any]:
    prompt = [r["prompt_tokens"] for r in rows]
    over = [r["id"] for r in rows if max_length is not None and r["prompt_tokens"] > max_length]
    return {"samples": len(rows), "skipped": len(skipped), "videos": len({r["video"] for r in rows}),
            "vision_tokens": _stats([r["vision_tokens"] for r in rows]), "prompt_tokens": _stats(prompt),
            "prompt_includes_text": has_text, "max_length": max_length, "over_max_length": over,
            "histogram": _histogram(prompt)}


def _histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines: `  lo - hi | ##### count`."""
    import numpy as np

    if not values:
        return []
    counts, edges = np.histogram(values, bins=bins if min(values) < max(values) else 1)
    top = max(counts)
    return [f"  {lo:>7.0f} - {hi:<7.0f} | {'#' * max(1 if c else 0, round(c / top * width)):<{width}} {c}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def _print_files(rows, skipped, summary, spec, max_length) -> None:
    print(f"spec {_spec_text(spec)}")
    if len(rows) <= 50:  # a per-sample table is useful for a handful of files, noise for a dataset
        print(f"{'id':<40} {'source':>16} {'frames':>6} {'WxH':>9} {'vision':>7} {'prompt':>7}")
        for r in rows:
            size = f"{r['width']}x{r['height']}"
            print(f"{r['id'][-40:]:<40} {r['source']:>16} {r['frames']:>6} {size:>9} "
                  f"{r['vision_tokens']:>7} {r['prompt_tokens']:>7}")
    print(f"{summary['samples']} samples over {summary['videos']} videos, {summary['skipped']} skipped")
    for name in ("vision_tokens", "prompt_tokens"):
        s = summary[name]
        if s:
            print(f"  {name:<14} min {s['min']}  median {s['median']:g}  p95 {s['p95']:g}  max {s['max']}")
    if not summary["prompt_includes_text"]:
        print("  note: prompt tokens = vision tokens only (trafficvlm.prompts.prompt_text_tokens unavailable"
              " or not a dataset)")
    if summary["histogram"]:
        print("prompt tokens per sample:")
        print("\n".join(summary["histogram"]))
    if max_length is not None:
        over = summary["over_max_length"]
        print(f"{len(over)} samples over --max-length {max_length}" + (": " + ", ".join(over[:20]) if over else ""))
        if len(over) > 20:
            print(f"  ... and {len(over) - 20} more (see --json)")
    for s in skipped:  # the reason names the file; datasets add the sample id
        print(f"skipped: {s['reason']}" if s["id"] == s["video"] else f"skipped {s['id']}: {s['reason']}",
              file=sys.stderr)
