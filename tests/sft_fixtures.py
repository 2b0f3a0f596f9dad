"""Shared setup for the SFT tests (test_train, test_checkpoint, test_parallel): a tiny model and a small
synthetic WTS dataset, built once per test session in a temporary directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyEnv:
    root: Path
    model: Path
    annotation: Path
    media: Path
    cache: Path

    def overrides(self, out: Path, **train) -> list[str]:
        """Overrides for configs/sft/tiny_cpu.toml that point it at this env; `train` adds train.* keys."""
        base = [f"model.path={self.model}", f"data.annotation_path={self.annotation}",
                f"data.media_path={self.media}", f"data.frame_cache={self.cache}", f"train.output_dir={out}"]
        return base + [f"train.{k}={_toml(v)}" for k, v in train.items()]

    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess (the package importable, one thread, offline, no MLflow)."""
        base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return {**base, "PYTHONPATH": str(REPO / "components"), "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRAFFICVLM_CACHE": str(self.cache)}


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def make_tiny_env(root: Path) -> TinyEnv:
    from trafficvlm.model import build_tiny
    from trafficvlm.stages.prepare import run_prepare
    from trafficvlm.synth import synthesize

    env = TinyEnv(root, root / "model", root / "llava" / "environment_mcq_llava_train.json",
                  root / "wts" / "videos" / "train", root / "frames")
    if not env.annotation.is_file():
        build_tiny(env.model, seed=0)
        synthesize(root / "wts", seed=0, scenarios=2, normal=0, bdd=0, val_fraction=0.0, duration=4.0,
                   progress=False)
        run_prepare(root / "wts", env.annotation.parent, splits=("train",), check_videos=False)
    return env


TINY_CONFIG = REPO / "configs" / "sft" / "tiny_cpu.toml"


# The reference recipe's sft_config.toml as published (nvidia-cosmos/cosmos-cookbook,
# scripts/examples/reason1/intelligent-transportation/sft_config.toml, commit 7b2b5c77), key for key.
PUBLISHED_RECIPE_SFT = """\
[custom.dataset]
annotation_path = "/path/to/WTS/environment_mcq_llava_train.py"
media_path = "/path/to/WTS/videos/train"
system_prompt = "You are a helpful assistant that can answer questions about a street-view CCTV footage."

[custom.vision]
fps = 1
max_pixels = 81920

[train]
output_dir = "outputs/wts_environment_mcq"
optm_warmup_steps = 0
train_batch_per_replica = 16
enable_validation = false

[policy]
model_name_or_path = "nvidia/Cosmos-Reason1-7B"
model_max_length = 81920

[logging]
logger = ['console', 'wandb']
project_name = "cosmos_reason1"
experiment_name = "post_training/wts_environment_mcq"

[train.train_policy]
type = "sft"
mini_batch = 1
dataset.test_size = 0

[train.ckpt]
enable_checkpoint = true

[policy.parallelism]
tp_size = 1
cp_size = 1
dp_shard_size = 8
pp_size = 1
"""


def recipe_sft_config(**changes) -> str:
    """The published recipe file with dotted keys changed or added (`**{"train.optm_lr": 2e-3}`)."""
    import tomllib

    from trafficvlm.config import dump_toml

    data = tomllib.loads(PUBLISHED_RECIPE_SFT)
    for key, value in changes.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return dump_toml(data)
