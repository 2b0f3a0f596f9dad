"""Offline validation of Kubernetes objects (trafficvlm.k8s_validate) and of everything under manifests/."""

import copy
import hashlib
import re
from pathlib import Path

import pytest
import yaml

from trafficvlm import k8s_validate as kv

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
SCHEMAS = kv.REPO_ROOT.parent / "shared" / "schemas"
needs_shared = pytest.mark.skipif(not (SCHEMAS / "examples").is_dir(), reason="shared/schemas not beside the repo")


def _load(path):
    return kv.load_documents(Path(path).read_text())


# --- the validator on the shared fixtures --------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("name", ["argocd-application.yaml", "core.yaml", "flux-helmrelease.yaml",
                                  "nimservice-custom-checkpoint.yaml", "pytorchjob.yaml", "swf.yaml",
                                  "trainjob.yaml"])
def test_valid_fixtures_pass(name):
    assert kv.validate_manifests(SCHEMAS / "examples" / name) == []


INVALID = {  # file -> a fragment every run must report (the reason it is invalid)
    "argocd-bad.yaml": "'valuesFiles' was unexpected",
    "core-bad.yaml": "'schedule' is a required property",
    "deployment-unknown-field.yaml": "'resource' was unexpected",
    "flux-bad.yaml": "'Always' is not one of",
    "pytorchjob-bad.yaml": "one container must be named 'pytorch'",
    "trainjob-bad-cel.yaml": "RFC 1035",
}


@needs_shared
@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_fixtures_fail(name):
    errors = kv.validate_manifests(SCHEMAS / "examples" / "invalid" / name)
    assert errors and any(INVALID[name] in e for e in errors), errors


@needs_shared
def test_every_invalid_fixture_is_covered():
    assert sorted(p.name for p in (SCHEMAS / "examples" / "invalid").glob("*.yaml")) == sorted(INVALID)


def test_duplicate_keys_are_rejected(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: '1'}\ndata: {y: '2'}\n")
    errors = kv.validate_manifests(f)
    assert len(errors) == 1 and "duplicate key 'data'" in errors[0] and str(f) in errors[0]


def test_unknown_kind_is_an_error_not_a_warning():
    errors = kv.validate_manifests({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert errors and "no schema for example.com/v1 Widget" in errors[0]


def test_bad_object_name():
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_OK"}}
    assert any("DNS-1123" in e for e in kv.validate_manifests(cm))


def _pytorchjob():
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "j", "namespace": "ml"},
        "spec": {"pytorchReplicaSpecs": {
            "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}},
            "Worker": {"replicas": 3, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}},
        }}}


def test_pytorchjob_webhook_rules():
    assert kv.validate_manifests(_pytorchjob()) == []
    job = _pytorchjob()
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    job["spec"]["pytorchReplicaSpecs"]["Chief"] = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"])
    errors = "\n".join(kv.validate_manifests(job))
    assert "Master.replicas: must be exactly 1" in errors
    assert "Worker.template.spec.containers: one container must be named 'pytorch'" in errors
    assert "Chief: replica type must be Master or Worker" in errors


def test_crd_strictness_rejects_unknown_fields():
    job = _pytorchjob()
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert any("'resourcez' was unexpected" in e for e in kv.validate_manifests(job))


def test_scheduledworkflow_needs_six_field_cron():
    swf = _load(MANIFESTS / "pipeline" / "recurring-run.yaml")[0]
    swf["spec"]["trigger"]["cronSchedule"]["cron"] = "0 2 * * 0"
    assert any("six fields" in e for e in kv.validate_manifests(swf))


def test_schema_dir_override(tmp_path, monkeypatch):
    # An empty override still leaves the vendored CRDs in charge.
    monkeypatch.setenv("TRAFFICVLM_SCHEMAS", str(tmp_path))
    assert kv.schema_dirs() == [kv.VENDORED_CRDS, tmp_path]
    assert kv.validate_manifests(_pytorchjob()) == []


def test_strict_schema_maps_nullable_and_closes_objects():
    out = kv.strict_schema({"type": "object", "properties": {"a": {"type": "string", "nullable": True}},
                            "x-kubernetes-validations": []})
    assert out["additionalProperties"] is False and out["properties"]["a"]["type"] == ["string", "null"]
    open_node = kv.strict_schema({"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True})
    assert "additionalProperties" not in open_node


# --- our manifests --------------------------------------------------------------------------------------

def test_every_manifest_validates():
    """Every YAML under manifests/ (CRDs, RBAC, PVCs, GitOps, the recurring run, and the launcher's
    PyTorchJob template when present) is a valid object for Kubernetes 1.30."""
    files = kv.yaml_files([MANIFESTS])
    assert len(files) >= 10
    assert kv.validate_manifests(files) == []


def test_vendored_crds_match_their_recorded_sha256():
    recorded = dict(re.findall(r"^([0-9a-f]{64})  (\S+)$", (MANIFESTS / "crds" / "SOURCES.md").read_text(), re.M))
    files = sorted(p.name for p in (MANIFESTS / "crds").glob("*.yaml"))
    assert sorted(recorded.values()) == files
    for digest, name in recorded.items():
        assert hashlib.sha256((MANIFESTS / "crds" / name).read_bytes()).hexdigest() == digest, name


def test_launcher_role_is_least_privilege():
    docs = {d["kind"]: d for d in _load(MANIFESTS / "rbac" / "launcher.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}  # nothing cluster-wide
    grants = {(g, r): set(rule["verbs"]) for rule in docs["Role"]["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants == {
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete", "patch"},
        ("", "configmaps"): {"create"},   # trafficvlm.launcher's trainer config, owned by the job
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list", "watch"},
    }
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]


def test_pvcs_are_read_write_many():
    for pvc in _load(MANIFESTS / "storage" / "pvc.yaml"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], pvc["metadata"]["name"]


def test_gitops_watch_the_values_file():
    app = _load(MANIFESTS / "gitops" / "argocd-application.yaml")[0]
    chart_src, values_src = app["spec"]["sources"]
    assert chart_src["helm"]["valueFiles"] == ["$values/helm/values/vss.yaml"] and values_src["ref"] == "values"
    repo, release = _load(MANIFESTS / "gitops" / "flux-helmrelease.yaml")
    spec = release["spec"]["chart"]["spec"]
    assert spec["reconcileStrategy"] == "Revision" and spec["sourceRef"]["name"] == repo["metadata"]["name"]
    assert all((REPO / f).is_file() for f in spec["valuesFiles"])
    assert (REPO / spec["chart"] / "Chart.yaml").is_file()


def test_recurring_run_settings():
    spec = _load(MANIFESTS / "pipeline" / "recurring-run.yaml")[0]["spec"]
    assert len(spec["trigger"]["cronSchedule"]["cron"].split()) == 6
    assert spec["maxConcurrency"] == 1 and spec["noCatchup"] is True and spec["pipelineVersionId"]


def test_secrets_readme_names_the_secrets_the_chart_uses():
    text = (MANIFESTS / "secrets" / "README.md").read_text()
    values = yaml.safe_load((REPO / "helm" / "trafficvlm-nim" / "values.yaml").read_text())
    for name in (values["ngcAPISecret"], values["imagePullSecrets"][0]["name"], values["model"]["s3"]["credentialsSecret"]):
        assert f"`{name}`" in text
    assert not list(MANIFESTS.rglob("*secret*.yaml"))  # no Secret objects with values in the repo
