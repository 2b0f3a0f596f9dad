"""`trafficvlm pipeline compile|run|submit|schedule`: the Kubeflow pipeline from the command line.

    trafficvlm pipeline compile                                        # pipelines/compiled/trafficvlm.yaml
    trafficvlm pipeline run --local --dataset-dir data/wts             # kfp.local, subprocesses, offline
    trafficvlm pipeline submit --host https://kfp.example.com --experiment wts --param nodes=2
    trafficvlm pipeline schedule --host https://kfp.example.com --cron "0 0 3 * * *"
    trafficvlm pipeline schedule --cron "0 0 3 * * 1" --dry-run       # print the recurring-run request

The pipeline itself is `pipelines/trafficvlm.py`; the compiled YAML is committed (a test fails when it is
stale), so users can upload it in the Kubeflow UI without installing anything.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PACKAGE = REPO_ROOT / "pipelines" / "compiled" / "trafficvlm.yaml"

EPILOG = """\
examples:
  trafficvlm pipeline compile
  trafficvlm pipeline run --local --dataset-dir data/wts --work-dir runs/pipeline
  trafficvlm pipeline run --local --dataset-uri s3://wts/raw --splits val      # AWS_* env for credentials
  # the whole DAG: promotion needs an MLflow server (MLFLOW_TRACKING_URI) and a bucket for the FP8 checkpoint
  trafficvlm pipeline run --local --dataset-dir data/wts --param checkpoint_store=s3://models/checkpoints \\
      --param gitops_repo=file:///srv/deploy.git --param smoke_endpoint=http://127.0.0.1:8000
  trafficvlm pipeline submit --host http://localhost:8080 --experiment wts \\
      --param nodes=2 --param gpus_per_node=8
  trafficvlm pipeline schedule --host http://localhost:8080 --cron "0 0 3 * * 0" --experiment nightly
  trafficvlm pipeline schedule --cron "0 30 2 * * *" --dry-run
"""


# --- compile --------------------------------------------------------------------------------------------

def compile_pipeline(out: str | Path = DEFAULT_PACKAGE) -> Path:
    """Compile `trafficvlm_pipeline` to IR YAML at `out`."""
    from kfp import compiler

    from pipelines.trafficvlm import trafficvlm_pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(trafficvlm_pipeline, str(out))
    return out


# --- parameters -----------------------------------------------------------------------------------------

def pipeline_parameters() -> dict[str, str]:
    """name -> KFP type ('String', 'Integer', 'Float', 'Boolean', 'List') of the pipeline's parameters."""
    from pipelines.trafficvlm import trafficvlm_pipeline

    return {name: spec.type for name, spec in trafficvlm_pipeline.component_spec.inputs.items()}


def parse_params(items: list[str], types: dict[str, str]) -> dict[str, Any]:
    """`["nodes=2", "subsets=environment,overhead"]` -> typed values; unknown names and bad values are
    errors that name the parameter."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE")
        if name not in types:
            raise ValueError(f"--param {name}: not a pipeline parameter (known: {', '.join(sorted(types))})")
        out[name] = _typed(name, raw, types[name])
    return out


def _typed(name: str, raw: str, kind: str) -> Any:
    try:
        if kind == "Integer":
            return int(raw)
        if kind == "Float":
            return float(raw)
        if kind == "Boolean":
            if raw.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return raw.lower() == "true"
        if kind == "List":
            return json.loads(raw) if raw.startswith("[") else [v for v in raw.split(",") if v]
    except ValueError as exc:
        raise ValueError(f"--param {name}={raw!r}: not a valid {kind} ({exc})") from None
    return raw


# --- run --local ----------------------------------------------------------------------------------------

def missing_stages() -> list[str]:
    """Stages whose module is not in the package yet (their components cannot run)."""
    from pipelines.trafficvlm import STAGES

    return [stage for stage, module in STAGES.items() if importlib.util.find_spec(module) is None]


def local_pipeline(missing: list[str]):
    """The longest prefix of the DAG whose stages all exist: the full pipeline, ingest -> prepare -> sft ->
    eval, or the data stages."""
    from pipelines.trafficvlm import data_pipeline, train_pipeline, trafficvlm_pipeline

    if not missing:
        return trafficvlm_pipeline
    if not {"ingest", "prepare", "sft", "eval"} & set(missing):
        return train_pipeline
    if not {"ingest", "prepare"} & set(missing):
        return data_pipeline
    raise RuntimeError(f"stages missing from the package: {', '.join(missing)}")


def run_local(dataset: str | Path, work_dir: str | Path, *, params: dict[str, Any] | None = None,
              cache: bool = True, echo=print) -> Any:
    """Run the pipeline with kfp.local (subprocesses of this interpreter, offline): every stage that exists
    yet, naming those still to come. Training runs in the step on this machine, with the tiny CPU config
    unless `params` say otherwise. Returns the last stage's output (LLaVA dir, accuracy, or a summary)."""
    from kfp import local

    # kfp.local warns that our base_image is not a plain Python image; running the components in this
    # interpreter (which has the trafficvlm package) is exactly the point of the local mode.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    work = Path(work_dir).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "kfp"),
               raise_on_error=True, enable_caching=cache, cache_root=str(work / "kfp-cache"))
    source = dataset if str(dataset).startswith("s3://") else str(Path(dataset).resolve())
    # The embedded default: the tiny model (built on first use by the tiny config) on a CPU.
    # WORK stands in for the data volume: data and checkpoints under it, as on a cluster under /mnt/data.
    arguments = {"dataset_uri": source, "data_root": str(work / "data"), "volume_mount": str(work),
                 "output_root": str(work / "checkpoints"), "base_model": str(work / "models" / "tiny"),
                 "train_config": str(REPO_ROOT / "configs" / "sft" / "tiny_cpu.toml"),
                 "launcher": "local", "nodes": 1, "gpus_per_node": 0, **(params or {})}
    todo = missing_stages()
    pipeline = local_pipeline(todo)
    if todo:
        echo(f"running {pipeline.component_spec.description}; still to come (not in the package yet): "
             f"{', '.join(todo)}")
    run = pipeline(**{k: v for k, v in arguments.items() if k in pipeline.component_spec.inputs})
    return run.output if pipeline.component_spec.outputs else f"pipeline finished; outputs under {work}"


# --- submit / schedule ----------------------------------------------------------------------------------

def make_client(host: str, namespace: str | None):
    """A kfp.Client (tests replace this function with a fake)."""
    import kfp

    return kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)


def submit(client, package: Path, *, experiment: str, run_name: str | None, params: dict[str, Any]) -> str:
    """Start one run of the compiled package; returns the run id. Caching is left to the per-step settings
    compiled into the package (enable_caching=None), not overridden for the whole run."""
    result = client.create_run_from_pipeline_package(
        str(package), arguments=params, run_name=run_name, experiment_name=experiment, enable_caching=None)
    return result.run_id


_CRON_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
_CRON_NAMES = re.compile(r"^(JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC|SUN|MON|TUE|WED|THU|FRI|SAT)$", re.I)


def validate_cron(cron: str) -> str:
    """KFP's cron has six fields, seconds first ("0 0 3 * * *" = 03:00:00 daily). A five-field Unix cron
    would be read with the minute as seconds: reject it with that explanation."""
    fields = cron.split()
    if len(fields) != 6:
        hint = f' (a Unix cron? prefix the seconds: "0 {cron.strip()}")' if len(fields) == 5 else ""
        raise ValueError(f"cron {cron!r}: KFP needs six fields, second minute hour day month weekday{hint}")
    for text, (lo, hi), what in zip(fields, _CRON_RANGES, _CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"cron {cron!r}: {what} step {step!r} is not a positive number")
            for bound in ([] if base in ("*", "?") else base.split("-", 1)):
                if _CRON_NAMES.match(bound):
                    continue
                if not bound.isdigit() or not lo <= int(bound) <= hi:
                    raise ValueError(f"cron {cron!r}: {what} {bound!r} is not in {lo}-{hi}")
    return cron


def package_version(package: Path) -> str:
    """A pipeline version name: the package version plus a hash of the compiled YAML."""
    from trafficvlm import __version__

    return f"{__version__}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def recurring_run_request(package: Path, *, cron: str, experiment: str, name: str,
                          params: dict[str, Any]) -> dict[str, Any]:
    """What `schedule` asks KFP for: a recurring run of one pipeline *version* (so editing the pipeline
    later does not silently change what the schedule runs), one run at a time, no backfill of missed runs."""
    from pipelines.trafficvlm import PIPELINE_NAME

    return {"pipeline_name": PIPELINE_NAME, "pipeline_version": package_version(package),
            "experiment": experiment, "job_name": name, "cron_expression": validate_cron(cron),
            "max_concurrency": 1, "no_catchup": True, "params": params}


def schedule(client, package: Path, request: dict[str, Any]) -> str:
    """Upload the package as a pipeline version (reusing an identical one) and create the recurring run."""
    pipeline_id = client.get_pipeline_id(request["pipeline_name"])
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=request["pipeline_name"]).pipeline_id
    version_id = _find_version(client, pipeline_id, request["pipeline_version"])
    if version_id is None:
        version_id = client.upload_pipeline_version(str(package), request["pipeline_version"],
                                                    pipeline_id=pipeline_id).pipeline_version_id
    experiment_id = client.create_experiment(request["experiment"]).experiment_id
    job = client.create_recurring_run(
        experiment_id=experiment_id, job_name=request["job_name"], cron_expression=request["cron_expression"],
        max_concurrency=request["max_concurrency"], no_catchup=request["no_catchup"], params=request["params"],
        pipeline_id=pipeline_id, version_id=version_id)
    return job.recurring_run_id


def _find_version(client, pipeline_id: str, name: str) -> str | None:
    listing = client.list_pipeline_versions(pipeline_id, page_size=100, sort_by="created_at desc")
    for version in listing.pipeline_versions or []:
        if version.display_name == name:
            return version.pipeline_version_id
    return None


# --- CLI ------------------------------------------------------------------------------------------------

def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipeline",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("compile", help="write the IR YAML to upload in the Kubeflow UI")
    c.add_argument("--out", default=str(DEFAULT_PACKAGE))
    c.set_defaults(func=_compile_main)

    r = sub.add_parser("run", help="run the pipeline here with kfp.local", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--local", action="store_true", required=True, help="run with kfp.local (required: "
                   "a cluster run is `submit`)")
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-dir", help="a WTS-layout directory")
    source.add_argument("--dataset-uri", help="s3://BUCKET/PREFIX of a WTS tree (credentials from AWS_* env)")
    r.add_argument("--work-dir", default="runs/pipeline", help="data, checkpoints and kfp outputs go here")
    r.add_argument("--subsets", default="environment")
    r.add_argument("--splits", default="train,val")
    r.add_argument("--strict", action="store_true")
    r.add_argument("--no-cache", action="store_true", help="rerun the cached steps (prepare)")
    _param_arg(r)
    r.set_defaults(func=_run_main)

    s = sub.add_parser("submit", help="start a run on a Kubeflow Pipelines server", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _server_args(s)
    s.add_argument("--run-name", default=None)
    s.set_defaults(func=_submit_main)

    k = sub.add_parser("schedule", help="create a recurring run (six-field cron, seconds first)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _server_args(k, host_required=False)
    k.add_argument("--cron", required=True, help='KFP cron, six fields: "0 0 3 * * *" is 03:00 daily')
    k.add_argument("--name", default="trafficvlm-retrain", help="the recurring run's name")
    k.add_argument("--dry-run", action="store_true", help="print the request as JSON; contact nothing")
    k.set_defaults(func=_schedule_main)


def _param_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline parameter (repeatable); lists as a,b or JSON")


def _server_args(p: argparse.ArgumentParser, host_required: bool = True) -> None:
    p.add_argument("--host", required=host_required, help="KFP API endpoint, e.g. http://localhost:8080")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--experiment", default="trafficvlm")
    p.add_argument("--package", default=str(DEFAULT_PACKAGE), help="compiled pipeline YAML")
    _param_arg(p)


def _compile_main(args: argparse.Namespace) -> int:
    print(f"wrote {compile_pipeline(args.out)}")
    return 0


def _run_main(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.param, pipeline_parameters())
    except ValueError as exc:
        return _error(exc)
    params.update(subsets=_csv(args.subsets), splits=_csv(args.splits), strict=args.strict)
    result = run_local(args.dataset_dir or args.dataset_uri, args.work_dir, params=params,
                       cache=not args.no_cache)
    print(result)
    return 0


def _submit_main(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.param, pipeline_parameters())
        package = _existing(args.package)
    except ValueError as exc:
        return _error(exc)
    run_id = submit(make_client(args.host, args.namespace), package, experiment=args.experiment,
                    run_name=args.run_name, params=params)
    print(f"started run {run_id} in experiment {args.experiment}")
    return 0


def _schedule_main(args: argparse.Namespace) -> int:
    try:
        params = parse_params(args.param, pipeline_parameters())
        package = _existing(args.package)
        request = recurring_run_request(package, cron=args.cron, experiment=args.experiment, name=args.name,
                                        params=params)
    except ValueError as exc:
        return _error(exc)
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return 0
    if not args.host:
        return _error(ValueError("--host is required unless --dry-run"))
    job_id = schedule(make_client(args.host, args.namespace), package, request)
    print(f"created recurring run {job_id} ({request['cron_expression']}, pipeline version "
          f"{request['pipeline_version']})")
    return 0


def _existing(package: str) -> Path:
    path = Path(package)
    if not path.is_file():
        raise ValueError(f"{path}: no compiled pipeline (run `trafficvlm pipeline compile`)")
    return path


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2
