"""The compiled pipeline end to end, twice, with kfp.local against a real `mlflow server`, a moto S3 bucket and
a bare Git repository (the GitOps target): what a run leaves in MLflow, the registry's aliases, and whether
it rolls out.

    .venv/bin/python -m pytest -q tests/test_pipeline_e2e.py -m slow      # ~2 minutes on 2 cores

1. A permissive gate and no champion yet: the first model becomes `challenger` and `champion`, and the
   rollout pushes one commit naming its checkpoint.
2. A gate the new model cannot pass (50 points better than the champion): a new `challenger`, `champion`
   stays, no commit, and the run still ends green with the reason on the version.

The data, the tiny model and the pipeline's parameters come from `trafficvlm demo --quick` (its helpers,
made smaller still): 4 train + 2 val synthetic scenarios, a few optimizer steps. The smoke test is skipped
(empty endpoint); tests/test_demo.py covers it against a deployed model.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from mlflow_server import mlflow_server  # noqa: F401  (the pytest fixture)
from s3server import s3_server  # noqa: F401  (the pytest fixture)

BUCKET = "e2e-pipeline"
MODEL_NAME = "e2e-pipeline-tiny"          # this test's own registered model (the server is shared)
# The child runs a promoted run logs under its parent ("prepare" is logged by the sft step: prepare is cached
# and takes no run id); the smoke step logs none when its endpoint is empty.
PROMOTED_STAGES = {"ingest", "prepare", "sft", "eval", "quantize", "promote", "rollout"}
# 6 scenarios, a third of them val: 4 train + 2 val; 3 optimizer steps (the pipeline's train_overrides,
# pinned here so a slower --quick cannot slow this test); the rest is --quick.
DEMO_OVERRIDES = ["synth.scenarios=6", "synth.val_fraction=0.34", f"model_name={MODEL_NAME}",
                  'train_overrides=["train.max_steps=3", "train.global_batch=4", "train.warmup_steps=1"]']


@pytest.fixture
def stack(tmp_path, monkeypatch, s3_server, mlflow_server):
    """Tiny data in the bucket, the tiny model, a seeded GitOps repository, and the environment kfp.local's
    step subprocesses inherit (the Secrets and ConfigMap on a cluster)."""
    from trafficvlm import demo
    from trafficvlm.config import load_train_config
    from trafficvlm.stages.ingest import run_upload

    s3_server.apply_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("TRAFFICVLM_CACHE", str(tmp_path / "cache"))
    cfg = demo.load_demo_config(demo.DEFAULT_CONFIG, DEMO_OVERRIDES, quick=True)
    wts = demo.make_dataset(cfg.synth, tmp_path / "wts")
    run_upload(wts, f"s3://{BUCKET}/wts", create_bucket=True, progress=False)
    model = demo.make_tiny_model(cfg.model, load_train_config(demo._repo_path(cfg.train_config),
                                                              cfg.train_overrides), tmp_path / "tiny")
    bare = tmp_path / "gitops.git"
    seed = demo.init_gitops(bare, tmp_path / "gitops-seed")
    return {"cfg": cfg, "model": model, "bare": bare, "seed": seed, "out": tmp_path, "s3": s3_server.client()}


def run_pipeline(stack: dict[str, Any], **gates: float) -> Path:
    """One kfp.local run of the whole pipeline (raises if a step fails); returns OUTPUT_ROOT/RUN_ID."""
    from pipelines.trafficvlm import trafficvlm_pipeline
    from trafficvlm import demo, pipeline_cli

    # As in the demo: OUT/pipeline stands in for the data volume, kfp.local's outputs go under it too.
    params = demo.pipeline_arguments(stack["cfg"], stack["out"], dataset_uri=f"s3://{BUCKET}/wts",
                                     base_model=stack["model"], gitops=stack["bare"], endpoint="",
                                     inputs=set(trafficvlm_pipeline.component_spec.inputs))
    params.update(checkpoint_store=f"s3://{BUCKET}/checkpoints", **gates)
    root = Path(params["output_root"])
    before = set(root.iterdir()) if root.is_dir() else set()
    pipeline_cli.run_local(f"s3://{BUCKET}/wts", params["volume_mount"], params=params)
    (run_dir,) = set(root.iterdir()) - before
    return run_dir


def git(bare: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(bare), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def pipeline_runs(client, run_id: str) -> tuple[Any, dict[str, Any]]:
    """The pipeline's parent run (exactly one) and its child runs by name."""
    from trafficvlm import tracking

    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    parents = client.search_runs([exp.experiment_id], f"tags.`trafficvlm.pipeline_run` = '{run_id}' and "
                                 "tags.`trafficvlm.role` = 'pipeline'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert len(by_name) == len(children), f"a stage logged twice: {[c.info.run_name for c in children]}"
    return parents[0], by_name


def version_by_alias(client, alias: str):
    return client.get_model_version_by_alias(MODEL_NAME, alias)


@pytest.mark.slow
def test_pipeline_twice_promotes_then_keeps_the_champion(stack, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    bare, seed = stack["bare"], stack["seed"]

    # 1. No champion yet, permissive gates: promoted and rolled out.
    first = run_pipeline(stack, min_accuracy=0.0, min_improvement=0.0, max_p_value=1.0)
    parent, stages = pipeline_runs(client, first.name)
    assert parent.info.status == "FINISHED"           # closed by the exit handler
    assert set(stages) == PROMOTED_STAGES
    assert all(c.info.status == "FINISHED" for c in stages.values())
    eval_metrics = stages["eval"].data.metrics
    assert 0.0 <= eval_metrics["accuracy"] <= 1.0 and eval_metrics["total"] > 0
    assert any(k.startswith("accuracy/per_type/") for k in eval_metrics)
    assert {"accuracy_bf16", "accuracy_fp8"} <= set(stages["quantize"].data.metrics)
    champion = version_by_alias(client, "champion")
    assert version_by_alias(client, "challenger").version == champion.version
    assert champion.run_id == stages["promote"].info.run_id
    assert champion.source.startswith(f"s3://{BUCKET}/checkpoints/{first.name}/fp8")
    listed = stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"checkpoints/{first.name}/fp8/")
    assert listed["KeyCount"] > 0                     # the registered source exists
    assert champion.tags["promoted"] == "true"
    assert float(champion.tags["accuracy"]) == pytest.approx(eval_metrics["accuracy"], abs=1e-6)
    commits = git(bare, "rev-list", f"{seed}..main").split()
    assert len(commits) == 1
    assert first.name in git(bare, "log", "-1", "--format=%B", "main")
    assert f"{first.name}/fp8" in git(bare, "show", "main:helm/values/vss.yaml")  # the new checkpoint
    assert stages["rollout"].data.tags["rollout.commit"] == commits[0]

    # 2. A gate this tiny model cannot pass (50 points over the champion): a new challenger, champion
    #    stays, no rollout.
    second = run_pipeline(stack, min_accuracy=0.0, min_improvement=0.5, max_p_value=1.0)
    parent, stages = pipeline_runs(client, second.name)
    assert parent.info.status == "FINISHED"           # not promoting is a green run
    assert set(stages) == PROMOTED_STAGES - {"rollout"}
    challenger = version_by_alias(client, "challenger")
    assert challenger.version != champion.version
    assert challenger.source.startswith(f"s3://{BUCKET}/checkpoints/{second.name}/fp8")
    assert version_by_alias(client, "champion").version == champion.version
    reason = challenger.tags["decision"]
    assert challenger.tags["promoted"] == "false"
    assert reason.startswith("not promoted") and "below the required +50.00%" in reason, reason
    assert f"vs champion v{champion.version}" in reason
    assert stages["promote"].data.tags["promote.decision"] == reason
    assert git(bare, "rev-list", f"{seed}..main").split() == commits
