"""`trafficvlm prepare` on a small hand-written WTS tree: exact LLaVA output, bad input, strict mode, idempotence.

    .venv/bin/python -m pytest -q tests/test_prepare.py
"""

import json
from collections import Counter

import av
import numpy as np
import pytest

from trafficvlm import video
from trafficvlm.cli import main
from trafficvlm.records import read_llava
from trafficvlm.stages.prepare import PrepareError, run_prepare

S1 = "20230707_8_SN46_T1"    # July naming: <S>_Camera<k>_<i>.mp4; has a vehicle view
S2 = "20230922_15_CN37_T1"   # Sept naming: <S>_192.168.0.<x>_<i>.mp4; no environment file
N = "20231013_101813_normal_192.168.0.11_1_event_1"  # normal_trimmed: id == overhead video stem

VIDEOS = [
    f"videos/train/{S1}/overhead_view/{S1}_Camera1_0.mp4",
    f"videos/train/{S1}/overhead_view/{S1}_Camera2_1.mp4",
    f"videos/train/{S1}/vehicle_view/{S1}_vehicle_view.mp4",
    f"videos/train/{S2}/overhead_view/{S2}_192.168.0.11_1.mp4",
    f"videos/train/normal_trimmed/{N}/overhead_view/{N}.mp4",
    "external/BDD_PC_5K/videos/train/video1005.mp4",
]

ANNOTATIONS = {
    f"annotations/vqa/train/{S1}/environment/{S1}.json": """
[{"id": 722,
  "overhead_videos": ["20230707_8_SN46_T1_Camera1_0.mp4", "20230707_8_SN46_T1_Camera2_1.mp4"],
  "environment": [
    {"question": "What is the road inclination in the scene?",
     "a": "Steep downhill", "b": "Level", "c": "Gentle downhill", "d": "Steep uphill", "correct": "b"},
    {"question": "Are there street lights in the scene?", "a": "Yes", "b": "No", "correct": "a"},
    {"question": "Where is the sidewalk in the scene?",
     "a": "Both sides", "b": "Not both sides", "c": "Only on the left", "correct": "c"}]}]""",
    f"annotations/vqa/train/{S1}/overhead_view/{S1}.json": """
[{"id": 722, "overhead_videos": ["20230707_8_SN46_T1_Camera1_0.mp4"],
  "event_phase": [
    {"start_time": "0.6", "end_time": "0.9", "labels": ["avoidance"],
     "conversations": [{"question": "What is the orientation of the pedestrian's body?",
                        "a": "Same direction as the vehicle", "b": "Diagonally to the left",
                        "c": "Perpendicular to the vehicle and to the right", "d": "Opposite direction",
                        "correct": "c"}]},
    {"start_time": "0.1", "end_time": "0.35", "labels": ["pre-recognition"],
     "conversations": [{"question": "What is vehicle's field of view?",
                        "a": "Pedestrian is visible", "b": "Pedestrian is not visible", "correct": "a"}]}]}]""",
    f"annotations/vqa/train/{S1}/vehicle_view/{S1}.json": """
[{"vehicle_view": "20230707_8_SN46_T1_vehicle_view.mp4",
  "event_phase": [
    {"start_time": "0.5", "end_time": "0.8", "labels": ["3"],
     "conversations": [{"question": "What is the action taken by vehicle?",
                        "a": "Going straight", "b": "Turning right", "c": "Stopped", "correct": "c"}]},
    {"start_time": "0.2", "end_time": "0.45", "labels": [1],
     "conversations": [{"question": "What is the pedestrian's awareness regarding vehicle?",
                        "a": "Notices the vehicle", "b": "Unaware of the vehicle", "c": "Cannot be determined",
                        "correct": "b"}]}]}]""",
    f"annotations/vqa/train/{S2}/overhead_view/{S2}.json": """
[{"id": 901, "overhead_videos": ["20230922_15_CN37_T1_192.168.0.11_1.mp4"],
  "event_phase": [
    {"start_time": "0.0", "end_time": "0.5", "labels": ["judgement"],
     "conversations": [{"question": "What is pedestrian's speed?",
                        "a": "Slow", "b": "Normal", "c": "Fast", "d": "Standing still", "correct": "d"}]}]}]""",
    f"annotations/vqa/train/normal_trimmed/{N}/environment/{N}.json": """
[{"id": 5001, "overhead_videos": ["20231013_101813_normal_192.168.0.11_1_event_1.mp4"],
  "environment": [
    {"question": "What is weather in the scenario?", "a": "Sunny", "b": "Cloudy", "c": "Rainy", "d": "Snowy",
     "correct": "b"},
    {"question": "Is pedestrian wearning a hat?", "a": "Yes", "b": "No", "correct": "b"}]}]""",
    "external/BDD_PC_5K/annotations/vqa/train/video1005/overhead_view/video1005.json": """
[{"videos": ["video1005.mp4"],
  "event_phase": [
    {"start_time": "0.25", "end_time": "0.75", "labels": ["judgment"],
     "conversations": [{"question": "What is relative distance of pedestrian from vehicle?",
                        "a": "Very close", "b": "Close", "c": "Far", "correct": "b"}]}]}]""",
}

# What the reference converter writes for this tree (ids <video stem>_<question index>), in its order.
EXPECTED_ENVIRONMENT = r"""[
 {"id": "20230707_8_SN46_T1_Camera1_0_0", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera1_0.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n What is the road inclination in the scene? \n A: Steep downhill \n B: Level \n C: Gentle downhill \n D: Steep uphill \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]},
 {"id": "20230707_8_SN46_T1_Camera1_0_1", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera1_0.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n Are there street lights in the scene? \n A: Yes \n B: No \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "A"}]},
 {"id": "20230707_8_SN46_T1_Camera1_0_2", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera1_0.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n Where is the sidewalk in the scene? \n A: Both sides \n B: Not both sides \n C: Only on the left \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "C"}]},
 {"id": "20230707_8_SN46_T1_Camera2_1_0", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera2_1.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n What is the road inclination in the scene? \n A: Steep downhill \n B: Level \n C: Gentle downhill \n D: Steep uphill \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]},
 {"id": "20230707_8_SN46_T1_Camera2_1_1", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera2_1.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n Are there street lights in the scene? \n A: Yes \n B: No \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "A"}]},
 {"id": "20230707_8_SN46_T1_Camera2_1_2", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera2_1.mp4", "type": "environment",
  "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n Where is the sidewalk in the scene? \n A: Both sides \n B: Not both sides \n C: Only on the left \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "C"}]},
 {"id": "20231013_101813_normal_192.168.0.11_1_event_1_0", "wts_id": 5001,
  "video": "normal_trimmed/20231013_101813_normal_192.168.0.11_1_event_1/overhead_view/20231013_101813_normal_192.168.0.11_1_event_1.mp4",
  "type": "environment", "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n What is weather in the scenario? \n A: Sunny \n B: Cloudy \n C: Rainy \n D: Snowy \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]},
 {"id": "20231013_101813_normal_192.168.0.11_1_event_1_1", "wts_id": 5001,
  "video": "normal_trimmed/20231013_101813_normal_192.168.0.11_1_event_1/overhead_view/20231013_101813_normal_192.168.0.11_1_event_1.mp4",
  "type": "environment", "phase": "full_video", "conversations": [
   {"from": "human", "value": "<video> \n Is pedestrian wearning a hat? \n A: Yes \n B: No \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]}
]"""

# Phases come out in canonical order (prerecognition first), whatever the file's order.
EXPECTED_OVERHEAD = r"""[
 {"id": "20230707_8_SN46_T1_Camera1_0_prerecognition_0", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera1_0.mp4", "type": "overhead",
  "phase": "prerecognition", "video_start": 0.1, "video_end": 0.35, "view": "overhead_view", "split": "train",
  "scenario": "20230707_8_SN46_T1", "conversations": [
   {"from": "human", "value": "<video> \n What is vehicle's field of view? \n A: Pedestrian is visible \n B: Pedestrian is not visible \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "A"}]},
 {"id": "20230707_8_SN46_T1_Camera1_0_avoidance_0", "wts_id": 722,
  "video": "20230707_8_SN46_T1/overhead_view/20230707_8_SN46_T1_Camera1_0.mp4", "type": "overhead",
  "phase": "avoidance", "video_start": 0.6, "video_end": 0.9, "view": "overhead_view", "split": "train",
  "scenario": "20230707_8_SN46_T1", "conversations": [
   {"from": "human", "value": "<video> \n What is the orientation of the pedestrian's body? \n A: Same direction as the vehicle \n B: Diagonally to the left \n C: Perpendicular to the vehicle and to the right \n D: Opposite direction \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "C"}]},
 {"id": "20230922_15_CN37_T1_192.168.0.11_1_judgement_0", "wts_id": 901,
  "video": "20230922_15_CN37_T1/overhead_view/20230922_15_CN37_T1_192.168.0.11_1.mp4", "type": "overhead",
  "phase": "judgement", "video_start": 0.0, "video_end": 0.5, "view": "overhead_view", "split": "train",
  "scenario": "20230922_15_CN37_T1", "conversations": [
   {"from": "human", "value": "<video> \n What is pedestrian's speed? \n A: Slow \n B: Normal \n C: Fast \n D: Standing still \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "D"}]}
]"""

EXPECTED_VEHICLE_FIRST = r"""
 {"id": "20230707_8_SN46_T1_vehicle_view_recognition_0",
  "video": "20230707_8_SN46_T1/vehicle_view/20230707_8_SN46_T1_vehicle_view.mp4", "type": "vehicle",
  "phase": "recognition", "video_start": 0.2, "video_end": 0.45, "view": "vehicle_view", "split": "train",
  "scenario": "20230707_8_SN46_T1", "conversations": [
   {"from": "human", "value": "<video> \n What is the pedestrian's awareness regarding vehicle? \n A: Notices the vehicle \n B: Unaware of the vehicle \n C: Cannot be determined \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]}"""

EXPECTED_BDD = r"""[
 {"id": "video1005_judgement_0", "video": "video1005.mp4", "type": "bdd", "phase": "judgement",
  "video_start": 0.25, "video_end": 0.75, "view": "overhead_view", "split": "train", "scenario": "video1005",
  "conversations": [
   {"from": "human", "value": "<video> \n What is relative distance of pedestrian from vehicle? \n A: Very close \n B: Close \n C: Far \n \nAnswer with the option's letter from the given choices directly."},
   {"from": "gpt", "value": "B"}]}
]"""

ALL = ["--subsets", "environment,overhead,vehicle,bdd", "--splits", "train"]


def _mp4(path, seconds=1.0, fps=10):
    """A tiny real H.264 MP4 (32x32): enough for probe to decode a frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture
def wts_root(tmp_path):
    root = tmp_path / "wts"
    for rel in VIDEOS:
        _mp4(root / rel)
    for rel, text in ANNOTATIONS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _load(path):
    return json.loads(path.read_text())


def test_good_tree_gives_the_recipes_entries_exactly(wts_root, tmp_path, capsys):
    out = tmp_path / "llava"
    assert main(["prepare", str(wts_root), "--out", str(out), *ALL]) == 0
    assert _load(out / "environment_mcq_llava_train.json") == json.loads(EXPECTED_ENVIRONMENT)
    assert _load(out / "overhead_mcq_llava_train.json") == json.loads(EXPECTED_OVERHEAD)
    vehicle = _load(out / "vehicle_mcq_llava_train.json")
    assert vehicle[0] == json.loads(EXPECTED_VEHICLE_FIRST)
    assert [(e["id"], e["phase"]) for e in vehicle] == [
        (f"{S1}_vehicle_view_recognition_0", "recognition"), (f"{S1}_vehicle_view_action_0", "action")]
    assert _load(out / "bdd_mcq_llava_train.json") == json.loads(EXPECTED_BDD)
    clip = read_llava(out / "overhead_mcq_llava_train.json")[1]  # train and eval read them back as records
    assert (clip.phase, clip.video_start, clip.video_end, clip.answer) == ("avoidance", 0.6, 0.9, "c")

    report = _load(out / "prepare_report.json")
    assert report["ok"] and report["problems"] == []
    assert report["note_kinds"] == {"no-environment-file": 1, "no-overhead-view-file": 1, "no-vehicle-view-file": 2}
    env_note = next(n for n in report["notes"] if n["kind"] == "no-environment-file")
    assert env_note["path"] == f"annotations/vqa/train/{S2}/environment/{S2}.json"
    assert env_note["reason"] == "Environment file not found"
    media = {o["path"]: o["media_dir"] for o in report["outputs"]}
    assert media["environment_mcq_llava_train.json"] == "videos/train"
    assert media["bdd_mcq_llava_train.json"] == "external/BDD_PC_5K/videos/train"
    env = report["counts"]["train"]["environment"]
    assert (env["samples"], env["videos"]) == (8, 3)
    assert env["questions"]["Are there street lights in the scene?"] == 2
    assert report["counts"]["train"]["vehicle"]["phases"] == {
        "prerecognition": 0, "recognition": 1, "judgement": 0, "action": 1, "avoidance": 0}
    assert "environment_mcq_llava_train.json" in capsys.readouterr().out


def test_each_video_is_probed_once(wts_root, tmp_path, monkeypatch):
    calls = Counter()
    real_probe = video.probe

    def counting_probe(path, timeout_s=30.0):
        calls[str(path)] += 1
        return real_probe(path, timeout_s=timeout_s)

    monkeypatch.setattr(video, "probe", counting_probe)
    report = run_prepare(wts_root, tmp_path / "out", subsets=("environment", "overhead", "vehicle", "bdd"),
                         splits=("train",), workers=3)
    assert report.ok
    # Camera1_0 serves 3 environment and 2 overhead questions; still one probe.
    assert sorted(calls.values()) == [1] * len(VIDEOS)


def _break(root):
    """A corrupt MP4, a truncated annotation file, an answer letter outside the options, a missing video."""
    (root / VIDEOS[1]).write_bytes(np.random.default_rng(0).bytes(4096))
    vehicle = root / f"annotations/vqa/train/{S1}/vehicle_view/{S1}.json"
    vehicle.write_text(vehicle.read_text()[:150])
    bdd = root / "external/BDD_PC_5K/annotations/vqa/train/video1005/overhead_view/video1005.json"
    bdd.write_text(bdd.read_text().replace('"correct": "b"', '"correct": "d"'))
    (root / VIDEOS[3]).unlink()


BAD_FILES = {
    "bad-video": VIDEOS[1],
    "invalid-json": f"annotations/vqa/train/{S1}/vehicle_view/{S1}.json",
    "bad-answer": "external/BDD_PC_5K/annotations/vqa/train/video1005/overhead_view/video1005.json",
    "missing-video": VIDEOS[3],
}


def test_bad_input_is_skipped_and_reported_by_file(wts_root, tmp_path, capsys):
    _break(wts_root)
    out = tmp_path / "llava"
    assert main(["prepare", str(wts_root), "--out", str(out), *ALL, "--workers", "2"]) == 0
    report = _load(out / "prepare_report.json")
    assert not report["ok"]
    assert {p["kind"]: p["path"] for p in report["problems"]} == BAD_FILES
    problems = {p["kind"]: p for p in report["problems"]}
    assert problems["bad-answer"]["reason"].startswith("event_phase[0].conversations[0]: correct letter 'd'")
    assert problems["bad-video"]["skipped"] == "3 environment/train samples"
    printed = capsys.readouterr().out
    assert all(path in printed for path in BAD_FILES.values())
    # The good parts are still written; the bad ones are not.
    env = _load(out / "environment_mcq_llava_train.json")
    assert [e["id"] for e in env] == [f"{S1}_Camera1_0_{i}" for i in range(3)] + [f"{N}_{i}" for i in range(2)]
    assert _load(out / "vehicle_mcq_llava_train.json") == []
    assert _load(out / "bdd_mcq_llava_train.json") == []
    assert [e["id"] for e in _load(out / "overhead_mcq_llava_train.json")] == [
        f"{S1}_Camera1_0_prerecognition_0", f"{S1}_Camera1_0_avoidance_0"]


def test_strict_fails_names_the_count_and_the_report(wts_root, tmp_path, capsys):
    _break(wts_root)
    out = tmp_path / "llava"
    assert main(["prepare", str(wts_root), "--out", str(out), *ALL, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and str(out / "prepare_report.json") in err
    assert sorted(p.name for p in out.iterdir()) == ["prepare_report.json"]  # nothing half-good to consume
    with pytest.raises(PrepareError) as info:
        run_prepare(wts_root, tmp_path / "api", splits=("train",), strict=True)
    assert [p.kind for p in info.value.report.problems] == ["bad-video"]


def test_no_check_videos_still_requires_the_files(wts_root, tmp_path):
    _break(wts_root)
    report = run_prepare(wts_root, tmp_path / "out", subsets=("environment", "overhead"), splits=("train",),
                         check_videos=False)
    assert [(p.kind, p.path) for p in report.problems] == [("missing-video", VIDEOS[3])]  # S2's overhead video
    assert report.counts["train"]["environment"]["samples"] == 8


def test_outputs_are_byte_identical_across_runs(wts_root, tmp_path):
    _break(wts_root)  # problems and notes must be deterministic too
    for name in ("a", "b", "b"):
        assert main(["prepare", str(wts_root), "--out", str(tmp_path / name), *ALL, "--workers", "3"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 5
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_phase_times_checked_against_the_video_and_duplicate_ids(wts_root, tmp_path):
    overhead = wts_root / f"annotations/vqa/train/{S1}/overhead_view/{S1}.json"
    text = overhead.read_text().replace('"0.6", "end_time": "0.9"', '"1.5", "end_time": "1.9"')  # video is 1 s
    overhead.write_text(text.replace('"0.1", "end_time": "0.35"', '"0.1", "end_time": "2.5"'))
    env = wts_root / f"annotations/vqa/train/normal_trimmed/{N}/environment/{N}.json"
    env.write_text(env.read_text().replace('"overhead_videos": ["{0}.mp4"]'.format(N),
                                           '"overhead_videos": ["{0}.mp4", "{0}.mp4"]'.format(N)))
    report = run_prepare(wts_root, tmp_path / "out", subsets=("environment", "overhead"), splits=("train",))
    problems = {p.kind: p for p in report.problems}
    assert sorted(problems) == ["bad-time", "duplicate-id"]
    assert problems["bad-time"].path == overhead.relative_to(wts_root).as_posix()
    assert "phase avoidance starts at 1.5 s, after the end" in problems["bad-time"].reason
    assert problems["duplicate-id"].skipped == f"2 environment/train samples e.g. '{N}_0'"
    [note] = [n for n in report.notes if n.kind == "phase-past-video-end"]
    assert "phase prerecognition ends at 2.5 s" in note.reason
    assert report.counts["train"]["overhead"]["phases"]["prerecognition"] == 1  # kept, clipped at the end


def test_bad_arguments(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "WTS root is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown subset"):
        run_prepare(tmp_path, tmp_path / "o", subsets=("captions",))


def _synthesize():
    """helper-4's generator, when it is there (the test is skipped before it lands)."""
    synth = pytest.importorskip("trafficvlm.synth")
    if not hasattr(synth, "synthesize"):
        pytest.skip("trafficvlm.synth.synthesize not written yet")
    return synth.synthesize


def test_synth_round_trip_is_accepted_strictly_and_matches_its_ground_truth(tmp_path):
    root, out = tmp_path / "wts", tmp_path / "llava"
    _synthesize()(root, seed=0, scenarios=4, size=(32, 32), fps=4.0, duration=2.0, progress=False)
    assert main(["prepare", str(root), "--out", str(out), "--strict", "--workers", "2",
                 "--subsets", "environment,overhead,vehicle,bdd"]) == 0
    truth = _load(root / "synth_ground_truth.json")
    counts = _load(out / "prepare_report.json")["counts"]
    for split in ("train", "val"):
        assert {sub: c["samples"] for sub, c in counts[split].items()} == _expected_counts(truth, split), split
    # Every environment answer is the option the generator drew.
    key_of = {q["question"]: key for key, q in truth["questions"].items()}
    scene_of = {s["id"]: s for s in truth["scenes"] if s["kind"] != "bdd"}
    entries = read_llava(out / "environment_mcq_llava_train.json")
    assert entries
    for rec in entries:
        drawn = scene_of[rec.meta["wts_id"]]["environment"][key_of[rec.question]]
        assert rec.options[rec.answer] == drawn, rec.id


def _expected_counts(truth, split):
    """Samples per subset, from the generator's record of what it wrote."""
    scenes = [s for s in truth["scenes"] if s["split"] == split]
    wts_scenes = [s for s in scenes if s["kind"] in ("main", "normal")]
    per_phase = {s["scene"]: sum(len(p["answers"]) for p in s["phases"]) for s in scenes}
    return {
        "environment": sum(len(s["cameras"]) * len(s["environment"]) for s in wts_scenes),
        "overhead": sum(len(s["cameras"]) * per_phase[s["scene"]] for s in wts_scenes),
        "vehicle": sum(per_phase[s["scene"]] for s in wts_scenes if s["vehicle_view"]),
        "bdd": sum(per_phase[s["scene"]] for s in scenes if s["kind"] == "bdd"),
    }
