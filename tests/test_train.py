"""SFT trainer: config (ours and the recipe's), loss at labels, shared-prefix gradients, data order,
failure messages, and a short real run whose final/ bundle loads with plain transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sft_fixtures import TINY_CONFIG, make_tiny_env, recipe_sft_config
from trafficvlm.config import ConfigError, load_train_config, map_recipe_sft, save_config

def recipe_for(annotation, media, out, model) -> str:
    """The recipe's own file, its paths pointed at synthetic data and its batch shrunk (16 x 8 replicas
    would need 128 samples)."""
    return recipe_sft_config(**{"custom.dataset.annotation_path": str(annotation),
                                "custom.dataset.media_path": str(media), "custom.vision.max_pixels": 12544,
                                "train.output_dir": str(out), "train.optm_lr": 2e-3,
                                "train.train_batch_per_replica": 2, "policy.model_name_or_path": str(model),
                                "policy.parallelism.dp_shard_size": 1})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_tiny_env(tmp_path_factory.mktemp("sft-env"))


def test_recipe_keys_map_and_the_rest_are_listed():
    import tomllib

    data = tomllib.loads(recipe_for("a.json", "m", "o", "p"))
    data["train"]["train_batch_per_replica"] = 16
    data["policy"]["parallelism"]["dp_shard_size"] = 8
    mapped, ignored = map_recipe_sft(data)
    assert mapped["train"]["global_batch"] == 128 and mapped["train"]["micro_batch"] == 1
    assert mapped["video"] == {"fps": 1, "max_pixels": 12544}
    assert mapped["model"] == {"path": "p", "max_length": 81920}
    assert "logging.logger" in ignored and "train.train_policy.type" in ignored
    assert "custom.dataset.annotation_path" not in ignored


def test_overrides_apply_and_unknown_keys_are_named(tmp_path):
    cfg = load_train_config(TINY_CONFIG, ["train.max_steps=3", "train.save_every=1", f"train.output_dir={tmp_path}"])
    assert (cfg.train.max_steps, cfg.train.save_every, cfg.train.output_dir) == (3, 1, str(tmp_path))
    save_config(cfg, tmp_path / "config.toml")  # the resolved copy a run leaves is a config again
    assert load_train_config(tmp_path / "config.toml") == cfg
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_train_config(TINY_CONFIG, ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="mode"):
        load_train_config(TINY_CONFIG, ["train.mode=qlora"])


def _samples(env, n, max_length=4096):
    from trafficvlm.data import SFTDataset
    from trafficvlm.model import load_processor
    from trafficvlm.processing import Preprocessor
    from trafficvlm.records import read_llava

    cfg = load_train_config(TINY_CONFIG, env.overrides(Path("unused")))
    pre = Preprocessor(load_processor(env.model), cfg.video)
    ds = SFTDataset(read_llava(env.annotation)[:n], env.media, cfg.video, pre, max_length=max_length,
                    cache=False)
    return ds, pre


def test_loss_at_labels_equals_the_plain_full_logits_loss(env):
    """Our loss (LM head only where labels are) against transformers' own loss over full logits, on a
    padded batch and on the packed batch of the same samples. Tolerance: 1e-6 relative (float64)."""
    from trafficvlm.model import load_model
    from trafficvlm.processing import collate_packed, collate_padded
    from trafficvlm.train import forward_loss

    ds, pre = _samples(env, 10)
    samples = [ds[0], ds[9]]  # two different videos, different lengths: padding is exercised
    model = load_model(env.model, dtype=torch.float64)
    padded = collate_padded(samples, pre.pad_token_id)
    with torch.no_grad():
        plain = model(**padded, use_cache=False).loss
        ours, n = forward_loss(model, padded)
        packed, n_packed = forward_loss(model, collate_packed(samples))
    assert n == n_packed == 4  # "X<|im_end|>" twice
    assert float(ours / n) == pytest.approx(float(plain), rel=1e-6)
    assert float(packed) == pytest.approx(float(ours), rel=1e-6)


def test_shared_prefix_gradient_equals_the_sum_of_per_question_gradients(env):
    """One sequence (video prefix once, 3 question branches under a block mask) against 3 separate
    sequences: same summed loss, same gradients. Tolerance: 1e-6 relative to each tensor's largest
    gradient, in float64 (measured ~4e-8: pixel and rotary arithmetic stays float32 inside the model)."""
    from trafficvlm.data import shared_prefix_batch
    from trafficvlm.model import load_model
    from trafficvlm.processing import collate_padded
    from trafficvlm.train import forward_loss

    ds, pre = _samples(env, 3)
    samples = [ds[i] for i in range(3)]
    model = load_model(env.model, dtype=torch.float64)
    total = 0.0
    for s in samples:
        loss, _ = forward_loss(model, collate_padded([s], pre.pad_token_id))
        loss.backward()
        total += float(loss.detach())
    separate = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    batch = shared_prefix_batch(samples)
    video = 151656
    assert int((batch["input_ids"] == video).sum()) == int((samples[0].input_ids == video).sum())  # once
    loss, n = forward_loss(model, batch)
    loss.backward()
    assert n == 6 and float(loss.detach()) == pytest.approx(total, rel=1e-9)
    for name, p in model.named_parameters():
        if name in separate:
            scale = separate[name].abs().max().clamp_min(1e-30)
            assert float((p.grad - separate[name]).abs().max() / scale) < 1e-6, name


def test_packed_shared_prefix_videos_equal_separate_ones(env):
    """Two videos' shared-prefix sequences packed into one row (micro_batch = 2) against one forward per
    video: same summed loss and gradients (float64, 1e-6 relative to each tensor's largest gradient)."""
    from trafficvlm.data import VideoGroupDataset, collate_shared
    from trafficvlm.model import load_model, load_processor
    from trafficvlm.processing import Preprocessor
    from trafficvlm.records import read_llava
    from trafficvlm.train import forward_loss

    cfg = load_train_config(TINY_CONFIG, env.overrides(Path("unused")))
    pre = Preprocessor(load_processor(env.model), cfg.video)
    ds = VideoGroupDataset(read_llava(env.annotation), env.media, cfg.video, pre, max_length=4096, cache=False)
    groups = [ds[0], ds[1]]
    assert len(ds) >= 2 and all(len(g) >= 2 for g in groups)
    model = load_model(env.model, dtype=torch.float64)
    total, labels = 0.0, 0
    for g in groups:
        loss, n = forward_loss(model, collate_shared([g])[0])
        loss.backward()
        total, labels = total + float(loss.detach()), labels + n
    separate = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    batch, ids = collate_shared(groups)
    assert ids == [s.record_id for g in groups for s in g]
    assert batch["input_ids"].shape[0] == 1 and batch["video_grid_thw"].shape[0] == 2
    loss, n = forward_loss(model, batch)
    loss.backward()
    assert n == labels and float(loss.detach()) == pytest.approx(total, rel=1e-9)
    for name, p in model.named_parameters():
        if name in separate:
            scale = separate[name].abs().max().clamp_min(1e-30)
            assert float((p.grad - separate[name]).abs().max() / scale) < 1e-6, name


def test_batch_plan_is_seeded_split_over_ranks_and_resumable():
    from trafficvlm.data import BatchPlan

    one = BatchPlan(n_items=20, global_batch=4, micro_batch=2, world_size=1, rank=0, seed=3)
    two = [BatchPlan(20, 4, 1, 2, r, 3) for r in range(2)]
    assert one.accumulation == 2 and two[0].accumulation == 2 and one.steps_per_epoch == 5
    for step in range(12):  # crosses two epoch boundaries
        mine = sorted(i for mb in one.micro_batches(step) for i in mb)
        theirs = sorted(i for p in two for mb in p.micro_batches(step) for i in mb)
        assert mine == theirs == sorted(one.global_indices(step))
    assert list(one.index_stream(3, 6)) == [mb for s in range(3, 6) for mb in one.micro_batches(s)]
    assert one.epoch_order(0) != one.epoch_order(1)
    assert BatchPlan(20, 4, 2, 1, 0, 4).epoch_order(0) != one.epoch_order(0)
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        BatchPlan(20, 3, 2, 1, 0, 0)


def test_a_sample_longer_than_max_length_is_an_error_naming_it(env):
    from trafficvlm.data import SampleTooLong

    ds, _ = _samples(env, 1, max_length=64)
    with pytest.raises(SampleTooLong, match=ds.records[0].id) as err:
        ds[0]
    assert "video" in str(err.value) and "never truncated" in str(err.value)


def test_nan_loss_stops_with_the_step_and_sample_ids():
    from trafficvlm.parallel import close_distributed, init_distributed
    from trafficvlm.train import StepStats, check_finite

    info = init_distributed("cpu")
    try:
        micro = [({}, ["q1", "q2"]), ({}, ["q3"])]
        check_finite(StepStats(1.0, 10, 3, 2), 4, micro, info)  # finite: nothing happens
        with pytest.raises(FloatingPointError, match=r"step 5.*'q1', 'q2', 'q3'"):
            check_finite(StepStats(math.nan, 10, 3, 2), 4, micro, info)
    finally:
        close_distributed()


def test_oom_message_names_the_vision_token_budget_and_what_to_lower():
    from trafficvlm.config import TrainConfig
    from trafficvlm.train import explain_oom

    msg = explain_oom([({"video_grid_thw": torch.tensor([[37, 14, 26]])}, ["q"])], TrainConfig())
    assert "3367" in msg and "video.fps" in msg and "video.max_pixels" in msg and "micro_batch" in msg


def test_recipe_sft_config_trains_the_loss_falls_and_final_loads_with_transformers(env, tmp_path):
    """The recipe's own file format, end to end: 8 full-parameter steps on 2 questions of one video."""
    from transformers import AutoModelForImageTextToText

    from trafficvlm.stages.sft import run_train

    out = tmp_path / "run"
    cfg_file = tmp_path / "sft_config.toml"
    cfg_file.write_text(recipe_for(env.annotation, env.media, out, env.model))
    result = run_train(cfg_file, ["train.max_steps=8", "data.limit=2", "video.min_pixels=3136",
                                  f"data.frame_cache={env.cache}", "train.device=cpu",
                                  "train.grad_checkpointing=false"])
    assert len(result.losses) == 8
    assert result.losses[-1] < result.losses[0] - 1.0, result.losses  # ln(152064) = 11.9 at the start
    assert all(b < a for a, b in zip(result.losses, result.losses[1:])), result.losses
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "tokens_per_s" in rows[0]
    assert (out / "loss.png").stat().st_size > 1000 and any((out / "tensorboard").iterdir())
    assert "[train]" in (out / "config.toml").read_text()
    final = out / "final"
    meta = json.loads((final / "trafficvlm.json").read_text())
    assert meta["video"]["max_pixels"] == 12544 and meta["training"]["train"]["global_batch"] == 2
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (final / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(final)
    base = AutoModelForImageTextToText.from_pretrained(env.model)
    key = "lm_head.weight"
    assert not torch.equal(model.state_dict()[key], base.state_dict()[key])  # trained weights were exported


def test_lora_run_exports_the_adapter_and_the_merged_model_and_logs_to_mlflow(env, tmp_path, monkeypatch):
    from peft import PeftConfig
    from transformers import AutoModelForImageTextToText

    from trafficvlm.stages.sft import run_train

    out = tmp_path / "lora"
    mlruns = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: no server, no database migration
    # Through the environment (mlflow also writes it there): monkeypatch removes it again afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{mlruns}")
    result = run_train(TINY_CONFIG, env.overrides(out, mode="lora", max_steps=2, global_batch=1, micro_batch=1,
                                                  lr=1e-2))
    assert len(result.losses) == 2
    logged = list(mlruns.glob("*/*/metrics/loss"))  # MLflow's file store: <experiment>/<run>/metrics/loss
    assert len(logged) == 1 and len(logged[0].read_text().splitlines()) == 2
    assert PeftConfig.from_pretrained(out / "final" / "adapter").r == 16
    merged = AutoModelForImageTextToText.from_pretrained(out / "final")
    base = AutoModelForImageTextToText.from_pretrained(env.model)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])
    v = "model.visual.blocks.0.mlp.gate_proj.weight"  # the vision tower is not LoRA-adapted
    assert torch.equal(merged.state_dict()[v], base.state_dict()[v])


def test_tiny_config_makes_its_missing_model_and_data(tmp_path):
    from trafficvlm.train import ensure_inputs, load_records

    cfg = load_train_config(TINY_CONFIG, [f"model.path={tmp_path}/models/tiny",
                                          f"data.annotation_path={tmp_path}/llava/environment_mcq_llava_train.json",
                                          f"data.media_path={tmp_path}/wts/videos/train",
                                          f"data.synth_root={tmp_path}/wts", "data.synth_scenarios=2"])
    ensure_inputs(cfg)
    assert (tmp_path / "models" / "tiny" / "config.json").is_file()
    records = load_records(cfg)
    assert records and all((tmp_path / "wts" / "videos" / "train" / r.video).is_file() for r in records)
    with pytest.raises(FileNotFoundError, match="data.annotation_path"):
        ensure_inputs(load_train_config(TINY_CONFIG, [f"model.path={tmp_path}/models/tiny",
                                                      f"data.annotation_path={tmp_path}/none.json",
                                                      "data.synth_root="]))  # nothing to make it from
