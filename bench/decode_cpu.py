"""CPU benchmark of the one video path: `load_clip` on a 75 s 1080p30 clip vs. decoding every frame.

    .venv/bin/python bench/decode_cpu.py                      # writes bench/results/decode_cpu.json
    .venv/bin/python bench/decode_cpu.py --workdir /tmp/bench --out /tmp/decode_cpu.json

The clip (1920x1080, 30 fps, 2,250 frames, H.264 ultrafast, a moving gradient) is generated once into
`--workdir` and reused. Each measurement runs in a fresh subprocess (`--repeat` times; min and median are
reported) that reports the wall and CPU time of the call (imports timed apart) and its peak RSS (VmHWM,
imports included), so one run's memory never inflates another's. Children run with OMP_NUM_THREADS=1 (as
torch DataLoader workers do) unless it is set:

- `load_clip`   : the recipe's setting A (fps 1, max_pixels 81,920), no cache: seek, stream-decode, keep
                  74 frames resized to 364x196.
- `cache_hit`   : the same call again, served from the frame cache the first run filled.
- `load_span`   : setting A on the span 60-75 s only (no cache): the seek skips the first 60 s.
- `decode_all`  : decode all 2,250 frames and convert each to RGB (dropping each at once). This is the time
                  floor of "decode everything, then pick"; *keeping* the frames, as torchvision's
                  `read_video` does, would need 2,250 x 1920 x 1080 x 3 B = 14.0 GB, reported as arithmetic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WIDTH, HEIGHT, FPS, SECONDS = 1920, 1080, 30, 75
ROOT = Path(__file__).resolve().parents[1]
MODES = ("load_clip", "cache_hit", "load_span", "decode_all")


def make_clip(path: Path) -> Path:
    """A 75 s 1080p30 H.264 clip of a gradient sliding 8 px per frame (cheap to make, real motion)."""
    import av
    import numpy as np
    from tqdm import tqdm

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(WIDTH * 2, dtype=np.uint16)
    y = np.arange(HEIGHT, dtype=np.uint16)[:, None]
    base = np.stack([(x[None, :] + y) % 256, (x[None, :] // 3) % 256 + 0 * y, (y * 2 + 0 * x) % 256],
                    axis=-1).astype(np.uint8)  # twice as wide as a frame, so a window can slide over it
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in tqdm(range(FPS * SECONDS), desc="encoding bench clip", unit="frame"):
            shift = (i * 8) % WIDTH
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift:shift + WIDTH]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def child(mode: str, clip: Path, cache_dir: Path) -> dict:
    """One measurement, in this (fresh) process. Imports are timed apart: a worker pays them once."""
    t = time.perf_counter()
    import av  # noqa: F401  (decode_all uses it directly; load_clip through trafficvlm.video)

    if mode != "decode_all":
        import torch  # noqa: F401  (load_clip resizes with torch; import it outside the timed call)

        from trafficvlm.config import SETTING_A
        from trafficvlm.video import FrameCache, load_clip
    result: dict = {"import_s": round(time.perf_counter() - t, 3)}
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "decode_all":
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            result["frames"] = sum(1 for f in container.decode(stream) if f.to_ndarray(format="rgb24") is not None)
    else:
        cache = FrameCache(cache_dir)
        span = (60.0, 75.0) if mode == "load_span" else (None, None)
        c = load_clip(clip, SETTING_A, *span, cache=cache if mode != "load_span" else None)
        result.update(frames=c.plan.frames, size=f"{c.plan.width}x{c.plan.height}",
                      vision_tokens=c.plan.vision_tokens, cache=cache.stats)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["wall_s"] = round(time.perf_counter() - start, 3)
    # CPU seconds are less sensitive than wall time to other jobs on a shared machine
    result["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child
    would report the parent's high-water mark if that is larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(mode: str, clip: Path, cache_dir: Path, repeat: int) -> dict:
    """Run a mode `repeat` times, each in a fresh process; keep the runs and their best/median wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "components")}
    # One torch thread, as in DataLoader workers: for 74 small resizes, 2 OpenMP threads spin on a busy
    # 2-core machine (measured: ~60% more CPU, wall time 1.5-3x). Export OMP_NUM_THREADS to override.
    env.setdefault("OMP_NUM_THREADS", "1")
    runs = []
    for _ in range(repeat):
        if mode == "load_clip":  # every load_clip run must decode; cache_hit reads what the last one stored
            shutil.rmtree(cache_dir, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--clip", str(clip), "--cache-dir",
                              str(cache_dir)], env=env, check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    walls = sorted(r["wall_s"] for r in runs)
    return {**runs[0], "wall_s_min": walls[0], "wall_s_median": walls[len(walls) // 2],
            "cpu_s_min": min(r["cpu_s"] for r in runs), "import_s_min": min(r["import_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "runs": runs}


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'mode':<12} {'wall s min':>10} {'median':>7} {'cpu s':>6} {'import s':>8} {'peak RSS MB':>12}  notes")
    for mode, r in rows.items():
        print(f"{mode:<12} {r['wall_s_min']:>10.2f} {r['wall_s_median']:>7.2f} {r['cpu_s_min']:>6.2f} "
              f"{r['import_s_min']:>8.2f} {r['peak_rss_mb']:>12.0f}  "
              f"{r['frames']} frames {r.get('size', 'RGB 1920x1080, each dropped')}")
    ratio = rows["decode_all"]["wall_s_min"] / rows["load_clip"]["wall_s_min"]
    print(f"decode_all / load_clip wall (min): {ratio:.2f}x")


def versions() -> dict:
    import av
    import numpy
    import torch

    return {"python": platform.python_version(), "av": av.__version__, "ffmpeg": av.ffmpeg_version_info,
            "numpy": numpy.__version__, "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "trafficvlm" / "bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decode_cpu.json")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per mode (default 3)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.clip, args.cache_dir)))
        return 0

    clip = make_clip(args.workdir / f"bench_{WIDTH}x{HEIGHT}_{FPS}fps_{SECONDS}s.mp4")
    cache_dir = args.workdir / f"frames-{os.getpid()}"  # fresh: the first load_clip must decode
    try:
        rows = {mode: measure(mode, clip, cache_dir, args.repeat) for mode in MODES}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    keep_all_gb = FPS * SECONDS * WIDTH * HEIGHT * 3 / 1e9
    print_table(rows)
    print(f"keeping all 2,250 RGB frames (read-everything decoders) would need {keep_all_gb:.1f} GB")
    result = {"benchmark": "decode_cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "versions": versions(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
              "clip": {"width": WIDTH, "height": HEIGHT, "fps": FPS, "seconds": SECONDS,
                       "bytes": clip.stat().st_size},
              "spec": "setting A (fps 1, max_pixels 81920)", "results": rows, "keep_all_rgb_gb": keep_all_gb}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
