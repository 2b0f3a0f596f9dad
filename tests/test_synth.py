"""The synthetic WTS generator: layout and schemas of wts-format.md, decodable videos, balanced answers,
cues that match the ground truth, and byte-for-byte reproducibility."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from trafficvlm.synth import synthesize
from trafficvlm.synth.scene import ENV_QUESTIONS, PHASE_NAMES, Timeline, plan_dataset
from trafficvlm.synth.render import UPPER, Canvas, dashcam_frames, overhead_frames

SMALL = dict(scenarios=4, normal=1, bdd=1, size=(64, 48), fps=4.0, duration=2.0, progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wts")
    synthesize(root, seed=3, **SMALL)
    return root


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path):
    return json.loads(path.read_text())


def _check_mcq(q: dict) -> None:
    letters = [k for k in "abcd" if k in q]
    assert set(q) <= {"question", "a", "b", "c", "d", "correct"}, q
    assert letters == list("abcd"[:len(letters)]) and len(letters) >= 2, q
    assert q["correct"] in letters, q


def _check_phases(phases: list, caption: bool) -> None:
    assert len(phases) == 5
    for ph in phases:
        start, end = float(ph["start_time"]), float(ph["end_time"])   # strings that parse as seconds
        assert isinstance(ph["start_time"], str) and 0 <= start < end
        label = ph["labels"][0]
        assert label in {str(i) for i in range(5)} | set(PHASE_NAMES)
        if caption:
            assert ph["caption_pedestrian"] and ph["caption_vehicle"]
        else:
            assert ph["conversations"]
            for q in ph["conversations"]:
                _check_mcq(q)


def test_videos_decode_with_expected_frames_and_size(tree):
    videos = sorted(tree.rglob("*.mp4"))
    assert videos
    for path in videos:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f for f in container.decode(stream)]
        assert len(frames) == 8, path
        assert (frames[0].width, frames[0].height) == (64, 48)
        assert frames[0].format.name == "yuv420p"


def test_layout_and_schemas(tree):
    gt = _load(tree / "synth_ground_truth.json")
    kinds = Counter((s["kind"], s["split"]) for s in gt["scenes"])
    assert kinds == {("main", "train"): 3, ("main", "val"): 1, ("normal", "train"): 1, ("bdd", "train"): 1}
    styles = set()
    for s in gt["scenes"]:
        sid, split = s["scene"], s["split"]
        if s["kind"] == "bdd":
            bdd = tree / "external/BDD_PC_5K"
            assert (bdd / f"videos/{split}/{sid}.mp4").is_file()
            cap = _load(bdd / f"annotations/caption/{split}/{sid}_caption.json")
            assert isinstance(cap, dict) and cap["video_name"] == f"{sid}.mp4" and isinstance(cap["fps"], str)
            _check_phases(cap["event_phase"], caption=True)
            vqa = _load(bdd / f"annotations/vqa/{split}/{sid}/overhead_view/{sid}.json")
            assert isinstance(vqa, list) and len(vqa) == 1 and vqa[0]["videos"] == [f"{sid}.mp4"]
            _check_phases(vqa[0]["event_phase"], caption=False)
            env = _load(bdd / f"annotations/vqa/{split}/{sid}/environment/{sid}.json")
            assert env[0]["videos"] == [f"{sid}.mp4"]
            box = _load(bdd / f"annotations/bbox_annotated/{split}/{sid}_bbox.json")["annotations"]
            assert all(isinstance(b["phase_number"], int) for b in box)
            continue
        rel = f"{split}/normal_trimmed/{sid}" if s["kind"] == "normal" else f"{split}/{sid}"
        for stem in s["cameras"]:
            assert (tree / f"videos/{rel}/overhead_view/{stem}.mp4").is_file()
            styles.add("normal" if "_normal_" in stem else "Camera" if "_Camera" in stem else "ip")
        if s["kind"] == "normal":
            assert s["cameras"] == [sid]       # a normal scenario's id is its video's stem
        env = _load(tree / f"annotations/vqa/{rel}/environment/{sid}.json")
        assert isinstance(env, list) and len(env) == 1
        assert set(env[0]) == {"id", "overhead_videos", "environment"}
        assert env[0]["overhead_videos"] == [f"{c}.mp4" for c in s["cameras"]]
        assert len(env[0]["environment"]) == len(ENV_QUESTIONS)
        for q in env[0]["environment"]:
            _check_mcq(q)
        views = ["overhead_view"] + (["vehicle_view"] if s["vehicle_view"] else [])
        for view in views:
            cap = _load(tree / f"annotations/caption/{rel}/{view}/{sid}_caption.json")
            assert isinstance(cap, dict)
            _check_phases(cap["event_phase"], caption=True)
            assert all(ph["labels"][0].isdigit() for ph in cap["event_phase"])
            vqa = _load(tree / f"annotations/vqa/{rel}/{view}/{sid}.json")
            assert isinstance(vqa, list) and len(vqa) == 1
            _check_phases(vqa[0]["event_phase"], caption=False)
            assert all(ph["labels"][0] in PHASE_NAMES for ph in vqa[0]["event_phase"])
            if view == "vehicle_view":
                assert vqa[0]["vehicle_view"] == f"{sid}_vehicle_view.mp4" == cap["vehicle_view"]
                assert (tree / f"videos/{rel}/vehicle_view/{sid}_vehicle_view.mp4").is_file()
        stem = s["cameras"][0]
        for kind in ("bbox_annotated", "bbox_generated"):
            boxes = _load(tree / f"annotations/{kind}/vehicle/{rel}/overhead_view/{stem}_bbox.json")["annotations"]
            assert boxes and all(len(b["bbox"]) == 4 and isinstance(b["phase_number"], str) for b in boxes)
            assert len({b["phase_number"] for b in boxes if not b["auto-generated"]}) == 5
    assert styles == {"Camera", "ip", "normal"}
    assert not (tree / "videos/normal_trimmed").exists()       # normal_trimmed lives inside a split
    with open(tree / "view_used_as_main_reference_for_multiview_scenario.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Scene", "Viewpoint1", "Viewpoint2", "Viewpoint3", "Viewpoint4"]
    assert len(rows) == 1 + 4


def test_answers_match_ground_truth(tree):
    gt = _load(tree / "synth_ground_truth.json")
    scene = next(s for s in gt["scenes"] if s["kind"] == "main")
    rel, sid = f"{scene['split']}/{scene['scene']}", scene["scene"]
    env = _load(tree / f"annotations/vqa/{rel}/environment/{sid}.json")[0]["environment"]
    for q, spec in zip(env, ENV_QUESTIONS):
        assert q["question"] == spec.text and q[q["correct"]] == scene["environment"][spec.key]
    phases = _load(tree / f"annotations/vqa/{rel}/overhead_view/{sid}.json")[0]["event_phase"]
    for ph, truth in zip(phases, scene["phases"]):
        got = {q["question"]: q[q["correct"]] for q in ph["conversations"]}
        assert got["What is vehicle's field of view?"] == truth["answers"]["visible"]
        assert got["What is the action taken by vehicle?"] == truth["answers"]["vehicle_action"]


def test_answers_are_balanced():
    scenes = [s for s in plan_dataset(seed=0, scenarios=24, normal=0, bdd=0, val_fraction=0.25)]
    for q in ENV_QUESTIONS:
        counts = Counter(s.env[q.key] for s in scenes)
        assert set(counts) == set(q.options), q.key
        assert max(counts.values()) - min(counts.values()) <= 2, (q.key, counts)
    moving = Counter(p.moving for s in scenes for p in s.phases)
    visible = Counter(p.visible for s in scenes for p in s.phases)
    assert abs(moving[True] - moving[False]) <= 2 and abs(visible[True] - visible[False]) <= 2
    positions = Counter(p.position for s in scenes for p in s.phases if p.visible)
    assert max(positions.values()) - min(positions.values()) <= 2
    # No single attribute value dominates a split either.
    val = [s for s in scenes if s.split == "val"]
    assert len(val) == 6 and len({s.env["weather"] for s in val}) >= 3


def test_same_seed_same_bytes_other_seed_differs(tree, tmp_path):
    again = tmp_path / "again"
    synthesize(again, seed=3, **SMALL)
    assert _tree_hash(again) == _tree_hash(tree)
    other = tmp_path / "other"
    synthesize(other, seed=4, **SMALL)
    theirs, ours = _tree_hash(other), _tree_hash(tree)
    assert theirs != ours
    mp4 = [k for k in ours if k.endswith(".mp4") and k in theirs]
    assert any(ours[k] != theirs[k] for k in mp4) or set(theirs) != set(ours)


def test_parallel_rendering_gives_the_same_bytes(tree, tmp_path):
    """--workers changes who renders each video, never what it contains."""
    parallel = tmp_path / "parallel"
    summary = synthesize(parallel, seed=3, workers=2, **SMALL)
    assert summary.videos >= 4
    assert _tree_hash(parallel) == _tree_hash(tree)


def test_pixels_show_the_ground_truth():
    """Mean sky colour tells the weather; ground luminance the brightness; the road tint wet vs dry."""
    scenes = plan_dataset(seed=0, scenarios=24, normal=0, bdd=0, val_fraction=0.0)
    tl, c = Timeline(fps=4.0, duration=2.0), Canvas(64, 48)
    sky: dict[str, list] = {}
    ground: dict[str, list] = {}
    road: dict[str, list] = {}
    for s in scenes:
        frame = next(overhead_frames(s, tl, c, camera=0)).astype(float)
        sky.setdefault(s.env["weather"], []).append(frame[:10].mean(axis=(0, 1)))
        ground.setdefault(s.env["brightness"], []).append(frame[40:45, 5:12].mean())  # grass left of the road
        road.setdefault(s.env["surface"], []).append(frame[13:17, 8:10].mean(axis=(0, 1)))  # far road, between cars
    mean = {w: np.mean(v, axis=0) for w, v in sky.items()}
    assert mean["Clear"][2] > mean["Clear"][0] + 100                       # saturated blue
    assert mean["Snowy"].mean() > mean["Cloudy"].mean() > mean["Rainy"].mean() + 40
    for w, values in sky.items():        # every sky is nearer its own weather's mean than any other
        for v in values:
            assert min(mean, key=lambda k: np.abs(mean[k] - v).sum()) == w
    assert min(ground["Bright"]) > max(ground["Dim"]) and min(ground["Dim"]) > max(ground["Dark"])
    wet = [v[2] - v[0] for v in road["Wet"]]
    dry = [v[2] - v[0] for v in road["Dry"]]
    assert min(wet) > max(dry) + 20


def test_moving_vehicle_moves_and_stopped_one_does_not():
    scene = plan_dataset(seed=1, scenarios=4, normal=0, bdd=0, val_fraction=0.0)[0]
    tl, c = Timeline(fps=4.0, duration=10.0), Canvas(64, 48)
    frames = list(overhead_frames(scene, tl, c, camera=0))
    for p, state in enumerate(scene.phases):
        start, end = tl.phase_span(p, "overhead")
        inside = [i for i in range(tl.n_frames) if start <= i / tl.fps < end]
        first, last = frames[inside[0]], frames[inside[-1]]
        changed = np.abs(first[12:].astype(int) - last[12:].astype(int)).max() > 60   # below the sky
        assert changed == state.moving, (p, state)


def test_dashcam_shows_pedestrian_and_go_stop_light():
    scenes = plan_dataset(seed=2, scenarios=8, normal=0, bdd=0, val_fraction=0.0)
    # A red shirt next to a red signal light would be ambiguous to this pixel count, not to a model.
    scene = next(s for s in scenes if not (s.env["upper_color"] == "Red" and "with signal" in s.env["formation"]))
    tl, c = Timeline(fps=4.0, duration=10.0), Canvas(64, 48)
    shirt = np.array(UPPER[scene.env["upper_color"]])
    seen = set()
    for i, frame in enumerate(dashcam_frames(scene, tl, c)):
        state = scene.phases[tl.phase_at(i / tl.fps, "vehicle")]
        ground = frame[16:39].astype(int)                  # between the sky and the guardrail/dashboard
        assert ((np.abs(ground - shirt).sum(-1) < 30).sum() > 4) == state.visible, (i, state)
        assert (frame[45, 32, 1] > 150) == state.moving, (i, state)   # dashboard light: green = moving
        seen.add((state.visible, state.moving))
    assert len(seen) >= 2


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--size"):
        synthesize(tmp_path / "a", size=(63, 48), progress=False)
    with pytest.raises(ValueError, match="frames"):
        synthesize(tmp_path / "b", fps=1, duration=2, progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        synthesize(tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="--workers"):
        synthesize(tmp_path / "d", workers=0, progress=False)


def test_cli_writes_a_tree(tmp_path, capsys):
    from trafficvlm.cli import main
    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--scenarios", "2", "--normal", "0", "--bdd", "0", "--size", "64x48",
               "--duration", "2"])
    assert rc == 0 and "videos" in capsys.readouterr().out
    assert (out / "synth_ground_truth.json").is_file()
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "x"), "--size", "64by48"])
