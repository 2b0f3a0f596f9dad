"""The one video path (DESIGN.md contract 1): decode, temporal sampling, resize, and the frame cache.

Training, evaluation, quantization calibration and serving all call `load_clip`, so a model sees the same
frames everywhere. The arithmetic follows qwen-vl-utils 0.0.14 as the reference recipe used it:

- span: `video_start`/`video_end` (seconds) become frames `ceil(start*fps) .. min(floor(end*fps), N-1)`;
- count: `nframes` rounded to a multiple of 2, or `span/fps_src*fps` clamped to [min_frames, max_frames]
  and to the span, floored to a multiple of 2; indices `linspace(first, last, n).round()`;
- size: a per-frame pixel cap from `total_pixels` (`frame_pixel_cap`), then `smart_resize` to multiples of 28;
- time: `second_per_grid = 2 / fps` with `fps` (contract 2: the nominal rate, not the slightly different
  rate `n / span * fps_src` that flooring to even frames achieves); with `nframes`, `2 / (n / span * fps_src)`.

Example (no file needed):

    >>> from trafficvlm.config import SETTING_A
    >>> p = plan(75.0, 1920, 1080, 30.0, SETTING_A)
    >>> p.frames, p.height, p.width, p.vision_tokens
    (74, 196, 364, 3367)

and on a file: `clip = load_clip("videos/val/x.mp4", SETTING_A, start=3.0, end=20.0)` -> `clip.frames` is
uint8 [T, H, W, 3], already resized.

Decoding uses PyAV (FFmpeg with x264 bundled in the wheel; decord is unmaintained, torchcodec needs CUDA
torch). Resizing uses torch `interpolate(mode="bicubic", antialias=True)` on float32, rounded and clamped
back to uint8: that is what torchvision's `resize` (the reference's resizer) computes for a uint8 tensor,
and torchvision itself is not installable here. This module knows nothing about prompts or models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trafficvlm.config import FRAME_FACTOR, IMAGE_FACTOR, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VideoSpec

log = logging.getLogger(__name__)

PATCH_SIZE = 14          # ViT patch side; IMAGE_FACTOR = PATCH_SIZE * SPATIAL_MERGE
SPATIAL_MERGE = 2        # 2x2 patches merge into one LLM token
MAX_ASPECT_RATIO = 200   # qwen-vl-utils rejects more extreme frames
CACHE_FORMAT = 1         # bump whenever decoding or resizing changes the pixels a key maps to


class VideoError(RuntimeError):
    """A video that cannot be used: the message is always `"<path>: <reason>"`."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # DataLoader workers pickle exceptions; keep both fields across processes
        return (type(self), (self.path, self.reason))


# --- arithmetic (qwen-vl-utils semantics) ---------------------------------------------------------------

def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python round: half to even, as qwen-vl-utils


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: float = VIDEO_MIN_PIXELS,
                 max_pixels: float = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) with both sides multiples of `factor`, area within the caps, aspect ratio kept.

    The cap is checked first, so `min_pixels > max_pixels` (the recipe's setting A) means "at most
    max_pixels". Raises ValueError on empty or extreme (> 200:1) frames."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    h = max(factor, _round_by(height, factor))
    w = max(factor, _round_by(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, _floor_by(height / beta, factor))
        w = max(factor, _floor_by(width / beta, factor))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = _ceil_by(height * beta, factor)
        w = _ceil_by(width * beta, factor)
    return h, w


def frame_pixel_cap(n_frames: int, spec: VideoSpec) -> float:
    """The per-frame `max_pixels` after the total-pixel rule:
    `min(max(min(768*28*28, total_pixels / n * 2), int(min_pixels * 1.05)), spec.max_pixels)`.

    Kept exact (it may be fractional, as in qwen-vl-utils), because smart_resize's scale factor uses it."""
    cap = max(min(VIDEO_MAX_PIXELS, spec.total_pixels / n_frames * FRAME_FACTOR), int(spec.min_pixels * 1.05))
    return min(cap, spec.max_pixels)


def frame_span(total_frames: int, video_fps: float, start: float | None = None,
               end: float | None = None) -> tuple[int, int]:
    """First and last source frame index of a clip given in seconds (inclusive), clamped to the video."""
    if video_fps <= 0 or total_frames <= 0:
        raise ValueError(f"need a positive frame count and fps, got {total_frames} frames at {video_fps} fps")
    if start is None and end is None:
        return 0, total_frames - 1
    max_duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, max_duration)) * video_fps) if start is not None else 0
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, max_duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(f"clip {start}..{end} s selects no frames (frames {first}..{last} of "
                         f"{total_frames} at {video_fps:g} fps)")
    return first, last


def _num_frames(span_frames: int, video_fps: float, spec: VideoSpec) -> int:
    """How many frames to sample from a span of `span_frames` source frames (qwen's smart_nframes)."""
    if spec.nframes is not None:
        n = _round_by(spec.nframes, FRAME_FACTOR)
    else:
        min_frames = _ceil_by(spec.min_frames, FRAME_FACTOR)
        max_frames = _floor_by(min(spec.max_frames, span_frames), FRAME_FACTOR)
        wanted = span_frames / video_fps * spec.fps
        n = _floor_by(min(max(wanted, min_frames), max_frames, span_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= span_frames:
        raise ValueError(f"cannot sample {n} frames from a span of {span_frames} source frames "
                         f"(need {FRAME_FACTOR} <= frames <= span)")
    return n


def sample_indices(total_frames: int, video_fps: float, spec: VideoSpec, start: float | None = None,
                   end: float | None = None) -> list[int]:
    """Source frame indices to decode: `linspace(first, last, n).round()` over the clip's span."""
    first, last = frame_span(total_frames, video_fps, start, end)
    n = _num_frames(last - first + 1, video_fps, spec)
    return np.linspace(first, last, n).round().astype(int).tolist()


@dataclass
class Plan:
    """What a clip becomes: sampled frame count, resized size, and its vision-token footprint."""

    frames: int
    height: int
    width: int
    vision_tokens: int
    grid_thw: tuple[int, int, int]
    second_per_grid: float
    indices: list[int]


def plan(duration: float, width: int, height: int, src_fps: float, spec: VideoSpec,
         start: float | None = None, end: float | None = None) -> Plan:
    """Plan a clip from its duration (s), size and source fps alone; no file is read."""
    total_frames = max(1, round(duration * src_fps))
    return plan_frames(total_frames, src_fps, width, height, spec, start, end)


def plan_frames(total_frames: int, video_fps: float, width: int, height: int, spec: VideoSpec,
                start: float | None = None, end: float | None = None) -> Plan:
    """`plan` from an exact source frame count (what `load_clip` knows after probing)."""
    indices = sample_indices(total_frames, video_fps, spec, start, end)
    n = len(indices)
    h, w = smart_resize(height, width, IMAGE_FACTOR, spec.min_pixels, frame_pixel_cap(n, spec))
    grid = (n // FRAME_FACTOR, h // PATCH_SIZE, w // PATCH_SIZE)
    if spec.fps is not None:
        second_per_grid = FRAME_FACTOR / spec.fps
    else:  # nframes: the sample rate actually achieved over the span (qwen's sample_fps)
        first, last = frame_span(total_frames, video_fps, start, end)
        second_per_grid = FRAME_FACTOR / (n / (last - first + 1) * video_fps)
    tokens = grid[0] * grid[1] * grid[2] // (SPATIAL_MERGE * SPATIAL_MERGE)
    return Plan(n, h, w, tokens, grid, second_per_grid, indices)


# --- probing and decoding -------------------------------------------------------------------------------

@dataclass
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float  # num_frames / fps, the duration the sampling arithmetic sees


def _check_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoError(path, "no such file") from None
    except OSError as exc:
        raise VideoError(path, f"cannot stat ({exc.strerror})") from None
    if not path.is_file():
        raise VideoError(path, "not a regular file")
    if st.st_size == 0:
        raise VideoError(path, "empty file (0 bytes)")
    return st


def _open(path: Path):
    """Open a container and return (container, video stream, VideoInfo). Errors are VideoErrors."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(path, f"not a readable video container ({exc.__class__.__name__}: "
                               f"{getattr(exc, 'strerror', None) or exc})") from None
    try:
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0 or not stream.width or not stream.height:
            raise VideoError(path, "video stream has no frame rate or size")
        fps = float(rate)
        num_frames = stream.frames or _frames_from_duration(stream, container, fps)
        if num_frames <= 0:
            raise VideoError(path, "video stream has no frames")
    except BaseException:
        container.close()
        raise
    info = VideoInfo(str(path), stream.width, stream.height, fps, num_frames, num_frames / fps)
    return container, stream, info


def _frames_from_duration(stream, container, fps: float) -> int:
    """Frame count when the container does not store one (some MKV/TS): duration times fps."""
    if stream.duration is not None and stream.time_base is not None:
        return round(float(stream.duration * stream.time_base) * fps)
    if container.duration is not None:
        return round(container.duration / 1_000_000 * fps)  # container.duration is in AV_TIME_BASE (µs)
    return 0


def probe(path: str | os.PathLike, timeout_s: float = 30.0) -> VideoInfo:
    """Size, fps and frame count of a video, checking that its first frame decodes (no full decode)."""
    path = Path(path)
    _check_file(path)
    container, stream, info = _open(path)
    with container:
        frames = _decode_frames(container, stream, path, time.monotonic() + timeout_s, timeout_s)
        if next(frames, None) is None:
            raise VideoError(path, "no decodable video frame")
    return info


def _decode_frames(container, stream, path: Path, deadline: float, timeout_s: float):
    """Yield decoded frames, turning FFmpeg errors and the deadline into VideoErrors.

    The deadline is checked per packet, so a stream of packets that never yield a frame still times out."""
    import av

    stream.thread_type = "AUTO"  # frame threading: several frames in flight, same output
    try:
        for packet in container.demux(stream):  # ends with an empty packet that flushes the decoder
            if time.monotonic() > deadline:
                raise VideoError(path, f"decoding exceeded the {timeout_s:g} s timeout")
            yield from packet.decode()
    except av.FFmpegError as exc:
        raise VideoError(path, f"decode failed ({exc.__class__.__name__}: "
                               f"{getattr(exc, 'strerror', None) or exc})") from None


def _frame_index(frame, t0: int, time_base: float, fps: float) -> int | None:
    """Source frame index from the presentation time: for constant-frame-rate files (WTS, cameras) this
    is decord's frame number; unlike counting, it stays right after a seek."""
    if frame.pts is None:
        return None
    return round((frame.pts - t0) * time_base * fps)


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], bicubic with antialias (torchvision's uint8 resize)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
    y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


class _SeekOvershoot(Exception):
    """The seek landed after the first wanted frame (a file with an unreliable index)."""


def _seek(container, stream, pts: int) -> None:
    container.seek(pts, stream=stream, backward=True)  # to the keyframe at or before pts


def _decode_indices(container, stream, info: VideoInfo, p: Plan, path: Path, deadline: float,
                    timeout_s: float, seek: bool = True) -> np.ndarray:
    """Seek near the first wanted frame, stream-decode, keep (converted and resized) only wanted frames.

    Memory stays at one full-size RGB frame plus the output. A wanted index missing from the timeline
    (a dropped or variable-rate frame) takes the next decoded frame, with a warning. If the stream ends
    before the last wanted frame (truncated file, or a container that over-reports its frame count) this
    raises a VideoError: there is no repeat-last-frame padding, a short clip is never returned."""
    wanted = p.indices
    out = np.empty((len(wanted), p.height, p.width, 3), np.uint8)
    t0 = stream.start_time or 0
    time_base = float(stream.time_base)
    seek = seek and wanted[0] > 0
    if seek:  # aim half a frame early so rounding never puts the target after the wanted frame
        _seek(container, stream, t0 + int((wanted[0] - 0.5) / info.fps / time_base))
    k, counter, last_seen, substituted = 0, 0, -1, 0
    for frame in _decode_frames(container, stream, path, deadline, timeout_s):
        idx = _frame_index(frame, t0, time_base, info.fps)
        idx = counter if idx is None else idx  # no pts: count frames (exact only without a seek)
        if seek and last_seen < 0 and idx > wanted[0]:
            raise _SeekOvershoot
        counter, last_seen = idx + 1, idx
        if idx < wanted[k]:
            continue
        rgb = _resize(frame.to_ndarray(format="rgb24"), p.height, p.width)
        while k < len(wanted) and wanted[k] <= idx:
            substituted += wanted[k] < idx
            out[k] = rgb
            k += 1
        if k == len(wanted):
            if substituted:
                log.warning("%s: %d sampled frames were missing from the timeline and took the next decoded "
                            "frame (variable frame rate or dropped frames?)", path, substituted)
            return out
    raise VideoError(path, f"stream ended at source frame {last_seen} but frame {wanted[k]} was planned: "
                           f"decoded {k} of {len(wanted)} sampled frames (the container claims "
                           f"{info.num_frames} frames); the file is truncated or corrupt")


def _decode_clip(path: Path, spec: VideoSpec, start: float | None, end: float | None,
                 timeout_s: float) -> tuple[np.ndarray, Plan, VideoInfo]:
    deadline = time.monotonic() + timeout_s
    try:
        return _decode_once(path, spec, start, end, deadline, timeout_s, seek=True)
    except _SeekOvershoot:
        log.warning("%s: seeking overshot the first wanted frame; decoding from the start", path)
        return _decode_once(path, spec, start, end, deadline, timeout_s, seek=False)


def _decode_once(path: Path, spec: VideoSpec, start: float | None, end: float | None, deadline: float,
                 timeout_s: float, seek: bool) -> tuple[np.ndarray, Plan, VideoInfo]:
    container, stream, info = _open(path)
    with container:
        try:
            p = plan_frames(info.num_frames, info.fps, info.width, info.height, spec, start, end)
        except ValueError as exc:
            raise VideoError(path, str(exc)) from None
        return _decode_indices(container, stream, info, p, path, deadline, timeout_s, seek), p, info


@dataclass
class Clip:
    """Decoded, sampled, resized frames of one clip, with what the model needs to place them in time."""

    frames: np.ndarray        # uint8 [T, H, W, 3], T = plan.frames
    indices: list[int]        # source frame index of each frame
    video_fps: float          # source frame rate
    second_per_grid: float    # seconds per temporal grid step (2 frames); for mrope_position_ids
    plan: Plan
    path: str


def load_clip(path: str | os.PathLike, spec: VideoSpec, start: float | None = None, end: float | None = None,
              *, cache: "FrameCache | None | bool" = True, timeout_s: float = 120.0) -> Clip:
    """The frames of `path` between `start` and `end` seconds, sampled and resized by `spec`.

    `cache=True` uses the shared on-disk `FrameCache` (`$TRAFFICVLM_CACHE`); pass a FrameCache to use
    another, or None/False to always decode. Every failure (missing, empty, corrupt file; a span outside
    the video; decoding past `timeout_s`) is a VideoError naming the file. A stream that ends before the
    last planned frame (truncated file) is an error too: no repeat-last-frame padding, never a short clip.
    A frame missing mid-timeline (variable frame rate, dropped frames) takes the next decoded frame and
    logs a warning."""
    path = Path(path)
    _check_file(path)
    store = _resolve_cache(cache)
    key = store.key(path, spec, start, end) if store is not None else None
    if store is not None and (hit := store.get(key)) is not None:
        hit.path = str(path)  # the caller's spelling of the path; the key used the resolved one
        return hit
    frames, p, info = _decode_clip(path, spec, start, end, timeout_s)
    clip = Clip(frames, p.indices, info.fps, p.second_per_grid, p, str(path))
    if store is not None:
        store.put(key, clip)
    return clip


# --- the frame cache ------------------------------------------------------------------------------------

class FrameCache:
    """Decoded clips on disk, so each video is decoded once for its questions and across epochs.

    Key: file identity (resolved path, size, mtime_ns) + spec + clip span + CACHE_FORMAT, hashed. An entry
    is `<key>.npy` (frames) and `<key>.json` (the rest), each written to a temporary file and renamed, so
    concurrent workers and ranks never read half an entry. A changed file gets a new key; stale entries
    are simply never read again (delete the directory to reclaim space)."""

    def __init__(self, root: str | os.PathLike | None = None):
        default = os.environ.get("TRAFFICVLM_CACHE") or Path.home() / ".cache" / "trafficvlm" / "frames"
        self.root = Path(root or default)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(path: str | os.PathLike, spec: VideoSpec, start: float | None = None,
            end: float | None = None) -> str:
        resolved = Path(path).resolve()
        st = resolved.stat()
        ident = {"format": CACHE_FORMAT, "path": str(resolved), "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "spec": spec.to_dict(),
                 "start": None if start is None else float(start), "end": None if end is None else float(end)}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def get(self, key: str) -> Clip | None:
        npy, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            frames = np.load(npy, allow_pickle=False)
            p = Plan(**{**meta["plan"], "grid_thw": tuple(meta["plan"]["grid_thw"])})
            if frames.shape != (p.frames, p.height, p.width, 3) or frames.dtype != np.uint8:
                raise ValueError(f"cached frames have shape {frames.shape}, plan says {p}")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged entry is a miss, not a failure
            log.warning("frame cache: ignoring damaged entry %s (%s)", npy, exc)
            self.misses += 1
            return None
        self.hits += 1
        return Clip(frames, p.indices, meta["video_fps"], meta["second_per_grid"], p, meta["path"])

    def put(self, key: str, clip: Clip) -> None:
        npy, meta_path = self._paths(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        meta = {"path": clip.path, "video_fps": clip.video_fps, "second_per_grid": clip.second_per_grid,
                "plan": asdict(clip.plan)}
        # frames first, metadata last: an entry is visible only once both are complete
        _write_atomic(npy, lambda f: np.save(f, np.ascontiguousarray(clip.frames), allow_pickle=False))
        _write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))

    @property
    def stats(self) -> dict[str, Any]:
        return {"root": str(self.root), "hits": self.hits, "misses": self.misses}


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_default_cache: FrameCache | None = None


def default_cache() -> FrameCache:
    """The process-wide cache (one instance, so its hit/miss stats add up across calls)."""
    global _default_cache
    if _default_cache is None or _default_cache.root != FrameCache().root:
        _default_cache = FrameCache()
    return _default_cache


def _resolve_cache(cache: "FrameCache | None | bool") -> FrameCache | None:
    if cache is True:
        return default_cache()
    if cache is None or cache is False:
        return None
    return cache
