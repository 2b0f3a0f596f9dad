"""The trafficvlm pipeline (KFP v2): ingest -> prepare -> sft -> eval -> quantize + gate -> promote -> rollout
-> smoke test, inside an exit handler that closes the run's MLflow parent run.

    trafficvlm pipeline compile                     # -> pipelines/compiled/trafficvlm.yaml (upload in the UI)
    trafficvlm pipeline run --local --dataset-dir data/wts
    trafficvlm pipeline submit --host https://kubeflow.example.com/pipeline --experiment wts

Read `_stages` for the steps, then `trafficvlm_pipeline` for the parameters (what a user can set when
starting a run) and the MLflow parent run around the steps. Where data lives: everything large is on the
shared volume `DATA_PVC`, mounted at `volume_mount` (videos and LLaVA JSON under `data_root`, checkpoints
under `output_root`), and passes between steps as path strings; see pipelines/components.py for why.

Caching is decided per step, not per run:
- ingest: off. The bucket can change under the same URI, and a cache hit would hide that. Re-running is
  cheap: ingest is incremental (unchanged files are not fetched again).
- prepare: on. It is a pure function of its inputs, and its input `fingerprint` changes exactly when the
  ingested files do, so a hit is never stale.
- sft, eval, quantize: off. Their inputs name mutable storage (a checkpoint path can be overwritten or
  deleted), and a scheduled retraining must train.
- promote, rollout, smoke, tracking: off. They change the outside world (model registry, Git) or check it;
  a cached "success" would silently skip a promotion.

Promotion: promote always runs (a model the FP8 gate rejected is registered too, as the record of what was
tried, and refused); rollout and the smoke test run only when promote moved `champion`. A run whose model
is not better ends green, with promote's printed reason.
"""

from kfp import dsl

from pipelines import cluster
from pipelines.components import (evaluate, finish_tracking, ingest, prepare, promote, quantize, rollout, sft,
                                  smoke, start_tracking)
from pipelines.images import STAGE_IMAGES

PIPELINE_NAME = "trafficvlm"
# Stages in DAG order with the module each shell imports; `pipeline run --local` runs those that exist.
STAGES = {"ingest": "trafficvlm.stages.ingest", "prepare": "trafficvlm.stages.prepare",
          "sft": "trafficvlm.stages.sft", "eval": "trafficvlm.stages.evaluate",
          "quantize": "trafficvlm.stages.quantize", "promote": "trafficvlm.stages.promote",
          "rollout": "trafficvlm.stages.rollout", "smoke": "trafficvlm.smoke"}


def _stages(run_id, parent_run_id, *, dataset_uri, data_root, volume_mount, subsets, splits, strict, base_model,
            output_root, launcher, train_config, nodes, gpus_per_node, fps, nframes, max_pixels, total_pixels,
            learning_rate, epochs, global_batch_size, train_overrides, max_fp8_accuracy_drop, min_accuracy,
            min_improvement, max_p_value, model_name, checkpoint_store, gitops_repo, gitops_branch, values_path,
            smoke_endpoint, smoke_timeout_s) -> None:
    """The steps, top to bottom (called once, at compile time, inside the exit handler)."""
    tracked = {"run_id": run_id, "parent_run_id": parent_run_id}
    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits, **tracked)
    data.set_caching_options(False).set_retry(2).set_cpu_limit("4").set_memory_limit("8Gi")
    for setting in (cluster.with_data_volume, cluster.with_s3_credentials, cluster.with_tracking):
        setting(data)
    wts_dir = data.outputs["wts_dir"]

    prep = prepare(wts_dir=wts_dir, fingerprint=data.outputs["fingerprint"], data_root=data_root,
                   subsets=subsets, splits=splits, strict=strict)
    prep.set_caching_options(True).set_cpu_limit("4").set_memory_limit("16Gi")
    cluster.with_data_volume(prep)
    llava_dir = prep.outputs["Output"]

    train = sft(launcher=launcher, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets, base_model=base_model,
                output_root=output_root, train_config=train_config, train_image=STAGE_IMAGES["train"],
                nodes=nodes, gpus_per_node=gpus_per_node, fps=fps, nframes=nframes, max_pixels=max_pixels,
                total_pixels=total_pixels, learning_rate=learning_rate, epochs=epochs,
                global_batch_size=global_batch_size, train_overrides=train_overrides, **tracked)
    train.set_caching_options(False).set_retry(1)  # a retried launcher re-attaches to its job
    # Resources, node selector, tolerations and volumes set here are the PyTorchJob's (per node), not the
    # launcher pod's (dsl.TaskConfig passthrough).
    train.set_cpu_limit("64").set_memory_limit("512Gi")
    train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_node)
    cluster.gpu_stage(train)
    checkpoint = train.output

    score = evaluate(checkpoint=checkpoint, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets,
                     output_root=output_root, **tracked)
    score.set_caching_options(False).set_cpu_limit("16").set_memory_limit("128Gi")
    score.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    cluster.gpu_stage(score)

    fp8 = quantize(checkpoint=checkpoint, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets,
                   eval_dir=score.outputs["results_dir"], max_accuracy_drop=max_fp8_accuracy_drop,
                   output_root=output_root, **tracked)
    fp8.set_caching_options(False).set_cpu_limit("16").set_memory_limit("192Gi")
    fp8.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    cluster.gpu_stage(fp8)
    fp8_checkpoint = fp8.outputs["fp8_checkpoint"]

    chosen = promote(fp8_checkpoint=fp8_checkpoint, eval_dir=score.outputs["results_dir"],
                     checkpoint_store=checkpoint_store, fp8_gate_passed=fp8.outputs["gate_passed"],
                     fp8_drop=fp8.outputs["accuracy_drop"], min_accuracy=min_accuracy,
                     min_improvement=min_improvement, max_p_value=max_p_value, model_name=model_name, **tracked)
    chosen.set_caching_options(False)
    for setting in (cluster.with_data_volume, cluster.with_s3_credentials, cluster.with_tracking):
        setting(chosen)

    # "Output" is promote's return value, whether `champion` moved (see promote for why not a named output)
    with dsl.If(chosen.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a KFP condition)
        deploy = rollout(fp8_checkpoint=fp8_checkpoint, volume_mount=volume_mount, gitops_repo=gitops_repo,
                         gitops_branch=gitops_branch, values_path=values_path,
                         model_version=chosen.outputs["version"], accuracy=score.outputs["accuracy"], **tracked)
        deploy.set_caching_options(False)
        for setting in (cluster.with_data_volume, cluster.with_gitops_credentials, cluster.with_tracking):
            setting(deploy)  # the volume: the bundle's video spec (trafficvlm.json)

        check = smoke(endpoint=smoke_endpoint, fp8_checkpoint=fp8_checkpoint, llava_dir=llava_dir,
                      wts_dir=wts_dir, subsets=subsets, model_name=model_name,
                      model_version=chosen.outputs["version"], champion_before=chosen.outputs["champion_before"],
                      timeout_s=smoke_timeout_s, **tracked).after(deploy)
        check.set_caching_options(False)
        for setting in (cluster.with_data_volume, cluster.with_endpoint_key, cluster.with_tracking):
            setting(check)


@dsl.pipeline(name=PIPELINE_NAME, description="Post-train Cosmos-Reason1-7B (Qwen2.5-VL-7B) on WTS traffic "
              "video and roll the FP8 checkpoint out to NVIDIA VSS / NIM through GitOps.")
def trafficvlm_pipeline(
    # data
    dataset_uri: str = "s3://trafficvlm-data/wts",         # or a directory on the data volume
    data_root: str = cluster.DATA_MOUNT,
    volume_mount: str = cluster.DATA_MOUNT,                 # where steps see the data volume (local: a stand-in dir)
    subsets: list = ["environment"],
    splits: list = ["train", "val"],
    strict: bool = False,                                   # fail prepare on any data problem
    # model and training
    base_model: str = f"{cluster.DATA_MOUNT}/models/Cosmos-Reason1-7B",
    output_root: str = f"{cluster.DATA_MOUNT}/checkpoints",  # run outputs: RUN_ID/{sft,eval,fp8}
    launcher: str = "pytorchjob",                           # or "local": train in the step itself
    train_config: str = "configs/sft/recipe_setting_a.toml",  # path inside the train image
    nodes: int = 1,
    gpus_per_node: int = 8,
    fps: float = 1.0,                                       # vision: 0 keeps the config file's value
    nframes: int = 0,
    max_pixels: int = 81920,
    total_pixels: int = 0,
    learning_rate: float = 1e-5,                            # hyperparameters: 0 keeps the config's value
    epochs: int = 1,
    global_batch_size: int = 128,
    train_overrides: list = [],                             # extra trainer `key=value` overrides
    # gates and promotion (accuracies as fractions: 0.01 = one point)
    max_fp8_accuracy_drop: float = 0.01,
    min_accuracy: float = 0.85,
    min_improvement: float = 0.0,
    max_p_value: float = 0.05,                              # McNemar vs the champion; 1.0 turns it off
    model_name: str = "cosmos-reason1-7b-wts",
    checkpoint_store: str = "s3://trafficvlm-models/checkpoints",  # registered checkpoints: RUN_ID/fp8/
    # GitOps target and the smoke test after it
    gitops_repo: str = "https://git.example.com/platform/vss-deploy.git",
    gitops_branch: str = "main",
    values_path: str = "helm/values/vss.yaml",
    smoke_endpoint: str = "",                               # OpenAI-compatible base URL; "" skips the test
    smoke_timeout_s: float = 120.0,
):
    params = dict(locals())  # the pipeline's parameters (channels), for _stages
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # resolved when the run starts, never at compile time

    done = finish_tracking(run_id=run_id)
    done.set_caching_options(False)
    cluster.with_tracking(done)

    with dsl.ExitHandler(done, name="mlflow-parent-run"):
        parent = start_tracking(run_id=run_id)
        parent.set_caching_options(False).set_retry(2)
        cluster.with_tracking(parent)
        parent_run_id = parent.output
        _stages(run_id, parent_run_id, **params)


# --- the prefixes `pipeline run --local` runs while later stages are still being written --------------------

@dsl.pipeline(name=f"{PIPELINE_NAME}-data", description="ingest -> prepare")
def data_pipeline(dataset_uri: str, data_root: str, subsets: list = ["environment"],
                  splits: list = ["train", "val"], strict: bool = False) -> str:
    """The data stages alone; returns the LLaVA directory."""
    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits,
                  run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, parent_run_id="")
    data.set_caching_options(False)
    prep = prepare(wts_dir=data.outputs["wts_dir"], fingerprint=data.outputs["fingerprint"],
                   data_root=data_root, subsets=subsets, splits=splits, strict=strict)
    return prep.outputs["Output"]


@dsl.pipeline(name=f"{PIPELINE_NAME}-train", description="ingest -> prepare -> sft -> eval")
def train_pipeline(dataset_uri: str, data_root: str, base_model: str, output_root: str, train_config: str,
                   subsets: list = ["environment"], splits: list = ["train", "val"], strict: bool = False,
                   fps: float = 1.0, nframes: int = 0, max_pixels: int = 81920, total_pixels: int = 0,
                   learning_rate: float = 0.0, epochs: int = 0, global_batch_size: int = 0,
                   train_overrides: list = []) -> float:
    """Training in the step (launcher "local"), then eval; returns the accuracy. Hyperparameters default
    to the config file's (0). No MLflow parent run (stages still log standalone runs when a URI is set)."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits, run_id=run_id,
                  parent_run_id="")
    data.set_caching_options(False)
    prep = prepare(wts_dir=data.outputs["wts_dir"], fingerprint=data.outputs["fingerprint"],
                   data_root=data_root, subsets=subsets, splits=splits, strict=strict)
    train = sft(launcher="local", run_id=run_id, parent_run_id="", llava_dir=prep.outputs["Output"],
                wts_dir=data.outputs["wts_dir"], subsets=subsets, base_model=base_model,
                output_root=output_root, train_config=train_config, train_image=STAGE_IMAGES["train"],
                nodes=1, gpus_per_node=0, fps=fps, nframes=nframes, max_pixels=max_pixels,
                total_pixels=total_pixels, learning_rate=learning_rate, epochs=epochs,
                global_batch_size=global_batch_size, train_overrides=train_overrides)
    train.set_caching_options(False)
    score = evaluate(checkpoint=train.output, llava_dir=prep.outputs["Output"], wts_dir=data.outputs["wts_dir"],
                     subsets=subsets, output_root=output_root, run_id=run_id, parent_run_id="")
    score.set_caching_options(False)
    return score.outputs["accuracy"]
