"""`trafficvlm rollout`: targeted edits of the VSS / NIM values and GitOps commits to a local bare repository."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from trafficvlm import cli
from trafficvlm.stages import rollout as ro

REPO = Path(__file__).resolve().parents[1]
VALUES = {p: (REPO / p).read_text() for p in ("helm/values/vss.yaml", "helm/values/nim-finetuned.yaml")}
SPEC = {"fps": 1.0, "max_pixels": 81920}
NEW = "pvc://trafficvlm-data/checkpoints/r42/fp8"


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(autouse=True)
def git_identity(tmp_path, monkeypatch):
    cfg = tmp_path / "gitconfig"
    cfg.write_text("[user]\n\tname = Test Bot\n\temail = bot@example.com\n[init]\n\tdefaultBranch = main\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def remote(tmp_path):
    """A bare GitOps repository whose main branch holds our two values files."""
    bare, work = tmp_path / "deploy.git", tmp_path / "seed"
    git("init", "--quiet", "--bare", str(bare))
    git("init", "--quiet", str(work))
    for rel, text in VALUES.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    git("add", ".", cwd=work)
    git("commit", "--quiet", "-m", "seed", cwd=work)
    git("push", "--quiet", str(bare), "HEAD:refs/heads/main", cwd=work)
    return bare


def show(remote, rel, ref="main"):
    return git("--git-dir", str(remote), "show", f"{ref}:{rel}")


def count(remote, ref="main"):
    return int(git("--git-dir", str(remote), "rev-list", "--count", ref))


def vss_env(text):
    data = yaml.safe_load(text)
    return {e["name"]: e["value"] for e in data["vss"]["applicationSpecs"]["vss-deployment"]["containers"]["vss"]["env"]}


def test_gitops_commit_then_idempotent(remote):
    res = ro.run_rollout(NEW, str(remote), video_spec=SPEC, run_id="run-42", model_version="7",
                         metrics={"accuracy": 0.93125, "unparsed": 0})
    assert res.changed and res.commit_sha == git("--git-dir", str(remote), "rev-parse", "main")
    assert count(remote) == 2
    text = show(remote, "helm/values/vss.yaml")
    assert vss_env(text)["MODEL_PATH"] == "/mnt/data/checkpoints/r42/fp8"
    # only MODEL_PATH changed among the values; comments survive
    before, after = yaml.safe_load(VALUES["helm/values/vss.yaml"]), yaml.safe_load(text)
    before_env = before["vss"]["applicationSpecs"]["vss-deployment"]["containers"]["vss"]["env"]
    next(e for e in before_env if e["name"] == "MODEL_PATH")["value"] = "/mnt/data/checkpoints/r42/fp8"
    assert after == before
    assert "# Helm replaces lists wholesale" in text and "# chart default: the summarisation / chat LLM" in text
    assert f"# trafficvlm-model: {NEW}" in text
    assert json.loads(text.split("# trafficvlm-video-spec:")[1].splitlines()[0]) == {**SPEC, "nframes": None}
    message = git("--git-dir", str(remote), "log", "-1", "--format=%B", "main")
    assert NEW in message and "pipeline run: run-42" in message and "MLflow model version: 7" in message
    assert "accuracy=0.9313" in message and "unparsed=0" in message
    # the same checkpoint again: no commit
    again = ro.run_rollout(NEW, str(remote), video_spec=SPEC, run_id="run-43")
    assert (again.changed, again.commit_sha, again.diff) == (False, None, "")
    assert again.message.startswith("already at") and count(remote) == 2


def test_dry_run_commits_nothing(remote):
    res = ro.run_rollout(NEW, str(remote), video_spec=SPEC, dry_run=True)
    assert res.changed and res.commit_sha is None
    assert "-            value: /mnt/data/checkpoints/current" in res.diff
    assert "+            value: /mnt/data/checkpoints/r42/fp8" in res.diff
    assert count(remote) == 1


def test_new_branch_from_default(remote):
    res = ro.run_rollout(NEW, str(remote), branch="promote/run-42", video_spec=SPEC)
    assert count(remote, "promote/run-42") == 2 and count(remote) == 1
    assert res.commit_sha == git("--git-dir", str(remote), "rev-parse", "promote/run-42")


def test_local_bundle_under_pvc_mount_gives_the_spec(remote, tmp_path):
    bundle = tmp_path / "mnt" / "checkpoints" / "r7" / "fp8"
    bundle.mkdir(parents=True)
    (bundle / "trafficvlm.json").write_text(json.dumps({"video": {"fps": 2.0, "max_pixels": 50176,
                                                                  "total_pixels": 6422528, "min_frames": 4}}))
    ro.run_rollout(str(bundle), str(remote), pvc_mount=str(tmp_path / "mnt"))
    text = show(remote, "helm/values/vss.yaml")
    assert vss_env(text)["MODEL_PATH"] == "/mnt/data/checkpoints/r7/fp8"
    assert "# trafficvlm-model: pvc://trafficvlm-data/checkpoints/r7/fp8" in text
    spec = json.loads(text.split("# trafficvlm-video-spec:")[1].splitlines()[0])
    assert spec == {"fps": 2.0, "nframes": None, "max_pixels": 50176, "total_pixels": 6422528}


def test_nim_values_s3(remote):
    rel = "helm/values/nim-finetuned.yaml"
    ro.run_rollout("s3://models/r42/fp8", str(remote), values_path=rel, served_name="wts-r42",
                   video_spec={"fps": 1.0, "max_pixels": 50176})
    after = yaml.safe_load(show(remote, rel))
    expected = yaml.safe_load(VALUES[rel])
    expected["model"]["source"] = "s3"
    expected["model"]["s3"]["uri"] = "s3://models/r42/fp8/"
    expected["servedModelName"] = "wts-r42"
    expected["videoSpec"]["maxPixels"] = 50176
    assert after == expected


def test_recipe_layout_edits_the_subpath():
    text = ("vss:\n  applicationSpecs:\n    vss-deployment:\n      containers:\n        vss:\n          env:\n"
            "          - name: MODEL_PATH\n            value: \"/tmp/cosmos-reason1\"\n"
            "  extraPodVolumes:\n  - name: ckpt\n    persistentVolumeClaim:\n      claimName: old-claim\n"
            "  extraPodVolumeMounts:\n  - name: ckpt\n    mountPath: /tmp/cosmos-reason1\n"
            "    subPath: old/step-1   # the checkpoint dir\n")
    out = ro.edit_values(text, ro.parse_location("pvc://wts-ckpt/runs/r9/fp8"), SPEC, None, "vss.yaml")
    data = yaml.safe_load(out)
    assert data["vss"]["extraPodVolumeMounts"][0]["subPath"] == "runs/r9/fp8"
    assert data["vss"]["extraPodVolumes"][0]["persistentVolumeClaim"]["claimName"] == "wts-ckpt"
    assert 'value: "/tmp/cosmos-reason1"' in out and "# the checkpoint dir" in out


def test_rejected_push_is_a_clear_error(remote):
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'protected branch' >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(ro.RolloutError, match="rejected.*nothing was force-pushed"):
        ro.run_rollout(NEW, str(remote), video_spec=SPEC)
    assert count(remote) == 1


@pytest.mark.parametrize("uri, kwargs, match", [
    (NEW, {}, "no video spec"),
    ("s3://models/r42/fp8", {"video_spec": SPEC}, "not S3"),
    ("gs://b/x", {"video_spec": SPEC}, "scheme not supported"),
    ("pvc://only-claim", {"video_spec": SPEC}, "pvc://CLAIM/PATH"),
    ("/somewhere/else", {"video_spec": SPEC}, "--pvc-mount"),
])
def test_bad_input(remote, uri, kwargs, match):
    with pytest.raises(ro.RolloutError, match=match):
        ro.run_rollout(uri, str(remote), **kwargs)


def test_missing_key_names_it():
    with pytest.raises(ro.RolloutError, match="key 'MODEL_PATH'|no MODEL_PATH"):
        ro.edit_values("vss:\n  applicationSpecs:\n    vss-deployment:\n      containers:\n        vss:\n"
                       "          env: []\n", ro.parse_location(NEW), SPEC, None, "v.yaml")


def test_helm_mode_builds_the_upgrade_command(remote):
    res = ro.run_rollout("s3://models/r42/fp8", str(remote), values_path="helm/values/nim-finetuned.yaml",
                         mode="helm", chart="helm/trafficvlm-nim", namespace="ml", release="wts-nim",
                         video_spec=SPEC, dry_run=True)
    cmd = res.command
    assert cmd[1:5] == ["upgrade", "--install", "wts-nim", "helm/trafficvlm-nim"]
    assert cmd[cmd.index("--namespace") + 1] == "ml" and cmd[cmd.index("--values") + 1].endswith("nim-finetuned.yaml")
    assert "--atomic" in cmd and "--dry-run" not in cmd  # our dry run never calls helm
    assert "+    uri: s3://models/r42/fp8/" in res.diff and count(remote) == 1


def test_cli(remote, capsys):
    argv = ["rollout", NEW, "--gitops-repo", str(remote), "--fps", "1", "--max-pixels", "81920",
            "--run-id", "r1", "--metrics", '{"accuracy": 0.9}']
    assert cli.main(argv) == 0 and "committed" in capsys.readouterr().out
    assert cli.main(argv) == 0 and "already at" in capsys.readouterr().out
    assert cli.main(["rollout", NEW, "--gitops-repo", str(remote)]) == 1
    assert "no video spec" in capsys.readouterr().err
    assert count(remote) == 2
