"""trafficvlm.video on tiny H.264 clips made here: sampled indices, sizes, spans, the cache, bad files.

Each clip encodes its frame number as colour (red = i % 16 * 16, green = i // 16 * 16), which survives
H.264 and yuv420p, so a test can read back which source frames were kept.
"""

import os
import pickle

import av
import numpy as np
import pytest

from trafficvlm import video
from trafficvlm.config import VideoSpec
from trafficvlm.video import FrameCache, VideoError, frame_span, load_clip, probe

SMALL = dict(min_pixels=28 * 28, max_pixels=56 * 56)  # keeps 64x48 frames tiny: resized to 56x56


def make_clip(path, n=100, fps=10, width=64, height=48, gop=None, faststart=False, offset=0):
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(n):
            img = np.full((height, width, 3), 128, np.uint8)
            img[..., 0] = (i + offset) % 16 * 16
            img[..., 1] = (i + offset) // 16 * 16
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def frame_numbers(frames):
    red = frames[..., 0].mean(axis=(1, 2)) / 16
    green = frames[..., 1].mean(axis=(1, 2)) / 16
    return (np.round(red) + 16 * np.round(green)).astype(int).tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    plain = make_clip(d / "plain.mp4")
    fast = make_clip(d / "fast.mp4", faststart=True)
    data = plain.read_bytes()
    (d / "cut.mp4").write_bytes(data[: len(data) // 2])  # moov atom (index) is at the end: lost
    fast_data = fast.read_bytes()
    (d / "cut_fast.mp4").write_bytes(fast_data[: len(fast_data) // 2])  # index intact, frames missing
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    return d


def test_probe(clips):
    info = probe(clips / "plain.mp4")
    assert (info.width, info.height, info.fps, info.num_frames, info.duration) == (64, 48, 10.0, 100, 10.0)


def test_fps_sampling_picks_the_planned_frames(clips):
    spec = VideoSpec(fps=2, **SMALL)
    clip = load_clip(clips / "plain.mp4", spec, cache=None)
    # 100 frames at 10 fps, 2 fps -> 20 frames over 0..99
    assert clip.indices == np.linspace(0, 99, 20).round().astype(int).tolist()
    assert clip.frames.shape == (20, 56, 56, 3) and clip.frames.dtype == np.uint8
    assert frame_numbers(clip.frames) == clip.indices
    assert clip.second_per_grid == 1.0 and clip.video_fps == 10.0
    assert clip.plan.grid_thw == (10, 4, 4) and clip.plan.vision_tokens == 40


def test_clip_span_and_nframes(clips):
    spec = VideoSpec(fps=None, nframes=6, **SMALL)
    clip = load_clip(clips / "plain.mp4", spec, start=2.0, end=7.5, cache=None)
    assert clip.indices[0] == 20 and clip.indices[-1] == 75 and len(clip.indices) == 6
    assert frame_numbers(clip.frames) == clip.indices
    # nframes: second_per_grid follows the sample rate achieved over the 56-frame span
    assert clip.second_per_grid == pytest.approx(2 / (6 / 56 * 10))


def test_seek_into_a_long_gop_clip(tmp_path):
    path = make_clip(tmp_path / "gop.mp4", n=120, gop=12, offset=0)
    clip = load_clip(path, VideoSpec(fps=1, **SMALL), start=6.3, end=11.0, cache=None)
    assert clip.indices[0] == 63
    assert frame_numbers(clip.frames) == clip.indices


def test_a_seek_that_overshoots_falls_back_to_decoding_from_the_start(tmp_path, monkeypatch, caplog):
    path = make_clip(tmp_path / "gop.mp4", n=120, gop=12)
    real_seek = video._seek
    monkeypatch.setattr(video, "_seek", lambda c, s, pts: real_seek(c, s, pts + 30 * 1024))  # 3 s too far
    clip = load_clip(path, VideoSpec(fps=1, **SMALL), start=6.3, end=11.0, cache=None)
    assert frame_numbers(clip.frames) == clip.indices and clip.indices[0] == 63
    assert "overshot" in caplog.text


def test_resize_downscales_to_the_pixel_cap(clips):
    clip = load_clip(clips / "plain.mp4", VideoSpec(fps=1, min_pixels=28 * 28, max_pixels=28 * 28), cache=None)
    assert clip.frames.shape[1:] == (28, 28, 3)
    assert frame_numbers(clip.frames) == clip.indices  # flat colours survive bicubic resampling


def test_frame_span_matches_qwen_rules():
    assert frame_span(100, 10.0) == (0, 99)
    assert frame_span(100, 10.0, 2.01, 7.59) == (21, 75)  # start rounds up, end rounds down
    assert frame_span(100, 10.0, None, 50.0) == (0, 99)   # clamped to the video
    assert frame_span(100, 10.0, -1.0, None) == (0, 99)
    with pytest.raises(ValueError, match="selects no frames"):
        frame_span(100, 10.0, 12.0, 20.0)


def test_span_outside_the_video_is_a_video_error(clips):
    with pytest.raises(VideoError, match="selects no frames") as err:
        load_clip(clips / "plain.mp4", VideoSpec(fps=1, **SMALL), start=20.0, end=30.0, cache=None)
    assert err.value.path == str(clips / "plain.mp4")


def test_cache_hit_then_invalidated_by_a_changed_file(tmp_path):
    path = make_clip(tmp_path / "v.mp4", n=40)
    cache = FrameCache(tmp_path / "cache")
    spec = VideoSpec(fps=2, **SMALL)
    first = load_clip(path, spec, 1.0, 3.0, cache=cache)
    second = load_clip(path, spec, 1.0, 3.0, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first.frames, second.frames)
    assert second.plan == first.plan and second.indices == first.indices
    load_clip(path, spec, 0.0, 3.0, cache=cache)  # another span is another entry
    assert cache.misses == 2
    make_clip(path, n=40, offset=50)  # same name, new content
    os.utime(path, ns=(1, 1))  # force a different mtime even on coarse clocks
    changed = load_clip(path, spec, 1.0, 3.0, cache=cache)
    assert cache.misses == 3
    assert frame_numbers(changed.frames) == [i + 50 for i in changed.indices]
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # writes are tmp + rename


def test_damaged_cache_entry_is_a_miss(tmp_path):
    path = make_clip(tmp_path / "v.mp4", n=30)
    cache = FrameCache(tmp_path / "cache")
    spec = VideoSpec(fps=2, **SMALL)
    load_clip(path, spec, cache=cache)
    (npy,) = (tmp_path / "cache").rglob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    clip = load_clip(path, spec, cache=cache)
    assert cache.hits == 0 and frame_numbers(clip.frames) == clip.indices


def test_default_cache_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAFFICVLM_CACHE", str(tmp_path / "c"))
    path = make_clip(tmp_path / "v.mp4", n=20)
    load_clip(path, VideoSpec(fps=2, **SMALL))
    assert list((tmp_path / "c").rglob("*.npy"))
    assert video.default_cache().root == tmp_path / "c"


@pytest.mark.parametrize("name, reason", [
    ("missing.mp4", "no such file"),
    ("empty.mp4", "empty file"),
    ("cut.mp4", "not a readable video"),
    ("text.mp4", "not a readable video"),
])
def test_bad_files_raise_video_error(clips, name, reason):
    path = clips / name
    for call in (lambda: probe(path, timeout_s=10), lambda: load_clip(path, VideoSpec(**SMALL), timeout_s=10)):
        with pytest.raises(VideoError, match=reason) as err:
            call()
        assert err.value.path == str(path) and str(err.value).startswith(f"{path}: ")


def test_truncated_stream_is_an_error_not_a_short_clip(clips):
    with pytest.raises(VideoError, match="truncated") as err:
        load_clip(clips / "cut_fast.mp4", VideoSpec(fps=2, **SMALL), cache=None, timeout_s=10)
    assert "decoded" in err.value.reason


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match="no video stream"):
        probe(path)


def test_deadline_is_checked_while_decoding(clips):
    with pytest.raises(VideoError, match="timeout"):
        load_clip(clips / "plain.mp4", VideoSpec(**SMALL), cache=None, timeout_s=0)


def test_video_error_survives_pickling():
    err = pickle.loads(pickle.dumps(VideoError("/d/x.mp4", "bad")))
    assert (err.path, err.reason, str(err)) == ("/d/x.mp4", "bad", "/d/x.mp4: bad")
