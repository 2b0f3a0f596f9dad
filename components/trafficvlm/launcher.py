"""The SFT stage on a cluster: build a Kubeflow PyTorchJob (`kubeflow.org/v1`), create it, follow it to the end.

    trafficvlm sft job --dry-run --nodes 2 --gpus-per-node 8 --data /mnt/data/llava/x/environment_mcq_llava_train.json
    trafficvlm sft job --nodes 1 --namespace ml --config configs/sft/recipe_setting_a.toml   # create and follow
    trafficvlm sft job --dry-run --engine cosmos-rl    # the recipe's cosmos-rl: its own image, one node

    from trafficvlm.launcher import JobSpec, build_pytorchjob, build_configmap, job_name, run_job, KubeCluster
    spec = JobSpec(name=job_name(run_id), nodes=2, gpus_per_node=8, overrides=["train.max_steps=100"])
    run_job(KubeCluster(spec.namespace), build_pytorchjob(spec), build_configmap(spec))

The follower is a pure state machine over what the cluster reports (job conditions and pod phases), with
the clock and the cluster injected, so tests replay recorded sequences. It succeeds only on `Succeeded`
(the Training Operator SDK's wait returns normally on a failed job: a green step for failed training);
`Failed` raises with the failing replica, the reason and the last log lines; a pod that stays `Pending`
past a timeout raises with why (no GPU node fits, image pull); SIGTERM (KFP cancelling the step) deletes
the job so no GPU keeps burning for a cancelled run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import enum
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"        # set by the operator on every pod of a job
REPLICA_LABEL = "training.kubeflow.org/replica-type"
RUN_ID_LABEL = "trafficvlm.io/run-id"
CONFIG_MOUNT = "/etc/trafficvlm"
# The trainer config keys (config.TrainConfig) the launcher sets: `trafficvlm train --config FILE key=value`.
TRAINER_KEYS = {
    "data": "data.annotation_path", "media": "data.media_path", "base_model": "model.path",
    "output": "train.output_dir",
    "fps": "video.fps", "nframes": "video.nframes", "max_pixels": "video.max_pixels",
    "total_pixels": "video.total_pixels",
    "learning_rate": "train.lr", "epochs": "train.epochs", "global_batch_size": "train.global_batch",
}
# NCCL: warnings only; fail fast on a hung collective instead of waiting out the timeout (torch's current
# name; the old NCCL_ASYNC_ERROR_HANDLING only prints a deprecation warning); NVLink SHARP (NVLS) off, as
# on the device machines (multicast unsupported).
NCCL_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "NCCL_NVLS_ENABLE": "0"}
# The SFT engines (TrainConfig.train.engine): our torchrun + FSDP2 trainer in the train image, or the
# reference recipe's cosmos-rl in its own image (trafficvlm.cosmos_rl; transformers < 5, flash-attn, redis).
ENGINES = ("trafficvlm", "cosmos-rl")
_DNS_LABEL_MAX = 63
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


# --- names ----------------------------------------------------------------------------------------------

def dns_label(text: str, max_len: int = _DNS_LABEL_MAX) -> str:
    """Lowercase alphanumerics and '-', starting with a letter, ending alphanumeric, at most max_len."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    if not cleaned or not cleaned[0].isalpha():
        cleaned = "x-" + cleaned
    return cleaned[:max_len].rstrip("-")


def label_value(text: str) -> str:
    """A label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:_DNS_LABEL_MAX].strip("-._")


def job_name(run_id: str, prefix: str = "tvlm-sft") -> str:
    """The PyTorchJob's name for a pipeline run, computed at run time from the run id (never at compile
    time). 48 characters at most: the operator derives pod and Service names (`<job>-worker-12`) from it,
    and a Service name must fit in 63."""
    if not run_id.strip():
        raise ValueError("job_name: empty run id")
    return dns_label(f"{prefix}-{run_id}", 48)


# --- the job --------------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """Everything a PyTorchJob for `trafficvlm train` needs. Dict/list fields are Kubernetes JSON
    fragments (what `dsl.TaskConfig` passes through from the launcher task)."""

    name: str
    namespace: str = "kubeflow"
    image: str = "ghcr.io/trafficvlm/train:0.1.0"
    nodes: int = 1
    gpus_per_node: int = 8
    cpu: str = "32"
    memory: str = "256Gi"
    shm_size: str = "64Gi"
    config_path: str = "configs/sft/recipe_setting_a.toml"  # in the image, unless config_text is given
    config_text: str | None = None                    # -> a ConfigMap mounted at CONFIG_MOUNT
    overrides: list[str] = field(default_factory=list)
    run_id: str = ""
    resources: dict[str, Any] | None = None           # overrides cpu/memory/gpus when set
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    service_account: str | None = None
    backoff_limit: int = 3
    ttl_seconds_after_finished: int = 3 * 24 * 3600
    # Running: finished jobs keep their failed pods (and logs) for inspection; running ones are reaped.
    clean_pod_policy: str = "Running"
    engine: str = "trafficvlm"                       # ENGINES; cosmos-rl also needs its image (engine_image)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"JobSpec.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "cosmos-rl" and (self.nodes != 1 or self.gpus_per_node < 1):
            # cosmos-rl starts its own controller and workers inside the pod; spreading one replica over
            # pods needs its own rendezvous flags, which this launcher does not set (the recipe: 1 x 8 GPUs).
            raise ValueError(f"engine cosmos-rl runs on one node with GPUs, got nodes={self.nodes} "
                             f"gpus_per_node={self.gpus_per_node}")
        if self.nodes < 1:
            raise ValueError(f"JobSpec.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"JobSpec.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if not (_DNS_LABEL.fullmatch(self.name) and len(self.name) <= 48):
            raise ValueError(f"JobSpec.name {self.name!r} is not a DNS-1123 label of at most 48 characters")

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or 1  # CPU-only smoke runs: one process per pod

    @property
    def configmap_name(self) -> str:
        return f"{self.name}-config"


def trainer_args(spec: JobSpec) -> list[str]:
    """torchrun over `trafficvlm train`. c10d rendezvous at the master's Service, which the operator
    exports as MASTER_ADDR/MASTER_PORT in every pod (`$(VAR)` is expanded by the kubelet). `--resume`:
    a restarted pod continues from the last checkpoint in the output directory instead of starting over."""
    config = f"{CONFIG_MOUNT}/sft.toml" if spec.config_text is not None else spec.config_path
    return ["--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.procs_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "$(MASTER_ADDR):$(MASTER_PORT)",
            "--rdzv-id", spec.name,
            "-m", "trafficvlm", "train", "--config", config, "--resume", *spec.overrides]


def recipe_args(spec: JobSpec) -> list[str]:
    """`trafficvlm train` with the cosmos-rl engine, one process per pod: it writes the recipe's job
    (sft_config.toml, custom_sft.py) under the output directory and runs cosmos-rl, which starts its own
    workers on the pod's GPUs. `--resume` becomes cosmos-rl's `train.resume`."""
    config = f"{CONFIG_MOUNT}/sft.toml" if spec.config_text is not None else spec.config_path
    return ["-m", "trafficvlm", "train", "--config", config, "--resume", *spec.overrides, "train.engine=cosmos-rl"]


def engine_of(overrides: list[str], default: str = "trafficvlm") -> str:
    """The engine a `train.engine=...` trainer override selects (the last one wins), else `default`: so
    the pipeline's `train_overrides` and `sft job --set` pick the engine's image and command too."""
    engine = default
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "train.engine":
            engine = value.strip().strip("\"'")
    if engine not in ENGINES:
        raise ValueError(f"train.engine must be one of {ENGINES}, got {engine!r}")
    return engine


def engine_image(engine: str) -> str:
    """The image an engine's pods run: pipelines/images.py names them (`train`, `cosmos-rl`)."""
    from trafficvlm import __version__

    name = "cosmos-rl" if engine == "cosmos-rl" else "train"
    try:
        from pipelines.images import image
    except ImportError:  # the package installed without the pipelines/ tree
        return f"ghcr.io/trafficvlm/{name}:{__version__}"
    return image(name)


def _resources(spec: JobSpec) -> dict[str, Any]:
    if spec.resources:
        return spec.resources
    limits: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"requests": dict(limits), "limits": limits}


def _pod_template(spec: JobSpec, labels: dict[str, str]) -> dict[str, Any]:
    env = [{"name": k, "value": v} for k, v in NCCL_ENV.items()] + list(spec.env)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}] + list(spec.volume_mounts)
    # torch DataLoader workers share tensors through /dev/shm; the container default (64 MiB) is too small.
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}
    volumes = [shm] + list(spec.volumes)
    if spec.config_text is not None:
        mounts.append({"name": "trainer-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
        volumes.append({"name": "trainer-config", "configMap": {"name": spec.configmap_name}})
    cmd, args = ("python", recipe_args(spec)) if spec.engine == "cosmos-rl" else ("torchrun", trainer_args(spec))
    pod: dict[str, Any] = {
        "containers": [{"name": "pytorch", "image": spec.image, "command": [cmd], "args": args,
                        "env": env, "resources": _resources(spec),
                        "volumeMounts": mounts}],
        "volumes": volumes,
    }
    for key, value in (("nodeSelector", spec.node_selector), ("tolerations", spec.tolerations),
                       ("serviceAccountName", spec.service_account)):
        if value:
            pod[key] = value
    return {"metadata": {"labels": labels}, "spec": pod}


def _labels(spec: JobSpec) -> dict[str, str]:
    labels = {"app.kubernetes.io/part-of": "trafficvlm", "app.kubernetes.io/component": "sft"}
    if spec.run_id:
        labels[RUN_ID_LABEL] = label_value(spec.run_id)
    return labels


def build_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """The PyTorchJob: one Master, nodes-1 Workers, same pod template; `restartPolicy: ExitCode` restarts
    pods killed by the node (exit >= 128: OOM-kill, preemption) and fails fast on a trainer error (1-127)."""
    labels = _labels(spec)
    template = _pod_template(spec, labels)
    replica = lambda n: {"replicas": n, "restartPolicy": "ExitCode",  # noqa: E731
                         "template": copy.deepcopy(template)}
    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(labels)},
        "spec": {
            "runPolicy": {"backoffLimit": spec.backoff_limit, "cleanPodPolicy": spec.clean_pod_policy,
                          "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished},
            "nprocPerNode": str(spec.procs_per_node),
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_configmap(spec: JobSpec) -> dict[str, Any] | None:
    """The trainer config as a ConfigMap, when the spec carries its text (else the image's file is used)."""
    if spec.config_text is None:
        return None
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": spec.configmap_name, "namespace": spec.namespace, "labels": _labels(spec)},
            "data": {"sft.toml": spec.config_text}}


# --- following a job ------------------------------------------------------------------------------------

class Phase(enum.Enum):
    PENDING = "Pending"  # created, no condition reported yet
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class JobFailed(RuntimeError):
    """The job ended Failed, or vanished. The message names the replica, the reason and the log tail."""


class JobStuck(RuntimeError):
    """A pod stayed Pending past the timeout (no node fits the GPU request, image cannot be pulled, ...)."""


class Cancelled(BaseException):
    """SIGTERM reached the launcher (KFP cancelled the step). BaseException, like KeyboardInterrupt, so
    no `except Exception` in between swallows it."""


def job_phase(conditions: list[dict[str, Any]]) -> Phase:
    """The job's state from its status conditions. Terminal conditions win; otherwise the latest true one
    (the operator appends conditions in order and flips older ones to False)."""
    true = [c.get("type") for c in conditions if str(c.get("status")) == "True"]
    for terminal in (Phase.FAILED, Phase.SUCCEEDED):
        if terminal.value in true:
            return terminal
    for kind in reversed(true):
        if kind in (Phase.RUNNING.value, Phase.RESTARTING.value, Phase.CREATED.value):
            return Phase(kind)
    return Phase.PENDING


@dataclass
class PodState:
    """What the follower needs to know about one pod of the job."""

    name: str
    replica: str
    phase: str                     # Pending | Running | Succeeded | Failed | Unknown
    reason: str = ""               # e.g. Unschedulable, ImagePullBackOff, OOMKilled, Error
    message: str = ""
    exit_code: int | None = None

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> "PodState":
        """From a pod as JSON (the API's camelCase)."""
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        state = cls(meta.get("name", "?"), (meta.get("labels") or {}).get(REPLICA_LABEL, "?"),
                    status.get("phase", "Unknown"), status.get("reason", ""), status.get("message", ""))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                state.reason, state.message = cond.get("reason", ""), cond.get("message", "")
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") != "pytorch":
                continue
            st = cs.get("state") or {}
            if "waiting" in st and st["waiting"].get("reason") not in (None, "ContainerCreating"):
                state.reason, state.message = st["waiting"].get("reason", ""), st["waiting"].get("message", "")
            term = st.get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode"):
                state.exit_code = term["exitCode"]
                state.reason = term.get("reason") or state.reason
        return state


class Cluster(Protocol):
    """The cluster I/O the launcher needs; `KubeCluster` is the real one, tests replay recordings."""

    def create(self, job: dict[str, Any], configmap: dict[str, Any] | None) -> bool: ...  # False: existed
    def get_job(self, name: str) -> dict[str, Any] | None: ...
    def list_pods(self, name: str) -> list[dict[str, Any]]: ...
    def pod_logs(self, pod: str, tail: int) -> str: ...
    def delete_job(self, name: str) -> None: ...


_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")


class Follower:
    """Observes a job once per `observe()`; raises on failure or a stuck pod; returns the phase."""

    def __init__(self, cluster: Cluster, name: str, *, clock: Callable[[], float] = time.monotonic,
                 pending_timeout_s: float = 1800.0, log_tail: int = 50,
                 echo: Callable[[str], None] = print):
        self.cluster, self.name, self.clock = cluster, name, clock
        self.pending_timeout_s, self.log_tail, self.echo = pending_timeout_s, log_tail, echo
        self.phase: Phase | None = None
        self._pending_since: dict[str, float] = {}

    def observe(self) -> Phase:
        job = self.cluster.get_job(self.name)
        if job is None:
            raise JobFailed(f"PyTorchJob {self.name} disappeared (deleted by someone else?)")
        conditions = (job.get("status") or {}).get("conditions") or []
        phase = job_phase(conditions)
        pods = [PodState.from_pod(p) for p in self.cluster.list_pods(self.name)]
        if phase is not self.phase:
            self._announce(phase, conditions, pods)
        self.phase = phase
        if phase is Phase.FAILED:
            raise JobFailed(self._failure(conditions, pods))
        if phase is not Phase.SUCCEEDED:
            self._check_pending(pods)
        return phase

    def wait(self, poll_s: float = 15.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Until Succeeded; anything else ends in an exception."""
        while self.observe() is not Phase.SUCCEEDED:
            sleep(poll_s)

    def _announce(self, phase: Phase, conditions: list[dict[str, Any]], pods: list[PodState]) -> None:
        cond = _condition(conditions, phase.value)
        detail = f": {cond.get('reason', '')} {cond.get('message', '')}".rstrip() if cond else ""
        running = sum(p.phase == "Running" for p in pods)
        self.echo(f"PyTorchJob {self.name}: {phase.value} ({running}/{len(pods)} pods running){detail}")
        if phase is Phase.RESTARTING:
            self.echo("  a replica is restarting; the trainer resumes from its last checkpoint (--resume)")

    def _failure(self, conditions: list[dict[str, Any]], pods: list[PodState]) -> str:
        cond = _condition(conditions, Phase.FAILED.value) or {}
        lines = [f"PyTorchJob {self.name} failed: {cond.get('reason', 'unknown reason')}: "
                 f"{cond.get('message', '')}".rstrip(": ")]
        failed = [p for p in pods if p.phase == "Failed" or p.exit_code]
        # The Master usually only reports that a peer died; a failed Worker is closer to the cause.
        failed.sort(key=lambda p: p.replica.lower() == "master")
        if failed:
            pod = failed[0]
            lines.append(f"failing replica: {pod.replica} (pod {pod.name}, exit code {pod.exit_code}, "
                         f"{pod.reason or pod.phase})")
            lines.append(f"last {self.log_tail} log lines of {pod.name}:")
            lines.append(self.cluster.pod_logs(pod.name, self.log_tail).rstrip())
        else:
            lines.append("no failed pod found (cleaned up already?); see `kubectl describe pytorchjob "
                         f"{self.name}`")
        return "\n".join(lines)

    def _check_pending(self, pods: list[PodState]) -> None:
        now = self.clock()
        # With no pods at all the operator has not acted yet (or is not installed): time that too.
        pending = [p for p in pods if p.phase == "Pending"]
        if not pods:
            pending = [PodState("<no pods yet>", "-", "Pending")]
        self._pending_since = {p.name: self._pending_since.get(p.name, now) for p in pending}
        for pod in pending:
            waited = now - self._pending_since[pod.name]
            if waited > self.pending_timeout_s:
                raise JobStuck(f"PyTorchJob {self.name}: pod {pod.name} pending for {waited:.0f} s: "
                               f"{_stuck_hint(pod)}")


def _condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    matches = [c for c in conditions if c.get("type") == kind]
    return matches[-1] if matches else None


def _stuck_hint(pod: PodState) -> str:
    detail = f"{pod.reason}: {pod.message}".strip(": ") or "no reason reported"
    if pod.reason in _PULL_REASONS:
        return f"{detail} -- the image cannot be pulled: check the image name/tag and imagePullSecrets"
    if pod.reason == "Unschedulable":
        return (f"{detail} -- no node fits: check free nvidia.com/gpu capacity, the node selector and "
                "the tolerations for GPU taints")
    if pod.name == "<no pods yet>":
        return "the Training Operator created no pods: is it installed and watching this namespace?"
    return detail


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Cancelled` for the duration (main thread only: elsewhere signals are not ours)."""
    def handler(signum: int, frame: Any) -> None:
        raise Cancelled("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(cluster: Cluster, job: dict[str, Any], configmap: dict[str, Any] | None = None, *,
            poll_s: float = 15.0, pending_timeout_s: float = 1800.0,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            echo: Callable[[str], None] = print) -> None:
    """Create the job and follow it until Succeeded. Cancelled or stuck: the job is deleted. Failed: it is
    kept (its pods hold the logs; ttlSecondsAfterFinished reaps it). A retried launcher finds its job by
    name (the name comes from the run id) and follows it instead of starting a second one."""
    name = job["metadata"]["name"]
    if cluster.create(job, configmap):
        echo(f"created PyTorchJob {job['metadata'].get('namespace', '')}/{name}")
    else:
        echo(f"PyTorchJob {name} already exists (a retried step): following it")
    follower = Follower(cluster, name, clock=clock, pending_timeout_s=pending_timeout_s, echo=echo)
    try:
        with sigterm_raises():
            follower.wait(poll_s, sleep)
    except JobFailed:
        raise
    except BaseException as exc:
        echo(f"{type(exc).__name__}: deleting PyTorchJob {name}")
        cluster.delete_job(name)
        raise
    echo(f"PyTorchJob {name}: Succeeded")


# --- the pipeline's SFT step ---------------------------------------------------------------------------

@dataclass
class SftRequest:
    """What the pipeline's `sft` component passes: locations, trainer settings, the job's shape. A value of
    0 in `video` or `hyper` means "keep the config file's value" (KFP parameters cannot be None)."""

    run_id: str
    llava_dir: str                   # prepare's output directory
    wts_dir: str                     # the WTS root the videos are under
    base_model: str
    output_root: str
    subsets: list[str] = field(default_factory=lambda: ["environment"])
    train_config: str = "configs/sft/recipe_setting_a.toml"
    train_image: str = JobSpec.image
    nodes: int = 1
    gpus_per_node: int = 8
    video: dict[str, float] = field(default_factory=dict)
    hyper: dict[str, float] = field(default_factory=dict)
    extra_overrides: list[str] = field(default_factory=list)
    engine: str = "trafficvlm"       # ENGINES: cosmos-rl runs in engine_image("cosmos-rl"), not train_image

    def __post_init__(self) -> None:
        if len(self.subsets) != 1:
            raise ValueError(f"sft: the trainer reads one subset's annotation file, got subsets={self.subsets}")
        if self.video.get("fps") and self.video.get("nframes"):
            raise ValueError("sft: set one of fps and nframes (the other 0)")
        self.engine = engine_of(self.extra_overrides, self.engine)

    @property
    def output_dir(self) -> str:
        """The trainer's output directory for this run (checkpoints/, final/, metrics)."""
        return f"{self.output_root.rstrip('/')}/{self.run_id}/sft"

    @property
    def checkpoint(self) -> str:
        """The exported model the later stages read: the trainer's `final/` Hugging Face directory."""
        return f"{self.output_dir}/final"

    def overrides(self) -> list[str]:
        from trafficvlm.sources.wts import media_dir
        from trafficvlm.stages.prepare import output_name

        (subset,) = self.subsets
        values = {"data": f"{self.llava_dir.rstrip('/')}/{output_name(subset, 'train')}",
                  "media": f"{self.wts_dir.rstrip('/')}/{media_dir(subset, 'train')}",
                  "base_model": self.base_model, "output": self.output_dir,
                  **{k: v for k, v in {**self.hyper, **self.video}.items() if v}}
        return [f"{TRAINER_KEYS[k]}={v}" for k, v in values.items()] + list(self.extra_overrides)


def spec_from_request(request: SftRequest, task_config: Any = None, namespace: str | None = None) -> JobSpec:
    """The PyTorchJob for a pipeline run. `task_config` (a `dsl.TaskConfig`) carries what was set on the
    launcher task — resources, node selector, tolerations, volumes, env — to the job's pods."""
    tc = task_config
    resources = dict(getattr(tc, "resources", None) or {}) or None
    if resources and request.gpus_per_node:
        # The GPU count is the job's shape, decided by gpus_per_node; keep the passthrough consistent.
        for part in ("requests", "limits"):
            resources[part] = {**resources.get(part, {}), "nvidia.com/gpu": str(request.gpus_per_node)}
    image = engine_image("cosmos-rl") if request.engine == "cosmos-rl" else request.train_image
    return JobSpec(
        name=job_name(request.run_id), namespace=namespace or current_namespace(), image=image,
        engine=request.engine,
        nodes=request.nodes, gpus_per_node=request.gpus_per_node, config_path=request.train_config,
        overrides=request.overrides(), run_id=request.run_id, resources=resources,
        node_selector=dict(getattr(tc, "node_selector", None) or {}),
        tolerations=list(getattr(tc, "tolerations", None) or []),
        volumes=list(getattr(tc, "volumes", None) or []),
        volume_mounts=list(getattr(tc, "volume_mounts", None) or []),
        env=list(getattr(tc, "env", None) or []))


def train_locally_command(request: SftRequest) -> list[str]:
    """`trafficvlm train` as a subprocess of this machine (kfp.local, the demo): one process on CPU."""
    engine = [f"train.engine={request.engine}"] if request.engine != "trafficvlm" else []
    return [sys.executable, "-m", "trafficvlm", "train", "--config", request.train_config, "--resume",
            *request.overrides(), *engine]


def run_sft(launcher: str, request: SftRequest, task_config: Any = None, *,
            cluster: Cluster | None = None) -> str:
    """Train, locally or as a PyTorchJob; returns the checkpoint location."""
    if launcher == "local":
        import subprocess

        subprocess.run(train_locally_command(request), check=True)
    elif launcher == "pytorchjob":
        spec = spec_from_request(request, task_config)
        run_job(cluster or KubeCluster(spec.namespace), build_pytorchjob(spec), build_configmap(spec))
    else:
        raise ValueError(f"launcher {launcher!r}: expected 'local' or 'pytorchjob'")
    return request.checkpoint


# --- the real cluster -----------------------------------------------------------------------------------

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace(default: str = "kubeflow") -> str:
    """The pod's own namespace in a cluster (where KFP runs the step), else `default`."""
    return _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else default


class KubeCluster:
    """`Cluster` through the `kubernetes` client: in-cluster config in a pod, else ~/.kube/config."""

    def __init__(self, namespace: str):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.namespace, self._client = namespace, client
        self.api = client.ApiClient()
        self.custom, self.core = client.CustomObjectsApi(self.api), client.CoreV1Api(self.api)

    def create(self, job: dict[str, Any], configmap: dict[str, Any] | None) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            created = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        if configmap is not None:
            # Owned by the job, so deleting the job (or its TTL) removes the config with it.
            configmap["metadata"]["ownerReferences"] = [{
                "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": created["metadata"]["name"],
                "uid": created["metadata"]["uid"]}]
            self.core.create_namespaced_config_map(self.namespace, configmap)
        return True

    def get_job(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_pods(self, name: str) -> list[dict[str, Any]]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={name}")
        return [self.api.sanitize_for_serialization(p) for p in pods.items]

    def pod_logs(self, pod: str, tail: int) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(pod, self.namespace, container="pytorch", tail_lines=tail)
        except ApiException as exc:
            return f"(logs unavailable: {exc.status} {exc.reason})"

    def delete_job(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name,
                body=self._client.V1DeleteOptions(propagation_policy="Foreground"))
        except ApiException as exc:
            if exc.status != 404:
                raise


# --- CLI ------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  trafficvlm sft job --dry-run                                        # 1 node x 8 GPUs
  trafficvlm sft job --dry-run --nodes 2 --gpus-per-node 8 --namespace ml --run-id run-42 \\
      --data /mnt/data/llava/environment_mcq_llava_train.json --media /mnt/data/wts/videos/train \\
      --output /mnt/data/checkpoints/run-42/sft \\
      --node-selector nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 --toleration nvidia.com/gpu:NoSchedule \\
      --pvc trafficvlm-data:/mnt/data
  trafficvlm sft job --dry-run --nodes 2 --gpus-per-node 0 --cpu 2 --memory 8Gi   # CPU-only smoke job
  trafficvlm sft job --namespace ml --config configs/sft/recipe_setting_a.toml    # create and follow it
  trafficvlm sft job --dry-run --engine cosmos-rl --config configs/sft/recipe_setting_a.toml  # the recipe's engine
"""


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    sft = subparsers.add_parser("sft", help="the SFT stage on Kubernetes (PyTorchJob)",
                                description="The SFT stage on a cluster.")
    sub = sft.add_subparsers(dest="sft_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("job", help="build (--dry-run: print) or create and follow the PyTorchJob",
                       description="Build the PyTorchJob that runs `trafficvlm train` under torchrun; print it "
                                   "with --dry-run, else create it and follow it to Succeeded.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the YAML instead of creating the job")
    p.add_argument("--run-id", default="manual", help="names the job (tvlm-sft-<run id>) and labels it")
    p.add_argument("--namespace", default=None, help="default: the pod's namespace, else kubeflow")
    p.add_argument("--image", default=None, help="default: the engine's image of pipelines/images.py")
    p.add_argument("--engine", choices=ENGINES, default="trafficvlm",
                   help="trafficvlm: torchrun + FSDP2 (default); cosmos-rl: the reference recipe's engine, "
                        "one node, its own image (docs/training.md)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: a CPU-only smoke job")
    p.add_argument("--cpu", default="32", help="CPU per pod (requests = limits)")
    p.add_argument("--memory", default="256Gi", help="memory per pod (requests = limits)")
    p.add_argument("--config", default=None,
                   help="a trainer TOML on this machine, shipped as a ConfigMap (default: the image's "
                        "configs/sft/recipe_setting_a.toml)")
    p.add_argument("--data", default=None, help=f"LLaVA train JSON ({TRAINER_KEYS['data']})")
    p.add_argument("--media", default=None, help=f"directory the JSON's videos are under ({TRAINER_KEYS['media']})")
    p.add_argument("--output", default=None, help=f"trainer output directory ({TRAINER_KEYS['output']})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override (repeatable)")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT")
    p.add_argument("--pvc", action="append", default=[], metavar="CLAIM:MOUNT_PATH")
    p.add_argument("--service-account", default=None)
    p.add_argument("--pending-timeout", type=float, default=1800.0, help="seconds a pod may stay Pending")
    p.set_defaults(func=_main)


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    overrides = list(args.overrides)
    engine = engine_of(overrides, args.engine)
    for key, value in (("data", args.data), ("media", args.media), ("output", args.output)):
        if value:
            overrides.append(f"{TRAINER_KEYS[key]}={value}")
    volumes, mounts = [], []
    for item in args.pvc:
        claim, sep, path = item.partition(":")
        if not (claim and sep and path.startswith("/")):
            raise ValueError(f"--pvc {item!r}: expected CLAIM:/mount/path")
        volumes.append({"name": dns_label(claim), "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": dns_label(claim), "mountPath": path})
    config_text = Path(args.config).read_text() if args.config else None
    return JobSpec(name=job_name(args.run_id), namespace=args.namespace or current_namespace(),
                   image=args.image or engine_image(engine), engine=engine,
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   cpu=args.cpu, memory=args.memory, config_text=config_text, overrides=overrides,
                   run_id=args.run_id,
                   node_selector=dict(_key_value(s, "--node-selector") for s in args.node_selector),
                   tolerations=[parse_toleration(t) for t in args.toleration], volumes=volumes,
                   volume_mounts=mounts, service_account=args.service_account)


def parse_toleration(text: str) -> dict[str, str]:
    """`nvidia.com/gpu:NoSchedule` (Exists) or `dedicated=gpu:NoSchedule` (Equal)."""
    key_value, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"--toleration {text!r}: expected KEY[=VALUE]:NoSchedule|PreferNoSchedule|NoExecute")
    key, eq, value = key_value.partition("=")
    if eq:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump_all(docs, sort_keys=False)


def _main(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job, configmap = build_pytorchjob(spec), build_configmap(spec)
    if args.dry_run:
        print(to_yaml([d for d in (configmap, job) if d is not None]), end="")
        return 0
    try:
        run_job(KubeCluster(spec.namespace), job, configmap, pending_timeout_s=args.pending_timeout)
    except (JobFailed, JobStuck) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Cancelled:
        return 143
    return 0
