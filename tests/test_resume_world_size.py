"""Resume across world sizes: a checkpoint written by 2 gloo ranks (FSDP2 shards through DCP) resumes on 1
process and ends with the weights of the uninterrupted 2-rank run at the same global batch, for full
fine-tuning and for LoRA. The data order is a function of (seed, step) and the loss is the global-batch
mean whatever the world size, so only float summation order differs (measured: see MAX_ABS_DIFF)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_fixtures import TINY_CONFIG, make_tiny_env

STEPS, SAVE_AT = 4, 2
# Measured on CPU (fp32, gloo, these settings): LoRA 0 (bit-identical); full 8.3e-7 (an uninterrupted
# 1-rank run vs 2 ranks: 3.3e-6). The full-mode difference comes only from gradient clipping: the global
# norm of sharded gradients sums per-shard norms in another order, and with max_grad_norm = 0 the 1- and
# 2-rank runs are bit-identical too. Training moves the weights by ~5e-3, so a lost step, a wrong data order
# or a wrong loss scale is far above the tolerance.
MAX_ABS_DIFF = 1e-5


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {directory}"
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_tiny_env(tmp_path_factory.mktemp("sft-env"))  # model, data and frame cache: built once


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_rank_checkpoint_resumes_on_one_rank_with_the_same_weights(mode, env, tmp_path_factory, capsys):
    from trafficvlm.stages.sft import run_train

    base = tmp_path_factory.mktemp(f"ws-{mode}")
    common = dict(mode=mode, max_steps=STEPS, save_every=SAVE_AT, keep_last=2, global_batch=2, micro_batch=1,
                  lr=2e-3, grad_checkpointing=False)
    straight, resumed = base / "two-ranks", base / "two-then-one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "trafficvlm", "train", "--config", str(TINY_CONFIG), *env.overrides(straight, **common)]
    two = subprocess.run(cmd, env=env.env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, "\n".join(ln for ln in two.stderr.splitlines() if "[rank1]" not in ln)[-4000:]
    assert "= 2 ranks x 1 x 1 accumulation" in two.stdout

    # The 2-rank run's step-2 checkpoint, as if that run had been killed there; continue on 1 process.
    ckpt = f"step_{SAVE_AT:08d}"
    shutil.copytree(straight / "checkpoints" / ckpt, resumed / "checkpoints" / ckpt)
    assert json.loads((resumed / "checkpoints" / ckpt / "trainer_state.json").read_text())["world_size"] == 2
    capsys.readouterr()
    one = run_train(TINY_CONFIG, env.overrides(resumed, **common), resume=True)
    log = capsys.readouterr().out
    assert f"(step {SAVE_AT})" in log and "= 1 ranks x 1 x 2 accumulation" in log  # same global batch
    assert one.steps == STEPS and len(one.losses) == STEPS - SAVE_AT

    # The resumed steps see the same samples from the same weights: the same losses.
    assert _losses(resumed) == pytest.approx(_losses(straight)[SAVE_AT:], rel=1e-6)
    final = "final/adapter" if mode == "lora" else "final"
    a, b = _weights(straight / final), _weights(resumed / final)
    diff = _max_diff(a, b)
    moved = _moved(a, env.model, mode)
    print(f"{mode}: max abs weight difference 2 ranks vs 2 -> 1 ranks {diff:.3g}; training moved {moved:.3g}")
    assert diff <= MAX_ABS_DIFF, diff
    # The tolerance is far below what training moved: a lost step or a wrong loss scale would show.
    assert moved > 100 * MAX_ABS_DIFF


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _moved(trained: dict[str, torch.Tensor], base_model: Path, mode: str) -> float:
    """Largest weight change training made (LoRA's B matrices start at zero)."""
    if mode == "lora":
        return max(float(v.abs().max()) for k, v in trained.items() if "lora_B" in k)
    return _max_diff(trained, _weights(base_model))
