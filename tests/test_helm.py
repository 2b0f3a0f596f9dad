"""Our NIM chart (helm/trafficvlm-nim) and the values files in helm/values, checked with the real helm v4
binary (tools/fetch_helm.sh puts it in .cache/tools) and validated offline with trafficvlm.k8s_validate."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from trafficvlm.k8s_validate import load_documents, validate_manifests

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "trafficvlm-nim"
FINETUNED = REPO / "helm" / "values" / "nim-finetuned.yaml"
VSS = REPO / "helm" / "values" / "vss.yaml"
HELM = REPO / ".cache" / "tools" / "helm"
S3 = ["--set", "model.source=s3", "--set", "model.s3.uri=s3://trafficvlm-models/r42/fp8/"]

needs_helm = pytest.mark.skipif(not HELM.is_file(), reason="helm not fetched: bash tools/fetch_helm.sh .cache/tools")


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    home = tmp_path_factory.mktemp("helm")
    env = {"HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data"), "PATH": "/usr/bin:/bin"}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {shlex.join(args)} failed:\n{proc.stderr}")
        return proc
    return run


def render(helm, *args: str) -> dict[str, dict]:
    out = helm("template", "wts", str(CHART), "--namespace", "ml", "--skip-tests", "--kube-version", "1.30.0",
               *args).stdout
    docs = load_documents(out)
    assert validate_manifests(docs) == []
    return {d["kind"]: d for d in docs}


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@needs_helm
@pytest.mark.parametrize("args", [[], ["-f", str(FINETUNED)], ["-f", str(FINETUNED), *S3]],
                         ids=["defaults", "finetuned-pvc", "finetuned-s3"])
def test_lint(helm, args):
    helm("lint", "--strict", str(CHART), *args)


@needs_helm
def test_pvc_mode_renders_a_hardened_gpu_deployment(helm):
    objs = render(helm, "-f", str(FINETUNED))
    assert set(objs) == {"Deployment", "Service", "ConfigMap"}
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (nim,) = pod["containers"]
    assert "initContainers" not in pod
    env = env_of(nim)
    assert env["NIM_MODEL_NAME"] == "/opt/trafficvlm/model"
    assert env["NIM_SERVED_MODEL_NAME"] == "cosmos-reason1-7b-wts"
    assert env["NGC_API_KEY"] == {"secretKeyRef": {"name": "ngc-api", "key": "NGC_API_KEY"}}
    assert env["NIM_MAX_MODEL_LEN"] == "16384"
    assert nim["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert nim["startupProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert nim["readinessProbe"]["httpGet"]["path"] == "/v1/health/ready"
    assert nim["livenessProbe"]["httpGet"]["path"] == "/v1/health/live"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert nim["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    mounts = {m["name"]: m for m in nim["volumeMounts"]}
    assert mounts["model"]["subPath"] == "checkpoints/cosmos-reason1-wts/fp8" and mounts["model"]["readOnly"]
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "trafficvlm-data"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert pod["imagePullSecrets"] == [{"name": "ngc-secret"}]


@needs_helm
def test_video_spec_reaches_server_and_clients(helm):
    objs = render(helm, "-f", str(FINETUNED))
    spec = json.loads(objs["ConfigMap"]["data"]["video-spec.json"])
    assert spec == {"fps": 1, "nframes": None, "max_pixels": 81920, "min_pixels": 100352, "total_pixels": 90316800}
    assert json.loads(objs["Service"]["metadata"]["annotations"]["trafficvlm.io/video-spec"]) == spec
    args = shlex.split(env_of(objs["Deployment"]["spec"]["template"]["spec"]["containers"][0])["NIM_PASSTHROUGH_ARGS"])
    kwargs = dict(zip(args[::2], map(json.loads, args[1::2])))
    assert kwargs["--mm-processor-kwargs"] == {"fps": 1, "max_pixels": 81920, "min_pixels": 100352}
    assert kwargs["--media-io-kwargs"] == {"video": {"fps": 1, "num_frames": -1}}
    # nframes instead of fps: sampling by count
    objs = render(helm, "--set", "videoSpec.fps=null", "--set", "videoSpec.nframes=8")
    args = shlex.split(env_of(objs["Deployment"]["spec"]["template"]["spec"]["containers"][0])["NIM_PASSTHROUGH_ARGS"])
    assert json.loads(args[3]) == {"video": {"num_frames": 8}} and "fps" not in json.loads(args[1])


@needs_helm
def test_s3_mode_fetches_with_an_init_container(helm):
    objs = render(helm, "-f", str(FINETUNED), *S3, "--set", "model.s3.endpointURL=http://minio.ml:9000")
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    env = env_of(init)
    assert env["MODEL_S3_URI"] == "s3://trafficvlm-models/r42/fp8/" and env["AWS_ENDPOINT_URL"] == "http://minio.ml:9000"
    assert init["envFrom"] == [{"secretRef": {"name": "trafficvlm-s3"}}]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"] == {"name": "model", "emptyDir": {"sizeLimit": "40Gi"}}
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/opt/trafficvlm/model"}
    assert objs["Deployment"]["metadata"]["annotations"]["trafficvlm.io/model-source"] == "s3://trafficvlm-models/r42/fp8/"


@needs_helm
def test_optional_service_account(helm):
    objs = render(helm, "--set", "serviceAccount.create=true")
    assert objs["ServiceAccount"]["automountServiceAccountToken"] is False
    assert objs["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"] == "wts-trafficvlm-nim"


@needs_helm
@pytest.mark.parametrize("args, fragment", [
    (["--set", "model.source=nfs"], "/model/source"),
    (["--set", "model.source=s3"], "/model/s3/uri"),                        # s3 mode without a bucket
    (["--set", "unknownKey=1"], "unknownKey"),                              # strict top level
    (["--set", "videoSpec.nframes=8"], "/videoSpec"),                       # fps and nframes both set
    (["--set", "env[0].name=NIM_MODEL_NAME", "--set", "env[0].value=/x"], "/env/0/name"),  # chart-owned
    (["--set", "resources.limits.nvidia\\.com/gpu=0"], "nvidia.com~1gpu"),
], ids=["source", "s3-uri", "unknown", "spec", "owned-env", "gpu"])
def test_schema_rejects_bad_values(helm, args, fragment):
    proc = helm("template", "wts", str(CHART), "--kube-version", "1.30.0", *args, check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr
    assert fragment in proc.stderr, proc.stderr


def test_vss_overlay_selects_the_finetuned_vlm():
    values = yaml.safe_load(VSS.read_text())["vss"]
    env = {e["name"]: e["value"] for e in values["applicationSpecs"]["vss-deployment"]["containers"]["vss"]["env"]}
    assert env["VLM_MODEL_TO_USE"] == "cosmos-reason1"
    # Helm replaces the env list: the chart defaults VSS needs are carried explicitly.
    assert {"LLM_MODEL", "NGC_API_KEY_NAME", "NVIDIA_API_KEY_NAME", "OPENAI_API_KEY_NAME"} <= set(env)
    (mount,) = values["extraPodVolumeMounts"]
    (volume,) = values["extraPodVolumes"]
    assert env["MODEL_PATH"].startswith(mount["mountPath"] + "/") and mount["name"] == volume["name"]
    assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == "trafficvlm-data"
    marker = next(l for l in VSS.read_text().splitlines() if l.startswith("# trafficvlm-video-spec:"))
    assert json.loads(marker.split(":", 1)[1])["max_pixels"] == 81920
