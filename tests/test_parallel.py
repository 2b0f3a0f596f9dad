"""Distributed: the same code on 2 gloo processes (torchrun) gives the losses of 1 process at the same
global batch (relative difference <= 1e-5 per step), and sharding finds blocks by class name only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sft_fixtures import TINY_CONFIG, make_tiny_env


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(tmp_path_factory):
    from trafficvlm.stages.sft import run_train

    env = make_tiny_env(tmp_path_factory.mktemp("sft-env"))
    base = tmp_path_factory.mktemp("ddp")
    # LoRA keeps the CPU steps cheap; the full-parameter path is the same code (test_train, test_checkpoint).
    common = dict(mode="lora", max_steps=3, global_batch=2, micro_batch=1, lr=1e-2, grad_checkpointing=True)
    one = run_train(TINY_CONFIG, env.overrides(base / "one", **common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "trafficvlm", "train", "--config", str(TINY_CONFIG), *env.overrides(base / "two", **common)]
    two = subprocess.run(cmd, env=env.env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, "\n".join(ln for ln in two.stderr.splitlines() if "[rank1]" not in ln)[-4000:]
    assert "= 2 ranks x 1 x 1 accumulation" in two.stdout
    assert len(one.losses) == 3
    assert _losses(base / "two") == pytest.approx(one.losses, rel=1e-5)
    assert one.losses[-1] < one.losses[0]
    assert (base / "two" / "final" / "adapter").is_dir()


def test_shard_model_needs_a_block_class_and_keeps_parameter_names():
    from trafficvlm.parallel import close_distributed, find_blocks, init_distributed, shard_model

    info = init_distributed("cpu")
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
        names = [n for n, _ in model.named_parameters()]
        assert len(find_blocks(model, ["Linear"])) == 2
        with pytest.raises(ValueError, match="no submodule of class"):
            shard_model(model, info, block_classes=["DecoderLayer"])
        shard_model(model, info, block_classes=["Linear"], checkpointing=True)
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
        model(torch.ones(1, 2)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        close_distributed()
