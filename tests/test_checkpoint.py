"""Checkpoints: atomic save, keep-last-K, latest, exact restore; and the acceptance test of resume: a run
killed with SIGKILL after a checkpoint and restarted with --resume ends with the same weights as an
uninterrupted run (max abs difference <= 1e-5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sft_fixtures import TINY_CONFIG, make_tiny_env


@pytest.fixture
def one_rank():
    from trafficvlm.parallel import close_distributed, init_distributed

    info = init_distributed("cpu")
    yield info
    close_distributed()


def _toy(info, seed):
    from trafficvlm.parallel import shard_model

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].__class__ = type("Block", (torch.nn.Linear,), {})  # a "block" class for shard_model to find
    shard_model(model, info, block_classes=["Block"], checkpointing=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _full(model):
    from trafficvlm.checkpoint import full_state_dict

    return {k: v.clone() for k, v in full_state_dict(model).items()}


def test_save_keeps_last_k_and_load_restores_model_optimizer_and_rng(one_rank, tmp_path):
    from trafficvlm import checkpoint

    model, opt = _toy(one_rank, seed=0)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, state={"note": step}, info=one_rank, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / ".step_00000004.tmp").mkdir()  # a save killed half-way is never "latest"
    assert checkpoint.latest(tmp_path).name == "step_00000003"
    expected, draw = _full(model), torch.rand(3)

    other, other_opt = _toy(one_rank, seed=1)
    state = checkpoint.load(checkpoint.latest(tmp_path), other, other_opt, one_rank)
    assert state["step"] == 3 and state["note"] == 3 and state["world_size"] == 1
    for k, v in _full(other).items():
        assert torch.equal(v, expected[k]), k
    assert torch.equal(torch.rand(3), draw)  # RNG as it was at save time
    moments = [s["exp_avg"] for s in other_opt.state.values()]
    assert moments and all(float(m.full_tensor().abs().sum()) > 0 for m in moments)


def test_load_rejects_an_incomplete_checkpoint(one_rank, tmp_path):
    from trafficvlm import checkpoint

    model, opt = _toy(one_rank, seed=0)
    (tmp_path / "step_00000005").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "step_00000005", model, opt, one_rank)


def _weights(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(final.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path_factory):
    from trafficvlm.stages.sft import run_train

    env = make_tiny_env(tmp_path_factory.mktemp("sft-env"))
    common = dict(max_steps=6, save_every=2, keep_last=2, global_batch=2, micro_batch=1, lr=2e-3,
                  grad_checkpointing=False)
    base = tmp_path_factory.mktemp("resume")
    run_train(TINY_CONFIG, env.overrides(base / "straight", **common))

    killed = base / "killed"
    cmd = [sys.executable, "-m", "trafficvlm", "train", "--config", str(TINY_CONFIG),
           *env.overrides(killed, **common)]
    log = (base / "killed.log").open("w")
    proc = subprocess.Popen(cmd, env=env.env(), stdout=log, stderr=subprocess.STDOUT)
    first = killed / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert alive and first.exists(), (base / "killed.log").read_text()[-3000:]
    assert not (killed / "final").exists()  # it really died mid-run

    resumed = subprocess.run(cmd + ["--resume"], env=env.env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    straight, again = _weights(base / "straight" / "final"), _weights(killed / "final")
    assert straight.keys() == again.keys()
    diff = max(float((straight[k].float() - again[k].float()).abs().max()) for k in straight)
    assert diff <= 1e-5, diff
    trained = _weights(env.model)
    assert any(not torch.equal(trained[k], straight[k]) for k in straight if k in trained)
