"""MLflow: runs, metrics, artifacts, the model registry and its aliases. Decides nothing.

Everything here is a no-op when no tracking URI is configured (`MLFLOW_TRACKING_URI`, or the `uri`
argument), so the CLI works offline without a server and the pipeline logs when it has one.

Layout the pipeline leaves in MLflow: one parent run per pipeline run (tag `trafficvlm.pipeline_run`),
one child run per stage (tag `mlflow.parentRunId`), and model versions of one registered model with
aliases `challenger` (the newest candidate) and `champion` (what production serves; moved only by a
passed promotion).

    from trafficvlm import tracking
    with tracking.stage_run("eval", parent_run_id=pid) as run:
        tracking.log_metrics({"accuracy": 0.93})
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_EXPERIMENT = "trafficvlm"
DEFAULT_MODEL_NAME = "cosmos-reason1-traffic"


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def enabled(uri: str | None = None) -> bool:
    return tracking_uri(uri) is not None


def _mlflow(uri: str | None = None):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    return mlflow


@contextlib.contextmanager
def stage_run(name: str, *, parent_run_id: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
              tags: dict[str, str] | None = None, uri: str | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """A run for one stage (a child when `parent_run_id` is given); yields None when tracking is off."""
    if not enabled(uri):
        yield None
        return
    mlflow = _mlflow(uri)
    mlflow.set_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, tags=all_tags,
                          nested=mlflow.active_run() is not None) as run:
        yield run


def start_parent_run(name: str, *, experiment: str = DEFAULT_EXPERIMENT, tags: dict[str, str] | None = None,
                     uri: str | None = None) -> str | None:
    """Create (and leave open for children to reference) the pipeline's parent run; returns its id."""
    if not enabled(uri):
        return None
    from mlflow import MlflowClient

    mlflow = _mlflow(uri)
    exp = mlflow.set_experiment(experiment)
    run = MlflowClient(tracking_uri(uri)).create_run(exp.experiment_id, run_name=name, tags=tags or {})
    return run.info.run_id


def end_run(run_id: str | None, status: str = "FINISHED", uri: str | None = None) -> None:
    if run_id and enabled(uri):
        from mlflow import MlflowClient

        MlflowClient(tracking_uri(uri)).set_terminated(run_id, status)


def log_params(params: dict[str, Any], uri: str | None = None) -> None:
    if enabled(uri):
        _mlflow(uri).log_params({k: _short(v) for k, v in flatten(params).items()})


def log_metrics(metrics: dict[str, float], step: int | None = None, uri: str | None = None) -> None:
    if enabled(uri):
        clean = {_metric_key(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        _mlflow(uri).log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None, uri: str | None = None) -> None:
    if enabled(uri) and Path(path).exists():
        mlflow = _mlflow(uri)
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def register_model(source_uri: str, *, run_id: str | None, name: str = DEFAULT_MODEL_NAME,
                   tags: dict[str, str] | None = None, uri: str | None = None) -> str | None:
    """Register a checkpoint (an `s3://...` URI: MLflow 3 rejects local and PVC paths) as a new version."""
    if not enabled(uri):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri(uri))
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = client.create_model_version(name, source_uri, run_id=run_id,
                                          tags={k: _short(v) for k, v in (tags or {}).items()})
    return str(version.version)


def set_alias(alias: str, version: str, *, name: str = DEFAULT_MODEL_NAME, uri: str | None = None) -> None:
    if enabled(uri):
        from mlflow import MlflowClient

        MlflowClient(tracking_uri(uri)).set_registered_model_alias(name, alias, version)


def alias_version(alias: str, *, name: str = DEFAULT_MODEL_NAME, uri: str | None = None) -> Any | None:
    """The ModelVersion behind an alias, or None when the model or the alias does not exist."""
    if not enabled(uri):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri(uri)).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_version_tags(version: str, tags: dict[str, Any], *, name: str = DEFAULT_MODEL_NAME,
                     uri: str | None = None) -> None:
    """Add or overwrite tags of one model version (e.g. the promotion decision, known only after registering)."""
    if enabled(uri):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri(uri))
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, _short(value))


def set_tags(tags: dict[str, Any], uri: str | None = None) -> None:
    """Tags of the active run."""
    if enabled(uri):
        _mlflow(uri).set_tags({k: _short(v) for k, v in tags.items()})


def download_artifacts(artifact_uri: str, dst: str | Path, *, uri: str | None = None) -> Path:
    """Fetch a logged artifact (`runs:/RUN/PATH`, `mlflow-artifacts:/...`, `s3://...`) into `dst`."""
    mlflow = _mlflow(uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                    tracking_uri=tracking_uri(uri)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 500 else s[:497] + "..."


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; question texts need cleaning.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)[:250]
