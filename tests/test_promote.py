"""The promotion gate and the registry moves, against a real `mlflow server` (tests/mlflow_server.py).

Result directories are written by hand in `trafficvlm eval`'s format (report.summarize): 8 videos x 5
questions of the same held-out set, with a chosen number of correct answers, so the paired comparison's
delta and McNemar p are known in advance.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_server import mlflow_server  # noqa: F401  (the pytest fixture)
from trafficvlm import report
from trafficvlm.records import Prediction
from trafficvlm.stages.promote import PromotionError, PromotionPolicy, decide, run_promote

VIDEO_SPEC = {"fps": 1.0, "max_pixels": 81920, "min_pixels": 100352, "nframes": None, "total_pixels": None}
N_QUESTIONS = 40


def write_results(root: Path, name: str, n_correct: int) -> Path:
    """An eval results dir whose first `n_correct` of 40 questions are right."""
    preds = []
    for i in range(N_QUESTIONS):
        video = f"videos/val/2023{i % 8:02d}/overhead_view/clip.mp4"
        right = i < n_correct
        preds.append(Prediction(id=f"q{i}", video=video, type="environment" if i % 2 else "location",
                                phase="prerecognition", question=f"question {i % 5}", options={"a": "x", "b": "y"},
                                correct="a", predicted="a" if right else "b"))
    out = root / name
    out.mkdir(parents=True)
    report.write_predictions(out / report.PREDICTIONS, preds)
    report.write_results(out, report.summarize(preds, {"model": name, "video_spec": VIDEO_SPEC}))
    return out


@pytest.fixture
def registry(mlflow_server, monkeypatch):  # noqa: F811
    """A fresh registered-model name on the shared server, with MLFLOW_TRACKING_URI set."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return f"wts-{uuid.uuid4().hex[:8]}", MlflowClient(mlflow_server.uri)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def test_first_better_worse(tmp_path, registry):
    name, client = registry
    first = run_promote("s3://models/run-1/fp8", write_results(tmp_path, "run-1", 20), model_name=name,
                        fp8_passed=True, fp8_drop=0.004, pipeline_run_id="run-1")
    assert (first.promote, first.version, first.champion_before) == (True, "1", None)
    assert "no champion yet" in first.reason
    assert aliases(client, name) == {"champion": "1", "challenger": "1"}

    better = run_promote("s3://models/run-2/fp8", write_results(tmp_path, "run-2", 36), model_name=name,
                         fp8_passed=True, pipeline_run_id="run-2")
    assert (better.promote, better.version, better.champion_before) == (True, "2", "1")
    assert better.comparison["delta"] == pytest.approx(0.4)
    assert better.comparison["p_value"] < 0.05  # 16 wrong->right, 0 right->wrong
    assert aliases(client, name) == {"champion": "2", "challenger": "2"}

    # v2's results were fetched from MLflow (its results_uri tag), not passed in.
    worse = run_promote("s3://models/run-3/fp8", write_results(tmp_path, "run-3", 30), model_name=name,
                        fp8_passed=True, pipeline_run_id="run-3")
    assert (worse.promote, worse.version, worse.champion_before) == (False, "3", "2")
    assert "delta -15.00%" in worse.reason and "champion v2" in worse.reason
    assert aliases(client, name) == {"champion": "2", "challenger": "3"}
    v3 = client.get_model_version(name, "3")
    assert v3.source == "s3://models/run-3/fp8"
    assert v3.tags["promoted"] == "false" and v3.tags["decision"] == worse.reason


def test_version_tags_and_stage_run(tmp_path, registry):
    name, client = registry
    decision = run_promote("s3://models/run-7/fp8", write_results(tmp_path, "run-7", 30), model_name=name,
                           fp8_passed=True, fp8_drop=0.004, pipeline_run_id="run-7", out=tmp_path / "out")
    tags = client.get_model_version(name, decision.version).tags
    assert float(tags["accuracy"]) == pytest.approx(0.75)
    assert float(tags["accuracy.environment"]) == pytest.approx(0.75)
    assert json.loads(tags["video_spec"]) == VIDEO_SPEC
    assert (tags["pipeline_run_id"], tags["fp8_gate"], float(tags["fp8_drop"])) == ("run-7", "passed", 0.004)
    run = client.get_run(client.get_model_version(name, decision.version).run_id)
    assert run.data.metrics["promoted"] == 1.0 and run.data.tags["promote.decision"] == decision.reason
    assert tags["results_uri"] == f"runs:/{run.info.run_id}/eval"
    assert json.loads((tmp_path / "out" / "promotion.json").read_text())["version"] == decision.version


def test_failed_fp8_gate_registers_but_keeps_champion(tmp_path, registry):
    name, client = registry
    champ = write_results(tmp_path, "champ", 20)
    run_promote("s3://models/a/fp8", champ, model_name=name)
    decision = run_promote("s3://models/b/fp8", write_results(tmp_path, "b", 38), model_name=name,
                           fp8_passed=False, fp8_drop=0.031, champion_results=champ)
    assert not decision.promote and "FP8 gate failed (accuracy drop 3.10%)" in decision.reason
    assert aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(name, "2").tags["fp8_gate"] == "failed"


def test_local_path_is_rejected_before_anything_is_registered(tmp_path, registry):
    name, client = registry
    results = write_results(tmp_path, "run", 20)
    for bad in (str(tmp_path / "fp8"), "/mnt/data/checkpoints/run/fp8", "file:///tmp/x"):
        with pytest.raises(PromotionError, match="storage URI .*upload it first"):
            run_promote(bad, results, model_name=name)
    assert client.search_model_versions(f"name='{name}'") == []


def test_missing_results_and_untagged_champion(tmp_path, registry):
    name, client = registry
    with pytest.raises(PromotionError, match="no predictions.jsonl"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "results.json").write_text("{}")
        run_promote("s3://m/x", tmp_path / "empty", model_name=name)
    client.create_registered_model(name)
    client.create_model_version(name, "s3://m/manual")  # registered by hand: no results_uri tag
    client.set_registered_model_alias(name, "champion", "1")
    with pytest.raises(PromotionError, match="champion v1 .* no 'results_uri' tag.*--champion-results"):
        run_promote("s3://m/x", write_results(tmp_path, "x", 30), model_name=name)


def test_cli_reports_green_with_reason(tmp_path, registry, capsys):
    from trafficvlm.cli import main

    name, _ = registry
    results = str(write_results(tmp_path, "run", 20))
    assert main(["promote", "s3://m/1", "--results", results, "--model-name", name, "--min-accuracy", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "accuracy 50.00% is below the floor 90.00%" in out and "champion stays unset" in out
    assert main(["promote", "runs/fp8", "--results", results, "--model-name", name]) == 2
    assert "upload it first" in capsys.readouterr().err


@pytest.mark.parametrize("comparison, policy, promote, why", [
    (None, PromotionPolicy(), True, "no champion yet"),
    (None, PromotionPolicy(min_accuracy=0.9), False, "below the floor"),
    ({"delta": 0.02, "p_value": 0.2, "ci": [-0.01, 0.05], "champion_accuracy": 0.8}, PromotionPolicy(),
     False, "not significant"),
    ({"delta": 0.02, "p_value": 0.2, "ci": [-0.01, 0.05], "champion_accuracy": 0.8},
     PromotionPolicy(max_p_value=None), True, "+2.00% vs champion v4"),
    ({"delta": 0.02, "p_value": 0.01, "ci": [-0.01, 0.05], "champion_accuracy": 0.8},
     PromotionPolicy(require_ci_above_zero=True), False, "CI of the delta reaches -1.00%"),
    ({"delta": 0.02, "p_value": 0.01, "ci": [0.01, 0.05], "champion_accuracy": 0.8},
     PromotionPolicy(min_delta=0.03), False, "below the required +3.00%"),
])
def test_decide(comparison, policy, promote, why):
    ok, reason = decide(0.82, comparison, policy=policy, champion_version="4")
    assert ok is promote and why in reason


def test_champion_rollback_by_hand(tmp_path, registry, capsys):
    from trafficvlm.cli import main

    name, client = registry
    run_promote("s3://m/1", write_results(tmp_path, "1", 20), model_name=name)
    run_promote("s3://m/2", write_results(tmp_path, "2", 36), model_name=name)
    assert main(["champion", "--model-name", name, "--set", "1"]) == 2
    assert "--set needs --reason" in capsys.readouterr().err
    assert main(["champion", "--model-name", name, "--set", "9", "--reason", "x"]) == 2
    assert "has no version '9'" in capsys.readouterr().err
    assert main(["champion", "--model-name", name, "--set", "1", "--reason", "v2 misreads night scenes"]) == 0
    out = capsys.readouterr().out
    assert "champion v2 -> v1" in out and "challenger  v2" in out
    assert aliases(client, name) == {"champion": "1", "challenger": "2"}
    assert client.get_model_version(name, "2").tags["demoted"] == "champion moved to v1: v2 misreads night scenes"
