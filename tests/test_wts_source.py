"""sources/wts.py: the WTS layout, its quirks, and tolerant reading (no videos needed).

    .venv/bin/python -m pytest -q tests/test_wts_source.py
"""

import json

import pytest

from trafficvlm.sources import wts
from trafficvlm.sources.wts import Scenario


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("label, name", [
    ("0", "prerecognition"), (0, "prerecognition"), ("pre-recognition", "prerecognition"),
    ("pre_recognition", "prerecognition"), ("precognition", "prerecognition"), ("1", "recognition"),
    ("recognition", "recognition"), ("2", "judgement"), ("judgment", "judgement"), ("Judgement", "judgement"),
    ("3", "action"), (4, "avoidance"), (" avoidance ", "avoidance"),
])
def test_normalize_phase_table(label, name):
    assert wts.normalize_phase(label) == name


@pytest.mark.parametrize("label", ["5", 5, -1, True, "crossing", None, 1.0])
def test_normalize_phase_rejects_unknown(label):
    with pytest.raises(ValueError, match="unknown phase label"):
        wts.normalize_phase(label)


def test_parse_question_keeps_letter_order_and_lowercases_answer():
    row = {"b": "Level", "question": "Q?", "a": "Steep", "correct": "B"}
    assert wts.parse_question(row) == ("Q?", {"a": "Steep", "b": "Level"}, "b")


@pytest.mark.parametrize("row, fragment", [
    ({"question": "Q?", "a": "x", "b": "y", "correct": "c"}, "correct letter 'c' is not among the options a, b"),
    ({"question": "Q?", "a": "x", "b": "y"}, "correct letter None"),
    ({"question": "Q?", "a": "x", "c": "y", "correct": "a"}, "consecutive letters"),
    ({"question": "Q?", "a": "x", "correct": "a"}, "at least two"),
    ({"a": "x", "b": "y", "correct": "a"}, "no question text"),
    ("not an object", "expected an object"),
])
def test_parse_question_rejects_with_reason(row, fragment):
    with pytest.raises(wts.BadItem) as info:
        wts.parse_question(row)
    assert fragment in str(info.value)


def test_scenarios_sorted_main_then_normal_trimmed(tmp_path):
    for name in ["b_scn", "a_scn", "normal_trimmed/z_evt", "normal_trimmed/c_evt"]:
        (tmp_path / "annotations/vqa/train" / name).mkdir(parents=True)
    got = [(s.id, s.kind) for s in wts.iter_scenarios(tmp_path, "train")]
    assert got == [("a_scn", "main"), ("b_scn", "main"), ("c_evt", "normal"), ("z_evt", "normal")]
    normal = Scenario("c_evt", "train", "normal")
    assert normal.annotation_dir == "annotations/vqa/train/normal_trimmed/c_evt"
    assert normal.video_rel("overhead_view", "c_evt.mp4") == "normal_trimmed/c_evt/overhead_view/c_evt.mp4"
    assert Scenario("video7", "val", "bdd").video_rel("overhead_view", "video7.mp4") == "video7.mp4"
    assert wts.media_dir("bdd", "val") == "external/BDD_PC_5K/videos/val"
    assert wts.media_dir("vehicle", "train") == "videos/train"


ENV_OK = """[{"id": 7, "overhead_videos": ["S_Camera1_0.mp4"], "environment": [
  {"question": "Q1?", "a": "x", "b": "y", "correct": "a"},
  {"question": "Q2?", "a": "x", "b": "y", "correct": "z"},
  {"question": "Q3?", "a": "x", "b": "y", "c": "w", "correct": "c"}]}]"""


def test_environment_bad_question_is_skipped_and_indices_stay_file_positions(tmp_path):
    _write(tmp_path, "annotations/vqa/train/S/environment/S.json", ENV_OK)
    result = wts.read_environment(tmp_path, Scenario("S", "train", "main"))
    assert [r.id for r in result.records] == ["S_Camera1_0_0", "S_Camera1_0_2"]  # Q2 dropped, Q3 keeps index 2
    assert result.records[0].meta["wts_id"] == 7
    [problem] = result.problems
    assert problem.kind == "bad-answer"
    assert problem.path == "annotations/vqa/train/S/environment/S.json"
    assert "environment[1]" in problem.reason and "'z'" in problem.reason


@pytest.mark.parametrize("text, kind, fragment", [
    (ENV_OK[:60], "invalid-json", "not valid JSON"),
    ('{"id": 7}', "bad-schema", "expected a JSON array holding one object, got dict"),
    ("[]", "bad-schema", "empty array"),
    ('[{"id": 7, "environment": []}]', "bad-schema", "missing key(s) overhead_videos"),
    ('[{"id": 7, "overhead_videos": ["../x.mp4"], "environment": []}]', "bad-schema", "not a plain file name"),
])
def test_malformed_environment_file_is_one_problem_never_an_exception(tmp_path, text, kind, fragment):
    _write(tmp_path, "annotations/vqa/train/S/environment/S.json", text)
    result = wts.read_environment(tmp_path, Scenario("S", "train", "main"))
    assert result.records == []
    [problem] = result.problems
    assert (problem.kind, problem.path) == (kind, "annotations/vqa/train/S/environment/S.json")
    assert fragment in problem.reason


def test_missing_environment_file_is_a_note(tmp_path):
    (tmp_path / "annotations/vqa/train/S/overhead_view").mkdir(parents=True)
    result = wts.read_subset(tmp_path, "environment", "train")
    assert result.records == [] and result.problems == []
    [note] = result.notes
    assert note.kind == "no-environment-file" and note.reason == "Environment file not found"


def test_phase_file_sorts_phases_and_reports_bad_ones(tmp_path):
    phases = [
        {"start_time": "5.5", "end_time": "7.25", "labels": ["avoidance"],
         "conversations": [{"question": "Q?", "a": "x", "b": "y", "correct": "b"}]},
        {"start_time": "1", "end_time": "2", "labels": ["0"],
         "conversations": [{"question": "Q?", "a": "x", "b": "y", "correct": "a"}]},
        {"start_time": "abc", "end_time": "2", "labels": ["1"], "conversations": []},
        {"start_time": "3", "end_time": "2", "labels": ["2"], "conversations": []},
        {"start_time": "1", "end_time": "2", "labels": ["running"], "conversations": []},
        {"start_time": "8", "end_time": "9", "labels": ["4"], "conversations": []},
    ]
    _write(tmp_path, "annotations/vqa/train/S/vehicle_view/S.json",
           json.dumps([{"vehicle_view": "S_vehicle_view.mp4", "event_phase": phases}]))
    result = wts.read_phase_vqa(tmp_path, Scenario("S", "train", "main"), "vehicle")
    got = [(r.id, r.phase, r.video_start, r.video_end, r.answer) for r in result.records]
    assert got == [("S_vehicle_view_prerecognition_0", "prerecognition", 1.0, 2.0, "a"),
                   ("S_vehicle_view_avoidance_0", "avoidance", 5.5, 7.25, "b")]
    rec = result.records[0]
    assert rec.video == "S/vehicle_view/S_vehicle_view.mp4" and rec.type == "vehicle"
    assert "wts_id" not in rec.meta  # vehicle files often carry no id
    assert [(p.kind, p.reason.split(":")[0]) for p in result.problems] == [
        ("bad-time", "event_phase[2]"), ("bad-time", "event_phase[3]"), ("unknown-phase", "event_phase[4]"),
        ("bad-schema", "event_phase[5]")]
    assert "already given by event_phase[0]" in result.problems[-1].reason


def test_missing_view_file_is_a_note_and_missing_split_a_problem(tmp_path):
    (tmp_path / "annotations/vqa/train/S/overhead_view").mkdir(parents=True)
    result = wts.read_subset(tmp_path, "vehicle", "train")
    assert [n.kind for n in result.notes] == ["no-vehicle-view-file"] and not result.problems
    result = wts.read_subset(tmp_path, "bdd", "train")
    [problem] = result.problems
    assert (problem.kind, problem.path) == ("missing-split", "external/BDD_PC_5K/annotations/vqa/train")
