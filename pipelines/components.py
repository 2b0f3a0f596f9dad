"""The pipeline's components: one lightweight Python component per stage, each a thin shell that parses its
inputs, calls the stage function of the `trafficvlm` package and records its outputs.

Why lightweight components with our own image (not container components): `kfp.local` runs only
lightweight Python components, so the demo, the tests and the cluster run the same definitions; the body is
shipped as source, so every import happens inside the function; `install_kfp_package=False` because the
stage images carry kfp already and air-gapped clusters cannot pip-install it.

Data plane vs. artifacts: the WTS videos, the LLaVA JSON the trainer reads and the checkpoints live on a
shared volume or in S3 and travel between steps as *path strings* — the PyTorchJob's pods cannot see KFP
artifacts, and copying checkpoints through artifact storage into every consuming pod is slow and breaks
across buckets. Artifacts carry what the UI should show: the ingest manifest, a copy of the (small) LLaVA
files with their report, metrics.

The later stages (eval, quantize, promote, rollout) call their stage functions by name; those modules are
being written and the shells import them inside the body, so compiling never needs them.
"""

from typing import NamedTuple

from kfp import dsl

from pipelines.images import STAGE_IMAGES


@dsl.component(base_image=STAGE_IMAGES["ingest"], install_kfp_package=False)
def ingest(dataset_uri: str, data_root: str, subsets: list, splits: list,
           dataset: dsl.Output[dsl.Dataset]) -> NamedTuple("IngestOutputs", wts_dir=str, fingerprint=str):
    """s3://BUCKET/PREFIX -> DATA_ROOT/wts (incremental: unchanged files are not fetched again); a directory
    path is used in place. S3 credentials come from env vars (a Kubernetes Secret), never parameters.
    `fingerprint` (relative path, size, mtime of every data file; ingest leaves unchanged files untouched)
    changes exactly when the data does: it is what makes the cached `prepare` step safe."""
    import hashlib
    import json
    import os
    from pathlib import Path
    from typing import NamedTuple

    from trafficvlm.stages.ingest import MANIFEST_FILE, TMP_SUFFIX, run_ingest

    if dataset_uri.startswith("s3://"):
        wts_dir = os.path.join(data_root, "wts")
        print(run_ingest(dataset_uri, wts_dir, splits=splits, subsets=subsets, progress=False).summary())
    elif os.path.isdir(dataset_uri):
        wts_dir = dataset_uri
    else:
        raise FileNotFoundError(f"dataset_uri {dataset_uri!r}: neither s3://... nor an existing directory")
    root = Path(wts_dir)
    # Not ingest's own bookkeeping: its manifest is rewritten (with timings) on every run.
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name != MANIFEST_FILE and TMP_SUFFIX not in p.name)
    digest = hashlib.sha256()
    for path in files:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    fingerprint = digest.hexdigest()[:16]
    manifest = {"path": wts_dir, "source": dataset_uri, "files": len(files), "fingerprint": fingerprint}
    Path(dataset.path).write_text(json.dumps(manifest, indent=1))
    dataset.metadata.update(manifest)
    return NamedTuple("IngestOutputs", wts_dir=str, fingerprint=str)(wts_dir, fingerprint)


@dsl.component(base_image=STAGE_IMAGES["prepare"], install_kfp_package=False)
def prepare(wts_dir: str, fingerprint: str, data_root: str, subsets: list, splits: list, strict: bool,
            llava: dsl.Output[dsl.Dataset], metrics: dsl.Output[dsl.Metrics]) -> str:
    """WTS -> LLaVA MCQ JSON + prepare_report.json under DATA_ROOT/llava/<fingerprint>-<subsets>-<splits>.
    Pure in its inputs (the fingerprint stands for the data), hence cached. Returns the directory."""
    import os
    import shutil

    from trafficvlm.stages.prepare import run_prepare

    out_dir = os.path.join(data_root, "llava", "-".join([fingerprint, *subsets, *splits]))
    report = run_prepare(wts_dir, out_dir, subsets=subsets, splits=splits, strict=strict)
    shutil.copytree(out_dir, llava.path, dirs_exist_ok=True)  # small: JSON only, for the UI and lineage
    llava.metadata.update({"path": out_dir, "wts_dir": wts_dir, "fingerprint": fingerprint})
    for out in report.outputs:
        metrics.log_metric(f"samples_{out.subset}_{out.split}", out.samples)
    metrics.log_metric("problems", len(report.problems))
    print(f"prepare: {sum(o.samples for o in report.outputs)} samples in {out_dir}, "
          f"{len(report.problems)} problem(s), {len(report.notes)} note(s)")
    return out_dir


@dsl.component(
    base_image=STAGE_IMAGES["sft"], install_kfp_package=False,
    # On a cluster the GPU/CPU/memory, node selector, tolerations and volumes set on this task go to the
    # PyTorchJob's pods, not to this pod (which only creates and follows the job). Env (MLflow, S3
    # credentials) is needed by both.
    task_config_passthroughs=[
        dsl.TaskConfigField.RESOURCES,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_VOLUMES,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
    ])
def sft(launcher: str, run_id: str, llava_dir: str, wts_dir: str, subsets: list, base_model: str,
        output_root: str, train_config: str, train_image: str, nodes: int, gpus_per_node: int, fps: float,
        nframes: int, max_pixels: int, total_pixels: int, learning_rate: float, epochs: int,
        global_batch_size: int, train_overrides: list, task_config: dsl.TaskConfig) -> str:
    """Fine-tune: `launcher="pytorchjob"` creates a PyTorchJob and follows it to Succeeded;
    `launcher="local"` runs `trafficvlm train` on this step's machine (kfp.local, the demo).
    Returns the exported model's location (a string: volume path or S3 prefix), never an artifact."""
    from trafficvlm.launcher import SftRequest, run_sft

    request = SftRequest(
        run_id=run_id, llava_dir=llava_dir, wts_dir=wts_dir, subsets=list(subsets), base_model=base_model,
        output_root=output_root, train_config=train_config, train_image=train_image, nodes=nodes,
        gpus_per_node=gpus_per_node,
        video={"fps": fps, "nframes": nframes, "max_pixels": max_pixels, "total_pixels": total_pixels},
        hyper={"learning_rate": learning_rate, "epochs": epochs, "global_batch_size": global_batch_size},
        extra_overrides=list(train_overrides))
    return run_sft(launcher, request, task_config)


@dsl.component(base_image=STAGE_IMAGES["eval"], install_kfp_package=False)
def evaluate(checkpoint: str, llava_dir: str, wts_dir: str, subsets: list, output_root: str, run_id: str,
             metrics: dsl.Output[dsl.Metrics]) -> float:
    """Score the checkpoint on the validation MCQ of the subset it was trained on (video and prompt spec
    from the checkpoint's trafficvlm.json); results under OUTPUT_ROOT/RUN_ID/eval. Returns accuracy."""
    import os

    from trafficvlm.sources.wts import media_dir
    from trafficvlm.stages.evaluate import run_eval
    from trafficvlm.stages.prepare import output_name

    (subset,) = subsets
    results = run_eval(model=checkpoint, data=os.path.join(llava_dir, output_name(subset, "val")),
                       media_dir=os.path.join(wts_dir, media_dir(subset, "val")),
                       out=os.path.join(output_root, run_id, "eval"), progress=False)
    for key in ("accuracy", "correct", "total"):
        metrics.log_metric(key, results[key])
    return float(results["accuracy"])


@dsl.component(base_image=STAGE_IMAGES["quantize"], install_kfp_package=False)
def quantize(checkpoint: str, llava_dir: str, wts_dir: str, subsets: list, bf16_accuracy: float,
             max_accuracy_drop: float, output_root: str, run_id: str, metrics: dsl.Output[dsl.Metrics]
             ) -> NamedTuple("QuantizeOutputs", fp8_checkpoint=str, gate_passed=bool):
    """FP8 PTQ (llm-compressor, FP8_DYNAMIC, vision tower and lm_head kept) + the accuracy gate: the FP8
    model, scored on the same validation set as `evaluate`, may lose at most `max_accuracy_drop`
    (absolute) against the bf16 checkpoint."""
    import os
    from typing import NamedTuple

    from trafficvlm.sources.wts import media_dir
    from trafficvlm.stages.prepare import output_name
    from trafficvlm.stages.quantize import run_quantize

    (subset,) = subsets
    report = run_quantize(checkpoint, os.path.join(output_root, run_id, "fp8"),
                          data=os.path.join(llava_dir, output_name(subset, "val")),
                          media_dir=os.path.join(wts_dir, media_dir(subset, "val")),
                          reference_accuracy=bf16_accuracy, max_accuracy_drop=max_accuracy_drop)
    metrics.log_metric("fp8_accuracy", report.accuracy)
    metrics.log_metric("accuracy_drop", bf16_accuracy - report.accuracy)
    return NamedTuple("QuantizeOutputs", fp8_checkpoint=str, gate_passed=bool)(report.out_dir, report.passed)


@dsl.component(base_image=STAGE_IMAGES["promote"], install_kfp_package=False)
def promote(fp8_checkpoint: str, accuracy: float, min_accuracy: float, min_improvement: float,
            model_name: str, run_id: str) -> bool:
    """Register the checkpoint in MLflow as `challenger`; move `champion` to it only if it reaches
    `min_accuracy` and beats the current champion by `min_improvement`. Returns whether it was promoted."""
    from trafficvlm.stages.promote import run_promote

    return bool(run_promote(fp8_checkpoint, accuracy=accuracy, min_accuracy=min_accuracy,
                            min_improvement=min_improvement, model_name=model_name, run_id=run_id).promoted)


@dsl.component(base_image=STAGE_IMAGES["rollout"], install_kfp_package=False)
def rollout(fp8_checkpoint: str, data_root: str, gitops_repo: str, gitops_branch: str, values_path: str,
            run_id: str) -> str:
    """Commit the new checkpoint into the VSS/NIM Helm values of the GitOps repository (Argo CD / Flux
    deploy it). Returns the commit id ("" when the values already pointed there)."""
    from trafficvlm.stages.rollout import run_rollout

    result = run_rollout(fp8_checkpoint, gitops_repo, branch=gitops_branch, values_path=values_path,
                         run_id=run_id, pvc_mount=data_root)
    print(result.message)
    return result.commit_sha or ""
