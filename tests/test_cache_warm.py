"""`trafficvlm cache warm`: every distinct clip decoded once, a second run all hits, keys the trainer's
load_clip finds, failures named and counted."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from trafficvlm.cache_cli import distinct_clips
from trafficvlm.cli import main
from trafficvlm.config import VideoSpec
from trafficvlm.records import read_llava, write_llava


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny synthetic WTS tree and its environment LLaVA JSON: (json, media dir)."""
    from trafficvlm.stages.prepare import run_prepare
    from trafficvlm.synth import synthesize

    root = tmp_path_factory.mktemp("wts")
    synthesize(root, seed=1, scenarios=2, normal=0, bdd=0, size=(64, 48), fps=4.0, duration=2.0,
               val_fraction=0.0, progress=False)
    out = root.parent / "llava"
    run_prepare(root, out, subsets=("environment",), check_videos=False)
    return out / "environment_mcq_llava_train.json", root / "videos" / "train"


def _warm(json_path: Path, media: Path, cache: Path, report: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["cache", "warm", str(json_path), "--media-dir", str(media), "--cache-dir", str(cache),
               "--workers", "2", "--report", str(report), *extra])
    return rc, json.loads(report.read_text())


def test_first_run_decodes_each_clip_once_second_run_hits(llava, tmp_path, capsys):
    json_path, media = llava
    records = read_llava(json_path)
    clips = distinct_clips(records)
    assert len(records) > len(clips) >= 2          # several questions share each clip
    cache = tmp_path / "cache"
    rc, first = _warm(json_path, media, cache, tmp_path / "r1.json")
    assert rc == 0 and first["clips"] == len(clips)
    assert (first["decoded"], first["hits"], first["failures"]) == (len(clips), 0, [])
    assert first["cache_bytes"] > 0 and first["video"]["max_pixels"] == 81920   # setting A by default
    rc, second = _warm(json_path, media, cache, tmp_path / "r2.json")
    assert rc == 0 and (second["decoded"], second["hits"]) == (0, len(clips))
    assert second["cache_bytes"] == first["cache_bytes"]
    assert f"{len(clips)} already cached" in capsys.readouterr().out


def test_the_trainer_finds_what_warm_wrote(llava, tmp_path):
    """Same spec from the config -> the same cache key as the trainer's load_clip."""
    from trafficvlm.video import FrameCache, load_clip

    json_path, media = llava
    cache = tmp_path / "cache"
    rc, _ = _warm(json_path, media, cache, tmp_path / "r.json", "--set", "video.fps=2")
    assert rc == 0
    rec = read_llava(json_path)[0]
    store = FrameCache(cache)
    load_clip(media / rec.video, VideoSpec(fps=2.0, max_pixels=81920), rec.video_start, rec.video_end, cache=store)
    assert (store.hits, store.misses) == (1, 0)
    other = FrameCache(cache)
    load_clip(media / rec.video, VideoSpec(fps=1.0, max_pixels=81920), rec.video_start, rec.video_end, cache=other)
    assert other.misses == 1                        # another spec is another key


def test_failures_are_named_and_fail_the_run(llava, tmp_path, capsys):
    json_path, media = llava
    records = read_llava(json_path)
    broken = tmp_path / "broken.json"
    bad = dataclasses.replace(records[0], id="gone", video="nowhere/missing.mp4")
    write_llava(broken, records + [bad])
    rc, report = _warm(broken, media, tmp_path / "cache", tmp_path / "r.json")
    assert rc == 1
    assert [f["video"] for f in report["failures"]] == ["nowhere/missing.mp4"]
    assert report["decoded"] == report["clips"] - 1
    assert "nowhere/missing.mp4" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    rc = main(["cache", "warm", str(tmp_path / "none.json"), "--media-dir", str(tmp_path)])
    assert rc == 2 and "none.json" in capsys.readouterr().err
