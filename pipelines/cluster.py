"""Kubernetes settings of the pipeline's tasks (kfp-kubernetes): the shared data volume, Secrets as env vars,
GPU node placement. They only take effect on a cluster (`kfp.local` drops them); tests read them back from
the compiled IR. The names are the objects `manifests/` creates; change them there and here together.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from trafficvlm.s3 import s3_env_secret_names

DATA_PVC = "trafficvlm-data"         # ReadWriteMany: WTS tree, LLaVA JSON, checkpoints
DATA_MOUNT = "/mnt/data"
S3_SECRET = "trafficvlm-s3"          # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, AWS_ENDPOINT_URL_S3, ...]
GITOPS_SECRET = "trafficvlm-gitops"  # GIT_TOKEN for the GitOps repository
MLFLOW_SECRET = "trafficvlm-mlflow"  # optional: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
ENDPOINT_SECRET = "trafficvlm-endpoint"  # optional: API_KEY of the served model (-> TRAFFICVLM_API_KEY)
SETTINGS_CONFIGMAP = "trafficvlm-settings"  # MLFLOW_TRACKING_URI (manifests/pipeline/settings.yaml)
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # label set by GPU feature discovery
GPU_TAINT = "nvidia.com/gpu"


def gpu_stage(task: PipelineTask) -> PipelineTask:
    """The GPU stages: data volume, S3 credentials (checkpoints may live in S3), MLflow, GPU nodes."""
    for setting in (with_data_volume, with_s3_credentials, with_tracking, on_gpu_nodes):
        setting(task)
    return task


def with_data_volume(task: PipelineTask) -> PipelineTask:
    return kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)


def with_s3_credentials(task: PipelineTask) -> PipelineTask:
    """The S3 Secret's keys become env vars of the same names; its values never enter the pipeline.
    The endpoint and region keys may be absent (AWS itself needs neither)."""
    required = s3_env_secret_names(required_only=True)
    optional = [k for k in s3_env_secret_names() if k not in required]
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={k: k for k in required})
    return kubernetes.use_secret_as_env(task, secret_name=S3_SECRET,
                                        secret_key_to_env={k: k for k in optional}, optional=True)


def with_tracking(task: PipelineTask) -> PipelineTask:
    """MLFLOW_TRACKING_URI from the settings ConfigMap (not a secret; MLflow needs --allowed-hosts for it),
    and the server's basic-auth credentials from an optional Secret (absent: a server without auth)."""
    key = "MLFLOW_TRACKING_URI"
    kubernetes.use_config_map_as_env(task, config_map_name=SETTINGS_CONFIGMAP, config_map_key_to_env={key: key})
    auth = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    return kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env={k: k for k in auth},
                                        optional=True)


def with_endpoint_key(task: PipelineTask) -> PipelineTask:
    """The served model's API key for the smoke test, if the endpoint wants one (optional Secret)."""
    return kubernetes.use_secret_as_env(task, secret_name=ENDPOINT_SECRET,
                                        secret_key_to_env={"API_KEY": "TRAFFICVLM_API_KEY"}, optional=True)


def with_gitops_credentials(task: PipelineTask) -> PipelineTask:
    return kubernetes.use_secret_as_env(task, secret_name=GITOPS_SECRET,
                                        secret_key_to_env={"GIT_TOKEN": "GIT_TOKEN"})


def on_gpu_nodes(task: PipelineTask) -> PipelineTask:
    """Schedule onto GPU nodes and tolerate their taint. On the sft task these pass through to the
    PyTorchJob's pods (dsl.TaskConfig)."""
    for key, value in GPU_NODE_SELECTOR.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return kubernetes.add_toleration(task, key=GPU_TAINT, operator="Exists", effect="NoSchedule")
