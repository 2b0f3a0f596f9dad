"""The SFT launcher: the PyTorchJob it builds (validated against the Training Operator v1.9.4 CRD and its
webhook rules) and the follower's state machine, driven by recorded condition sequences — no cluster."""

import os
import re
import shlex
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from trafficvlm import cli
from trafficvlm.k8s_validate import validate_manifests
from trafficvlm.launcher import (Cancelled, JobFailed, JobSpec, JobStuck, Phase, SftRequest, build_configmap,
                                 build_pytorchjob, job_name, job_phase, run_job, run_sft, spec_from_request,
                                 train_locally_command)

REPO = Path(__file__).resolve().parents[1]
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _containers(job, replica):
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (2, 8), (2, 0)], ids=["1x8", "2x8", "cpu-smoke"])
def test_job_validates_against_crd_and_webhook(nodes, gpus):
    spec = JobSpec(name=job_name("0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"), nodes=nodes, gpus_per_node=gpus,
                   cpu="2" if not gpus else "32", memory="8Gi" if not gpus else "256Gi",
                   run_id="0b1c2d3e-aaaa-bbbb-cccc-0123456789ab", config_text="[train]\nmax_steps = 2\n",
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   node_selector={"nvidia.com/gpu.present": "true"})
    job, configmap = build_pytorchjob(spec), build_configmap(spec)
    assert validate_manifests([configmap, job]) == []

    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(max(gpus, 1))
    (container,) = _containers(job, "Master")
    assert container["name"] == "pytorch"
    limits = container["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    args = container["args"]
    assert args[args.index("--nnodes") + 1] == str(nodes)
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert "--resume" in args and args[args.index("--config") + 1] == "/etc/trafficvlm/sft.toml"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and "NCCL_ASYNC_ERROR_HANDLING" not in env  # deprecated name
    pod = replicas["Master"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert job["metadata"]["labels"]["trafficvlm.io/run-id"] == "0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"
    assert set(job["spec"]["runPolicy"]) == {"backoffLimit", "cleanPodPolicy", "ttlSecondsAfterFinished"}


def test_validator_catches_a_broken_job():
    """The check above can fail: a renamed container and two Masters are rejected."""
    job = build_pytorchjob(JobSpec(name="tvlm-sft-x", nodes=2))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    _containers(job, "Worker")[0]["name"] = "trainer"
    errors = "\n".join(validate_manifests(job))
    assert "Master.replicas" in errors and "named 'pytorch'" in errors


@pytest.mark.parametrize("run_id", ["0b1c2d3e-aaaa-bbbb-cccc-0123456789ab", "Run_42/Nightly.Retrain",
                                    "9" * 80, "--weird--"])
def test_job_name_is_dns_safe(run_id):
    name = job_name(run_id)
    assert DNS_LABEL.match(name) and len(name) <= 48
    assert job_name(run_id) == name  # deterministic: a retried launcher finds its job


def test_job_name_rejects_empty_run_id():
    with pytest.raises(ValueError, match="empty run id"):
        job_name(" ")


def test_committed_template_matches_builder(capsys):
    """manifests/training/pytorchjob.yaml is what `sft job --dry-run` prints for the args in its header."""
    path = REPO / "manifests" / "training" / "pytorchjob.yaml"
    text = path.read_text()
    command = next(line for line in text.splitlines() if line.startswith("#   trafficvlm sft job"))
    assert cli.main(shlex.split(command.lstrip("# "))[1:]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == list(yaml.safe_load_all(text))
    assert validate_manifests(str(path)) == []


def test_cli_dry_run_with_config_prints_configmap_and_job(tmp_path, capsys):
    config = tmp_path / "sft.toml"
    config.write_text("[train]\nmax_steps = 3\n")
    code = cli.main(["sft", "job", "--dry-run", "--nodes", "2", "--gpus-per-node", "0", "--cpu", "2",
                     "--memory", "8Gi", "--namespace", "ml", "--config", str(config), "--data", "/d/train.json",
                     "--media", "/d/wts/videos/train", "--output", "/ckpt/run-1", "--set", "train.lr=1e-5",
                     "--run-id", "run-1"])
    assert code == 0
    configmap, job = yaml.safe_load_all(capsys.readouterr().out)
    assert configmap["kind"] == "ConfigMap" and "max_steps = 3" in configmap["data"]["sft.toml"]
    args = _containers(job, "Worker")[0]["args"]
    assert {"data.annotation_path=/d/train.json", "data.media_path=/d/wts/videos/train",
            "train.output_dir=/ckpt/run-1", "train.lr=1e-5"} <= set(args)
    assert job["metadata"]["namespace"] == "ml"


def test_cli_rejects_bad_toleration(capsys):
    assert cli.main(["sft", "job", "--dry-run", "--toleration", "nvidia.com/gpu"]) == 2
    assert "--toleration" in capsys.readouterr().err


# --- the follower ---------------------------------------------------------------------------------------

def _cond(*types, failed_reason="PyTorchJobFailed", message=""):
    out = [{"type": t, "status": "True", "reason": failed_reason if t == "Failed" else f"PyTorchJob{t}",
            "message": message} for t in types]
    for c in out[:-1]:  # the operator flips earlier conditions (other than Created) to False
        if c["type"] != "Created":
            c["status"] = "False"
    return out


def _pod(name, replica, phase, *, reason="", message="", exit_code=None, unschedulable=False):
    status = {"phase": phase, "conditions": [], "containerStatuses": []}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": message})
    elif reason and exit_code is None:
        status["containerStatuses"].append({"name": "pytorch", "state": {"waiting": {"reason": reason,
                                                                                       "message": message}}})
    if exit_code is not None:
        status["containerStatuses"].append({"name": "pytorch", "state": {
            "terminated": {"exitCode": exit_code, "reason": reason or "Error"}}})
    return {"metadata": {"name": name, "labels": {"training.kubeflow.org/replica-type": replica}},
            "status": status}


class RecordedCluster:
    """Replays (conditions, pods) observations, one per get_job/list_pods pair; records what is done."""

    def __init__(self, steps, *, exists=False, logs="step 10 loss 0.5\nRuntimeError: CUDA out of memory"):
        self.steps, self.i, self.calls, self.exists, self.logs = steps, -1, 0, exists, logs
        self.created, self.deleted, self.log_requests = [], [], []

    def create(self, job, configmap):
        self.created.append((job, configmap))
        return not self.exists

    def get_job(self, name):
        self.calls += 1
        self.i = min(self.i + 1, len(self.steps) - 1)
        conditions = self.steps[self.i][0]
        return None if conditions is None else {"metadata": {"name": name}, "status": {"conditions": conditions}}

    def list_pods(self, name):
        return self.steps[self.i][1]

    def pod_logs(self, pod, tail):
        self.log_requests.append((pod, tail))
        return self.logs

    def delete_job(self, name):
        self.deleted.append(name)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def _run(cluster, clock=None, **kw):
    clock = clock or FakeClock()
    lines = []
    job = build_pytorchjob(JobSpec(name="tvlm-sft-run-1", nodes=2))
    run_job(cluster, job, poll_s=30, clock=clock, sleep=kw.pop("sleep", clock.sleep), echo=lines.append, **kw)
    return lines


RUNNING_PODS = [_pod("j-master-0", "master", "Running"), _pod("j-worker-0", "worker", "Running")]


def test_job_phase_from_conditions():
    assert job_phase([]) is Phase.PENDING
    assert job_phase(_cond("Created", "Running")) is Phase.RUNNING
    assert job_phase(_cond("Created", "Running", "Restarting")) is Phase.RESTARTING
    assert job_phase(_cond("Created", "Running", "Failed")) is Phase.FAILED
    assert job_phase(_cond("Created", "Running", "Succeeded")) is Phase.SUCCEEDED


def test_follow_until_succeeded():
    cluster = RecordedCluster([([], []), (_cond("Created"), []), (_cond("Created", "Running"), RUNNING_PODS),
                               (_cond("Created", "Running"), RUNNING_PODS),
                               (_cond("Created", "Running", "Succeeded"), [])])
    lines = _run(cluster)
    assert len(cluster.created) == 1 and cluster.deleted == []
    assert any("Running (2/2 pods running)" in line for line in lines)
    assert lines[-1].endswith("Succeeded")


def test_failure_after_a_restart_names_replica_reason_and_logs():
    failed_pods = [_pod("j-master-0", "master", "Failed", exit_code=1),
                   _pod("j-worker-0", "worker", "Failed", exit_code=137, reason="OOMKilled")]
    cluster = RecordedCluster([
        (_cond("Created", "Running"), RUNNING_PODS),
        (_cond("Created", "Running", "Restarting"), [_pod("j-master-0", "master", "Running"),
                                                     _pod("j-worker-0", "worker", "Pending")]),
        (_cond("Created", "Running", "Restarting", "Running"), RUNNING_PODS),
        (_cond("Created", "Running", "Restarting", "Running", "Failed",
               message="PyTorchJob tvlm-sft-run-1 has failed because 1 Worker replica(s) failed."), failed_pods)])
    lines = []
    with pytest.raises(JobFailed) as err:
        lines = _run(cluster)
    text = str(err.value)
    assert "PyTorchJobFailed" in text and "1 Worker replica(s) failed" in text
    assert "failing replica: worker (pod j-worker-0, exit code 137, OOMKilled)" in text
    assert "CUDA out of memory" in text and cluster.log_requests == [("j-worker-0", 50)]
    assert cluster.deleted == []  # a failed job is kept for its logs
    assert lines == []  # the exception ended the run


def test_restarting_is_not_the_end():
    cluster = RecordedCluster([(_cond("Created", "Running", "Restarting"), RUNNING_PODS),
                               (_cond("Created", "Running", "Restarting", "Succeeded"), [])])
    lines = _run(cluster)
    assert any("resumes from its last checkpoint" in line for line in lines)


def test_stuck_pending_times_out_with_gpu_hint_and_deletes_the_job():
    pending = [_pod("j-master-0", "master", "Pending", unschedulable=True,
                    message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")]
    cluster = RecordedCluster([(_cond("Created"), pending)])
    with pytest.raises(JobStuck, match="Insufficient nvidia.com/gpu.*free nvidia.com/gpu capacity"):
        _run(cluster, pending_timeout_s=600)
    assert cluster.deleted == ["tvlm-sft-run-1"]
    assert 600 / 30 <= cluster.calls <= 600 / 30 + 2  # gave up right after the timeout, not before


def test_image_pull_failure_is_explained():
    pending = [_pod("j-master-0", "master", "Pending", reason="ImagePullBackOff",
                    message='Back-off pulling image "ghcr.io/trafficvlm/train:0.1.0"')]
    cluster = RecordedCluster([(_cond("Created"), pending)])
    with pytest.raises(JobStuck, match="cannot be pulled"):
        _run(cluster, pending_timeout_s=60)


def test_no_pods_at_all_times_out():
    cluster = RecordedCluster([([], [])])
    with pytest.raises(JobStuck, match="Training Operator created no pods"):
        _run(cluster, pending_timeout_s=60)


def test_sigterm_deletes_the_job():
    cluster = RecordedCluster([(_cond("Created", "Running"), RUNNING_PODS)])
    calls = []

    def sleep(seconds):  # KFP cancels the step while we wait: the kubelet sends SIGTERM
        calls.append(seconds)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Cancelled):
        _run(cluster, sleep=sleep)
    assert cluster.deleted == ["tvlm-sft-run-1"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


def test_job_deleted_by_someone_else_fails():
    cluster = RecordedCluster([(_cond("Created", "Running"), RUNNING_PODS), (None, [])])
    with pytest.raises(JobFailed, match="disappeared"):
        _run(cluster)


def test_retried_launcher_follows_the_existing_job():
    cluster = RecordedCluster([(_cond("Created", "Running", "Succeeded"), [])], exists=True)
    lines = _run(cluster)
    assert "already exists" in lines[0] and len(cluster.created) == 1


# --- the pipeline's sft step ----------------------------------------------------------------------------

def _request(**kw):
    return SftRequest(run_id="5e6f", llava_dir="/mnt/data/llava/abc", wts_dir="/mnt/data/wts",
                      base_model="/mnt/data/models/tiny", output_root="/ckpt/", nodes=2, gpus_per_node=8,
                      video={"fps": 1.0, "nframes": 0, "max_pixels": 81920, "total_pixels": 0},
                      hyper={"learning_rate": 1e-5}, extra_overrides=["train.max_steps=5"], **kw)


def test_request_overrides_and_checkpoint_location():
    """The overrides are keys of the trainer's real schema: load them onto a TrainConfig."""
    from trafficvlm.config import TrainConfig, load_config

    request = _request()
    assert request.checkpoint == "/ckpt/5e6f/sft/final"
    overrides = request.overrides()
    assert not any(o.startswith(("video.nframes", "video.total_pixels")) for o in overrides)  # 0 = unset
    assert overrides[-1] == "train.max_steps=5"
    cfg = load_config(TrainConfig, overrides=overrides)
    assert cfg.data.annotation_path == "/mnt/data/llava/abc/environment_mcq_llava_train.json"
    assert cfg.data.media_path == "/mnt/data/wts/videos/train"
    assert cfg.train.output_dir == "/ckpt/5e6f/sft" and cfg.model.path == "/mnt/data/models/tiny"
    assert (cfg.video.fps, cfg.video.max_pixels, cfg.train.lr, cfg.train.max_steps) == (1.0, 81920, 1e-5, 5)


def test_request_rejects_what_the_trainer_cannot_take():
    with pytest.raises(ValueError, match="one subset"):
        _request(subsets=["environment", "overhead"])
    with pytest.raises(ValueError, match="one of fps and nframes"):
        SftRequest(run_id="r", llava_dir="l", wts_dir="w", base_model="m", output_root="o",
                   video={"fps": 1.0, "nframes": 8})


def test_task_config_passes_through_to_the_job():
    task_config = SimpleNamespace(
        resources={"limits": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "4"}},
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "trafficvlm-data"}}],
        volume_mounts=[{"name": "data", "mountPath": "/mnt/data"}],
        env=[{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}], affinity=None)
    job = build_pytorchjob(spec_from_request(_request(), task_config, namespace="ml"))
    assert validate_manifests(job) == []
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"  # gpus_per_node decides the shape
    assert pod["nodeSelector"] == task_config.node_selector and pod["tolerations"] == task_config.tolerations
    assert {"name": "data", "mountPath": "/mnt/data"} in container["volumeMounts"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in container["env"]


def test_run_sft_pytorchjob_and_local(monkeypatch):
    cluster = RecordedCluster([(_cond("Created", "Running", "Succeeded"), [])])
    monkeypatch.setattr("trafficvlm.launcher.current_namespace", lambda default="kubeflow": "ml")
    assert run_sft("pytorchjob", _request(), None, cluster=cluster) == "/ckpt/5e6f/sft/final"
    (job, _), = cluster.created
    assert job["metadata"]["name"] == "tvlm-sft-5e6f" and job["metadata"]["namespace"] == "ml"

    ran = []
    monkeypatch.setattr("subprocess.run", lambda cmd, check: ran.append(cmd))
    assert run_sft("local", _request()) == "/ckpt/5e6f/sft/final"
    assert ran == [train_locally_command(_request())]
    assert ran[0][2:6] == ["trafficvlm", "train", "--config", "configs/sft/recipe_setting_a.toml"]
    with pytest.raises(ValueError, match="launcher 'slurm'"):
        run_sft("slurm", _request())
