"""The vision-token planner: the recipe's reference numbers, a grid checked against an independent
re-derivation of qwen-vl-utils' formulas, and the `trafficvlm tokens` command on files and a dataset."""

import argparse
import json
import math

import av
import numpy as np
import pytest

from trafficvlm import tokens
from trafficvlm.config import SETTING_A, SETTING_B, VideoSpec
from trafficvlm.records import VideoQARecord, write_llava
from trafficvlm.video import plan


def test_recipe_reference_numbers():
    p = plan(75.0, 1920, 1080, 30.0, SETTING_A)
    assert (p.frames, p.height, p.width, p.vision_tokens) == (74, 196, 364, 3367)
    assert p.grid_thw == (37, 14, 26) and p.second_per_grid == 2.0
    b = plan(75.0, 1920, 1080, 30.0, SETTING_B)
    assert b.frames == 74 and b.vision_tokens <= 8192


@pytest.mark.parametrize("duration", [30.0, 75.0, 120.0])
@pytest.mark.parametrize("res", [(1920, 1080), (1280, 720), (3840, 2160), (1080, 1920)])
def test_total_pixels_bounds_tokens(duration, res):
    # total_pixels 6,422,528 = 8,192 tokens of 28x28: the budget holds while the per-frame floor
    # (min_pixels * 1.05) does not bind, i.e. up to ~121 frames
    assert plan(duration, *res, 30.0, SETTING_B).vision_tokens <= 8192


def test_per_frame_floor_wins_over_total_pixels_on_long_clips():
    # 300 frames: total_pixels / 150 < 105,369 px, so each frame keeps ~105k px and the budget is exceeded
    p = plan(300.0, 1920, 1080, 30.0, SETTING_B)
    floor = int(SETTING_B.min_pixels * 1.05)
    assert p.frames == 300 and 6422528 / 300 * 2 < p.height * p.width <= floor
    assert p.vision_tokens > 8192


# --- an independent re-derivation, straight from DESIGN.md contract 1 ------------------------------------

def reference(duration, width, height, src_fps, spec, start=None, end=None):
    total = max(1, round(duration * src_fps))
    first, last = 0, total - 1
    if start is not None or end is not None:
        if start is not None:
            first = math.ceil(min(max(start, 0.0), total / src_fps) * src_fps)
        if end is not None:
            last = min(math.floor(min(max(end, 0.0), total / src_fps) * src_fps), total - 1)
        if first >= last:
            return None
    span = last - first + 1
    if spec.nframes is not None:
        n = round(spec.nframes / 2) * 2
    else:
        lo = math.ceil(spec.min_frames / 2) * 2
        hi = math.floor(min(spec.max_frames, span) / 2) * 2
        n = math.floor(min(max(span / src_fps * spec.fps, lo), hi, span) / 2) * 2
    if not 2 <= n <= span:
        return None
    cap = min(max(min(768 * 784, spec.total_pixels / n * 2), int(spec.min_pixels * 1.05)), spec.max_pixels)
    h, w = max(28, round(height / 28) * 28), max(28, round(width / 28) * 28)
    if h * w > cap:
        s = math.sqrt(height * width / cap)
        h, w = max(28, math.floor(height / s / 28) * 28), max(28, math.floor(width / s / 28) * 28)
    elif h * w < spec.min_pixels:
        s = math.sqrt(spec.min_pixels / (height * width))
        h, w = math.ceil(height * s / 28) * 28, math.ceil(width * s / 28) * 28
    idx = [int(v) for v in np.round(np.linspace(first, last, n))]
    sample_fps = spec.fps if spec.fps is not None else n / span * src_fps
    return n, h, w, (n // 2) * (h // 14) * (w // 14) // 4, 2 / sample_fps, idx


SPECS = [SETTING_A, SETTING_B, VideoSpec(fps=2.0, max_pixels=768 * 784), VideoSpec(fps=None, nframes=16),
         VideoSpec(fps=None, nframes=7), VideoSpec(fps=4.0, max_frames=20, min_frames=8),
         VideoSpec(fps=0.25, min_pixels=28 * 28, max_pixels=200_000, total_pixels=1_000_000)]
GRID = [(d, r, f) for d in (0.5, 3.0, 10.0, 75.0, 601.0)
        for r in ((1920, 1080), (1280, 720), (640, 480), (64, 48), (3840, 2160), (720, 1280), (1000, 10))
        for f in (10.0, 25.0, 29.97, 60.0)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"fps{s.fps}-n{s.nframes}-max{s.max_pixels}")
def test_plan_matches_independent_derivation(spec):
    spans = [(None, None), (2.0, 9.5), (None, 4.2), (1.01, None)]
    checked = 0
    for (duration, (width, height), fps), (start, end) in ((g, s) for g in GRID for s in spans):
        want = reference(duration, width, height, fps, spec, start, end)
        if want is None:
            with pytest.raises(ValueError):
                plan(duration, width, height, fps, spec, start, end)
            continue
        p = plan(duration, width, height, fps, spec, start, end)
        got = (p.frames, p.height, p.width, p.vision_tokens, p.second_per_grid, p.indices)
        assert got[:4] == want[:4] and got[5] == want[5], (duration, width, height, fps, start, end)
        assert got[4] == pytest.approx(want[4])
        checked += 1
    assert checked > len(GRID)  # most combinations are valid clips


# --- the command ----------------------------------------------------------------------------------------

def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="trafficvlm")
    tokens.add_cli(parser.add_subparsers())
    args = parser.parse_args(["tokens", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_json(capsys):
    rc, out, _ = run_cli(["--duration", "75", "--resolution", "1920x1080", "--src-fps", "30", "--fps", "1",
                          "--max-pixels", "81920", "--json"], capsys)
    got = json.loads(out.strip().splitlines()[-1])
    assert rc == 0
    assert (got["frames"], got["height"], got["width"], got["vision_tokens"]) == (74, 196, 364, 3367)
    assert got["grid"] == [37, 14, 26] and got["second_per_grid"] == 2.0


def test_cli_plan_text_and_bad_input(capsys):
    rc, out, _ = run_cli(["--duration", "75", "--resolution", "1920x1080", "--src-fps", "30",
                          "--total-pixels", "6422528", "--max-pixels", "602112"], capsys)
    assert rc == 0 and "vision tokens   7733" in out
    rc, _, err = run_cli(["--duration", "75", "--src-fps", "30"], capsys)
    assert rc == 2 and "--resolution" in err
    rc, _, err = run_cli(["--duration", "0.01", "--resolution", "64x48", "--src-fps", "30"], capsys)
    assert rc == 2 and "cannot sample" in err


def make_clip(path, n, fps=10, width=64, height=48):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(n):
            img = np.full((height, width, 3), i % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_cli_on_video_files(tmp_path, capsys):
    a = make_clip(tmp_path / "a.mp4", 100)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    rc, out, err = run_cli([str(a), str(bad), "--fps", "2", "--json"], capsys)
    got = json.loads(out.strip().splitlines()[-1])
    assert rc == 1 and got["summary"]["samples"] == 1 and got["summary"]["skipped"] == 1
    item = got["items"][0]
    want = plan(10.0, 64, 48, 10.0, VideoSpec(fps=2))
    assert (item["frames"], item["height"], item["width"], item["vision_tokens"]) == \
        (want.frames, want.height, want.width, want.vision_tokens)
    assert str(bad) in got["skipped"][0]["reason"]


def dataset(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    make_clip(media / "long.mp4", 200)  # 20 s
    make_clip(media / "short.mp4", 40)  # 4 s
    recs = [VideoQARecord(f"q{i}", "long.mp4", "What?", {"a": "x", "b": "y"}, "a") for i in range(3)]
    recs.append(VideoQARecord("q-span", "long.mp4", "What?", {"a": "x", "b": "y"}, "b",
                              video_start=2.0, video_end=6.0))
    recs.append(VideoQARecord("q-short", "short.mp4", "What?", {"a": "x", "b": "y"}, "a"))
    recs.append(VideoQARecord("q-missing", "gone.mp4", "What?", {"a": "x", "b": "y"}, "a"))
    path = tmp_path / "data.json"
    write_llava(path, recs)
    return path, media


def test_cli_on_a_dataset(tmp_path, capsys, monkeypatch):
    path, media = dataset(tmp_path)
    monkeypatch.setattr(tokens, "_prompt_counter", lambda: None)
    long_tokens = plan(20.0, 64, 48, 10.0, SETTING_A).vision_tokens
    rc, out, _ = run_cli([str(path), "--media-dir", str(media), "--max-length", str(long_tokens - 1),
                          "--json"], capsys)
    got = json.loads(out.strip().splitlines()[-1])
    s = got["summary"]
    assert rc == 1 and s["samples"] == 5 and s["skipped"] == 1 and s["videos"] == 2
    by_id = {r["id"]: r for r in got["items"]}
    assert by_id["q-span"]["vision_tokens"] == plan(20.0, 64, 48, 10.0, SETTING_A, 2.0, 6.0).vision_tokens
    assert s["vision_tokens"]["max"] == long_tokens and not s["prompt_includes_text"]
    assert sorted(s["over_max_length"]) == ["q0", "q1", "q2"]
    assert all(r["prompt_tokens"] == r["vision_tokens"] for r in got["items"])


def test_cli_dataset_adds_text_tokens_and_prints_a_histogram(tmp_path, capsys, monkeypatch):
    path, media = dataset(tmp_path)
    monkeypatch.setattr(tokens, "_prompt_counter", lambda: (lambda record: 50))
    rc, out, err = run_cli([str(path), "--media-dir", str(media), "--max-length", "100000"], capsys)
    assert "prompt_tokens" in out and "|" in out and "0 samples over --max-length" in out
    assert "gone.mp4" in err and "q-missing" in err
    rc, out, _ = run_cli([str(path), "--media-dir", str(media), "--json"], capsys)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["summary"]["prompt_includes_text"]
    assert all(r["prompt_tokens"] == r["vision_tokens"] + 50 for r in got["items"])
