"""bench/recipe_scale.sh: its plan runs the PyTorchJob's own trainer command, its warm-up fills the keys the
trainer reads, its projection arithmetic, and one tiny end-to-end run on the CPU (random-init tiny model)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trafficvlm.config import ConfigError, load_train_config
from trafficvlm.launcher import NCCL_ENV, JobSpec, job_name, trainer_args

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "recipe_scale.sh"
sys.path.insert(0, str(REPO / "bench"))

import recipe_scale  # noqa: E402


def _script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TRAFFICVLM_CACHE")}
    full = {**base, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=240)


def _planned(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_plan_runs_the_launchers_trainer_command(tmp_path):
    proc = _script(tmp_path, "--dry-run", "--max-steps", "3", NGPU="4")
    assert proc.returncode == 0, proc.stderr
    commands = {argv[argv.index("--rdzv-id") + 1]: argv for argv in _planned(proc.stdout) if "torchrun" in argv}
    work = tmp_path / "work"
    for variant, batch in (("per-question", ["train.global_batch=128"]),
                           ("shared-prefix", ["train.shared_prefix=true", "train.global_batch=8"])):
        overrides = [f"data.annotation_path={work}/llava/environment_mcq_llava_train.json",
                     f"data.media_path={work}/wts/videos/train", f"model.path={work}/processor",
                     f"train.output_dir={work}/runs/recipe-scale-{variant}/sft",
                     "model.random_init=7b", *batch, "train.max_steps=3"]
        spec = JobSpec(name=job_name(f"recipe-scale-{variant}"), nodes=1, gpus_per_node=4,
                       config_path="configs/sft/recipe_setting_a.toml", overrides=overrides)
        expected = [a.replace("$(MASTER_ADDR):$(MASTER_PORT)", "127.0.0.1:29511") for a in trainer_args(spec)]
        argv = commands[spec.name]
        cut = argv.index("torchrun")
        assert argv[cut + 1:] == expected
        assert argv[:cut] == ["env", *(f"{k}={v}" for k, v in NCCL_ENV.items())]   # the pod's variables
    assert not (tmp_path / "work").exists()                                      # a plan writes nothing


def test_plan_only_env_and_the_warm_up_matches_the_trainer(tmp_path):
    proc = _script(tmp_path, PLAN_ONLY="1", NGPU="2", EXTRA_OVERRIDES="video.fps=2")
    assert proc.returncode == 0, proc.stderr
    planned = _planned(proc.stdout)
    warm = next(a for a in planned if a[1:5] == ["-m", "trafficvlm", "cache", "warm"])
    train = next(a for a in planned if "torchrun" in a)
    keys = dict(a.split("=", 1) for a in train if "=" in a and not a.startswith("-"))
    assert warm[5] == keys["data.annotation_path"] and warm[warm.index("--media-dir") + 1] == keys["data.media_path"]
    assert warm[warm.index("--config") + 1] == train[train.index("--config") + 1]
    assert "--set=video.fps=2" in warm and keys["video.fps"] == "2"               # same spec -> same cache keys
    assert "train.max_steps" not in " ".join(train)                              # a full epoch by default
    synth = next(a for a in planned if a[1:4] == ["-m", "trafficvlm", "synth"])
    assert synth[synth.index("--size") + 1] == "1920x1080" and synth[synth.index("--duration") + 1] == "75"
    assert synth[synth.index("--scenarios") + 1] == "137"


def test_epoch_projection_and_scaling():
    rows = [{"step_s": 30.0, "samples_per_s": 128 / 30, "tokens_per_s": 1e5, "mfu": 0.2, "loss": 12.0},
            {"step_s": 10.0, "samples_per_s": 12.8, "tokens_per_s": 4e5, "mfu": 0.4, "loss": 11.9},
            {"step_s": 14.0, "samples_per_s": 128 / 14, "tokens_per_s": 3e5, "mfu": 0.3, "loss": 11.8}]
    v = recipe_scale.variant_summary(rows, items=3420, global_batch=128, ngpu=4, target_gpus=8, ref_items=5115,
                                     complete=False)
    assert v["steps_timed"] == 2 and v["step_s_mean"] == 12.0                 # the first step left out
    assert v["steps_per_epoch"] == 27 and v["epoch_s"] == 27 * 12.0            # ceil(3420 / 128)
    assert v["epoch_min_on_8_gpus"] == round(27 * 12.0 / 2 / 60, 2)            # same per-GPU shapes, 2x GPUs
    assert v["epoch_min_reference_shape_on_8_gpus"] == round(40 * 12.0 / 2 / 60, 2)
    assert v["samples_per_s"] == round(256 / 24, 3) and v["mfu"] == round((0.4 * 10 + 0.3 * 14) / 24, 4)
    full = recipe_scale.variant_summary(rows, items=384, global_batch=128, ngpu=8, target_gpus=8, ref_items=5115,
                                        complete=True)
    assert full["epoch_measured"] and full["epoch_s"] == 54.0                  # a real epoch: every step counts
    assert "error" in recipe_scale.variant_summary([], 1, 1, 1, 8, 1, complete=False)


def test_random_init_accepts_only_known_architectures():
    assert load_train_config(None, ["model.random_init=7b"]).model.random_init == "7b"
    with pytest.raises(ConfigError, match="random_init"):
        load_train_config(None, ["model.random_init=13b"])


def test_tiny_end_to_end_run_on_cpu(tmp_path):
    """Every stage for real, small: synth -> prepare -> warm -> train (random-init tiny model) -> summary."""
    proc = _script(tmp_path, "--max-steps", "2", NGPU="1", SCENARIOS="2", DURATION="4", SIZE="64x48", FPS="4",
                   GLOBAL_BATCH="4", WORKERS="2", VARIANTS="per-question",
                   EXTRA_OVERRIDES="model.random_init=tiny train.device=cpu data.num_workers=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "recipe_scale.json").read_text())
    assert doc["data"] == {"samples": 70, "videos": 7}                          # 7 overhead videos x 10 questions
    assert doc["one_off"]["warm"]["decoded"] == 7 and doc["one_off"]["warm_s"] > 0
    v = doc["variants"]["per-question"]
    assert v["steps_run"] == 2 and v["steps_per_epoch"] == 18 and not v["epoch_measured"]
    assert v["samples_per_s"] > 0 and v["process_wall_s"] > 0
    run = tmp_path / "work" / "runs" / "recipe-scale-per-question" / "sft"
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "final").exists() and not (run / "checkpoints").exists()   # random weights: nothing saved
    assert "per-question" in proc.stdout and "projected" in proc.stdout
