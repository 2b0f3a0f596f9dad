"""`trafficvlm eval`: letter scoring, shared prefix, generation, resume, baselines, the OpenAI engine, configs.

Everything runs on a tiny random Qwen2.5-VL (byte vocabulary) and three synthetic 64x48 clips whose frames
become 56x56 (4 video tokens per 2-frame group), so a full evaluation takes seconds on a CPU.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from trafficvlm.config import ConfigError, VideoSpec, load_eval_config
from trafficvlm.records import VideoQARecord, group_by_video, read_llava

SPEC = VideoSpec(fps=2.0, min_pixels=3136, max_pixels=3136)
SYSTEM = "You are a helpful assistant that can answer questions about a street-view CCTV footage."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from trafficvlm.model import build_tiny
    from trafficvlm.stages.prepare import run_prepare
    from trafficvlm.synth import synthesize

    root = tmp_path_factory.mktemp("eval")
    synthesize(root / "wts", seed=0, scenarios=2, normal=0, bdd=0, size=(64, 48), fps=2.0, duration=4.0,
               val_fraction=0.5, progress=False)
    run_prepare(root / "wts", root / "llava", check_videos=False)
    build_tiny(root / "tiny", vocab="byte", spec=SPEC)
    data = root / "llava" / "environment_mcq_llava_train.json"  # the larger split: several clips
    records = read_llava(data)
    return {"n": len(records), "clips": len(group_by_video(records)), "texts": len({r.question for r in records}),
            "root": root, "model": str(root / "tiny"), "data": str(data),
            "train": str(root / "llava" / "environment_mcq_llava_val.json"),
            "media": str(root / "wts" / "videos" / "train"), "cache": str(root / "frames")}


def _args(env, out, **kw):
    return {"model": env["model"], "data": env["data"], "media_dir": env["media"], "out": str(out),
            "frame_cache": env["cache"], **kw}


@pytest.fixture(scope="module")
def loaded(env):
    from trafficvlm.model import load_model, load_processor
    from trafficvlm.video import FrameCache, load_clip

    model, processor = load_model(env["model"]), load_processor(env["model"])
    groups = [(recs, load_clip(Path(env["media"]) / v, SPEC, s, e, cache=FrameCache(env["cache"])))
              for (v, s, e), recs in group_by_video(read_llava(env["data"])).items()]
    return model, processor, groups


@pytest.fixture(scope="module")
def baseline_run(env, tmp_path_factory):
    from trafficvlm.stages.evaluate import run_eval

    out = tmp_path_factory.mktemp("run") / "full"
    return out, run_eval(progress=False, **_args(env, out))


def _flat(groups_of_answers):
    return [a for g in groups_of_answers for a in g]


# --- letter scoring --------------------------------------------------------------------------------------

def test_eval_writes_results_dir_and_report(env, baseline_run):
    out, results = baseline_run
    assert env["clips"] >= 2 and results["total"] == env["n"] and results["videos"] == env["clips"]
    assert 0 <= results["correct"] <= env["n"] and results["parse_failures"] == 0
    assert len(results["per_question"]) == env["texts"] and set(results["per_view"]) == {"overhead"}
    assert sum(s["total"] for s in results["per_question"].values()) == env["n"]
    assert results["video_spec"]["max_pixels"] == 3136 and results["mode"] == "letter"
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == env["n"]
    for p in lines:
        assert set(p) >= {"id", "video", "type", "phase", "question", "options", "correct", "predicted",
                          "letter_probs", "raw_text"}
        assert set(p["letter_probs"]) == set(p["options"]) and abs(sum(p["letter_probs"].values()) - 1) < 1e-5
        assert p["predicted"] == max(p["letter_probs"], key=p["letter_probs"].get)
    assert json.loads((out / "results.json").read_text())["accuracy"] == results["accuracy"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "confusion_matrix.png" in (out / "report.md").read_text()
    assert (out / "eval_config.toml").is_file()


def _reference_logits(model, processor, groups):
    """Plain full-model forward of each question alone (the thing shared-prefix scoring must equal)."""
    from trafficvlm.processing import Preprocessor, collate_padded

    pre = Preprocessor(processor, SPEC, SYSTEM)
    rows = []
    with torch.inference_mode():
        for records, clip in groups:
            for r in records:
                b = collate_padded([pre.encode(r, clip, with_answer=False)], pre.pad_token_id)
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"], pixel_values_videos=b["pixel_values_videos"],
                            video_grid_thw=b["video_grid_thw"], use_cache=False)
                rows.append(out.logits[0, -1])
    return rows


def test_shared_prefix_equals_per_question_scoring(env, loaded):
    from trafficvlm.evaluate import LocalEngine, letter_answer, letter_token_ids

    model, processor, groups = loaded
    shared = _flat(LocalEngine(model, processor, SPEC, SYSTEM, question_batch=4).score(groups))
    padded = _flat(LocalEngine(model, processor, SPEC, SYSTEM, shared_prefix=False, question_batch=5)
                   .score(groups))  # batches mix clips, and rows of different lengths
    ids = letter_token_ids(processor.tokenizer)
    records = [r for recs, _ in groups for r in recs]
    ref = [letter_answer(l, r.options, ids) for l, r in zip(_reference_logits(model, processor, groups), records)]
    assert len(shared) == len(padded) == len(ref) == env["n"]
    for s, p, f in zip(shared, padded, ref):
        assert s.predicted == p.predicted == f.predicted
        for k in f.letter_probs:
            assert abs(s.letter_probs[k] - f.letter_probs[k]) < 1e-4
            assert abs(p.letter_probs[k] - f.letter_probs[k]) < 1e-4


def test_generate_matches_greedy_full_forwards(loaded):
    """Our KV-cache decoding loop equals re-running the full sequence with rope positions at every step."""
    from trafficvlm.evaluate import LocalEngine
    from trafficvlm.processing import Preprocessor
    from trafficvlm.rope import mrope_position_ids

    model, processor, groups = loaded
    records, clip = groups[0][0][:3], groups[0][1]
    engine = LocalEngine(model, processor, SPEC, SYSTEM, mode="generate", max_new_tokens=4)
    shared = engine.score([(records, clip)])[0]
    alone = LocalEngine(model, processor, SPEC, SYSTEM, mode="generate", max_new_tokens=4,
                        shared_prefix=False).score([(records, clip)])[0]
    pre = Preprocessor(processor, SPEC, SYSTEM)
    for r, got, got_alone in zip(records, shared, alone):
        s = pre.encode(r, clip, with_answer=False)
        ids = s.input_ids
        new: list[int] = []
        with torch.inference_mode():
            for _ in range(4):
                pos = mrope_position_ids(ids, s.video_grid_thw, s.second_per_grid_ts)
                logits = model(input_ids=ids[None], position_ids=pos[:, None], use_cache=False,
                               pixel_values_videos=s.pixel_values_videos, video_grid_thw=s.video_grid_thw).logits
                tok = int(logits[0, -1].argmax())
                if tok in engine.eos_ids:
                    break
                new.append(tok)
                ids = torch.cat([ids, torch.tensor([tok])])
        expected = processor.tokenizer.decode(new, skip_special_tokens=True)
        assert got.raw_text == expected == got_alone.raw_text
        assert got.letter_probs is None


# --- resume, baselines, spec checks ---------------------------------------------------------------------

def _stable(results):
    return {k: v for k, v in results.items() if k not in ("timing", "config")}


def test_resume_after_a_kill_gives_the_same_results(env, baseline_run, tmp_path, monkeypatch):
    from trafficvlm.evaluate import LocalEngine
    from trafficvlm.stages.evaluate import run_eval

    out = tmp_path / "killed"
    real, calls = LocalEngine.score_prepared, {"n": 0}  # the stage scores prefetched, prepared clips

    def dying(self, prepared):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, prepared)

    monkeypatch.setattr(LocalEngine, "score_prepared", dying)
    with pytest.raises(KeyboardInterrupt):
        run_eval(progress=False, **_args(env, out))
    first_clip = len(next(iter(group_by_video(read_llava(env["data"])).values())))
    assert len((out / "predictions.jsonl").read_text().splitlines()) == first_clip  # flushed before the kill
    with pytest.raises(ConfigError, match="--resume"):
        run_eval(progress=False, **_args(env, out))
    monkeypatch.setattr(LocalEngine, "score_prepared", real)
    resumed = run_eval(progress=False, resume=True, **_args(env, out))
    full_out, full = baseline_run
    assert _stable(resumed) == _stable(full)
    assert (out / "predictions.jsonl").read_text() == (full_out / "predictions.jsonl").read_text()


def test_baselines_majority_and_blind(env, tmp_path):
    from trafficvlm.stages.evaluate import run_eval

    maj = run_eval(progress=False, baseline="majority", train_data=env["train"], **_args(env, tmp_path / "maj"))
    assert maj["total"] == env["n"] and maj["baseline"] == {"kind": "majority", "learned_from": env["train"]}
    self_maj = run_eval(progress=False, baseline="majority", **_args(env, tmp_path / "maj-self"))
    assert "evaluation set itself" in self_maj["baseline"]["learned_from"]
    # learned on the eval set itself, each question text scores exactly its most frequent answer's share
    from collections import Counter

    answers: dict[str, Counter] = {}
    for r in read_llava(env["data"]):
        answers.setdefault(r.question, Counter())[r.answer] += 1
    for q, s in self_maj["per_question"].items():
        assert s["correct"] == max(answers[q].values())
    blind = run_eval(progress=False, baseline="blind", **_args(env, tmp_path / "blind"))
    assert blind["total"] == env["n"] and blind["baseline"]["kind"] == "blind"
    lines = [json.loads(l) for l in (tmp_path / "blind" / "predictions.jsonl").read_text().splitlines()]
    # no video: every clip's copy of a question gets the same answer
    by_q = {}
    for p in lines:
        by_q.setdefault(p["question"], set()).add(json.dumps(p["letter_probs"], sort_keys=True)[:40])
    assert all(len(v) == 1 for v in by_q.values())


def test_unreadable_videos_are_skipped_and_reported(env, tmp_path):
    from dataclasses import replace

    from trafficvlm.records import write_llava
    from trafficvlm.stages.evaluate import run_eval

    first = next(iter(group_by_video(read_llava(env["data"])).values()))[:2]
    broken = [replace(r, id=r.id + "-x", video="missing/overhead_view/none.mp4") for r in first]
    write_llava(tmp_path / "data.json", first + broken)
    results = run_eval(progress=False, **{**_args(env, tmp_path / "out"), "data": str(tmp_path / "data.json")})
    assert results["total"] == 2 and results["skipped_questions"] == 2
    assert results["skipped"][0]["video"] == "missing/overhead_view/none.mp4"
    assert "no such file" in results["skipped"][0]["reason"]
    assert "2 questions skipped" in (tmp_path / "out" / "report.md").read_text()


def test_bundle_spec_mismatch_is_an_error_unless_overridden(env):
    from trafficvlm.stages.evaluate import resolve

    cfg = load_eval_config(None, _args(env, "x", video={"fps": 4.0}))
    with pytest.raises(ConfigError, match=r"video.fps: bundle 2.0, given 4.0"):
        resolve(cfg)
    res = resolve(load_eval_config(None, _args(env, "x", video={"fps": 4.0}, override_spec=True)))
    assert res.spec.fps == 4.0 and res.spec.max_pixels == 3136  # the rest still from the bundle
    same = resolve(load_eval_config(None, _args(env, "x", video={"fps": 2.0})))
    assert same.spec == SPEC and same.system_prompt == SYSTEM and same.mode == "letter"
    reasoning = resolve(load_eval_config(None, _args(env, "x", answer_type="reasoning", override_spec=True)))
    assert reasoning.mode == "generate" and "<think>" in reasoning.system_prompt


RECIPE_YAML = """\
datasets:
  environment:
    annotation_path: /data/WTS/environment_mcq_llava_val.json
    media_dir: /data/WTS/videos/val
    system_prompt: You are a helpful assistant that can answer questions about a street-view CCTV footage.
model:
  model_name: /ckpt/safetensors
  save_folder: post_trained_cr1
  tokenizer_model_name: qwen2.5-vl-7b
  dtype: bfloat16
  tp_size: 4
  max_length: 128000
evaluation:
  answer_type: letter
  num_processes: 40
  skip_saved: false
  seed: 1
vision:
  fps: 1
  total_pixels: 81920
generation:
  max_retries: 10
  max_tokens: 1024
  temperature: 0
  repetition_penalty: 1.0
"""


def test_recipe_eval_config_yaml_is_mapped(tmp_path):
    path = tmp_path / "eval_config.yaml"
    path.write_text(RECIPE_YAML)
    notes = []
    cfg = load_eval_config(path, {"out": "runs/x"}, on_ignored=notes.append)
    assert (cfg.data, cfg.media_dir, cfg.model) == ("/data/WTS/environment_mcq_llava_val.json",
                                                    "/data/WTS/videos/val", "/ckpt/safetensors")
    assert cfg.system_prompt == SYSTEM and cfg.answer_type == "letter" and cfg.mode == "letter"
    assert (cfg.dtype, cfg.max_length, cfg.seed, cfg.max_tokens, cfg.temperature) == ("bfloat16", 128000, 1, 1024, 0.0)
    assert cfg.video == {"fps": 1, "total_pixels": 81920} and cfg.resume is False and cfg.out == "runs/x"
    for key in ("model.tp_size", "model.save_folder", "evaluation.num_processes", "generation.max_retries"):
        assert key in notes[0]
    (tmp_path / "two.yaml").write_text(RECIPE_YAML.replace("datasets:\n", "datasets:\n  other: {}\n"))
    with pytest.raises(ConfigError, match="exactly one dataset"):
        load_eval_config(tmp_path / "two.yaml")


def test_shipped_eval_configs_load():
    configs = sorted((Path(__file__).parents[1] / "configs" / "eval").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = load_eval_config(path)
        VideoSpec(**cfg.video)  # explicit spec lines form a valid spec
        assert cfg.data.endswith("_val.json"), f"{path.name}: evaluate on the val split"


# --- the OpenAI-compatible engine ----------------------------------------------------------------------------

class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):  # /v1/models
        self._reply({"object": "list", "data": [{"id": "fake-cosmos", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        self._reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Answer: C"}}]})

    def _reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_engine_against_a_fake_endpoint(env, tmp_path, monkeypatch):
    from trafficvlm.stages.evaluate import run_eval

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FAKE_KEY", "sk-secret-123")
    try:
        out = tmp_path / "api"
        results = run_eval(progress=False, engine="openai", endpoint=f"http://127.0.0.1:{server.server_port}/v1",
                           api_key_env="FAKE_KEY", limit=11, **_args(env, out))
    finally:
        server.shutdown()
    reqs = _FakeOpenAI.requests
    assert len(reqs) == 11 and results["total"] == 11
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(p["raw_text"] == "Answer: C" for p in preds)
    assert all(p["predicted"] == ("c" if "c" in p["options"] else None) for p in preds)
    assert results["parse_failures"] == sum("c" not in p["options"] for p in preds)
    body = reqs[0]["body"]
    assert reqs[0]["path"] == "/v1/chat/completions" and reqs[0]["auth"] == "Bearer sk-secret-123"
    assert body["model"] == "fake-cosmos" and body["messages"][0]["content"] == SYSTEM
    video, text = body["messages"][1]["content"]
    assert video["type"] == "video_url" and video["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert text["text"].endswith("Answer with the option's letter from the given choices directly.")
    assert body["mm_processor_kwargs"] == {"fps": 2.0, "min_pixels": 3136, "max_pixels": 3136}
    assert body["media_io_kwargs"] == {"video": {"num_frames": -1, "fps": 2.0}}
    for name in ("results.json", "eval_config.toml", "report.md"):
        assert "sk-secret-123" not in (out / name).read_text()


# --- data parallel ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(env, baseline_run, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    out = tmp_path / "dp"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "trafficvlm", "eval",
           "--model", env["model"], "--data", env["data"], "--media-dir", env["media"], "--out", str(out),
           "--no-progress"]
    envs = {**os.environ, "TRAFFICVLM_CACHE": env["cache"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=envs, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full_out, full = baseline_run
    assert (out / "predictions.jsonl").read_text() == (full_out / "predictions.jsonl").read_text()
    assert not list(out.glob("predictions.rank*.jsonl"))
    dp = json.loads((out / "results.json").read_text())
    assert {k: dp[k] for k in ("accuracy", "correct", "per_question")} == \
        {k: full[k] for k in ("accuracy", "correct", "per_question")}


@pytest.mark.parametrize("every, syncs", [(3600.0, 1), (0.0, 4)])
def test_prediction_sink_flushes_every_clip_and_fsyncs_on_a_timer(tmp_path, monkeypatch, every, syncs):
    """Each clip's lines are readable as soon as they are appended (a killed process keeps them); fsync
    runs on the timer and at close only, not once per clip."""
    from trafficvlm.evaluate import Answer
    from trafficvlm.report import read_predictions
    from trafficvlm.stages import evaluate as stage

    calls = []
    monkeypatch.setattr(stage.os, "fsync", lambda fd: calls.append(fd))
    path = tmp_path / "predictions.jsonl"
    recs = [VideoQARecord(id=f"q{i}", video="v.mp4", question="Weather?", options={"a": "Clear", "b": "Rain"},
                          answer="a") for i in range(3)]
    with stage.PredictionSink(path, sync_every_s=every) as sink:
        for i, r in enumerate(recs):
            sink.append([r], [Answer("a", {"a": 0.9, "b": 0.1})])
            assert [p.id for p in read_predictions(path)] == [x.id for x in recs[:i + 1]]
    assert len(calls) == syncs
