"""The compiled pipeline (IR read back: DAG, parameters, caching, kfp-kubernetes settings, no secrets, not
stale), a kfp.local run of the data stages on a synthetic WTS tree, and the submit/schedule commands
against a fake kfp.Client."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipelines.images import STAGE_IMAGES
from s3server import s3_server  # noqa: F401  (the pytest fixture)
from trafficvlm import cli, pipeline_cli

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "pipelines" / "compiled" / "trafficvlm.yaml"
FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKE0TEST0ID", "AWS_SECRET_ACCESS_KEY": "fake/Secret+Key0123456789",
                "GIT_TOKEN": "ghp_faketoken0123456789abcdef", "TRAFFICVLM_API_KEY": "sk-fake-endpoint-key-0123",
                "API_KEY": "sk-fake-api-key-4567", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-89"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compiled with fake credentials in the environment: none of them may end up in the YAML."""
    mp = pytest.MonkeyPatch()
    for key, value in FAKE_SECRETS.items():
        mp.setenv(key, value)
    path = pipeline_cli.compile_pipeline(tmp_path_factory.mktemp("compiled") / "trafficvlm.yaml")
    mp.undo()
    spec, platform = yaml.safe_load_all(path.read_text())
    return SimpleNamespace(path=path, text=path.read_text(), spec=spec,
                           k8s=platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def _component_dag(spec, task):
    return spec["components"][task["componentRef"]["name"]]["dag"]


def _stages(spec):
    """The tasks inside the exit handler (the whole pipeline but its MLflow finisher)."""
    return _component_dag(spec, spec["root"]["dag"]["tasks"]["exit-handler-1"])["tasks"]


def _producer(task, param):
    return task["inputs"]["parameters"][param]["taskOutputParameter"]


def test_committed_yaml_is_not_stale(compiled):
    assert COMMITTED.is_file(), "run `trafficvlm pipeline compile` and commit pipelines/compiled/trafficvlm.yaml"
    assert COMMITTED.read_text() == compiled.text, "stale: run `trafficvlm pipeline compile`"


def test_dag_tasks_and_dependencies(compiled):
    root = compiled.spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finish-tracking"}
    tasks = _stages(compiled.spec)
    assert set(tasks) == {"start-tracking", "ingest", "prepare", "sft", "evaluate", "quantize", "promote",
                          "condition-2"}
    assert _producer(tasks["sft"], "llava_dir")["producerTask"] == "prepare"
    assert _producer(tasks["evaluate"], "checkpoint")["producerTask"] == "sft"
    assert tasks["prepare"]["dependentTasks"] == ["ingest"]
    assert set(tasks["sft"]["dependentTasks"]) == {"ingest", "prepare", "start-tracking"}
    # the gate compares against eval's results; promote takes the gate's verdict and drop as inputs
    assert _producer(tasks["quantize"], "eval_dir") == {"outputParameterKey": "results_dir",
                                                         "producerTask": "evaluate"}
    for param, key in (("fp8_gate_passed", "gate_passed"), ("fp8_drop", "accuracy_drop"),
                       ("fp8_checkpoint", "fp8_checkpoint")):
        assert _producer(tasks["promote"], param) == {"outputParameterKey": key, "producerTask": "quantize"}
    # rollout and the smoke test only when promote moved `champion`; smoke after rollout
    assert tasks["condition-2"]["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--promote-Output'] == true"  # promoted (kfp.local reads it)
    inner = _component_dag(compiled.spec, tasks["condition-2"])["tasks"]
    assert set(inner) == {"rollout", "smoke"} and inner["smoke"]["dependentTasks"] == ["rollout"]
    assert inner["rollout"]["inputs"]["parameters"]["model_version"]["componentInputParameter"] == \
        "pipelinechannel--promote-version"
    assert inner["smoke"]["inputs"]["parameters"]["champion_before"]["componentInputParameter"] == \
        "pipelinechannel--promote-champion_before"


def test_every_stage_logs_under_one_mlflow_parent_run(compiled):
    tasks = _stages(compiled.spec)
    for name in ("ingest", "sft", "evaluate", "quantize", "promote"):
        assert _producer(tasks[name], "parent_run_id") == {"outputParameterKey": "Output",
                                                            "producerTask": "start-tracking"}, name
    inner = _component_dag(compiled.spec, tasks["condition-2"])["tasks"]
    for name in ("rollout", "smoke"):
        assert inner[name]["inputs"]["parameters"]["parent_run_id"]["componentInputParameter"] == \
            "pipelinechannel--start-tracking-Output"
    # the exit handler closes the parent run whatever happened, finding it by the run id
    finisher = compiled.spec["root"]["dag"]["tasks"]["finish-tracking"]
    assert finisher["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finisher["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert finisher["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_parameters_have_types_and_defaults(compiled):
    params = compiled.spec["root"]["inputDefinitions"]["parameters"]
    expect = {"dataset_uri": ("STRING", "s3://trafficvlm-data/wts"), "nodes": ("NUMBER_INTEGER", 1),
              "gpus_per_node": ("NUMBER_INTEGER", 8), "fps": ("NUMBER_DOUBLE", 1.0),
              "max_pixels": ("NUMBER_INTEGER", 81920), "subsets": ("LIST", ["environment"]),
              "strict": ("BOOLEAN", False), "launcher": ("STRING", "pytorchjob"),
              "max_fp8_accuracy_drop": ("NUMBER_DOUBLE", 0.01), "gitops_branch": ("STRING", "main"),
              "checkpoint_store": ("STRING", "s3://trafficvlm-models/checkpoints"),
              "max_p_value": ("NUMBER_DOUBLE", 0.05), "smoke_endpoint": ("STRING", ""),
              "volume_mount": ("STRING", "/mnt/data")}
    for name, (kind, default) in expect.items():
        assert params[name]["parameterType"] == kind, name
        assert params[name]["defaultValue"] == default, name
    assert all("defaultValue" in p for p in params.values())  # a UI run needs no typing


def test_every_pipeline_parameter_is_used(compiled):
    """A parameter no task reads is a lie in the UI (the recurring run once passed two such names)."""
    dags = [compiled.spec["root"]["dag"]] + [c["dag"] for c in compiled.spec["components"].values() if "dag" in c]
    used = {param.get("componentInputParameter", "").removeprefix("pipelinechannel--")
            for dag in dags for task in dag["tasks"].values()
            for param in task.get("inputs", {}).get("parameters", {}).values()}
    assert set(compiled.spec["root"]["inputDefinitions"]["parameters"]) <= used


def test_recurring_run_passes_only_real_parameters():
    doc = yaml.safe_load((REPO / "manifests" / "pipeline" / "recurring-run.yaml").read_text())
    names = [p["name"] for p in doc["spec"]["workflow"]["parameters"]]
    unknown = set(names) - set(pipeline_cli.pipeline_parameters())
    assert names and not unknown, f"recurring-run.yaml passes parameters the pipeline lacks: {unknown}"


def test_run_id_is_resolved_at_run_time(compiled):
    sft_inputs = _stages(compiled.spec)["sft"]["inputs"]["parameters"]
    assert sft_inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_caching_per_step(compiled):
    tasks = _stages(compiled.spec)
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    for name in ("start-tracking", "ingest", "sft", "evaluate", "quantize", "promote"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    inner = _component_dag(compiled.spec, tasks["condition-2"])["tasks"]
    assert not any(t["cachingOptions"].get("enableCache") for t in inner.values())


STAGE_OF = {"exec-start-tracking": "tracking", "exec-finish-tracking": "tracking", "exec-ingest": "ingest",
            "exec-prepare": "prepare", "exec-sft": "sft", "exec-evaluate": "eval", "exec-quantize": "quantize",
            "exec-promote": "promote", "exec-rollout": "rollout", "exec-smoke": "smoke"}


def test_images_and_no_pip_install(compiled):
    executors = compiled.spec["deploymentSpec"]["executors"]
    assert set(executors) == set(STAGE_OF)
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == STAGE_IMAGES[STAGE_OF[name]]
        assert "pip install" not in " ".join(container["command"])  # air-gapped: kfp is in the image


def _secrets(executor):
    return {s["secretName"]: ({e["secretKey"]: e["envVar"] for e in s["keyToEnv"]}, s["optional"])
            for s in executor.get("secretAsEnv", [])}


def test_kubernetes_settings_on_the_right_tasks(compiled):
    k8s = compiled.k8s
    pvc = {"constant": "trafficvlm-data", "mountPath": "/mnt/data"}
    for name in ("exec-ingest", "exec-prepare", "exec-sft", "exec-evaluate", "exec-quantize", "exec-promote",
                 "exec-rollout", "exec-smoke"):
        assert pvc.items() <= k8s[name]["pvcMount"][0].items(), name
    for name in ("exec-sft", "exec-evaluate", "exec-quantize"):
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[name]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu",
                                             "operator": "Exists"}]
    assert "tolerations" not in k8s["exec-ingest"] and "nodeSelector" not in k8s["exec-prepare"]
    s3_keys = {e["secretKey"] for s in k8s["exec-ingest"]["secretAsEnv"] for e in s["keyToEnv"]
               if s["secretName"] == "trafficvlm-s3"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= s3_keys
    assert "secretAsEnv" not in k8s["exec-prepare"] and "configMapAsEnv" not in k8s["exec-prepare"]
    assert "trafficvlm-s3" in _secrets(k8s["exec-promote"])  # uploads the FP8 checkpoint
    assert set(_secrets(k8s["exec-rollout"])) == {"trafficvlm-gitops", "trafficvlm-mlflow"}
    assert _secrets(k8s["exec-rollout"])["trafficvlm-gitops"] == ({"GIT_TOKEN": "GIT_TOKEN"}, False)
    # the smoke test's API key: an optional Secret, read as an env var, never a parameter
    assert _secrets(k8s["exec-smoke"])["trafficvlm-endpoint"] == ({"API_KEY": "TRAFFICVLM_API_KEY"}, True)
    assert "trafficvlm-s3" not in _secrets(k8s["exec-smoke"]) and "trafficvlm-gitops" not in _secrets(k8s["exec-smoke"])


def test_tracking_settings_on_every_logging_step(compiled):
    for name in set(STAGE_OF) - {"exec-prepare"}:
        executor = compiled.k8s[name]
        (cm,) = executor["configMapAsEnv"]
        assert cm["configMapName"] == "trafficvlm-settings" and not cm["optional"], name
        assert cm["keyToEnv"] == [{"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"}]
        auth, optional = _secrets(executor)["trafficvlm-mlflow"]
        assert optional and set(auth) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, name


def test_settings_configmap_and_secrets_readme_match_the_pipeline():
    from pipelines import cluster

    (cm,) = yaml.safe_load_all((REPO / "manifests" / "pipeline" / "settings.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == cluster.SETTINGS_CONFIGMAP
    assert "MLFLOW_TRACKING_URI" in cm["data"]
    readme = (REPO / "manifests" / "secrets" / "README.md").read_text()
    for name in (cluster.S3_SECRET, cluster.GITOPS_SECRET, cluster.MLFLOW_SECRET, cluster.ENDPOINT_SECRET,
                 cluster.SETTINGS_CONFIGMAP, "GIT_TOKEN", "API_KEY", "MLFLOW_TRACKING_USERNAME"):
        assert f"`{name}`" in readme, name


def test_sft_resources_pass_through_to_the_job(compiled):
    resources = compiled.spec["deploymentSpec"]["executors"]["exec-sft"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "gpus_per_node" in resources["accelerator"]["resourceCount"]  # the parameter, not a constant
    passthroughs = compiled.spec["components"]["comp-sft"]["taskConfigPassthroughs"]
    fields = {p["field"]: p.get("applyToTask", False) for p in passthroughs}
    assert fields == {"RESOURCES": False, "KUBERNETES_NODE_SELECTOR": False, "KUBERNETES_TOLERATIONS": False,
                      "KUBERNETES_VOLUMES": False, "ENV": True}
    evaluate = compiled.spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert evaluate["accelerator"]["resourceCount"] == "1"


def test_no_secret_values_in_the_yaml(compiled):
    for value in FAKE_SECRETS.values():
        assert value not in compiled.text
    assert "AWS_SECRET_ACCESS_KEY" in compiled.text  # the key is referenced, its value is not
    assert "TRAFFICVLM_API_KEY" in compiled.text and "x-access-token" in compiled.text  # names, not values


# --- kfp.local ------------------------------------------------------------------------------------------

def test_local_run_of_the_data_stages(tmp_path, monkeypatch, capsys):
    from trafficvlm.synth import synthesize

    synthesize(tmp_path / "wts", seed=0, scenarios=1, normal=1, bdd=0, progress=False)
    # Pretend training is still missing, so this stays the data stages even after the trainer lands.
    monkeypatch.setattr(pipeline_cli, "missing_stages", lambda: ["sft", "eval"])
    messages = []
    out = pipeline_cli.run_local(tmp_path / "wts", tmp_path / "work",
                                 params={"splits": ["train", "val"]}, echo=messages.append)
    assert messages == ["running ingest -> prepare; still to come (not in the package yet): sft, eval"]
    llava = Path(out)
    assert llava.parent == tmp_path / "work" / "data" / "llava"
    report = json.loads((llava / "prepare_report.json").read_text())
    train = json.loads((llava / "environment_mcq_llava_train.json").read_text())
    assert len(train) > 0 and "<video>" in train[0]["conversations"][0]["value"]
    assert report["counts"]


def test_local_run_ingests_from_s3_with_credentials_from_env(tmp_path, monkeypatch, s3_server):
    """The ingest shell reads S3 credentials from the environment (a Secret on a cluster), never from
    parameters; the second run fetches nothing and gets the same fingerprint, so prepare's cache holds."""
    from trafficvlm.stages.ingest import run_upload
    from trafficvlm.synth import synthesize

    s3_server.apply_env(monkeypatch)  # kfp.local's subprocesses inherit this environment
    synthesize(tmp_path / "wts", seed=1, scenarios=1, normal=1, bdd=0, progress=False)
    run_upload(tmp_path / "wts", "s3://pipeline-test/wts", create_bucket=True, progress=False)
    monkeypatch.setattr(pipeline_cli, "missing_stages", lambda: ["sft"])
    outs = [pipeline_cli.run_local("s3://pipeline-test/wts", tmp_path / "work", params={"splits": ["train"]},
                                   echo=lambda _: None) for _ in range(2)]
    assert outs[0] == outs[1] and Path(outs[0], "environment_mcq_llava_train.json").is_file()
    assert (tmp_path / "work" / "data" / "wts" / "videos" / "train").is_dir()


def test_missing_stages_lists_modules_not_written():
    missing = pipeline_cli.missing_stages()
    assert "ingest" not in missing and "prepare" not in missing


def test_local_run_takes_the_longest_prefix_that_exists():
    from pipelines.trafficvlm import data_pipeline, train_pipeline, trafficvlm_pipeline

    assert pipeline_cli.local_pipeline([]) is trafficvlm_pipeline
    assert pipeline_cli.local_pipeline(["quantize", "promote"]) is train_pipeline
    assert pipeline_cli.local_pipeline(["eval", "quantize"]) is data_pipeline
    assert pipeline_cli.local_pipeline(["sft", "eval"]) is data_pipeline
    with pytest.raises(RuntimeError, match="prepare"):
        pipeline_cli.local_pipeline(["prepare"])


# --- submit / schedule ----------------------------------------------------------------------------------

class FakeClient:
    def __init__(self, pipelines=None, versions=()):
        self.calls, self.pipelines, self.versions = [], dict(pipelines or {}), list(versions)

    def create_run_from_pipeline_package(self, pipeline_file, **kw):
        self.calls.append(("run", pipeline_file, kw))
        return SimpleNamespace(run_id="run-123")

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name):
        self.calls.append(("upload_pipeline", pipeline_name))
        return SimpleNamespace(pipeline_id="p-1")

    def list_pipeline_versions(self, pipeline_id, **kw):
        return SimpleNamespace(pipeline_versions=self.versions)

    def upload_pipeline_version(self, path, name, pipeline_id):
        self.calls.append(("upload_version", name, pipeline_id))
        return SimpleNamespace(pipeline_version_id="v-new")

    def create_experiment(self, name):
        return SimpleNamespace(experiment_id=f"e-{name}")

    def create_recurring_run(self, **kw):
        self.calls.append(("recurring", kw))
        return SimpleNamespace(recurring_run_id="rr-1")


@pytest.fixture
def fake_client(monkeypatch):
    client = FakeClient()
    monkeypatch.setattr(pipeline_cli, "make_client", lambda host, namespace: client)
    return client


def test_submit_builds_the_call(fake_client, capsys):
    code = cli.main(["pipeline", "submit", "--host", "http://kfp:8080", "--experiment", "wts", "--param",
                     "nodes=2", "--param", "subsets=environment,overhead", "--param", "strict=true",
                     "--param", "fps=2", "--package", str(COMMITTED)])
    assert code == 0 and "run-123" in capsys.readouterr().out
    (kind, package, kw), = fake_client.calls
    assert package == str(COMMITTED) and kw["experiment_name"] == "wts"
    assert kw["arguments"] == {"nodes": 2, "subsets": ["environment", "overhead"], "strict": True, "fps": 2.0}
    assert kw["enable_caching"] is None  # per-step caching stays as compiled


@pytest.mark.parametrize("param,message", [("nodez=2", "not a pipeline parameter"),
                                           ("nodes=two", "not a valid Integer"),
                                           ("strict=yes", "not a valid Boolean")])
def test_submit_rejects_bad_params(fake_client, capsys, param, message):
    code = cli.main(["pipeline", "submit", "--host", "h", "--param", param, "--package", str(COMMITTED)])
    assert code == 2 and message in capsys.readouterr().err and fake_client.calls == []


def test_schedule_creates_a_recurring_run_of_a_version(fake_client, capsys):
    code = cli.main(["pipeline", "schedule", "--host", "h", "--cron", "0 0 3 * * *", "--experiment", "nightly",
                     "--param", "nodes=2", "--package", str(COMMITTED)])
    assert code == 0
    assert [c[0] for c in fake_client.calls] == ["upload_pipeline", "upload_version", "recurring"]
    kw = fake_client.calls[-1][1]
    assert kw["cron_expression"] == "0 0 3 * * *" and kw["max_concurrency"] == 1 and kw["no_catchup"] is True
    assert kw["pipeline_id"] == "p-1" and kw["version_id"] == "v-new" and kw["experiment_id"] == "e-nightly"
    assert kw["params"] == {"nodes": 2}


def test_schedule_reuses_an_identical_version(monkeypatch):
    version = pipeline_cli.package_version(COMMITTED)
    client = FakeClient(pipelines={"trafficvlm": "p-9"},
                        versions=[SimpleNamespace(display_name=version, pipeline_version_id="v-9")])
    request = pipeline_cli.recurring_run_request(COMMITTED, cron="0 0 3 * * 0", experiment="x", name="n",
                                                 params={})
    assert pipeline_cli.schedule(client, COMMITTED, request) == "rr-1"
    assert [c[0] for c in client.calls] == ["recurring"] and client.calls[0][1]["version_id"] == "v-9"


def test_schedule_dry_run_prints_the_request(fake_client, capsys):
    assert cli.main(["pipeline", "schedule", "--cron", "0 30 2 * * MON-FRI", "--dry-run",
                     "--package", str(COMMITTED)]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["cron_expression"] == "0 30 2 * * MON-FRI" and request["max_concurrency"] == 1
    assert request["no_catchup"] is True and request["pipeline_version"].startswith("0.1.0-")
    assert fake_client.calls == []


@pytest.mark.parametrize("cron,message", [("0 3 * * *", "six fields"), ("60 0 3 * * *", "second '60'"),
                                          ("0 0 25 * * *", "hour '25'"), ("0 */0 * * * *", "step")])
def test_bad_cron_is_rejected(cron, message):
    with pytest.raises(ValueError, match=message):
        pipeline_cli.validate_cron(cron)
