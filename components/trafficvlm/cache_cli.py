"""`trafficvlm cache warm`: decode every clip of a LLaVA JSON once into the shared frame cache.

    trafficvlm cache warm data/llava/environment_mcq_llava_train.json --media-dir data/wts/videos/train
    trafficvlm cache warm train.json --media-dir videos/train --config configs/sft/recipe_setting_a.toml --workers 16

    from trafficvlm.cache_cli import warm_cache
    report = warm_cache(records, "data/wts/videos/train", spec, workers=8)

Training decodes each clip on first use, inside the data loader, so a cold first epoch measures the
decoder, not the trainer. Warming first makes that one-off decode a separate, timed step; the trainer
then finds every clip in the cache (same spec, same file identity -> same key, `video.FrameCache`).
The spec comes from the trainer's config (`--config`, its `[video]` table and `data.frame_cache`), so the
keys match what `trafficvlm train` with that config looks up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trafficvlm.config import VideoSpec
    from trafficvlm.records import VideoQARecord

ClipKey = tuple[str, "float | None", "float | None"]   # video (relative to the media dir), start, end


@dataclass
class WarmReport:
    """What `warm_cache` did: every distinct clip is a hit, a fresh decode, or a named failure."""

    clips: int
    decoded: int
    hits: int
    seconds: float
    cache_dir: str
    cache_bytes: int
    failures: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.clips} clips: {self.decoded} decoded, {self.hits} already cached, "
                f"{len(self.failures)} failed, in {self.seconds:.1f} s; cache {self.cache_dir} holds "
                f"{self.cache_bytes / 2**30:.2f} GiB")


def distinct_clips(records: list["VideoQARecord"]) -> list[ClipKey]:
    """Each (video, start, end) once, in first-seen order: ~15 questions share one clip."""
    return list(dict.fromkeys((r.video, r.video_start, r.video_end) for r in records))


def _warm_one(media_dir: str, clip: ClipKey, spec: "VideoSpec", cache_dir: str | None) -> tuple[str, str]:
    """Load one clip through a cache in `cache_dir`; returns ("hit" | "decoded" | "failed", detail).
    Runs in a worker process: a bad file is reported, never raised, so one clip cannot stop the rest."""
    from trafficvlm.video import FrameCache, VideoError, load_clip

    store = FrameCache(cache_dir)
    video, start, end = clip
    try:
        load_clip(Path(media_dir) / video, spec, start, end, cache=store)
    except (VideoError, OSError, ValueError) as exc:
        return "failed", str(exc)
    return ("hit" if store.hits else "decoded"), ""


def warm_cache(records: list["VideoQARecord"], media_dir: str | Path, spec: "VideoSpec", *,
               cache_dir: str | Path | None = None, workers: int = 1, progress: bool = True) -> WarmReport:
    """Decode every distinct clip of `records` once into the frame cache (default `$TRAFFICVLM_CACHE`)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from trafficvlm.video import FrameCache

    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    clips = distinct_clips(records)
    root = str(FrameCache(cache_dir).root)
    counts = {"hit": 0, "decoded": 0}
    failures: list[dict[str, str]] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, min(workers, len(clips)))) as pool, \
            tqdm(total=len(clips), desc="cache warm", unit="clip", disable=not progress) as bar:
        futures = {pool.submit(_warm_one, str(media_dir), clip, spec, root): clip for clip in clips}
        for future in as_completed(futures):
            status, detail = future.result()
            if status == "failed":
                video, start, end = futures[future]
                failures.append({"video": video, "start": str(start), "end": str(end), "error": detail})
            else:
                counts[status] += 1
            bar.update(1)
    return WarmReport(clips=len(clips), decoded=counts["decoded"], hits=counts["hit"],
                      seconds=time.perf_counter() - t0, cache_dir=root, cache_bytes=_tree_bytes(Path(root)),
                      failures=sorted(failures, key=lambda f: f["video"]))


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


# --- CLI ------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  trafficvlm cache warm data/llava/environment_mcq_llava_train.json --media-dir data/wts/videos/train
  trafficvlm cache warm data/llava/environment_mcq_llava_train.json --media-dir data/wts/videos/train \\
      --config configs/sft/recipe_setting_a.toml --workers 16 --report runs/warm.json
  TRAFFICVLM_CACHE=/pvc/frame-cache trafficvlm cache warm train.json --media-dir /pvc/wts/videos/train

The cache is $TRAFFICVLM_CACHE (default ~/.cache/trafficvlm/frames) unless --cache-dir or the config's
data.frame_cache says otherwise. Exit 1 when any clip failed (each one is named).
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("cache", help="the decoded-frame cache: warm it before training",
                              description="The decoded-frame cache shared by train, eval and serve.")
    sub = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    w = sub.add_parser("warm", help="decode every clip of a LLaVA JSON once into the cache",
                       description="Decode every distinct clip of a LLaVA JSON once, in a process pool, into "
                                   "the frame cache the trainer reads; report clips, time, cache size, failures.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("llava_json", metavar="LLAVA_JSON", help="annotation file (prepare's output)")
    w.add_argument("--media-dir", required=True, help="directory the JSON's video paths are relative to")
    w.add_argument("--config", default=None,
                   help="trainer TOML whose [video] spec and data.frame_cache to use (default: setting A)")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override, e.g. video.fps=2 (repeatable)")
    w.add_argument("--cache-dir", default=None, help="cache directory (default: config, else $TRAFFICVLM_CACHE)")
    w.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: one per available CPU)")
    w.add_argument("--report", default=None, metavar="JSON", help="also write the report as JSON here")
    w.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from trafficvlm.config import ConfigError, load_train_config
    from trafficvlm.records import read_llava

    try:
        cfg = load_train_config(args.config, args.overrides)
        records = read_llava(args.llava_json)
        report = warm_cache(records, args.media_dir, cfg.video,
                            cache_dir=args.cache_dir or cfg.data.frame_cache,
                            workers=args.workers or _available_cpus())
    except (ConfigError, ValueError, OSError) as exc:
        print(f"cache warm: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    for f in report.failures:
        print(f"  failed: {f['video']} [{f['start']}, {f['end']}]: {f['error']}", file=sys.stderr)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(_report_json(report, cfg.video), indent=2) + "\n")
    return 1 if report.failures else 0


def _available_cpus() -> int:
    """The CPUs this process may use (a container's limit, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _report_json(report: WarmReport, spec: "VideoSpec") -> dict[str, Any]:
    return {**asdict(report), "video": spec.to_dict()}
