"""The trafficvlm pipeline (KFP v2): ingest -> prepare -> sft -> eval -> quantize + gate -> promote -> rollout.

    trafficvlm pipeline compile                     # -> pipelines/compiled/trafficvlm.yaml (upload in the UI)
    trafficvlm pipeline run --local --dataset-dir data/wts
    trafficvlm pipeline submit --host https://kubeflow.example.com/pipeline --experiment wts

Read it top to bottom: the parameters (what a user can set when starting a run), then the steps. Where
data lives: everything large is on the shared volume `DATA_PVC` mounted at `data_root` (videos, LLaVA
JSON, checkpoints) and passes between steps as path strings; see pipelines/components.py for why.

Caching is decided per step, not per run:
- ingest: off. The bucket can change under the same URI, and a cache hit would hide that. Re-running is
  cheap: ingest is incremental (unchanged files are not fetched again).
- prepare: on. It is a pure function of its inputs, and its input `fingerprint` changes exactly when the
  ingested files do, so a hit is never stale.
- sft, eval, quantize: off. Their inputs name mutable storage (a checkpoint path can be overwritten or
  deleted), and a scheduled retraining must train.
- promote, rollout: off. They change the outside world (model registry, Git); a cached "success" would
  silently skip a promotion.
"""

from kfp import dsl

from pipelines import cluster
from pipelines.components import evaluate, ingest, prepare, promote, quantize, rollout, sft
from pipelines.images import STAGE_IMAGES

PIPELINE_NAME = "trafficvlm"
# Stages in DAG order with the module each shell imports; `pipeline run --local` runs those that exist.
STAGES = {"ingest": "trafficvlm.stages.ingest", "prepare": "trafficvlm.stages.prepare",
          "sft": "trafficvlm.stages.sft", "eval": "trafficvlm.stages.evaluate",
          "quantize": "trafficvlm.stages.quantize", "promote": "trafficvlm.stages.promote",
          "rollout": "trafficvlm.stages.rollout"}


@dsl.pipeline(name=PIPELINE_NAME, description="Post-train Cosmos-Reason1-7B (Qwen2.5-VL-7B) on WTS traffic "
              "video and roll the FP8 checkpoint out to NVIDIA VSS / NIM through GitOps.")
def trafficvlm_pipeline(
    # data
    dataset_uri: str = "s3://trafficvlm-data/wts",         # or a directory on the data volume
    data_root: str = cluster.DATA_MOUNT,
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
    # gates and promotion
    max_fp8_accuracy_drop: float = 0.01,
    min_accuracy: float = 0.85,
    min_improvement: float = 0.0,
    model_name: str = "cosmos-reason1-7b-wts",
    # GitOps target
    gitops_repo: str = "https://git.example.com/platform/vss-deploy.git",
    gitops_branch: str = "main",
    values_path: str = "helm/values/vss.yaml",
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER  # resolved when the run starts, never at compile time

    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits)
    data.set_caching_options(False).set_retry(2).set_cpu_limit("4").set_memory_limit("8Gi")
    cluster.with_data_volume(data)
    cluster.with_s3_credentials(data)
    wts_dir = data.outputs["wts_dir"]

    prep = prepare(wts_dir=wts_dir, fingerprint=data.outputs["fingerprint"], data_root=data_root,
                   subsets=subsets, splits=splits, strict=strict)
    prep.set_caching_options(True).set_cpu_limit("4").set_memory_limit("16Gi")
    cluster.with_data_volume(prep)
    llava_dir = prep.outputs["Output"]

    train = sft(launcher=launcher, run_id=run_id, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets,
                base_model=base_model, output_root=output_root, train_config=train_config,
                train_image=STAGE_IMAGES["train"], nodes=nodes, gpus_per_node=gpus_per_node, fps=fps,
                nframes=nframes, max_pixels=max_pixels, total_pixels=total_pixels, learning_rate=learning_rate,
                epochs=epochs, global_batch_size=global_batch_size, train_overrides=train_overrides)
    train.set_caching_options(False).set_retry(1)  # a retried launcher re-attaches to its job
    # Resources, node selector, tolerations and volumes set here are the PyTorchJob's (per node), not the
    # launcher pod's (dsl.TaskConfig passthrough).
    train.set_cpu_limit("64").set_memory_limit("512Gi")
    train.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus_per_node)
    cluster.gpu_stage(train)
    checkpoint = train.output

    score = evaluate(checkpoint=checkpoint, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets,
                     output_root=output_root, run_id=run_id)
    score.set_caching_options(False).set_cpu_limit("16").set_memory_limit("128Gi")
    score.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    cluster.gpu_stage(score)
    accuracy = score.outputs["Output"]

    fp8 = quantize(checkpoint=checkpoint, llava_dir=llava_dir, wts_dir=wts_dir, subsets=subsets,
                   bf16_accuracy=accuracy, max_accuracy_drop=max_fp8_accuracy_drop, output_root=output_root,
                   run_id=run_id)
    fp8.set_caching_options(False).set_cpu_limit("16").set_memory_limit("192Gi")
    fp8.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    cluster.gpu_stage(fp8)

    with dsl.If(fp8.outputs["gate_passed"] == True, name="fp8-gate-passed"):  # noqa: E712 (a KFP condition)
        chosen = promote(fp8_checkpoint=fp8.outputs["fp8_checkpoint"], accuracy=accuracy,
                         min_accuracy=min_accuracy, min_improvement=min_improvement, model_name=model_name,
                         run_id=run_id)
        chosen.set_caching_options(False)
        cluster.with_data_volume(chosen)
        cluster.with_s3_credentials(chosen)
        cluster.with_tracking(chosen)

        with dsl.If(chosen.output == True, name="promoted"):  # noqa: E712
            deploy = rollout(fp8_checkpoint=fp8.outputs["fp8_checkpoint"], data_root=data_root,
                             gitops_repo=gitops_repo, gitops_branch=gitops_branch, values_path=values_path,
                             run_id=run_id)
            deploy.set_caching_options(False)
            cluster.with_data_volume(deploy)  # reads the bundle's video spec (trafficvlm.json)
            cluster.with_gitops_credentials(deploy)


# --- the prefixes `pipeline run --local` runs while later stages are still being written --------------------

@dsl.pipeline(name=f"{PIPELINE_NAME}-data", description="ingest -> prepare")
def data_pipeline(dataset_uri: str, data_root: str, subsets: list = ["environment"],
                  splits: list = ["train", "val"], strict: bool = False) -> str:
    """The data stages alone; returns the LLaVA directory."""
    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits)
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
    to the config file's (0)."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    data = ingest(dataset_uri=dataset_uri, data_root=data_root, subsets=subsets, splits=splits)
    data.set_caching_options(False)
    prep = prepare(wts_dir=data.outputs["wts_dir"], fingerprint=data.outputs["fingerprint"],
                   data_root=data_root, subsets=subsets, splits=splits, strict=strict)
    train = sft(launcher="local", run_id=run_id, llava_dir=prep.outputs["Output"],
                wts_dir=data.outputs["wts_dir"], subsets=subsets, base_model=base_model,
                output_root=output_root, train_config=train_config, train_image=STAGE_IMAGES["train"],
                nodes=1, gpus_per_node=0, fps=fps, nframes=nframes, max_pixels=max_pixels,
                total_pixels=total_pixels, learning_rate=learning_rate, epochs=epochs,
                global_batch_size=global_batch_size, train_overrides=train_overrides)
    train.set_caching_options(False)
    score = evaluate(checkpoint=train.output, llava_dir=prep.outputs["Output"], wts_dir=data.outputs["wts_dir"],
                     subsets=subsets, output_root=output_root, run_id=run_id)
    score.set_caching_options(False)
    return score.outputs["Output"]
