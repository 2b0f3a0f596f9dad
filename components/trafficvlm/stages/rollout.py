"""Rollout stage: promote a checkpoint into the Helm values that serve it — by a GitOps commit (default) or
a direct `helm upgrade --install`.

    trafficvlm rollout pvc://trafficvlm-data/checkpoints/r42/fp8 --gitops-repo git@git.example.com:ml/deploy.git \
        --run-id r42 --model-version 7 --metrics '{"accuracy": 0.93}' --fps 1 --max-pixels 81920
    trafficvlm rollout /mnt/data/checkpoints/r42/fp8 --pvc-mount /mnt/data --gitops-repo /srv/deploy.git
    trafficvlm rollout s3://models/r42/fp8/ --bundle runs/r42/fp8 --gitops-repo ../deploy.git \
        --values-path helm/values/nim-finetuned.yaml --mode helm --chart helm/trafficvlm-nim --dry-run

    from trafficvlm.stages.rollout import run_rollout
    result = run_rollout("pvc://trafficvlm-data/checkpoints/r42/fp8", "/srv/deploy.git", video_spec={"fps": 1.0, ...})

MODEL_URI is where the cluster finds the checkpoint: `s3://bucket/prefix`, `pvc://CLAIM/SUBPATH`, or a local
directory under `--pvc-mount` (the checkpoints claim as mounted in this pod). Its video spec comes from the
bundle's `trafficvlm.json` (MODEL_URI itself when local, else `--bundle`) and/or flags; serving without it
would sample video differently from training, so a missing spec is an error.

Values files are edited in place, not regenerated: each key is located through PyYAML's node positions and
only that scalar's text is replaced, so comments, order and every unrelated key survive; the result is
re-parsed and must differ from the original in exactly the intended keys. Two layouts are recognised:
the VSS overlay (helm/values/vss.yaml: MODEL_PATH env, checkpoint volume; spec and model in marker comments)
and our NIM chart's values (helm/values/nim-finetuned.yaml: model.*, servedModelName, videoSpec.*).

Git: clone into a temp dir, commit on `--branch` (created from the default branch if missing), push without
force; a rejected push is an error telling you to re-run. Opening a merge request is left to the Git host.
The same checkpoint twice is a no-op ("already at ...").
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_VALUES_PATH = "helm/values/vss.yaml"
SPEC_KEYS = ("fps", "nframes", "max_pixels", "min_pixels", "total_pixels")
NIM_SPEC_KEYS = {"fps": "fps", "nframes": "nframes", "max_pixels": "maxPixels", "min_pixels": "minPixels",
                 "total_pixels": "totalPixels"}
VSS_CONTAINER = ("vss", "applicationSpecs", "vss-deployment", "containers", "vss")
SPEC_MARKER = "# trafficvlm-video-spec:"
MODEL_MARKER = "# trafficvlm-model:"


class RolloutError(RuntimeError):
    """A rollout that cannot proceed; the message says why and what to do."""


@dataclass
class ModelLocation:
    """Where the cluster reads the checkpoint."""

    kind: str                  # "pvc" | "s3"
    uri: str                   # canonical: pvc://claim/sub/path (claim may be "" = keep) or s3://bucket/prefix
    claim: str | None = None
    sub_path: str | None = None


@dataclass
class RolloutResult:
    commit_sha: str | None
    changed: bool
    diff: str
    message: str = ""
    command: list[str] = field(default_factory=list)   # the helm command in --mode helm


# --- model location and video spec ---------------------------------------------------------------------

def parse_location(model_uri: str, pvc_mount: str | None = None) -> ModelLocation:
    """`s3://b/p`, `pvc://claim/sub` or a local dir under `pvc_mount` -> ModelLocation."""
    if model_uri.startswith("s3://"):
        if not re.match(r"^s3://[^/]+/.+", model_uri):
            raise RolloutError(f"MODEL_URI {model_uri!r}: an S3 location needs a bucket and a prefix")
        return ModelLocation("s3", model_uri.rstrip("/") + "/")
    if model_uri.startswith("pvc://"):
        claim, _, sub = model_uri[len("pvc://"):].partition("/")
        if not claim or not sub.strip("/"):
            raise RolloutError(f"MODEL_URI {model_uri!r}: use pvc://CLAIM/PATH/IN/CLAIM")
        return ModelLocation("pvc", f"pvc://{claim}/{sub.strip('/')}", claim, sub.strip("/"))
    if "://" in model_uri:
        raise RolloutError(f"MODEL_URI {model_uri!r}: scheme not supported (s3://, pvc:// or a local directory)")
    path = Path(model_uri).resolve()
    if not pvc_mount:
        raise RolloutError(f"MODEL_URI {model_uri!r} is a local path: pass --pvc-mount (where the checkpoints "
                           f"claim is mounted here) or a pvc:// / s3:// URI")
    try:
        sub = path.relative_to(Path(pvc_mount).resolve()).as_posix()
    except ValueError:
        raise RolloutError(f"MODEL_URI {path} is not under --pvc-mount {pvc_mount}") from None
    if sub == ".":
        raise RolloutError(f"MODEL_URI {path} is the mount itself; give the checkpoint directory")
    return ModelLocation("pvc", f"pvc://{sub}", None, sub)


def read_video_spec(bundle_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `video` section of a bundle's trafficvlm.json, or None when the bundle has none. Read here, not via
    trafficvlm.model, so the rollout image needs no torch."""
    path = Path(bundle_dir) / "trafficvlm.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RolloutError(f"{path}: not valid JSON ({exc})") from None
    spec = meta.get("video")  # VideoSpec fields, as trafficvlm.model.write_bundle_meta stores them
    if not isinstance(spec, dict):
        raise RolloutError(f"{path}: no 'video' object (the video spec the model was trained with)")
    return {k: spec[k] for k in SPEC_KEYS if k in spec}


def resolve_video_spec(bundle: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    spec = dict(read_video_spec(bundle) or {}) if bundle else {}
    spec.update({k: v for k, v in overrides.items() if v is not None})
    if "nframes" in overrides and overrides["nframes"] is not None:
        spec["fps"] = None  # exactly one of fps / nframes drives sampling
    if not spec or (spec.get("fps") is None and spec.get("nframes") is None):
        raise RolloutError("no video spec: MODEL has no trafficvlm.json 'video' section; pass --bundle DIR or "
                           "--fps/--nframes and --max-pixels (serving must sample video as training did)")
    spec.setdefault("nframes", None)
    return spec


# --- targeted YAML edits --------------------------------------------------------------------------------

Step = str | tuple[str, str]   # a mapping key, or (key, value) selecting a list item by one of its fields


def _find_node(root: Any, path: list[Step], where: str) -> Any:
    import yaml

    node = root
    for step in path:
        if isinstance(step, tuple):
            if not isinstance(node, yaml.SequenceNode):
                raise RolloutError(f"{where}: expected a list at {step}")
            key, value = step
            matches = [item for item in node.value if isinstance(item, yaml.MappingNode) and any(
                k.value == key and getattr(v, "value", None) == value for k, v in item.value)]
            if len(matches) != 1:
                raise RolloutError(f"{where}: expected one list item with {key}={value!r}, found {len(matches)}")
            node = matches[0]
            continue
        if not isinstance(node, yaml.MappingNode):
            raise RolloutError(f"{where}: expected a mapping before {step!r}")
        found = [v for k, v in node.value if k.value == step]
        if not found:
            raise RolloutError(f"{where}: key {step!r} not found; add it to the values file once by hand")
        node = found[0]
    if not isinstance(node, yaml.ScalarNode):
        raise RolloutError(f"{where}: {path[-1]!r} is not a scalar")
    return node


def _render_scalar(value: Any, quoted: bool) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    import yaml

    plain_ok = re.fullmatch(r"[A-Za-z0-9_./@-][A-Za-z0-9_./:@-]*", value) and yaml.safe_load(value) == value
    return value if plain_ok and not quoted else json.dumps(value)


def apply_edits(text: str, edits: dict[tuple[Step, ...], Any], where: str) -> str:
    """Set each path of `edits` to its value by rewriting only that scalar's text; verified by re-parsing."""
    import yaml

    from trafficvlm.k8s_validate import UniqueKeyLoader

    root = yaml.compose(text, Loader=UniqueKeyLoader)
    spans = []
    for path, value in edits.items():
        node = _find_node(root, list(path), where)
        spans.append((node.start_mark.index, node.end_mark.index, _render_scalar(value, node.style in ('"', "'"))))
    out = text
    for start, end, new in sorted(spans, reverse=True):
        out = out[:start] + new + out[end:]
    expected = yaml.load(text, Loader=UniqueKeyLoader)
    for path, value in edits.items():
        _set_in(expected, list(path), value)
    if yaml.load(out, Loader=UniqueKeyLoader) != expected:
        raise RolloutError(f"{where}: in-place edit did not produce the intended values (unusual YAML layout); "
                           f"edit it by hand")
    return out


def _set_in(data: Any, path: list[Step], value: Any) -> None:
    for step in path[:-1]:
        data = next(i for i in data if i.get(step[0]) == step[1]) if isinstance(step, tuple) else data[step]
    data[path[-1]] = value


def _set_marker(text: str, marker: str, payload: str) -> str:
    line = f"{marker} {payload}"
    pattern = re.compile(rf"^{re.escape(marker)}.*$", re.M)
    return pattern.sub(lambda _: line, text, count=1) if pattern.search(text) else f"{line}\n{text}"


# --- the two values layouts -----------------------------------------------------------------------------

def edit_values(text: str, loc: ModelLocation, spec: dict[str, Any], served_name: str | None,
                where: str) -> str:
    """New text of a values file pointing at `loc` with `spec`; VSS overlay or trafficvlm-nim values."""
    import yaml

    from trafficvlm.k8s_validate import UniqueKeyLoader

    try:
        data = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise RolloutError(f"{where}: not valid YAML ({exc})") from None
    if isinstance(data.get("vss"), dict):
        return _edit_vss(text, data, loc, spec, served_name, where)
    if isinstance(data.get("model"), dict) and "source" in data["model"]:
        return apply_edits(text, _nim_edits(data, loc, spec, served_name), where)
    raise RolloutError(f"{where}: neither a VSS overlay (top-level 'vss') nor trafficvlm-nim values ('model.source')")


def _edit_vss(text: str, data: dict[str, Any], loc: ModelLocation, spec: dict[str, Any],
              served_name: str | None, where: str) -> str:
    if loc.kind != "pvc":
        raise RolloutError(f"{where}: VSS loads MODEL_PATH from a mounted volume, not S3; roll out the PVC copy "
                           f"(pvc://CLAIM/PATH) or use the trafficvlm-nim values")
    if served_name:
        print(f"note: {where}: VSS serves its integrated VLM under its own name; --served-name ignored",
              file=sys.stderr)
    env_path: list[Step] = list(VSS_CONTAINER) + ["env"]
    env = {e.get("name"): e.get("value") for e in _get(data, env_path, where) or []}
    if "MODEL_PATH" not in env:
        raise RolloutError(f"{where}: the vss container env has no MODEL_PATH entry")
    mount, claim = _checkpoint_mount(data["vss"], str(env["MODEL_PATH"]), where)
    edits: dict[tuple[Step, ...], Any] = {}
    if "subPath" in mount:   # the recipe's layout: the checkpoint dir itself is mounted at MODEL_PATH
        edits[("vss", "extraPodVolumeMounts", ("name", mount["name"]), "subPath")] = loc.sub_path
        model_path = mount["mountPath"]
    else:                    # the whole claim is mounted; MODEL_PATH points inside it
        model_path = f"{mount['mountPath'].rstrip('/')}/{loc.sub_path}"
    edits[tuple(env_path + [("name", "MODEL_PATH"), "value"])] = model_path
    if loc.claim and loc.claim != claim:
        edits[("vss", "extraPodVolumes", ("name", mount["name"]), "persistentVolumeClaim", "claimName")] = loc.claim
    out = apply_edits(text, edits, where)
    out = _set_marker(out, SPEC_MARKER, json.dumps({k: spec.get(k) for k in SPEC_KEYS if k in spec}))
    return _set_marker(out, MODEL_MARKER, f"pvc://{loc.claim or claim}/{loc.sub_path}")


def _checkpoint_mount(vss: dict[str, Any], model_path: str, where: str) -> tuple[dict[str, Any], str]:
    """The extraPodVolumeMounts entry holding MODEL_PATH (deepest match) and the claim of its volume."""
    def holds(m: dict[str, Any]) -> bool:
        root = m["mountPath"].rstrip("/")
        return model_path == root or model_path.startswith(root + "/")

    mount = max(filter(holds, vss.get("extraPodVolumeMounts") or []), key=lambda m: len(m["mountPath"]),
                default=None)
    volume = next((v for v in vss.get("extraPodVolumes") or [] if mount and v.get("name") == mount["name"]), None)
    if mount is None or not (volume or {}).get("persistentVolumeClaim"):
        raise RolloutError(f"{where}: MODEL_PATH {model_path} is not on a PVC from vss.extraPodVolumes/"
                           f"extraPodVolumeMounts")
    return mount, volume["persistentVolumeClaim"].get("claimName", "")


def _nim_edits(data: dict[str, Any], loc: ModelLocation, spec: dict[str, Any],
               served_name: str | None) -> dict[tuple[Step, ...], Any]:
    edits: dict[tuple[Step, ...], Any] = {("model", "source"): loc.kind}
    if loc.kind == "pvc":
        edits[("model", "pvc", "subPath")] = loc.sub_path
        if loc.claim:
            edits[("model", "pvc", "claimName")] = loc.claim
    else:
        edits[("model", "s3", "uri")] = loc.uri
    if served_name:
        edits[("servedModelName",)] = served_name
    for key, value_key in NIM_SPEC_KEYS.items():
        if key in spec and value_key in (data.get("videoSpec") or {}):
            edits[("videoSpec", value_key)] = spec[key]
    return edits


def _get(data: Any, path: list[Step], where: str) -> Any:
    for step in path:
        if not isinstance(data, dict) or step not in data:
            raise RolloutError(f"{where}: missing {'.'.join(map(str, path))}")
        data = data[step]
    return data


# --- git ------------------------------------------------------------------------------------------------

def _git(*args: str, cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if check and proc.returncode != 0:
        raise RolloutError(f"git {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def clone_branch(repo: str, branch: str, dest: Path) -> None:
    """Clone `repo` at `branch` into `dest`; a missing branch is created from the default branch."""
    heads = _git("ls-remote", "--heads", repo, branch).stdout
    if heads.strip():
        _git("clone", "--quiet", "--single-branch", "--branch", branch, repo, str(dest))
    else:
        _git("clone", "--quiet", repo, str(dest))
        _git("checkout", "--quiet", "-b", branch, cwd=dest)


def commit_and_push(workdir: Path, values_path: str, branch: str, message: str) -> str:
    identity = [] if _git("config", "user.email", cwd=workdir, check=False).returncode == 0 else [
        "-c", "user.name=trafficvlm rollout", "-c", "user.email=trafficvlm@localhost"]
    _git("add", "--", values_path, cwd=workdir)
    _git(*identity, "commit", "--quiet", "-m", message, cwd=workdir)
    push = _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=workdir, check=False)
    if push.returncode != 0:
        raise RolloutError(f"push to branch {branch!r} was rejected (the branch moved or is protected); nothing "
                           f"was force-pushed — re-run the rollout to apply the change on the new head.\n"
                           f"{push.stderr.strip()}")
    return _git("rev-parse", "HEAD", cwd=workdir).stdout.strip()


def commit_message(loc: ModelLocation, values_path: str, run_id: str | None, model_version: str | None,
                   metrics: dict[str, Any] | None, spec: dict[str, Any]) -> str:
    lines = [f"rollout: serve {loc.uri}", "", f"values: {values_path}",
             f"pipeline run: {run_id or 'n/a'}", f"MLflow model version: {model_version or 'n/a'}"]
    if metrics:
        lines.append("metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())))
    lines.append("video spec: " + json.dumps(spec, sort_keys=True))
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --- helm -----------------------------------------------------------------------------------------------

def helm_binary() -> str:
    local = Path(__file__).resolve().parents[3] / ".cache" / "tools" / "helm"
    return os.environ.get("HELM") or (str(local) if local.is_file() else "helm")


def helm_command(release: str, chart: str, values_file: str | Path, namespace: str,
                 extra: list[str] | None = None) -> list[str]:
    """`helm upgrade --install` for the edited values; --atomic rolls back a release that never gets ready."""
    return [helm_binary(), "upgrade", "--install", release, chart, "--namespace", namespace,
            "--values", str(values_file), "--atomic", "--wait", "--timeout", "45m", *(extra or [])]


# --- the stage ------------------------------------------------------------------------------------------

def run_rollout(model_uri: str, gitops_repo: str, *, branch: str = "main",
                values_path: str = DEFAULT_VALUES_PATH, mode: str = "gitops", served_name: str | None = None,
                run_id: str | None = None, model_version: str | None = None,
                metrics: dict[str, Any] | None = None, video_spec: dict[str, Any] | None = None,
                bundle: str | None = None, pvc_mount: str | None = None, dry_run: bool = False,
                release: str | None = None, chart: str | None = None, namespace: str = "default") -> RolloutResult:
    """Point the values file at MODEL_URI; commit+push (gitops) or `helm upgrade --install` (helm)."""
    if mode not in ("gitops", "helm"):
        raise RolloutError(f"mode must be gitops or helm, got {mode!r}")
    loc = parse_location(model_uri, pvc_mount)
    if bundle is None and Path(model_uri).is_dir():
        bundle = model_uri
    spec = resolve_video_spec(bundle, video_spec or {})
    with tempfile.TemporaryDirectory(prefix="trafficvlm-rollout-") as tmp:
        work = Path(tmp) / "repo"
        clone_branch(gitops_repo, branch, work)
        target = work / values_path
        if not target.is_file():
            raise RolloutError(f"{values_path} not found in {gitops_repo} (branch {branch})")
        old = target.read_text()
        new = edit_values(old, loc, spec, served_name, f"{gitops_repo}:{values_path}")
        diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                            f"a/{values_path}", f"b/{values_path}"))
        if mode == "helm":
            return _helm_rollout(work, target, new, diff, release, chart, namespace, dry_run)
        if not diff:
            return RolloutResult(None, False, "", f"already at {loc.uri} on {branch}: nothing to commit")
        if dry_run:
            return RolloutResult(None, True, diff, "dry run: nothing committed")
        target.write_text(new)
        message = commit_message(loc, values_path, run_id, model_version, metrics, spec)
        sha = commit_and_push(work, values_path, branch, message)
        return RolloutResult(sha, True, diff, f"committed {sha[:12]} on {branch}: {loc.uri}")


def _helm_rollout(work: Path, target: Path, new: str, diff: str, release: str | None, chart: str | None,
                  namespace: str, dry_run: bool) -> RolloutResult:
    if not chart:
        raise RolloutError("--mode helm needs --chart (a chart path in the GitOps repo, a .tgz or repo/chart)")
    chart_path = work / chart
    chart_ref = str(chart_path) if chart_path.exists() else chart
    target.write_text(new)
    cmd = helm_command(release or Path(chart).name.removesuffix(".tgz"), chart_ref, target, namespace)
    if dry_run:
        return RolloutResult(None, bool(diff), diff, "dry run: " + shlex.join(cmd), cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RolloutError(f"helm upgrade failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return RolloutResult(None, bool(diff), diff, proc.stdout.strip(), cmd)


# --- CLI ------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  # GitOps: commit the new checkpoint into the VSS overlay on branch main of the deploy repo
  trafficvlm rollout pvc://trafficvlm-data/checkpoints/r42/fp8 --gitops-repo git@git.example.com:ml/deploy.git \\
      --run-id r42 --model-version 7 --metrics '{"accuracy": 0.93}' --fps 1 --max-pixels 81920
  # a local bundle on the mounted checkpoints claim: its trafficvlm.json gives the video spec
  trafficvlm rollout /mnt/data/checkpoints/r42/fp8 --pvc-mount /mnt/data --gitops-repo /srv/deploy.git
  # what would change, without committing
  trafficvlm rollout pvc://trafficvlm-data/checkpoints/r43/fp8 --gitops-repo /srv/deploy.git --fps 1 --dry-run
  # our NIM chart, straight to the cluster with helm (prints the command with --dry-run)
  trafficvlm rollout s3://models/r42/fp8/ --bundle runs/r42/fp8 --gitops-repo /srv/deploy.git \\
      --values-path helm/values/nim-finetuned.yaml --mode helm --chart helm/trafficvlm-nim -n kubeflow --dry-run
"""


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("rollout", help="promote a checkpoint into the VSS/NIM Helm values (GitOps or helm)",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_uri", metavar="MODEL_URI", help="s3://bucket/prefix, pvc://CLAIM/PATH or a local dir")
    p.add_argument("--gitops-repo", required=True, help="Git URL or path of the repository holding the values")
    p.add_argument("--branch", default="main")
    p.add_argument("--values-path", default=DEFAULT_VALUES_PATH, help="values file inside the repository")
    p.add_argument("--mode", choices=("gitops", "helm"), default="gitops")
    p.add_argument("--served-name", help="NIM_SERVED_MODEL_NAME (trafficvlm-nim values only)")
    p.add_argument("--run-id", help="pipeline run id, named in the commit message")
    p.add_argument("--model-version", help="MLflow model version, named in the commit message")
    p.add_argument("--metrics", help="JSON object (or a path to a JSON file) of metrics for the commit message")
    p.add_argument("--bundle", help="local copy of the bundle whose trafficvlm.json gives the video spec")
    p.add_argument("--pvc-mount", help="where the checkpoints claim is mounted here (for a local MODEL_URI)")
    for flag, typ in (("--fps", float), ("--nframes", int), ("--max-pixels", int), ("--min-pixels", int),
                      ("--total-pixels", int)):
        p.add_argument(flag, type=typ, help="video spec override (else from trafficvlm.json)")
    p.add_argument("--chart", help="--mode helm: chart path in the repo, .tgz or repo/chart")
    p.add_argument("--release", help="--mode helm: release name")
    p.add_argument("-n", "--namespace", default="default", help="--mode helm: namespace")
    p.add_argument("--dry-run", action="store_true", help="print the diff (and helm command); change nothing")
    p.set_defaults(func=_cli)


def _load_metrics(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    raw = Path(value).read_text() if Path(value).is_file() else value
    try:
        metrics = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RolloutError(f"--metrics: not a JSON object or file ({exc})") from None
    if not isinstance(metrics, dict):
        raise RolloutError("--metrics: expected a JSON object")
    return metrics


def _cli(args: argparse.Namespace) -> int:
    spec = {k: getattr(args, k) for k in SPEC_KEYS}
    try:
        result = run_rollout(args.model_uri, args.gitops_repo, branch=args.branch, values_path=args.values_path,
                             mode=args.mode, served_name=args.served_name, run_id=args.run_id,
                             model_version=args.model_version, metrics=_load_metrics(args.metrics),
                             video_spec=spec, bundle=args.bundle, pvc_mount=args.pvc_mount,
                             dry_run=args.dry_run, release=args.release, chart=args.chart,
                             namespace=args.namespace)
    except RolloutError as exc:
        print(f"rollout: error: {exc}", file=sys.stderr)
        return 1
    if result.diff:
        print(result.diff, end="")
    print(result.message)
    return 0
