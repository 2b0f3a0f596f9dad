"""The cosmos-rl engine (trafficvlm.cosmos_rl): the recipe's sft_config.toml written from our TrainConfig, read
back by the recipe reader, our dataset script, and the PyTorchJob that runs it. cosmos-rl itself is not
installed here (it needs transformers < 5): nothing in this file runs it."""

import importlib.util
import py_compile
import tomllib
from pathlib import Path

import pytest
import yaml

from trafficvlm import cli, cosmos_rl
from sft_fixtures import PUBLISHED_RECIPE_SFT as RECIPE_FILE

from trafficvlm.config import RECIPE_SFT_KEYS, SYSTEM_PROMPT, TrainConfig, from_dict, load_train_config
from trafficvlm.k8s_validate import validate_manifests
from trafficvlm.launcher import (JobSpec, SftRequest, build_configmap, build_pytorchjob, engine_image, job_name,
                                 spec_from_request, train_locally_command)
from trafficvlm.prompts import answer_text, user_text
from trafficvlm.records import VideoQARecord, write_llava

REPO = Path(__file__).resolve().parents[1]

# The keys of the reference recipe's sft_config.toml (nvidia-cosmos/cosmos-cookbook,
# scripts/examples/reason1/intelligent-transportation/sft_config.toml, commit 7b2b5c77). Setting A is that
# file; setting B is the same file with [custom.vision] total_pixels = 6422528 instead of max_pixels.
RECIPE_COMMON = {
    "custom.dataset.annotation_path", "custom.dataset.media_path", "custom.dataset.system_prompt",
    "custom.vision.fps",
    "train.output_dir", "train.optm_warmup_steps", "train.train_batch_per_replica", "train.enable_validation",
    "policy.model_name_or_path", "policy.model_max_length",
    "logging.logger", "logging.project_name", "logging.experiment_name",
    "train.train_policy.type", "train.train_policy.mini_batch", "train.train_policy.dataset.test_size",
    "train.ckpt.enable_checkpoint",
    "policy.parallelism.tp_size", "policy.parallelism.cp_size", "policy.parallelism.dp_shard_size",
    "policy.parallelism.pp_size",
}
RECIPE_A = RECIPE_COMMON | {"custom.vision.max_pixels"}
RECIPE_B = RECIPE_COMMON | {"custom.vision.total_pixels"}
# What the recipe file leaves to cosmos-rl's defaults and we write from the config.
CARRIED = {"train.epoch", "train.optm_lr", "train.optm_decay_type", "train.optm_min_lr_factor",
           "train.optm_weight_decay", "train.optm_grad_norm_clip", "train.optm_betas", "train.compile",
           "train.ckpt.max_keep", "policy.model_gradient_checkpointing"}



def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _cfg(video, **train):
    base = {"model": {"path": "/models/Cosmos-Reason1-7B", "max_length": 32768},
            "data": {"annotation_path": "/data/llava/train.json", "media_path": "/data/wts/videos/train"},
            "video": video,
            "train": {"output_dir": "/pvc/runs/a", "epochs": 2, "lr": 2e-5, "global_batch": 128, "micro_batch": 2,
                      "warmup_steps": 3, "save_every": 20, "keep_last": 2, "freeze_vision": False, **train}}
    return from_dict(TrainConfig, base)


SETTING_A = {"fps": 1.0, "max_pixels": 81920}
SETTING_B = {"fps": 1.0, "max_pixels": 602112, "total_pixels": 6422528}


@pytest.mark.parametrize("video,recipe_keys", [(SETTING_A, RECIPE_A), (SETTING_B, RECIPE_B)], ids=["A", "B"])
def test_key_set_is_the_recipes_plus_the_carried_keys(video, recipe_keys):
    keys = set(_flat(cosmos_rl.recipe_config(_cfg(video))))
    assert keys == recipe_keys | CARRIED | {"train.ckpt.save_freq"}
    no_save = set(_flat(cosmos_rl.recipe_config(_cfg(video, save_every=0))))
    assert no_save == recipe_keys | CARRIED   # 0 (only at the end) leaves cosmos-rl's cadence alone


def test_values_are_mapped():
    flat = _flat(cosmos_rl.recipe_config(_cfg(SETTING_A), nodes=2, gpus_per_node=4))
    assert flat["train.optm_lr"] == 2e-5 and flat["train.epoch"] == 2
    assert flat["policy.parallelism.dp_shard_size"] == 8
    assert flat["train.train_batch_per_replica"] == 16      # 128 samples per step over 8 ranks
    assert flat["train.train_policy.mini_batch"] == 2
    assert flat["custom.vision.fps"] == 1.0 and flat["custom.vision.max_pixels"] == 81920
    assert flat["policy.model_name_or_path"] == "/models/Cosmos-Reason1-7B"
    assert flat["policy.model_max_length"] == 32768
    assert flat["train.output_dir"] == "/pvc/runs/a"
    assert flat["custom.dataset.annotation_path"] == "/data/llava/train.json"
    assert flat["custom.dataset.media_path"] == "/data/wts/videos/train"
    assert flat["custom.dataset.system_prompt"] == SYSTEM_PROMPT
    assert flat["train.optm_decay_type"] == "cosine" and flat["train.ckpt.save_freq"] == 20
    assert flat["train.ckpt.max_keep"] == 2 and flat["train.optm_warmup_steps"] == 3
    assert _flat(cosmos_rl.recipe_config(_cfg(SETTING_A), gpus_per_node=4))["train.train_batch_per_replica"] == 32
    b = _flat(cosmos_rl.recipe_config(_cfg(SETTING_B)))
    assert b["custom.vision.total_pixels"] == 6422528 and "custom.vision.max_pixels" not in b


def test_nframes_constant_decay_max_steps_and_resume():
    flat = _flat(cosmos_rl.recipe_config(_cfg({"nframes": 8}, decay="constant", max_steps=5), resume=True))
    assert flat["custom.vision.nframes"] == 8 and "custom.vision.fps" not in flat
    assert flat["train.optm_decay_type"] == "none"     # cosmos-rl's spelling of no decay
    assert flat["train.max_num_steps"] == 5 and flat["train.resume"] is True


@pytest.mark.parametrize("train,message", [
    ({"mode": "lora"}, "train.mode='lora'"),
    ({"freeze_vision": True}, "train.freeze_vision=true"),
    ({"global_batch": 100}, "multiple of 8 GPUs"),
    ({"global_batch": 24, "micro_batch": 2}, "micro_batch=2"),   # 3 per rank is not a multiple of 2
])
def test_unsupported_settings_are_errors(train, message):
    with pytest.raises(ValueError, match=message):
        cosmos_rl.recipe_config(_cfg(SETTING_A, **train))


# Our TrainConfig fields the recipe keys carry (the values of RECIPE_SFT_KEYS), plus the global batch.
ROUND_TRIP_FIELDS = sorted(set(RECIPE_SFT_KEYS.values()) | {"train.global_batch"})


def _field(cfg, dotted):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("video,train", [
    (SETTING_A, {}), (SETTING_B, {}),
    ({"nframes": 8, "min_pixels": 3136, "max_frames": 64}, {"decay": "constant", "max_steps": 7, "save_every": 0,
                                                            "compile": True, "betas": [0.9, 0.999]}),
], ids=["A", "B", "nframes"])
def test_round_trip_through_the_recipe_reader(tmp_path, video, train):
    cfg = _cfg(video, **train)
    job = cosmos_rl.write_recipe_job(cfg, tmp_path / "job", gpus_per_node=8)
    back = load_train_config(job / cosmos_rl.CONFIG_NAME, on_ignored=lambda msg: None)
    assert {k: _field(back, k) for k in ROUND_TRIP_FIELDS} == {k: _field(cfg, k) for k in ROUND_TRIP_FIELDS}
    assert back.video == cfg.video


def test_the_published_recipe_file_survives_a_round_trip(tmp_path):
    """The recipe's own file -> our config -> the file we write: every recipe value comes back (logging
    aside: no wandb in the cluster), so the cosmos-rl run sees the published settings."""
    (tmp_path / "sft_config.toml").write_text(RECIPE_FILE)
    cfg = load_train_config(tmp_path / "sft_config.toml", on_ignored=lambda msg: None)
    written = _flat(cosmos_rl.recipe_config(cfg, gpus_per_node=8))
    published = _flat(tomllib.loads(RECIPE_FILE))
    assert set(published) == RECIPE_A
    assert {k: written[k] for k in published if not k.startswith("logging.")} == \
        {k: v for k, v in published.items() if not k.startswith("logging.")}


def test_job_directory_files(tmp_path):
    job = cosmos_rl.write_recipe_job(_cfg(SETTING_B), tmp_path / "job")
    assert sorted(p.name for p in job.iterdir()) == ["custom_sft.py", "run.sh", "sft_config.toml"]
    assert tomllib.loads((job / "sft_config.toml").read_text()) == cosmos_rl.recipe_config(_cfg(SETTING_B))
    run = (job / "run.sh").read_text()
    assert 'exec cosmos-rl --config "$here/sft_config.toml" "$here/custom_sft.py"' in run
    assert (job / "run.sh").stat().st_mode & 0o111
    assert cosmos_rl.command(job) == ["cosmos-rl", "--config", str(job / "sft_config.toml"),
                                      str(job / "custom_sft.py")]


def _load_script(job: Path):
    py_compile.compile(str(job / "custom_sft.py"), doraise=True)
    spec = importlib.util.spec_from_file_location("custom_sft", job / "custom_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)   # cosmos_rl is imported only in main()
    return module


def test_dataset_script_builds_the_recipes_conversation(tmp_path):
    rec = VideoQARecord(id="q1", video="20230707_12_SN17_T1/overhead_view/a.mp4", question="What is the weather?",
                        options={"a": "Sunny", "b": "Rainy", "c": "Snowy"}, answer="b")
    unanswered = VideoQARecord(id="q2", video="b.mp4", question="Road surface?", options={"a": "Dry", "b": "Wet"})
    write_llava(tmp_path / "train.json", [rec, unanswered])
    cfg = _cfg(SETTING_A)
    cfg.data.annotation_path, cfg.data.media_path = str(tmp_path / "train.json"), str(tmp_path / "videos")
    job = cosmos_rl.write_recipe_job(cfg, tmp_path / "job")
    script = _load_script(job)

    dataset_cfg, vision = script.read_custom(job / "sft_config.toml")
    assert vision == {"fps": 1.0, "max_pixels": 81920}
    ds = script.LlavaVideoDataset(dataset_cfg["annotation_path"], dataset_cfg["media_path"],
                                  dataset_cfg["system_prompt"], vision)
    assert len(ds) == 1 and ds.skipped == 1
    system, user, assistant = ds[0]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    video, text = user["content"]
    assert video == {"type": "video", "video": str(tmp_path / "videos" / rec.video), "fps": 1.0, "max_pixels": 81920}
    assert text == {"type": "text", "text": user_text(rec)}   # one prompt: the trainer's user turn
    assert assistant == {"role": "assistant", "content": answer_text(rec)}


def test_dataset_script_reads_the_keys_we_write(tmp_path):
    script = _load_script(cosmos_rl.write_recipe_job(_cfg(SETTING_A), tmp_path / "job"))
    vision_keys = {k.split(".")[-1] for k in RECIPE_SFT_KEYS if k.startswith("custom.vision.")}
    assert set(script.VISION_KEYS) == vision_keys
    source = (tmp_path / "job" / "custom_sft.py").read_text()
    for key in (k.split(".")[-1] for k in RECIPE_SFT_KEYS if k.startswith("custom.dataset.")):
        assert f'"{key}"' in source
    (tmp_path / "bad.toml").write_text('[custom.dataset]\nannotation_path = "x.json"\n[custom.vision]\nfsp = 1\n')
    with pytest.raises(ValueError, match=r"bad.toml: \[custom.vision\] unknown key\(s\) \['fsp'\]"):
        script.read_custom(tmp_path / "bad.toml")


def test_dataset_script_names_bad_records(tmp_path):
    script = _load_script(cosmos_rl.write_recipe_job(_cfg(SETTING_A), tmp_path / "job"))
    (tmp_path / "bad.json").write_text('[{"id": "x", "video": "v.mp4", "conversations": []}]')
    with pytest.raises(ValueError, match=r"bad.json: 1 of 1 records unusable: record 0"):
        script.LlavaVideoDataset(str(tmp_path / "bad.json"))


def test_train_without_cosmos_rl_writes_the_job_and_says_where_it_runs(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(f'[train]\noutput_dir = "{tmp_path / "out"}"\nfreeze_vision = false\n'
                                     f'[data]\nannotation_path = "{tmp_path / "train.json"}"\n')
    rc = cli.main(["train", "--config", str(tmp_path / "c.toml"), "train.engine=cosmos-rl"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images/cosmos-rl.Dockerfile" in err and "cosmos_rl package" in err
    assert (tmp_path / "out" / "cosmos-rl" / "sft_config.toml").is_file()


def test_run_recipe_links_the_final_export(tmp_path, monkeypatch):
    monkeypatch.setattr(cosmos_rl, "_cosmos_rl_installed", lambda: True)
    (tmp_path / "train.json").write_text("[]")
    cfg = _cfg(SETTING_A, output_dir=str(tmp_path / "out"))
    cfg.data.annotation_path = str(tmp_path / "train.json")
    launched = []

    def fake_cosmos_rl(cmd):   # what cosmos-rl leaves: <output_dir>/<timestamp>/safetensors/step_N
        launched.append(cmd)
        for stamp, step in (("20260101000000", 99), ("20260102000000", 9), ("20260102000000", 40)):
            (tmp_path / "out" / stamp / "safetensors" / f"step_{step}").mkdir(parents=True)
        return 0

    result = cosmos_rl.run_recipe(cfg, resume=True, gpus=8, launch=fake_cosmos_rl)
    job = tmp_path / "out" / "cosmos-rl"
    assert launched == [cosmos_rl.command(job)]
    assert tomllib.loads((job / "sft_config.toml").read_text())["train"]["resume"] is True
    final = Path(result.final_dir)
    assert final.is_symlink() and final.resolve() == (tmp_path / "out/20260102000000/safetensors/step_40").resolve()
    meta = yaml.safe_load((final / "trafficvlm.json").read_text())
    assert meta["training"]["train"]["engine"] == "cosmos-rl" and meta["video"]["max_pixels"] == 81920

    with pytest.raises(RuntimeError, match="cosmos-rl exited with code 3"):
        cosmos_rl.run_recipe(cfg, gpus=8, launch=lambda cmd: 3)


def test_link_final_keeps_a_real_directory(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "2026/safetensors/step_1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is not a link"):
        cosmos_rl.link_final(tmp_path)


def _container(job):
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


def test_pytorchjob_for_cosmos_rl_validates_and_runs_the_recipe():
    spec = JobSpec(name=job_name("run-7"), engine="cosmos-rl", image=engine_image("cosmos-rl"), run_id="run-7",
                   config_text=(REPO / "configs/sft/recipe_setting_a.toml").read_text(),
                   overrides=["train.output_dir=/mnt/data/checkpoints/run-7/sft"])
    job, configmap = build_pytorchjob(spec), build_configmap(spec)
    assert validate_manifests([configmap, job]) == []
    container = _container(job)
    assert container["image"].rsplit("/", 1)[-1].startswith("cosmos-rl:")
    assert container["command"] == ["python"]
    assert container["args"][:3] == ["-m", "trafficvlm", "train"]
    assert container["args"][-1] == "train.engine=cosmos-rl" and "--resume" in container["args"]
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]
    with pytest.raises(ValueError, match="one node"):
        JobSpec(name="tvlm-sft-x", engine="cosmos-rl", nodes=2)


def test_sft_job_cli_and_pipeline_request_select_the_engine(capsys):
    assert cli.main(["sft", "job", "--dry-run", "--engine", "cosmos-rl", "--run-id", "r1"]) == 0
    job = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "PyTorchJob"][0]
    assert validate_manifests(job) == []
    assert "cosmos-rl:" in _container(job)["image"] and _container(job)["command"] == ["python"]

    request = SftRequest(run_id="r2", llava_dir="/l", wts_dir="/w", base_model="/m", output_root="/o",
                         engine="cosmos-rl")
    spec = spec_from_request(request, namespace="ml")
    assert spec.engine == "cosmos-rl" and spec.image == engine_image("cosmos-rl")
    assert train_locally_command(request)[-1] == "train.engine=cosmos-rl"
    plain = SftRequest(run_id="r2", llava_dir="/l", wts_dir="/w", base_model="/m", output_root="/o")
    assert spec_from_request(plain, namespace="ml").image == plain.train_image
    assert not any("engine" in a for a in train_locally_command(plain))
    # The pipeline's train_overrides select the engine too (image and command follow).
    by_override = SftRequest(run_id="r3", llava_dir="/l", wts_dir="/w", base_model="/m", output_root="/o",
                             extra_overrides=['train.engine="cosmos-rl"'])
    assert by_override.engine == "cosmos-rl"
    assert spec_from_request(by_override, namespace="ml").image == engine_image("cosmos-rl")
    with pytest.raises(ValueError, match="train.engine must be one of"):
        SftRequest(run_id="r", llava_dir="/l", wts_dir="/w", base_model="/m", output_root="/o",
                   extra_overrides=["train.engine=deepspeed"])
