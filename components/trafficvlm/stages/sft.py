"""The SFT stage: `trafficvlm train` on the command line, `run_train` for the pipeline.

    trafficvlm train --config configs/sft/tiny_cpu.toml
    trafficvlm train --config configs/sft/recipe_setting_a.toml model.path=/models/Cosmos-Reason1-7B
    torchrun --nproc-per-node 8 -m trafficvlm train --config configs/sft/recipe_setting_b.toml --resume
    trafficvlm train --config sft_config.toml        # the reference recipe's cosmos-rl file, mapped

    from trafficvlm.stages.sft import run_train
    result = run_train("configs/sft/tiny_cpu.toml", ["train.max_steps=5"])
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trafficvlm.config import TrainConfig
    from trafficvlm.cosmos_rl import RecipeResult
    from trafficvlm.train import TrainResult

EPILOG = """\
examples:
  trafficvlm train --config configs/sft/tiny_cpu.toml                       # tiny model, synthetic data, CPU
  trafficvlm train --config configs/sft/tiny_cpu.toml train.max_steps=5 train.output_dir=runs/smoke
  trafficvlm train --config configs/sft/tiny_cpu.toml --resume             # continue from the last checkpoint
  trafficvlm train --config configs/sft/recipe_setting_a.toml model.path=/models/Cosmos-Reason1-7B \\
      data.annotation_path=/data/llava/environment_mcq_llava_train.json data.media_path=/data/wts/videos/train
  torchrun --nproc-per-node 8 -m trafficvlm train --config configs/sft/recipe_setting_b.toml train.mode=lora
  trafficvlm train --config sft_config.toml   # the reference recipe's cosmos-rl file: keys mapped, the rest listed
  trafficvlm train --config configs/sft/recipe_setting_a.toml train.engine=cosmos-rl  # run cosmos-rl itself
      # (writes OUTPUT_DIR/cosmos-rl/{sft_config.toml,custom_sft.py,run.sh}; runs only in the cosmos-rl image)

overrides are dotted keys of the config (model.*, data.*, video.*, prompt.*, train.*, lora.*, tracking.*),
e.g. train.output_dir=/pvc/runs/x train.max_steps=100 train.save_every=50 video.fps=2.
Outputs in train.output_dir: config.toml (resolved), metrics.jsonl, tensorboard/, loss.png,
checkpoints/step_N/ (last train.keep_last), final/ (a Hugging Face model directory + trafficvlm.json).
MLflow logging when tracking.uri or MLFLOW_TRACKING_URI is set.
"""


def run_train(config: "str | Path | TrainConfig | None", overrides: list[str] | None = None, *,
              resume: bool = False) -> "TrainResult | RecipeResult":
    """Train from a TOML file (ours or the recipe's sft_config.toml) or a TrainConfig, plus overrides.
    With train.engine = "cosmos-rl" the recipe's cosmos-rl runs instead (trafficvlm.cosmos_rl.run_recipe)."""
    from trafficvlm.config import TrainConfig, deep_merge, from_dict, load_train_config, parse_overrides, to_dict

    if isinstance(config, TrainConfig):
        cfg = from_dict(TrainConfig, deep_merge(to_dict(config), parse_overrides(overrides or [])))
    else:
        cfg = load_train_config(config, overrides)
    if cfg.train.engine == "cosmos-rl":  # the recipe's engine, in its own image: see trafficvlm.cosmos_rl
        from trafficvlm.cosmos_rl import run_recipe

        return run_recipe(cfg, resume=resume)
    from trafficvlm.train import train

    return train(cfg, resume=resume)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a VLM (one process, or under torchrun with FSDP2)",
                              description="Supervised fine-tuning on LLaVA-format video MCQ data: full, frozen "
                                          "parts, or LoRA; FSDP2 under torchrun; resumable checkpoints; exports "
                                          "a Hugging Face bundle to OUTPUT_DIR/final.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TOML config (ours, or the recipe's sft_config.toml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from trafficvlm.cosmos_rl import EngineUnavailable

    try:
        result = run_train(args.config, args.overrides, resume=args.resume)
    except EngineUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.final_loss is not None and os.environ.get("RANK", "0") == "0":
        print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, model in {result.final_dir}")
    return 0
