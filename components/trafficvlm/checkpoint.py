"""Training state on disk: save atomically, keep the last K, find the latest, restore; export the bundle.

Layout under `OUTPUT_DIR/checkpoints/`:

    step_00000020/          one complete checkpoint (a directory appears only once complete: each is
      .metadata, *.distcp   written to `.step_00000020.tmp/` and renamed)
      trainer_state.json    step, data position, scheduler state, world size
      rng_rank{R}.pt        each rank's RNG states (python, numpy, torch, cuda)

Model and optimizer go through torch.distributed.checkpoint (DCP) with `get_state_dict`/`set_state_dict`,
so FSDP2 shards are saved as a resharding-safe checkpoint: a run can resume on another number of GPUs.
When to save is the trainer's business, not this module's.

    save(ckpt_dir, step, model, optimizer, state={...}, info=dist_info, keep_last=2)
    path = latest(ckpt_dir); state = load(path, model, optimizer, info)
    export_bundle(model, out_dir / "final", base_model_dir=..., meta=..., info=dist_info)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trafficvlm.parallel import DistInfo, barrier

STEP_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
# Files a Hugging Face user (or vLLM / NIM) expects next to the weights, copied from the base model as-is:
# transformers 5 rewrites some of them in a newer layout that older serving stacks do not read.
BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json")


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories start with '.' and are never listed)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _number(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} in the trainer state is not JSON serializable")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: str | Path, step: int, model, optimizer, *, state: dict[str, Any], info: DistInfo,
         keep_last: int = 2) -> Path:
    """Write checkpoint `step` (all ranks call this), then drop all but the newest `keep_last`.

    `state` is JSON-able trainer state (data position, scheduler state_dict, ...), written by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a run killed mid-save
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        payload = {"step": step, "world_size": info.world_size, **state}
        # tensors as numbers: torchao's optimizers keep the learning rate (and so the scheduler's) as a tensor
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2, default=_number) + "\n")
    barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: str | Path, model, optimizer, info: DistInfo) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from checkpoint `path`; return the trainer state.

    A different world size is fine for model and optimizer (DCP reshards); ranks without an RNG file of
    their own take rank 0's, so data order stays deterministic but dropout noise differs from the
    original run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rng_file = path / f"rng_rank{info.rank}.pt"
    if not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


# --- export ----------------------------------------------------------------------------------------------

def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded model weights on rank 0's CPU (an empty dict elsewhere). A collective: all ranks call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_bundle(model, out_dir: str | Path, *, base_model_dir: str | Path, meta: dict[str, Any],
                  info: DistInfo, lora: dict[str, Any] | None = None) -> Path | None:
    """Write the trained model as a Hugging Face directory (DESIGN.md contract 4); returns it on rank 0.

    The weights land in a fresh copy of the base model, loaded on rank 0's CPU in the base model's dtype,
    so the bundle matches the base checkpoint's layout whatever the sharding was. For LoRA, `lora` holds
    the peft LoraConfig kwargs: the adapter goes to `out_dir/adapter/`, the merged model to `out_dir/`."""
    weights = full_state_dict(model)
    out = Path(out_dir)
    if info.is_main:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _write_weights(weights, tmp, Path(base_model_dir), lora)
        _copy_base_files(Path(base_model_dir), tmp)
        from trafficvlm.model import write_bundle_meta

        write_bundle_meta(tmp, meta)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier()
    return out if info.is_main else None


def _write_weights(weights: dict[str, torch.Tensor], out: Path, base_dir: Path, lora: dict[str, Any] | None) -> None:
    from trafficvlm.model import load_model

    base = load_model(base_dir, device="cpu")
    if lora is None:
        _load_exact(base, weights)
        base.save_pretrained(out)
        return
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base, LoraConfig(**lora))
    _load_exact(peft_model, weights)
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out)


def _load_exact(model, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export: trained weights do not match the base model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def _copy_base_files(base_dir: Path, out: Path) -> None:
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
