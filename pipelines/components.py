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

MLflow: `start_tracking` opens one parent run per pipeline run (found again by its tag on a retry) and
`finish_tracking`, the exit handler, closes it with the run's final state; every stage logs into a child run
of it (`mlflow.parentRunId`) with a `seconds` metric. With no tracking URI (no `MLFLOW_TRACKING_URI` in the
environment: the ConfigMap on a cluster, your shell locally) the parent id is "" and nothing is logged —
except that promotion needs the registry and says so.

Every import happens inside the body (the body is shipped as source), so compiling never needs the stages.
"""

from typing import NamedTuple

from kfp import dsl

from pipelines.images import STAGE_IMAGES


@dsl.component(base_image=STAGE_IMAGES["tracking"], install_kfp_package=False)
def start_tracking(run_id: str) -> str:
    """The pipeline's parent MLflow run (tags `trafficvlm.pipeline_run` = the KFP run id, which its children
    carry too, and `trafficvlm.role` = pipeline); returns its id, or "" when no tracking server is configured.
    A retried step finds the run it created instead of adding one. The stages log to the same (default)
    experiment, so their runs nest under this one in the MLflow UI."""
    from trafficvlm import tracking

    if not tracking.enabled():
        print("MLflow: no MLFLOW_TRACKING_URI; this run logs nothing to MLflow")
        return ""
    import mlflow

    experiment = tracking.DEFAULT_EXPERIMENT
    tags = {"trafficvlm.pipeline_run": run_id, "trafficvlm.role": "pipeline"}
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=query, output_format="list",
                               max_results=1)
    parent = found[0].info.run_id if found else tracking.start_parent_run(
        f"pipeline-{run_id}", experiment=experiment, tags=tags)
    print(f"MLflow: parent run {parent} in experiment {experiment!r}")
    return parent


@dsl.component(base_image=STAGE_IMAGES["tracking"], install_kfp_package=False)
def finish_tracking(run_id: str, status: dsl.PipelineTaskFinalStatus):
    """The exit handler: close the parent run with the pipeline's outcome (FINISHED or FAILED). An exit task
    may not consume other tasks' outputs, so it finds the parent run by its tag, as a retry of
    `start_tracking` does."""
    from trafficvlm import tracking

    state = "FINISHED" if status.state == "SUCCEEDED" else "FAILED"
    if not tracking.enabled():
        print(f"pipeline {status.state}; no MLflow tracking server")
        return
    import mlflow

    experiment = tracking.DEFAULT_EXPERIMENT
    query = f"tags.`trafficvlm.pipeline_run` = '{run_id}' and tags.`trafficvlm.role` = 'pipeline'"
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=query, output_format="list")
    for run in found:  # one, unless the tracking server lost a retried start's answer
        tracking.end_run(run.info.run_id, state)
    print(f"pipeline {status.state}; MLflow parent run {[r.info.run_id for r in found]} -> {state}")


@dsl.component(base_image=STAGE_IMAGES["ingest"], install_kfp_package=False)
def ingest(dataset_uri: str, data_root: str, subsets: list, splits: list, run_id: str, parent_run_id: str,
           dataset: dsl.Output[dsl.Dataset]) -> NamedTuple("IngestOutputs", wts_dir=str, fingerprint=str):
    """s3://BUCKET/PREFIX -> DATA_ROOT/wts (incremental: unchanged files are not fetched again); a directory
    path is used in place. S3 credentials come from env vars (a Kubernetes Secret), never parameters.
    `fingerprint` (relative path, size, mtime of every data file; ingest leaves unchanged files untouched)
    changes exactly when the data does: it is what makes the cached `prepare` step safe."""
    import hashlib
    import json
    import os
    import time
    from pathlib import Path
    from typing import NamedTuple

    from trafficvlm import tracking
    from trafficvlm.stages.ingest import MANIFEST_FILE, TMP_SUFFIX, run_ingest

    started = time.time()
    with tracking.stage_run("ingest", parent_run_id=parent_run_id or None,
                            tags={"trafficvlm.pipeline_run": run_id}):
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
        tracking.log_params({"source": dataset_uri, "fingerprint": fingerprint})
        tracking.log_metrics({"files": len(files), "seconds": time.time() - started})
    return NamedTuple("IngestOutputs", wts_dir=str, fingerprint=str)(wts_dir, fingerprint)


@dsl.component(base_image=STAGE_IMAGES["prepare"], install_kfp_package=False)
def prepare(wts_dir: str, fingerprint: str, data_root: str, subsets: list, splits: list, strict: bool,
            llava: dsl.Output[dsl.Dataset], metrics: dsl.Output[dsl.Metrics]) -> str:
    """WTS -> LLaVA MCQ JSON + prepare_report.json under DATA_ROOT/llava/<fingerprint>-<subsets>-<splits>.
    Pure in its inputs (the fingerprint stands for the data), hence cached — and so it takes no MLflow run
    id (a new id every run would defeat the cache): `sft` logs prepare_report.json's counts to MLflow.
    Returns the directory."""
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
def sft(launcher: str, run_id: str, parent_run_id: str, llava_dir: str, wts_dir: str, subsets: list,
        base_model: str, output_root: str, train_config: str, train_image: str, nodes: int, gpus_per_node: int,
        fps: float, nframes: int, max_pixels: int, total_pixels: int, learning_rate: float, epochs: int,
        global_batch_size: int, train_overrides: list, task_config: dsl.TaskConfig) -> str:
    """Fine-tune: `launcher="pytorchjob"` creates a PyTorchJob and follows it to Succeeded;
    `launcher="local"` runs `trafficvlm train` on this step's machine (kfp.local, the demo). The trainer
    logs its own MLflow child run (`tracking.parent_run_id`); this shell first logs the data counts of
    prepare_report.json (prepare is cached and takes no run id). Returns the exported model's location
    (a string: volume path or S3 prefix), never an artifact."""
    import json
    import os

    from trafficvlm import tracking
    from trafficvlm.launcher import SftRequest, run_sft

    report = os.path.join(llava_dir, "prepare_report.json")
    with tracking.stage_run("prepare", parent_run_id=parent_run_id or None,
                            tags={"trafficvlm.pipeline_run": run_id}):
        counts = json.loads(open(report).read()).get("counts", {}) if os.path.isfile(report) else {}
        tracking.log_metrics({f"{split}/{subset}/{key}": value for split, by_subset in counts.items()
                              for subset, c in by_subset.items() for key, value in c.items()})
        tracking.log_artifact(report, artifact_path="prepare")
    # quoted: a TOML string, whatever characters the id happens to have
    tracking_override = [f'tracking.parent_run_id="{parent_run_id}"'] if parent_run_id else []
    request = SftRequest(
        run_id=run_id, llava_dir=llava_dir, wts_dir=wts_dir, subsets=list(subsets), base_model=base_model,
        output_root=output_root, train_config=train_config, train_image=train_image, nodes=nodes,
        gpus_per_node=gpus_per_node,
        video={"fps": fps, "nframes": nframes, "max_pixels": max_pixels, "total_pixels": total_pixels},
        hyper={"learning_rate": learning_rate, "epochs": epochs, "global_batch_size": global_batch_size},
        extra_overrides=list(train_overrides) + tracking_override)
    return run_sft(launcher, request, task_config)


@dsl.component(base_image=STAGE_IMAGES["eval"], install_kfp_package=False)
def evaluate(checkpoint: str, llava_dir: str, wts_dir: str, subsets: list, output_root: str, run_id: str,
             parent_run_id: str, metrics: dsl.Output[dsl.Metrics]
             ) -> NamedTuple("EvalOutputs", accuracy=float, results_dir=str):
    """Score the checkpoint on the validation MCQ of the subset it was trained on (video and prompt spec
    from the checkpoint's trafficvlm.json); results under OUTPUT_ROOT/RUN_ID/eval, which quantize (the gate's
    reference) and promote (the comparison with the champion) read. run_eval logs its MLflow child run
    (accuracy per question, the results); this shell adds accuracy per type and phase and `seconds` to it."""
    import os
    from typing import NamedTuple

    from trafficvlm import tracking
    from trafficvlm.sources.wts import media_dir
    from trafficvlm.stages.evaluate import run_eval
    from trafficvlm.stages.prepare import output_name

    (subset,) = subsets
    out = os.path.join(output_root, run_id, "eval")
    results = run_eval(model=checkpoint, data=os.path.join(llava_dir, output_name(subset, "val")),
                       media_dir=os.path.join(wts_dir, media_dir(subset, "val")), out=out, progress=False,
                       tracking={"parent_run_id": parent_run_id or None, "run_name": "eval"})
    extra = {f"accuracy/{group}/{key}": s["accuracy"] for group in ("per_type", "per_phase")
             for key, s in (results.get(group) or {}).items()}
    extra["seconds"] = results.get("timing", {}).get("seconds", 0.0)
    if tracking.enabled():
        import mlflow

        with tracking.stage_run("eval", run_id=mlflow.last_active_run().info.run_id):  # run_eval's run
            tracking.log_metrics(extra)
    for key in ("accuracy", "correct", "total"):
        metrics.log_metric(key, results[key])
    return NamedTuple("EvalOutputs", accuracy=float, results_dir=str)(float(results["accuracy"]), out)


@dsl.component(base_image=STAGE_IMAGES["quantize"], install_kfp_package=False)
def quantize(checkpoint: str, llava_dir: str, wts_dir: str, subsets: list, eval_dir: str,
             max_accuracy_drop: float, output_root: str, run_id: str, parent_run_id: str,
             metrics: dsl.Output[dsl.Metrics]
             ) -> NamedTuple("QuantizeOutputs", fp8_checkpoint=str, gate_passed=bool, accuracy_drop=float):
    """FP8 PTQ (llm-compressor, FP8_DYNAMIC, vision tower and lm_head kept) + the accuracy gate: the FP8
    model is scored on the questions `evaluate` scored (its results are the reference) and compared pairwise;
    it may lose at most `max_accuracy_drop` (a fraction: 0.01 = one point). `accuracy_drop` is a fraction
    too (source - FP8; negative when FP8 scored higher). A failed gate is an output, not an error: promote
    records it and refuses."""
    import os
    import time
    from typing import NamedTuple

    from trafficvlm import tracking
    from trafficvlm.sources.wts import media_dir
    from trafficvlm.stages.prepare import output_name
    from trafficvlm.stages.quantize import run_quantize

    (subset,) = subsets
    started = time.time()
    with tracking.stage_run("quantize", parent_run_id=parent_run_id or None,
                            tags={"trafficvlm.pipeline_run": run_id}):
        result = run_quantize(checkpoint, os.path.join(output_root, run_id, "fp8"),
                              data=os.path.join(llava_dir, output_name(subset, "val")),
                              media_dir=os.path.join(wts_dir, media_dir(subset, "val")),
                              max_drop=100.0 * max_accuracy_drop, reference=eval_dir,
                              overwrite=True, progress=False)  # the paths are this run's: a retry redoes them
        gate = result.gate
        drop = gate["drop_points"] / 100.0
        values = {"accuracy_bf16": gate["accuracy_source"], "accuracy_fp8": gate["accuracy_fp8"],
                  "accuracy_drop": drop, "gate_passed": float(result.passed), "p_value": gate["p_value"]}
        tracking.log_metrics({**values, "seconds": time.time() - started})
        tracking.set_tags({"fp8_gate": "passed" if result.passed else "failed"})
    for key, value in values.items():
        metrics.log_metric(key, value)
    return NamedTuple("QuantizeOutputs", fp8_checkpoint=str, gate_passed=bool, accuracy_drop=float)(
        result.out_dir, result.passed, drop)


@dsl.component(base_image=STAGE_IMAGES["promote"], install_kfp_package=False)
def promote(fp8_checkpoint: str, eval_dir: str, checkpoint_store: str, fp8_gate_passed: bool, fp8_drop: float,
            min_accuracy: float, min_improvement: float, max_p_value: float, model_name: str, run_id: str,
            parent_run_id: str, version: dsl.OutputPath(str), reason: dsl.OutputPath(str),
            champion_before: dsl.OutputPath(str)) -> bool:
    """Register the FP8 checkpoint in MLflow as `challenger`; move `champion` to it only if the FP8 gate
    passed, it reaches `min_accuracy`, and it beats the champion by `min_improvement` with McNemar
    p <= `max_p_value` (1.0 turns the test off) on the same questions. The registry needs a URI every
    consumer can read: a checkpoint on the volume is first uploaded to CHECKPOINT_STORE/RUN_ID/fp8/.
    Not promoting is a normal, green outcome; the reason is printed and on the model version.
    Returns whether `champion` moved; `version`, `reason` and `champion_before` are output parameters beside
    it, not a NamedTuple: kfp.local 2.17 cannot resolve a `dsl.If` on a named output (it reads
    "promote-promoted" as a pipeline input and silently skips the branch), but it can on "Output"."""
    import time
    from pathlib import Path

    from trafficvlm import tracking
    from trafficvlm.stages.ingest import run_upload
    from trafficvlm.stages.promote import PromotionPolicy, run_promote

    started = time.time()
    uri = fp8_checkpoint
    if not fp8_checkpoint.startswith(("s3://", "mlflow-artifacts:")):
        uri = f"{checkpoint_store.rstrip('/')}/{run_id}/fp8/"
        print(run_upload(fp8_checkpoint, uri, progress=False).summary())
    policy = PromotionPolicy(min_accuracy=min_accuracy, min_delta=min_improvement, max_p_value=max_p_value)
    d = run_promote(uri, eval_dir, fp8_passed=fp8_gate_passed, fp8_drop=fp8_drop, policy=policy,
                    model_name=model_name, pipeline_run_id=run_id, parent_run_id=parent_run_id or None)
    import mlflow

    with tracking.stage_run("promote", run_id=mlflow.last_active_run().info.run_id):  # run_promote's run
        tracking.log_metrics({"seconds": time.time() - started})
    print(f"{model_name} v{d.version}: {d.reason}")
    for path, value in ((version, d.version), (reason, d.reason), (champion_before, d.champion_before)):
        Path(path).write_text(value or "")
    return d.promote


@dsl.component(base_image=STAGE_IMAGES["rollout"], install_kfp_package=False)
def rollout(fp8_checkpoint: str, volume_mount: str, gitops_repo: str, gitops_branch: str, values_path: str,
            run_id: str, model_version: str, accuracy: float, parent_run_id: str) -> str:
    """Commit the new checkpoint into the VSS/NIM Helm values of the GitOps repository (Argo CD / Flux
    deploy it) as its place on the data volume (VSS mounts the claim; `volume_mount` is where this step
    sees it); the commit message names the run, the model version and its accuracy. The video spec comes
    from the bundle's trafficvlm.json. Returns the commit id ("" when the values already pointed there)."""
    import os
    import time

    from trafficvlm import tracking
    from trafficvlm.stages.rollout import run_rollout

    if os.environ.get("GIT_TOKEN"):
        # An https repository authenticates with the Secret's token through a credential helper that reads
        # it from the env at push time, so the token never appears in a URL, a git config file or a log.
        os.environ.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="credential.helper", GIT_CONFIG_VALUE_0=(
            '!f() { echo username=x-access-token; echo "password=$GIT_TOKEN"; }; f'))
    started = time.time()
    with tracking.stage_run("rollout", parent_run_id=parent_run_id or None,
                            tags={"trafficvlm.pipeline_run": run_id}):
        result = run_rollout(fp8_checkpoint, gitops_repo, branch=gitops_branch, values_path=values_path,
                             run_id=run_id, model_version=model_version or None,
                             metrics={"accuracy": accuracy}, pvc_mount=volume_mount)
        tracking.set_tags({"rollout.commit": result.commit_sha or "unchanged", "model_version": model_version})
        tracking.log_metrics({"seconds": time.time() - started})
    print(result.message)
    return result.commit_sha or ""


@dsl.component(base_image=STAGE_IMAGES["smoke"], install_kfp_package=False)
def smoke(endpoint: str, fp8_checkpoint: str, llava_dir: str, wts_dir: str, subsets: list, model_name: str,
          model_version: str, champion_before: str, run_id: str, parent_run_id: str, timeout_s: float) -> bool:
    """Ask the served model one validation question about one clip (OpenAI API, the bundle's video spec).
    An empty `endpoint` skips the test (printed). On failure the version is tagged smoke_test=failed,
    `champion` moves back to the previous version, and the step fails; the GitOps commit stays (revert it
    there). The API key comes from the env (optional Secret), never a parameter."""
    import os
    import time

    from trafficvlm import tracking
    from trafficvlm.config import VideoSpec
    from trafficvlm.records import read_llava
    from trafficvlm.smoke import smoke_test
    from trafficvlm.sources.wts import media_dir
    from trafficvlm.stages.prepare import output_name
    from trafficvlm.stages.promote import set_champion
    from trafficvlm.stages.rollout import read_video_spec

    if not endpoint:
        print("smoke test skipped: the pipeline parameter smoke_endpoint is empty")
        return False
    (subset,) = subsets
    record = read_llava(os.path.join(llava_dir, output_name(subset, "val")))[0]
    video = os.path.join(wts_dir, media_dir(subset, "val"), record.video)
    spec = VideoSpec(**(read_video_spec(fp8_checkpoint) or {}))
    started = time.time()
    with tracking.stage_run("smoke", parent_run_id=parent_run_id or None, tags={"trafficvlm.pipeline_run": run_id}):
        result = smoke_test(endpoint, video, record.question, record.options,
                            api_key=os.environ.get("TRAFFICVLM_API_KEY") or None, timeout_s=timeout_s, spec=spec)
        tracking.log_metrics({"ok": float(result.ok), "latency_s": result.latency_s or 0.0,
                              "seconds": time.time() - started})
        tracking.set_tags({"smoke.question": record.id, "smoke.error": result.error or ""})
    print(result.summary())
    if model_version:
        tracking.set_version_tags(model_version, {"smoke_test": "passed" if result.ok else "failed",
                                                  **({"smoke_error": result.error} if result.error else {})},
                                  name=model_name)
    if result.ok:
        return True
    if champion_before and model_version:
        set_champion(champion_before, reason=f"v{model_version} failed the smoke test: {result.error}",
                     model_name=model_name)
        print(f"champion moved back to v{champion_before}")
    else:
        print("no previous champion to move back to; `champion` stays on the failed version")
    raise RuntimeError(f"smoke test failed against {endpoint}: {result.error} (revert the rollout commit "
                       "in the GitOps repository)")
