"""`trafficvlm promote`: register a new checkpoint in MLflow and move `champion` to it only if it earned it.

    trafficvlm promote s3://trafficvlm-models/run-42/fp8 --results runs/run-42/eval \\
        --fp8-gate passed --fp8-drop 0.004 --pipeline-run-id run-42
    trafficvlm champion                                      # champion and challenger, with their accuracy
    trafficvlm champion --set 6 --reason "v7 misreads night scenes"     # roll the alias back by hand

From Python (the KFP component shell):

    from trafficvlm.stages.promote import PromotionPolicy, run_promote
    decision = run_promote("s3://trafficvlm-models/run-42/fp8", "runs/run-42/eval", fp8_passed=True,
                           fp8_drop=0.004, policy=PromotionPolicy(min_accuracy=0.85), pipeline_run_id="run-42")
    decision.promote, decision.reason, decision.version

What happens, in order:
1. The new model's eval results (results.json + predictions.jsonl from `trafficvlm eval`) are read.
2. The current champion is looked up by alias; its results come from `--champion-results`, or else from the
   artifact its version's `results_uri` tag points at (every version this stage registers carries one).
3. The two are compared question by question on the held-out set (`trafficvlm compare`: delta, McNemar p,
   bootstrap CI over videos) and the policy decides.
4. The checkpoint is registered as a new version (source = its s3:// URI: MLflow 3 rejects local and PVC paths)
   with accuracy, per-type accuracies, the video spec, run ids and the FP8 drop as tags; `challenger` moves to
   it always, `champion` only when the gate passed. A rejected model is registered too (the record of what
   was tried), and the decision's reason is on the version and on this stage's MLflow run.

The default policy: accuracy >= min_accuracy, and either there is no champion yet, or the new model is at least
`min_delta` better (absolute, 0.01 = one percentage point) with McNemar p <= 0.05. Not promoting is a normal
outcome (exit code 0): the pipeline ends green with the reason and rolls nothing out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trafficvlm import tracking

# Sources MLflow 3's registry accepts for a model version and our serving stack can pull from.
ACCEPTED_SCHEMES = ("s3://", "mlflow-artifacts:")
RESULTS_ARTIFACT = "eval"          # where this stage logs the new model's results (its `results_uri`)
RESULT_FILES = ("results.json", "predictions.jsonl")

EPILOG = """\
examples:
  trafficvlm promote s3://trafficvlm-models/run-42/fp8 --results runs/run-42/eval
  trafficvlm promote s3://trafficvlm-models/run-42/fp8 --results runs/run-42/eval \\
      --fp8-gate passed --fp8-drop 0.004 --min-accuracy 0.85 --min-delta 0.01
  trafficvlm promote s3://... --results runs/eval-new --champion-results runs/eval-champion
  trafficvlm promote s3://... --results runs/eval-new --require-ci --max-p-value none

The tracking server comes from --tracking-uri or MLFLOW_TRACKING_URI. A local checkpoint must be uploaded
first (`trafficvlm upload runs/fp8 s3://bucket/prefix`): the registry needs a URI every consumer can read.
"""

CHAMPION_EPILOG = """\
examples:
  trafficvlm champion --model-name cosmos-reason1-7b-wts              # who is champion, who is challenger
  trafficvlm champion --model-name cosmos-reason1-7b-wts --set 6 --reason "v7 misreads night scenes"

Moving the alias does not change what is served: revert the rollout commit in the GitOps repository too.
"""


class PromotionError(ValueError):
    """Bad input to the promotion stage (the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class PromotionPolicy:
    """When a new model replaces the champion. Accuracies are fractions (0.01 = one percentage point)."""

    min_accuracy: float = 0.0              # absolute floor, champion or not
    min_delta: float = 0.0                 # new - champion must reach this
    max_p_value: float | None = 0.05       # McNemar (two-sided); None: no significance test
    require_ci_above_zero: bool = False    # the 95% bootstrap CI of the delta must exclude 0


@dataclass
class PromotionDecision:
    promote: bool
    reason: str
    version: str | None                    # the version registered now
    champion_before: str | None            # the champion's version before this decision (None: there was none)
    comparison: dict[str, Any] = field(default_factory=dict)


# --- the decision (pure) ------------------------------------------------------------------------------------

def decide(accuracy: float, comparison: dict[str, Any] | None, *, policy: PromotionPolicy,
           fp8_passed: bool | None = None, fp8_drop: float | None = None,
           champion_version: str | None = None) -> tuple[bool, str]:
    """(promote?, why). `comparison` is the paired comparison against the champion (None: no champion)."""
    failures = []
    if fp8_passed is False:
        drop = f" (accuracy drop {fp8_drop:.2%})" if fp8_drop is not None else ""
        failures.append(f"the FP8 gate failed{drop}")
    if accuracy < policy.min_accuracy:
        failures.append(f"accuracy {accuracy:.2%} is below the floor {policy.min_accuracy:.2%}")
    if comparison is None:
        verdict = "no champion yet"
    else:
        failures += _against_champion(comparison, policy)
        verdict = _verdict(comparison, champion_version)
    if failures:
        return False, f"not promoted: {'; '.join(failures)} [{verdict}]"
    return True, f"promoted: {verdict}, accuracy {accuracy:.2%}"


def _verdict(c: dict[str, Any], champion_version: str | None) -> str:
    unpaired = f", {c['unpaired']} questions unpaired and left out" if c.get("unpaired") else ""
    return (f"{c['delta']:+.2%} vs champion v{champion_version} ({c['champion_accuracy']:.2%} -> "
            f"{c['champion_accuracy'] + c['delta']:.2%}, McNemar p={c['p_value']:.3g}, "
            f"95% CI [{c['ci'][0]:+.2%}, {c['ci'][1]:+.2%}]{unpaired})")


def _against_champion(c: dict[str, Any], policy: PromotionPolicy) -> list[str]:
    failures = []
    if c["delta"] < policy.min_delta:
        failures.append(f"delta {c['delta']:+.2%} is below the required {policy.min_delta:+.2%}")
    if policy.max_p_value is not None and c["p_value"] > policy.max_p_value:
        failures.append(f"not significant (McNemar p={c['p_value']:.3g} > {policy.max_p_value:g})")
    if policy.require_ci_above_zero and c["ci"][0] <= 0:
        failures.append(f"the 95% CI of the delta reaches {c['ci'][0]:+.2%} (must be above 0)")
    return failures


# --- inputs -----------------------------------------------------------------------------------------------

def check_source_uri(uri: str) -> str:
    uri = uri.strip()
    if not uri.startswith(ACCEPTED_SCHEMES):
        raise PromotionError(
            f"checkpoint {uri!r}: the model registry needs a storage URI ({' or '.join(ACCEPTED_SCHEMES)}...), "
            "not a local or volume path (MLflow 3 rejects those, and NIM/VSS could not pull them); upload it "
            "first: trafficvlm upload DIR s3://BUCKET/PREFIX")
    return uri


def read_results(results_dir: str | Path) -> dict[str, Any]:
    """results.json of an eval run, checked for what the gate needs."""
    d = Path(results_dir)
    for name in RESULT_FILES:
        if not (d / name).is_file():
            raise PromotionError(f"{d}: no {name} (expected the output directory of `trafficvlm eval`)")
    try:
        results = json.loads((d / "results.json").read_text())
    except json.JSONDecodeError as exc:
        raise PromotionError(f"{d / 'results.json'}: not JSON ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("accuracy"), (int, float)):
        raise PromotionError(f"{d / 'results.json'}: field 'accuracy' is missing or not a number")
    return results


def compare(champion_dir: Path, new_dir: Path) -> dict[str, Any]:
    """The paired comparison, summarized: champion = A, new = B."""
    from trafficvlm.stages.evaluate import run_compare

    try:
        full = run_compare([champion_dir, new_dir])
    except ValueError as exc:  # no common question ids: the two were scored on different data
        raise PromotionError(f"cannot compare {new_dir} with the champion's results {champion_dir}: {exc}") from None
    c = full["comparisons"][0]
    return {"champion_accuracy": c["accuracy_a"], "accuracy": c["accuracy_b"], "delta": c["delta"],
            "ci": list(c["ci"]), "p_value": c["p_value"], "test": c["mcnemar"]["method"], "n": c["n"],
            "videos": c["videos"], "unpaired": c["only_in_a"] + c["only_in_b"],
            "right_to_wrong": len(c["flipped"]["right_to_wrong"]),
            "wrong_to_right": len(c["flipped"]["wrong_to_right"])}


def champion_results_dir(version: Any, work: Path, uri: str | None) -> Path:
    """Download the champion's eval results from the artifact its `results_uri` tag names."""
    pointer = (version.tags or {}).get("results_uri")
    if not pointer:
        raise PromotionError(
            f"champion v{version.version} of {version.name!r} has no 'results_uri' tag, so there is nothing to "
            "compare against: pass --champion-results DIR (its `trafficvlm eval` output on the same held-out set)")
    from mlflow.exceptions import MlflowException

    try:
        return tracking.download_artifacts(pointer, work / "champion", uri=uri)
    except (MlflowException, OSError) as exc:
        raise PromotionError(f"champion v{version.version}: cannot fetch its results from {pointer} ({exc}); "
                             "pass --champion-results DIR") from None


# --- the stage ----------------------------------------------------------------------------------------------

def run_promote(checkpoint_uri: str, results_dir: str | Path, *, fp8_passed: bool | None = None,
                fp8_drop: float | None = None, champion_results: str | Path | None = None,
                policy: PromotionPolicy | None = None, model_name: str = tracking.DEFAULT_MODEL_NAME,
                pipeline_run_id: str | None = None, parent_run_id: str | None = None,
                tracking_uri: str | None = None, experiment: str = tracking.DEFAULT_EXPERIMENT,
                out: str | Path | None = None) -> PromotionDecision:
    """Register the checkpoint, move `challenger` to it, and `champion` too when the gate passes.
    `fp8_passed` None means no FP8 gate ran. With `out`, promotion.json is written there."""
    policy = policy or PromotionPolicy()
    source = check_source_uri(checkpoint_uri)
    if not tracking.enabled(tracking_uri):
        raise PromotionError("no MLflow tracking server: set MLFLOW_TRACKING_URI or pass --tracking-uri "
                             "(promotion moves registry aliases; there is nothing to do without one)")
    new_dir = Path(results_dir)
    results = read_results(new_dir)
    champion = tracking.alias_version(tracking.CHAMPION, name=model_name, uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="trafficvlm-promote-") as work:
        comparison = None
        if champion is not None:
            champ_dir = Path(champion_results) if champion_results else champion_results_dir(
                champion, Path(work), tracking_uri)
            read_results(champ_dir)
            comparison = compare(champ_dir, new_dir)
    promote, reason = decide(results["accuracy"], comparison, policy=policy, fp8_passed=fp8_passed,
                             fp8_drop=fp8_drop, champion_version=champion.version if champion else None)
    decision = PromotionDecision(promote=promote, reason=reason, version=None,
                                 champion_before=str(champion.version) if champion else None,
                                 comparison=comparison or {})
    _register(decision, source, new_dir, results, policy, model_name=model_name, fp8_passed=fp8_passed,
              fp8_drop=fp8_drop, pipeline_run_id=pipeline_run_id, parent_run_id=parent_run_id,
              uri=tracking_uri, experiment=experiment)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "promotion.json").write_text(json.dumps(asdict(decision), indent=1) + "\n")
    return decision


def _register(decision: PromotionDecision, source: str, new_dir: Path, results: dict[str, Any],
              policy: PromotionPolicy, *, model_name: str, fp8_passed: bool | None, fp8_drop: float | None,
              pipeline_run_id: str | None, parent_run_id: str | None, uri: str | None, experiment: str) -> None:
    """The registry moves, inside this stage's MLflow run (which also keeps a copy of the results, so the next
    promotion can compare against this version)."""
    run_tags = {"trafficvlm.stage": "promote", **({"trafficvlm.pipeline_run": pipeline_run_id}
                                                  if pipeline_run_id else {})}
    with tracking.stage_run("promote", parent_run_id=parent_run_id, experiment=experiment, tags=run_tags,
                            uri=uri) as run:
        run_id = run.info.run_id
        for name in RESULT_FILES:
            tracking.log_artifact(new_dir / name, artifact_path=RESULTS_ARTIFACT, uri=uri)
        tags = _version_tags(results, source, f"runs:/{run_id}/{RESULTS_ARTIFACT}", fp8_passed=fp8_passed,
                             fp8_drop=fp8_drop, pipeline_run_id=pipeline_run_id, parent_run_id=parent_run_id)
        decision.version = tracking.register_model(source, run_id=run_id, name=model_name, tags=tags, uri=uri)
        tracking.set_alias(tracking.CHALLENGER, decision.version, name=model_name, uri=uri)
        if decision.promote:
            tracking.set_alias(tracking.CHAMPION, decision.version, name=model_name, uri=uri)
        tracking.set_version_tags(decision.version, {"promoted": str(decision.promote).lower(),
                                                     "decision": decision.reason}, name=model_name, uri=uri)
        tracking.log_params({"policy": asdict(policy), "model_name": model_name, "source": source}, uri=uri)
        tracking.log_metrics(_decision_metrics(decision, results), uri=uri)
        tracking.set_tags({"promote.decision": decision.reason, "promote.version": decision.version,
                           "promote.champion_before": decision.champion_before or "none"}, uri=uri)


def _version_tags(results: dict[str, Any], source: str, results_uri: str, *, fp8_passed: bool | None,
                  fp8_drop: float | None, pipeline_run_id: str | None, parent_run_id: str | None) -> dict[str, str]:
    tags = {"accuracy": f"{results['accuracy']:.6f}", "source": source, "results_uri": results_uri,
            "eval_total": str(results.get("total", "")),
            "video_spec": json.dumps(results.get("video_spec") or {}, sort_keys=True),
            "fp8_gate": {True: "passed", False: "failed", None: "not run"}[fp8_passed]}
    tags.update({f"accuracy.{t}": f"{s['accuracy']:.6f}" for t, s in (results.get("per_type") or {}).items()})
    optional = {"fp8_drop": None if fp8_drop is None else f"{fp8_drop:.6f}", "pipeline_run_id": pipeline_run_id,
                "parent_run_id": parent_run_id}
    tags.update({k: v for k, v in optional.items() if v})
    return tags


def _decision_metrics(decision: PromotionDecision, results: dict[str, Any]) -> dict[str, float]:
    c = decision.comparison
    metrics = {"promoted": float(decision.promote), "accuracy": results["accuracy"]}
    if c:
        metrics.update({"champion_accuracy": c["champion_accuracy"], "delta": c["delta"],
                        "p_value": c["p_value"], "delta_ci_low": c["ci"][0], "delta_ci_high": c["ci"][1]})
    return metrics


# --- by hand: inspect, roll back ----------------------------------------------------------------------

def set_champion(version: str, *, reason: str, model_name: str = tracking.DEFAULT_MODEL_NAME,
                 tracking_uri: str | None = None) -> str | None:
    """Move `champion` to an existing version (a rollback, or a promotion decided by a person); the reason
    goes on both versions. Returns the previous champion's version."""
    if not tracking.enabled(tracking_uri):
        raise PromotionError("no MLflow tracking server: set MLFLOW_TRACKING_URI or pass --tracking-uri")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking.tracking_uri(tracking_uri)).get_model_version(model_name, version)
    except MlflowException:
        raise PromotionError(f"model {model_name!r} has no version {version!r}") from None
    before = tracking.alias_version(tracking.CHAMPION, name=model_name, uri=tracking_uri)
    tracking.set_alias(tracking.CHAMPION, version, name=model_name, uri=tracking_uri)
    tracking.set_version_tags(version, {"champion_by_hand": reason}, name=model_name, uri=tracking_uri)
    if before is not None and str(before.version) != str(version):
        tracking.set_version_tags(str(before.version), {"demoted": f"champion moved to v{version}: {reason}"},
                                  name=model_name, uri=tracking_uri)
    return str(before.version) if before is not None else None


def describe_aliases(model_name: str = tracking.DEFAULT_MODEL_NAME, tracking_uri: str | None = None) -> str:
    """`champion` and `challenger`: version, source, accuracy and the decision that put them there."""
    lines = []
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        v = tracking.alias_version(alias, name=model_name, uri=tracking_uri)
        if v is None:
            lines.append(f"{alias:<10}  (not set)")
            continue
        tags = v.tags or {}
        lines.append(f"{alias:<10}  v{v.version}  accuracy {tags.get('accuracy', '?')}  {v.source}")
        for key in ("decision", "champion_by_hand"):
            if key in tags:
                lines.append(f"{'':<10}  {key}: {tags[key]}")
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("promote", help="register a checkpoint in MLflow; move `champion` if it beats it",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the checkpoint's storage URI (s3://... or mlflow-artifacts:...)")
    p.add_argument("--results", required=True, help="the new model's `trafficvlm eval` output directory")
    p.add_argument("--champion-results", help="the champion's eval directory on the same held-out set "
                                              "(default: the artifact its version's results_uri tag names)")
    p.add_argument("--fp8-gate", choices=("passed", "failed", "not-run"), default="not-run")
    p.add_argument("--fp8-drop", type=float, help="bf16 accuracy minus FP8 accuracy (recorded as a tag)")
    p.add_argument("--min-accuracy", type=float, default=0.0, help="absolute floor (fraction; default 0)")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="required improvement over the champion (fraction: 0.01 = 1 point; default 0)")
    p.add_argument("--max-p-value", type=_p_value, default=0.05,
                   help="McNemar p the improvement must reach; 'none' skips the test (default 0.05)")
    p.add_argument("--require-ci", action="store_true",
                   help="also require the 95%% bootstrap CI of the delta to lie above 0")
    p.add_argument("--model-name", default=tracking.DEFAULT_MODEL_NAME)
    p.add_argument("--pipeline-run-id", help="the KFP run id (a tag on the version and the run)")
    p.add_argument("--parent-run-id", help="the pipeline's parent MLflow run")
    p.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="also write promotion.json here")
    p.set_defaults(func=_main)

    c = subparsers.add_parser("champion", help="show the champion/challenger versions, or move champion by hand",
                              epilog=CHAMPION_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--set", metavar="VERSION", help="move `champion` to this existing version (rollback)")
    c.add_argument("--reason", help="why (required with --set; recorded on the versions)")
    c.add_argument("--model-name", default=tracking.DEFAULT_MODEL_NAME)
    c.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    c.set_defaults(func=_champion_main)


def _p_value(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _main(args: argparse.Namespace) -> int:
    policy = PromotionPolicy(min_accuracy=args.min_accuracy, min_delta=args.min_delta,
                             max_p_value=args.max_p_value, require_ci_above_zero=args.require_ci)
    fp8 = {"passed": True, "failed": False, "not-run": None}[args.fp8_gate]
    try:
        decision = run_promote(args.checkpoint, args.results, fp8_passed=fp8, fp8_drop=args.fp8_drop,
                               champion_results=args.champion_results, policy=policy, model_name=args.model_name,
                               pipeline_run_id=args.pipeline_run_id, parent_run_id=args.parent_run_id,
                               tracking_uri=args.tracking_uri, out=args.out)
    except PromotionError as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 2
    where = f"{args.model_name} v{decision.version}"
    print(f"{where}: {decision.reason}")
    if decision.promote:
        champion = f"-> v{decision.version}"
    else:
        champion = f"stays at v{decision.champion_before}" if decision.champion_before else "stays unset"
    print(f"  challenger -> v{decision.version}; champion {champion}")
    return 0


def _champion_main(args: argparse.Namespace) -> int:
    try:
        if args.set:
            if not args.reason:
                raise PromotionError("--set needs --reason (it is recorded on the versions)")
            before = set_champion(args.set, reason=args.reason, model_name=args.model_name,
                                  tracking_uri=args.tracking_uri)
            print(f"{args.model_name}: champion v{before} -> v{args.set}" if before else
                  f"{args.model_name}: champion -> v{args.set}")
        elif not tracking.enabled(args.tracking_uri):
            raise PromotionError("no MLflow tracking server: set MLFLOW_TRACKING_URI or pass --tracking-uri")
        print(describe_aliases(args.model_name, args.tracking_uri))
    except PromotionError as exc:
        print(f"champion: {exc}", file=sys.stderr)
        return 2
    return 0
