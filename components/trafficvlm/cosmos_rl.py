"""The recipe-reproduction engine of the SFT stage: run the reference recipe's cosmos-rl job from our config.

    trafficvlm train --config configs/sft/recipe_setting_a.toml train.engine=cosmos-rl   # in the cosmos-rl image
    trafficvlm sft job --engine cosmos-rl --dry-run                                      # the PyTorchJob for it

    from trafficvlm.cosmos_rl import recipe_config, write_recipe_job, command
    job_dir = write_recipe_job(cfg, "runs/sft-a/cosmos-rl", gpus_per_node=8)
    subprocess.run(command(job_dir), check=True)       # cosmos-rl --config .../sft_config.toml .../custom_sft.py

The reference recipe (nvidia-cosmos/cosmos-cookbook, scripts/examples/reason1/intelligent-transportation)
trains with `cosmos-rl --config sft_config.toml custom_sft.py`. From one `TrainConfig` this module writes that
job: `sft_config.toml` with the recipe's keys (mapped through `config.RECIPE_SFT_KEYS`, the same table
`trafficvlm train` uses to read a recipe file, so the two directions agree), `custom_sft.py` (our dataset
script, assets/cosmos_rl_dataset.py.tmpl, reading the same [custom] keys as the recipe's) and `run.sh`.

The recipe file leaves the optimizer, schedule and checkpoint cadence to cosmos-rl's defaults (0.4.7:
lr 1e-6, 20 warmup steps, no decay, save every 20 steps, keep 5, torch.compile on). We write those keys
explicitly from the config (`CARRIED_KEYS`), so a run does not depend on the installed cosmos-rl version and
means what our config says. cosmos-rl needs transformers < 5, flash-attn and redis, so it runs only in its
own image (images/cosmos-rl.Dockerfile); this module imports nothing of it and is tested without it.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trafficvlm.config import (FPS_MAX_FRAMES, FPS_MIN_FRAMES, RECIPE_SFT_KEYS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                               VIDEO_TOTAL_PIXELS, ConfigError, TrainConfig, dump_toml, to_dict)

CONFIG_NAME, SCRIPT_NAME, RUN_NAME = "sft_config.toml", "custom_sft.py", "run.sh"
JOB_DIR = "cosmos-rl"             # the job directory, under train.output_dir
TEMPLATE = Path(__file__).parent / "assets" / "cosmos_rl_dataset.py.tmpl"
IMAGE_DOCKERFILE = "images/cosmos-rl.Dockerfile"
# Our dotted key -> the recipe's dotted key: the inverse of the table the recipe reader uses.
OURS_TO_RECIPE = {ours: recipe for recipe, ours in RECIPE_SFT_KEYS.items()}
# Our keys written into every job although the recipe file omits them (see the module docstring).
CARRIED_KEYS = ("train.epochs", "train.lr", "train.decay", "train.min_lr_ratio", "train.weight_decay",
                "train.max_grad_norm", "train.betas", "train.compile", "train.keep_last", "train.grad_checkpointing")
# Our keys behind keys the recipe's file has (its other keys are fixed values, set in recipe_config).
RECIPE_MAPPED_KEYS = ("data.annotation_path", "data.media_path", "prompt.system_prompt", "train.output_dir",
                      "train.warmup_steps", "train.micro_batch", "model.path", "model.max_length")
# Video keys written only when they differ from qwen-vl-utils' default, as the recipe's settings do
# (setting A: fps + max_pixels; setting B: fps + total_pixels).
VISION_DEFAULTS = {"max_pixels": VIDEO_MAX_PIXELS, "total_pixels": VIDEO_TOTAL_PIXELS,
                   "min_pixels": VIDEO_MIN_PIXELS, "min_frames": FPS_MIN_FRAMES, "max_frames": FPS_MAX_FRAMES}
DECAY_TO_RECIPE = {"cosine": "cosine", "linear": "linear", "constant": "none"}


class EngineUnavailable(RuntimeError):
    """cosmos-rl (or a GPU) is missing here: the engine runs only in the cosmos-rl image."""


# --- the config ----------------------------------------------------------------------------------------

def recipe_config(cfg: TrainConfig, *, nodes: int = 1, gpus_per_node: int = 8,
                  resume: bool = False) -> dict[str, Any]:
    """The recipe's sft_config.toml as a nested dict. `dp_shard_size` is nodes x gpus_per_node (one FSDP
    replica over all GPUs, as the recipe); `train_batch_per_replica` is our global batch over it (cosmos-rl
    gives every data-parallel rank that many samples per step). `resume`: continue from the newest
    checkpoint under output_dir (cosmos-rl starts fresh when there is none)."""
    _check_supported(cfg)
    world = nodes * gpus_per_node
    if world < 1:
        raise ValueError(f"cosmos-rl engine: needs at least one GPU, got nodes={nodes} gpus_per_node={gpus_per_node}")
    per_rank, rest = divmod(cfg.train.global_batch, world)
    if rest or per_rank % cfg.train.micro_batch:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} must be a multiple of {world} GPUs x "
                         f"train.micro_batch={cfg.train.micro_batch} for the cosmos-rl engine")
    flat = {OURS_TO_RECIPE[k]: _value(cfg, k) for k in RECIPE_MAPPED_KEYS + CARRIED_KEYS}
    flat["train.optm_decay_type"] = DECAY_TO_RECIPE[cfg.train.decay]   # cosmos-rl spells "constant" "none"
    flat.update(_vision(cfg))
    if cfg.train.save_every:   # 0 (ours: only at the end) has no cosmos-rl spelling: keep its default
        flat["train.ckpt.save_freq"] = cfg.train.save_every
    if cfg.train.max_steps is not None:  # cosmos-rl stops at this step or at the epoch limit, whichever first
        flat["train.max_num_steps"] = cfg.train.max_steps
    flat.update({
        "train.train_batch_per_replica": per_rank,
        "train.enable_validation": False,
        "train.train_policy.type": "sft",
        "train.train_policy.dataset.test_size": 0,
        "train.ckpt.enable_checkpoint": True,
        "policy.parallelism.tp_size": 1, "policy.parallelism.cp_size": 1,
        "policy.parallelism.dp_shard_size": world, "policy.parallelism.pp_size": 1,
        # The recipe logs to wandb too; here metrics stay in the pod log (no wandb key in the cluster).
        "logging.logger": ["console"], "logging.project_name": cfg.tracking.experiment,
        "logging.experiment_name": cfg.tracking.run_name,
    })
    if resume:
        flat["train.resume"] = True
    return _nest(flat)


def _check_supported(cfg: TrainConfig) -> None:
    """Settings the recipe's cosmos-rl job cannot express: an error naming the key, never a silent change."""
    t = cfg.train
    problems = [f"train.mode={t.mode!r} (the recipe is full SFT)"] if t.mode != "full" else []
    problems += [f"train.{name}=true (the recipe trains the whole model)"
                 for name in ("freeze_vision", "freeze_merger", "freeze_llm", "freeze_embeddings")
                 if getattr(t, name)]
    if t.shared_prefix:
        problems.append("train.shared_prefix=true (our trainer's feature)")
    if cfg.data.limit is not None:
        problems.append("data.limit (cosmos-rl reads the whole annotation file)")
    if problems:
        raise ConfigError("cosmos-rl engine cannot run: " + "; ".join(problems) +
                         ". Change these or use train.engine=trafficvlm.")


def _value(cfg: TrainConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _vision(cfg: TrainConfig) -> dict[str, Any]:
    v = cfg.video
    out: dict[str, Any] = ({"custom.vision.nframes": v.nframes} if v.nframes is not None
                           else {"custom.vision.fps": v.fps})
    for name, default in VISION_DEFAULTS.items():
        if getattr(v, name) != default:
            out[f"custom.vision.{name}"] = getattr(v, name)
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


# --- the job directory ---------------------------------------------------------------------------------

def write_recipe_job(cfg: TrainConfig, out_dir: str | Path, *, nodes: int = 1, gpus_per_node: int = 8,
                     resume: bool = False) -> Path:
    """Write sft_config.toml, custom_sft.py and run.sh into `out_dir`; returns it."""
    out = Path(out_dir)
    recipe = recipe_config(cfg, nodes=nodes, gpus_per_node=gpus_per_node, resume=resume)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# The reference recipe's cosmos-rl config, written by trafficvlm.cosmos_rl from a TrainConfig.\n"
              f"# Run: cosmos-rl --config {CONFIG_NAME} {SCRIPT_NAME}   (in the image of {IMAGE_DOCKERFILE})\n\n")
    (out / CONFIG_NAME).write_text(header + dump_toml(recipe))
    script = TEMPLATE.read_text().replace(
        "@@HEADER@@", "Written by trafficvlm.cosmos_rl (assets/cosmos_rl_dataset.py.tmpl); regenerate, don't edit.")
    (out / SCRIPT_NAME).write_text(script)
    run = out / RUN_NAME
    # No `cd`: relative paths in the config resolve against the caller's directory, as with `trafficvlm train`.
    run.write_text("#!/usr/bin/env bash\n"
                   "# The reference recipe's launch line, on the files next to this script.\n"
                   "set -euo pipefail\n"
                   'here="$(dirname "$0")"\n'
                   f'exec cosmos-rl --config "$here/{CONFIG_NAME}" "$here/{SCRIPT_NAME}"\n')
    run.chmod(0o755)
    return out


def command(out_dir: str | Path) -> list[str]:
    """The recipe's command line for a job directory written by `write_recipe_job`."""
    out = Path(out_dir)
    return ["cosmos-rl", "--config", str(out / CONFIG_NAME), str(out / SCRIPT_NAME)]


# --- running it (`trafficvlm train` with train.engine = "cosmos-rl") ----------------------------------

@dataclass
class RecipeResult:
    """What `run_recipe` leaves: the job directory and the exported model (`final/`, as our trainer's)."""

    output_dir: str
    job_dir: str
    final_dir: str
    final_loss: float | None = None   # in cosmos-rl's log, not parsed here
    steps: int = 0


def run_recipe(cfg: TrainConfig, *, resume: bool = False, gpus: int | None = None,
               launch: Callable[[list[str]], int] | None = None) -> RecipeResult:
    """Write the job under train.output_dir, run cosmos-rl on this node's GPUs, then point
    `output_dir/final` at cosmos-rl's last Hugging Face export and add trafficvlm.json to it (contract 4).
    Without cosmos-rl or a GPU the job directory is still written, then EngineUnavailable says where."""
    gpus = gpus if gpus is not None else visible_gpus()
    job = write_recipe_job(cfg, Path(cfg.train.output_dir) / JOB_DIR, gpus_per_node=gpus or 8, resume=resume)
    missing = [what for what, ok in (("the cosmos_rl package", _cosmos_rl_installed()), ("a GPU", gpus > 0))
               if not ok]
    if missing:
        raise EngineUnavailable(
            f"engine cosmos-rl: wrote {job} but cannot run it here ({' and '.join(missing)} missing). cosmos-rl "
            f"needs transformers < 5, flash-attn and redis, so it runs only in the cosmos-rl image "
            f"({IMAGE_DOCKERFILE}): run `trafficvlm train ... train.engine=cosmos-rl` or `bash {job / RUN_NAME}` "
            f"there, e.g. with `trafficvlm sft job --engine cosmos-rl`.")
    if not Path(cfg.data.annotation_path).is_file():
        raise FileNotFoundError(f"data.annotation_path {cfg.data.annotation_path}: no such LLaVA JSON file")
    print(f"cosmos-rl engine: {' '.join(command(job))} ({gpus} GPUs)", flush=True)
    rc = (launch or _launch)(command(job))
    if rc != 0:
        raise RuntimeError(f"cosmos-rl exited with code {rc} (its log is above; job files in {job})")
    final = link_final(cfg.train.output_dir)
    _write_bundle_meta(cfg, final)
    print(f"done: cosmos-rl finished, model in {final}")
    return RecipeResult(cfg.train.output_dir, str(job), str(final))


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _cosmos_rl_installed() -> bool:
    return importlib.util.find_spec("cosmos_rl") is not None and shutil.which("cosmos-rl") is not None


def _launch(cmd: list[str]) -> int:
    """Run cosmos-rl as a child; SIGTERM (the pod being stopped) is passed on, so its workers shut down."""
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def link_final(output_dir: str | Path) -> Path:
    """`output_dir/final` -> cosmos-rl's last export, `<timestamp>/safetensors/step_<N>` (newest run, highest
    step), as a relative symlink, so the later stages find the model where our trainer puts it."""
    out = Path(output_dir)
    exports = sorted(out.glob("*/safetensors/step_*"), key=lambda p: (p.parts[-3], _step(p)))
    if not exports:
        raise FileNotFoundError(f"{out}: cosmos-rl wrote no Hugging Face export (*/safetensors/step_N)")
    final = out / "final"
    if final.exists() and not final.is_symlink():
        raise FileExistsError(f"{final} exists and is not a link to a cosmos-rl export; move it away first")
    final.unlink(missing_ok=True)
    final.symlink_to(exports[-1].relative_to(out))
    return final


def _step(path: Path) -> int:
    suffix = path.name.removeprefix("step_")
    return int(suffix) if suffix.isdigit() else -1


def _write_bundle_meta(cfg: TrainConfig, final: Path) -> None:
    from trafficvlm.model import bundle_meta, write_bundle_meta

    training = to_dict(cfg)
    training["train"]["engine"] = "cosmos-rl"   # whoever called us, this model came from cosmos-rl
    write_bundle_meta(final, bundle_meta(cfg.video, cfg.prompt, base_model=cfg.model.path, training=training))
