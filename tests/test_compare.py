"""`trafficvlm compare` and the statistics behind it, on hand-made results with known answers (no model)."""

from __future__ import annotations

import json
import math

import pytest

from trafficvlm import report
from trafficvlm.cli import main
from trafficvlm.records import Prediction

OPTIONS = {"a": "Yes", "b": "No"}


def _pred(i: int, video: str, question: str, correct: str, predicted: str | None) -> Prediction:
    return Prediction(id=f"q{i}", video=video, type="environment", phase="full_video", question=question,
                      options=OPTIONS, correct=correct, predicted=predicted,
                      letter_probs={"a": 0.8, "b": 0.2} if predicted == "a" else {"a": 0.3, "b": 0.7},
                      raw_text=predicted.upper() if predicted else "no idea")


def _write_run(path, preds, model):
    path.mkdir(parents=True, exist_ok=True)
    report.write_predictions(path / report.PREDICTIONS, preds)
    results = report.summarize(preds, {"model": model, "data": "hand-made"})
    report.write_results(path, results)
    return results


def _pair(tmp_path):
    """10 questions on 5 videos. A right on q0-q3; B right on q1-q9: 1 right->wrong (q0), 6 wrong->right."""
    correct = ["a"] * 10
    a = ["a", "a", "a", "a", "b", "b", "b", "b", "b", None]
    b = ["b", "a", "a", "a", "a", "a", "a", "a", "a", "a"]
    qs = ["Is it raining?", "Is it dark?"]
    run_a = [_pred(i, f"v{i // 2}.mp4", qs[i % 2], c, p) for i, (c, p) in enumerate(zip(correct, a))]
    run_b = [_pred(i, f"v{i // 2}.mp4", qs[i % 2], c, p) for i, (c, p) in enumerate(zip(correct, b))]
    _write_run(tmp_path / "base", run_a, "base")
    _write_run(tmp_path / "sft", run_b, "sft")
    return tmp_path / "base", tmp_path / "sft"


def test_summarize_counts_unparseable_as_wrong(tmp_path):
    base, _ = _pair(tmp_path)
    results = json.loads((base / "results.json").read_text())
    assert (results["correct"], results["total"], results["parse_failures"]) == (4, 10, 1)
    assert results["per_question"]["Is it raining?"] == {"accuracy": 0.4, "correct": 2, "total": 5,
                                                         "parse_failures": 0}
    assert results["per_view"] == {"other": {"accuracy": 0.4, "correct": 4, "total": 10, "parse_failures": 1}}
    rows, cols, matrix = report.confusion(report.read_predictions(base / "predictions.jsonl"))
    assert (rows, cols, matrix) == (["a", "b"], ["a", "b", "none"], [[4, 5, 1], [0, 0, 0]])


def test_compare_known_pair(tmp_path):
    base, sft = _pair(tmp_path)
    result = report.compare_results([base, sft], n_boot=500, seed=1)
    c = result["comparisons"][0]
    assert (c["n"], c["videos"]) == (10, 5)
    assert (c["accuracy_a"], c["accuracy_b"]) == (0.4, 0.9) and result["delta"] == pytest.approx(0.5)
    assert [f["id"] for f in c["flipped"]["right_to_wrong"]] == ["q0"]
    assert [f["id"] for f in c["flipped"]["wrong_to_right"]] == ["q4", "q5", "q6", "q7", "q8", "q9"]
    # exact two-sided binomial: P(X <= 1 or X >= 6 | n=7, p=1/2) = 2 * (1 + 7) / 128
    assert c["mcnemar"]["method"] == "exact binomial" and result["p_value"] == pytest.approx(16 / 128)
    lo, hi = result["ci"]
    assert -1 <= lo <= 0.5 <= hi <= 1
    assert c["per_question"]["Is it raining?"]["delta"] == pytest.approx(0.4)


def test_bootstrap_resamples_videos_not_questions():
    # one video holding every question: every resample is that video, so the interval is a single point
    pairs = [("only.mp4", i % 3 == 0, i % 2 == 0) for i in range(30)]
    ci = report.bootstrap_ci(pairs, n_boot=200)
    assert ci["a"][0] == ci["a"][1] == pytest.approx(10 / 30)
    assert ci["delta"][0] == ci["delta"][1] == pytest.approx(15 / 30 - 10 / 30)
    # many independent videos: a real interval around the observed delta
    pairs = [(f"v{i}.mp4", i % 3 == 0, i % 2 == 0) for i in range(300)]
    lo, hi = report.bootstrap_ci(pairs, n_boot=500)["delta"]
    assert lo < 50 / 300 < hi and hi - lo > 0.02


def test_mcnemar_large_counts_use_chi_square():
    from scipy import stats

    test = report.mcnemar(40, 80)
    chi2 = (abs(40 - 80) - 1) ** 2 / 120
    assert test["method"].startswith("chi-square") and test["statistic"] == pytest.approx(chi2)
    assert test["p_value"] == pytest.approx(stats.chi2.sf(chi2, 1))
    assert report.mcnemar(0, 0)["p_value"] == 1.0
    assert report.mcnemar(3, 3)["p_value"] == pytest.approx(1.0)


def test_compare_cli_prints_table_and_writes_chart(tmp_path, capsys):
    base, sft = _pair(tmp_path)
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(sft), "--out", str(out), "--resamples", "200"]) == 0
    printed = capsys.readouterr().out
    assert "40.00% -> 90.00%" in printed and "delta +50.00%" in printed and "p = 0.125" in printed
    assert "Is it raining?" in printed and "1 right->wrong, 6 wrong->right" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert saved["delta"] == pytest.approx(0.5) and math.isclose(saved["p_value"], 0.125)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_rejects_unrelated_runs(tmp_path):
    base, _ = _pair(tmp_path)
    other = [_pred(100 + i, "x.mp4", "Q?", "a", "a") for i in range(3)]
    _write_run(tmp_path / "other", other, "other")
    with pytest.raises(ValueError, match="share no question ids"):
        report.compare_results([base, tmp_path / "other"])
    assert main(["compare", str(base)]) == 2
