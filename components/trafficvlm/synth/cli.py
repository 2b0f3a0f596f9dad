"""`trafficvlm synth`: render a synthetic dataset in the WTS layout.

    trafficvlm synth data/wts --seed 0
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  trafficvlm synth data/wts                                   # 24 scenarios, 160x96, 4 fps, 8 s (CPU demo)
  trafficvlm synth data/wts --seed 1 --scenarios 48 --val-fraction 0.5
  trafficvlm synth /tmp/tiny --scenarios 4 --normal 1 --bdd 1 --size 64x48 --duration 2
  trafficvlm synth data/wts-big --size 1920x1080 --fps 30 --duration 75 --scenarios 8   # recipe-scale clips
  trafficvlm synth data/wts-big --size 1920x1080 --fps 30 --duration 75 --scenarios 137 --normal 0 --bdd 0 \
      --val-fraction 0 --workers 0          # ~342 train overhead videos, rendered on every available CPU

The same arguments always give the same bytes, whatever --workers is. Answers are in
OUT/synth_ground_truth.json.
"""


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x96, got {text!r}") from None
    return width, height


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="render a synthetic dataset in the WTS layout",
        description="Render procedural traffic scenes as H.264 MP4 with WTS captions, VQA, bbox files and "
                    "the multi-view csv: train/val scenarios, normal_trimmed and external/BDD_PC_5K.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory (new, empty, or an earlier synth output)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scenarios", type=int, default=24, help="main scenarios, train+val (default 24)")
    p.add_argument("--normal", type=int, default=4, help="normal_trimmed scenarios, train+val (default 4)")
    p.add_argument("--bdd", type=int, default=4, help="external/BDD_PC_5K clips, train+val (default 4)")
    p.add_argument("--size", type=_size, default=(160, 96), metavar="WxH", help="frame size (default 160x96)")
    p.add_argument("--fps", type=float, default=4.0, help="frames per second (default 4)")
    p.add_argument("--duration", type=float, default=8.0, metavar="SECONDS", help="video length (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each part in val (default 0.25)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="render videos in N processes (default 1; 0: one per available CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trafficvlm.synth.writer import default_workers, synthesize

    try:
        summary = synthesize(args.out, seed=args.seed, scenarios=args.scenarios, normal=args.normal,
                             bdd=args.bdd, size=args.size, fps=args.fps, duration=args.duration,
                             val_fraction=args.val_fraction, workers=args.workers or default_workers())
    except ValueError as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{n} {key}" for key, n in sorted(summary.scenes.items()))
    print(f"wrote {summary.videos} videos and {summary.json_files} JSON files to {summary.root} ({parts}); "
          f"answers in {summary.ground_truth}")
    return 0
