"""`trafficvlm demo`: the whole pipeline on the embedded default, on a laptop CPU, in minutes.

    make demo                                       # = trafficvlm demo --out runs/demo
    trafficvlm demo --out runs/demo --quick         # tiny everything (the end-to-end test uses this)
    trafficvlm demo --config configs/demo.toml synth.scenarios=96 gates.min_accuracy=0.8

What happens, in order (a tiny random Qwen2.5-VL and synthetic WTS scenes stand in for Cosmos-Reason1-7B and
the real dataset; everything else is the production code path):

1. local services on 127.0.0.1: an S3-compatible server (moto), an MLflow tracking server (SQLite + local
   artifact store) and a bare Git repository seeded with helm/values/ (the GitOps target);
2. synthetic WTS scenes (train and val scenarios differ) rendered and uploaded to the local bucket;
3. the untrained tiny model evaluated (the zero-shot row), uploaded and registered as the first `champion`
   by the promote stage itself;
4. the compiled pipeline run with kfp.local: ingest -> prepare -> SFT -> eval -> FP8 quantize + gate ->
   promotion -> rollout (a commit pushed to the Git repository, whose hook redeploys `trafficvlm serve` on
   the new checkpoint: the local stand-in for Argo CD + NIM) -> smoke test against that endpoint;
5. the blind (no video) and majority baselines, and one more question to the live endpoint;
6. a table, OUT/summary.json and OUT/report.html (accuracies per question, the training loss curve).

Tuning notes (why the tiny model trains the way configs/sft/demo_cpu.toml says): docs/demo.md.

Every service is stopped at the end, on errors and on Ctrl-C (each runs in its own process group). Reruns
reuse the rendered data, the tiny model, its zero-shot score and the decoded-frame cache; the services'
state (registry, Git repository, bucket) starts fresh each run so the story is the same every time.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.toml"
BUCKET = "trafficvlm-demo"
SEED_VALUES = ("helm/values/vss.yaml", "helm/values/nim-finetuned.yaml")
SUMMARY_KEYS = ("zero_shot_accuracy", "blind_accuracy", "majority_accuracy", "sft_accuracy", "fp8_accuracy",
                "promoted", "seconds")

EPILOG = """\
examples:
  trafficvlm demo                                  # runs/demo: ~15 min on 2 cores, no GPU, offline
  trafficvlm demo --quick --out /tmp/demo          # tiny everything: a smoke run of every stage (~2.5 min)
  trafficvlm demo synth.scenarios=96 train_overrides='["train.max_steps=200"]'
  trafficvlm demo --keep-services                  # leave S3, MLflow and the Git repo up to look around

The same pipeline on Kubeflow, with the real WTS dataset and Cosmos-Reason1-7B:
  trafficvlm pipeline compile                      # upload pipelines/compiled/trafficvlm.yaml in the UI, or:
  trafficvlm pipeline submit --host https://kubeflow.example.com/pipeline --experiment wts \\
      --param dataset_uri=s3://your-bucket/wts --param base_model=/data/models/Cosmos-Reason1-7B \\
      --param gitops_repo=https://git.example.com/platform/vss-deploy.git
"""


# --- configuration ------------------------------------------------------------------------------------------

@dataclass
class SynthSection:
    """The synthetic dataset (trafficvlm.synth.synthesize arguments)."""

    seed: int = 0
    scenarios: int = 160
    normal: int = 0
    bdd: int = 0
    width: int = 160
    height: int = 96
    fps: float = 4.0
    duration: float = 4.0
    val_fraction: float = 0.25


@dataclass
class TinySection:
    """The from-scratch model (trafficvlm.model.build_tiny arguments)."""

    hidden: int = 128
    layers: int = 2
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    seed: int = 0


@dataclass
class GateSection:
    min_accuracy: float = 0.85        # promotion floor
    min_improvement: float = 0.0      # over the champion (the untrained model)
    max_fp8_drop: float = 0.02        # FP8 gate, absolute
    max_p_value: float = 0.05         # McNemar against the champion; 1.0 turns the test off


@dataclass
class DemoConfig:
    synth: SynthSection = field(default_factory=SynthSection)
    model: TinySection = field(default_factory=TinySection)
    gates: GateSection = field(default_factory=GateSection)
    train_config: str = "configs/sft/demo_cpu.toml"
    train_overrides: list[str] = field(default_factory=list)
    model_name: str = "cosmos-reason1-traffic"
    quick: list[str] = field(default_factory=list)   # overrides applied by --quick


def load_demo_config(path: str | Path | None, overrides: list[str], *, quick: bool) -> DemoConfig:
    from trafficvlm.config import load_config

    cfg = load_config(DemoConfig, path, overrides)
    if quick:  # the quick overrides first, so explicit command-line overrides still win
        cfg = load_config(DemoConfig, path, [*cfg.quick, *overrides])
    return cfg


def _repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


# --- local services -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log: Path


class Services:
    """Background servers, each in its own process group (a server's workers die with it). `stop_all` is
    idempotent and runs from `finally`, atexit and the SIGTERM/SIGHUP handlers."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[str, Service] = {}
        self.started: dict[str, int] = {}          # every service ever started -> its pid (for the summary)
        atexit.register(self.stop_all)

    def start(self, name: str, cmd: list[str], *, url: str, probe: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> Service:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        service = self.running[name] = Service(name, url, proc, log)
        self.started[name] = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} while starting; see {log}")
            if _answers(url + probe):
                return service
            time.sleep(0.3)
        raise RuntimeError(f"{name} did not answer on {url}{probe} within {timeout:.0f} s; see {log}")

    def stop(self, name: str, grace: float = 10) -> None:
        service = self.running.pop(name, None)
        if service is None or service.process.poll() is not None:
            return
        _signal_group(service.process, signal.SIGTERM)
        try:
            service.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(service.process, signal.SIGKILL)
            service.process.wait(timeout=grace)
        # The leader may exit before its workers: make sure nothing of the group survives it.
        _signal_group(service.process, signal.SIGKILL)

    def stop_all(self) -> None:
        # A second Ctrl-C / SIGTERM while stopping must not abandon the services not yet stopped.
        with signals_ignored():
            for name in reversed(list(self.running)):
                self.stop(name)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group id is the leader's pid (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except OSError:
        return False


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP become SystemExit (so `finally` blocks stop the services); Ctrl-C already raises
    KeyboardInterrupt."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def start_s3(services: Services) -> dict[str, str]:
    """moto in server mode; returns the AWS_* variables every stage reads (as a Kubernetes Secret would)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    services.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], url=url,
                   probe="/moto-api/data.json", env={"MOTO_ALLOW_NONEXISTENT_REGION": "true"})
    return {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo-secret", "AWS_ENDPOINT_URL_S3": url,
            "AWS_DEFAULT_REGION": "us-east-1"}


def start_mlflow(services: Services, state: Path) -> str:
    """An MLflow tracking server with a SQLite store and a local artifact store it serves itself."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{(state / 'mlflow.db').resolve()}",
           "--artifacts-destination", str((state / "artifacts").resolve()), "--serve-artifacts"]
    services.start("mlflow", cmd, url=url, probe="/health", timeout=180)
    return url


def _git(*args: str, cwd: Path | None = None) -> str:
    identity = ["-c", "user.name=trafficvlm demo", "-c", "user.email=demo@localhost", "-c", "init.defaultBranch=main"]
    done = subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def init_gitops(bare: Path, work: Path) -> str:
    """A bare repository holding the Helm values the rollout edits (what Argo CD / Flux would watch);
    returns the seed commit."""
    _git("init", "--bare", "--initial-branch=main", str(bare))
    _git("clone", "-q", str(bare), str(work))
    for rel in SEED_VALUES:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, work / rel)
    _git("add", *SEED_VALUES, cwd=work)
    _git("commit", "-q", "-m", "seed: VSS and NIM values from the trafficvlm repository", cwd=work)
    _git("push", "-q", "origin", "HEAD:main", cwd=work)
    shutil.rmtree(work)
    return _git("--git-dir", str(bare), "rev-parse", "main")


HOOK = """#!{python}
# post-receive: hand the pushed commit to the demo's deployer and wait until it serves (or failed), so the
# push, and with it the pipeline's rollout step, returns only once the new model answers.
import pathlib, sys, time
inbox = pathlib.Path({inbox!r})
sha = [line.split()[1] for line in sys.stdin if line.strip()][-1]
(inbox / "request").write_text(sha)
deadline = time.time() + 300
while time.time() < deadline:
    done = inbox / ("done-" + sha)
    if done.exists():
        print("deployer:", done.read_text().strip())
        sys.exit(0 if done.read_text().startswith("ok") else 1)
    time.sleep(0.2)
print("deployer: no answer within 300 s", file=sys.stderr)
sys.exit(1)
"""
MODEL_MARKER = re.compile(r"^# trafficvlm-model: (\S+)", re.M)


class LocalDeployer:
    """The demo's stand-in for Argo CD / Flux and NIM. A post-receive hook in the GitOps repository hands each
    pushed commit to this thread, which reads the checkpoint the values file now names, (re)starts
    `trafficvlm serve` on it at a fixed local URL and answers the hook once it serves. The pipeline's smoke
    step then asks that URL, as it would ask the NIM endpoint on a cluster."""

    def __init__(self, services: Services, bare: Path, volume: Path, values_path: str):
        self.services, self.bare, self.volume, self.values_path = services, bare, volume, values_path
        self.inbox = bare / "deploy-inbox"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.deployed: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-deployer", daemon=True)

    def start(self) -> None:
        self.inbox.mkdir(parents=True, exist_ok=True)
        hook = self.bare / "hooks" / "post-receive"
        hook.write_text(HOOK.format(python=sys.executable, inbox=str(self.inbox)))
        hook.chmod(0o755)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        request = self.inbox / "request"
        while not self._stop.wait(0.2):
            if request.is_file():
                sha = request.read_text().strip()
                request.unlink()
                try:
                    message = "ok " + self.deploy(sha)
                except Exception as exc:  # reported to the hook, which fails the push's output
                    message = f"failed: {exc}"
                (self.inbox / f"done-{sha}").write_text(message + "\n")

    def deploy(self, sha: str) -> str:
        values = _git("--git-dir", str(self.bare), "show", f"{sha}:{self.values_path}")
        found = MODEL_MARKER.search(values)
        if not found:
            raise RuntimeError(f"{self.values_path} at {sha[:12]} names no checkpoint (# trafficvlm-model: ...)")
        model = self.local_path(found.group(1))
        self.services.stop("endpoint")
        port = self.url.rsplit(":", 1)[1]
        self.services.start("endpoint", [sys.executable, "-m", "trafficvlm", "serve", str(model), "--port", port,
                                         "--served-model-name", "cosmos-reason1-7b", "--log-level", "warning"],
                            url=self.url, probe="/health", timeout=240)
        self.deployed.append({"commit": sha, "model": str(model)})
        return f"{model} serves at {self.url}/v1"

    def local_path(self, uri: str) -> Path:
        """pvc://[CLAIM/]SUB -> the stand-in volume's SUB (the claim, when named, is the volume itself)."""
        if not uri.startswith("pvc://"):
            raise RuntimeError(f"the demo serves checkpoints on its volume only, not {uri}")
        sub = uri[len("pvc://"):]
        for candidate in (self.volume / sub, self.volume / sub.partition("/")[2]):
            if candidate.is_dir():
                return candidate
        raise RuntimeError(f"{uri}: no such checkpoint under {self.volume}")


# --- stage clock ----------------------------------------------------------------------------------------------

class StageClock:
    """Wall time per named step; kfp.local's task lines ("Executing task 'x'" / "Task 'x' finished") are
    timed by the Tee below."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._open: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def begin(self, name: str) -> None:
        self._open[name] = time.monotonic()
        print(f"\n== {name}", flush=True)

    def end(self, name: str) -> None:
        if name in self._open:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - self._open.pop(name)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([^']+)'")
TASK_END = re.compile(r"Task '([^']+)' finished")


class Tee:
    """stdout for the pipeline run: to the terminal and a log file, timing kfp.local's tasks on the way."""

    def __init__(self, stream, log: Path, clock: StageClock):
        self.stream, self.log, self.clock = stream, log.open("a", encoding="utf-8"), clock

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(ANSI.sub("", text))
        for line in ANSI.sub("", text).splitlines():
            if m := TASK_START.search(line):
                self.clock._open[f"pipeline: {m.group(1)}"] = time.monotonic()
            elif m := TASK_END.search(line):
                self.clock.end(f"pipeline: {m.group(1)}")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        self.log.close()


# --- steps ------------------------------------------------------------------------------------------------------

def _stamp_matches(directory: Path, stamp: dict[str, Any]) -> bool:
    file = directory / ".demo-stamp.json"
    return file.is_file() and json.loads(file.read_text()) == stamp


def _write_stamp(directory: Path, stamp: dict[str, Any]) -> None:
    (directory / ".demo-stamp.json").write_text(json.dumps(stamp, sort_keys=True) + "\n")


def make_dataset(cfg: SynthSection, root: Path) -> Path:
    """Render the synthetic WTS tree (reused when the same settings rendered it before)."""
    from trafficvlm.synth import synthesize

    stamp = asdict(cfg)
    if _stamp_matches(root, stamp):
        print(f"reusing {root} (same synth settings)")
        return root
    if root.exists():
        shutil.rmtree(root)
    s = synthesize(root, seed=cfg.seed, scenarios=cfg.scenarios, normal=cfg.normal, bdd=cfg.bdd,
                   size=(cfg.width, cfg.height), fps=cfg.fps, duration=cfg.duration, val_fraction=cfg.val_fraction)
    print(f"rendered {s.videos} videos: {', '.join(f'{n} {k}' for k, n in sorted(s.scenes.items()))}")
    _write_stamp(root, stamp)
    return root


def make_tiny_model(cfg: TinySection, train_cfg, out: Path) -> Path:
    """The from-scratch tiny Qwen2.5-VL, with the training config's video spec in its trafficvlm.json."""
    from trafficvlm.model import build_tiny

    stamp = {**asdict(cfg), "video": train_cfg.video.to_dict()}
    if _stamp_matches(out, stamp):
        print(f"reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    build_tiny(out, seed=cfg.seed, hidden=cfg.hidden, layers=cfg.layers, vision_depth=cfg.vision_depth,
               vision_hidden=cfg.vision_hidden, vision_heads=cfg.vision_heads, spec=train_cfg.video,
               prompt=train_cfg.prompt)
    _write_stamp(out, stamp)
    print(f"built {out} (hidden {cfg.hidden}, {cfg.layers} layers, vision depth {cfg.vision_depth})")
    return out


def evaluate(out: Path, *, model: Path, data: Path, media_dir: Path, reuse: bool = False, **extra: Any) -> dict:
    from trafficvlm.stages.evaluate import run_eval

    results = out / "results.json"
    if reuse and results.is_file():
        print(f"reusing {out}")
        return json.loads(results.read_text())
    if out.exists():
        shutil.rmtree(out)
    return run_eval(model=str(model), data=str(data), media_dir=str(media_dir), out=str(out), device="cpu",
                    progress=True, **extra)


def seed_champion(model_dir: Path, results_dir: Path, model_name: str, endpoint: str) -> str:
    """Upload the untrained model and let the promote stage register it as the first champion (no champion
    yet, no floor): the SFT model must then beat it question by question."""
    from trafficvlm.stages.ingest import run_upload
    from trafficvlm.stages.promote import PromotionPolicy, run_promote

    uri = f"s3://{BUCKET}/models/tiny-untrained"
    run_upload(model_dir, uri, endpoint_url=endpoint, progress=False)
    decision = run_promote(uri, results_dir, policy=PromotionPolicy(max_p_value=None), model_name=model_name,
                           pipeline_run_id="demo-seed")
    print(f"{model_name} v{decision.version}: untrained tiny model registered as champion ({decision.reason})")
    return str(decision.version)


def pipeline_arguments(cfg: DemoConfig, out: Path, *, dataset_uri: str, base_model: Path, gitops: Path,
                       endpoint: str, inputs: set[str]) -> dict[str, Any]:
    """The pipeline's parameters for the embedded default; 0 means "the training config's value".
    OUT/pipeline stands in for the cluster's data volume."""
    volume = out / "pipeline"
    values: dict[str, Any] = {
        "dataset_uri": dataset_uri, "data_root": str(volume / "data"), "volume_mount": str(volume),
        "output_root": str(volume / "checkpoints"), "base_model": str(base_model),
        "checkpoint_store": f"s3://{BUCKET}/checkpoints", "max_p_value": cfg.gates.max_p_value,
        "smoke_endpoint": endpoint, "smoke_timeout_s": 120.0,
        "train_config": str(_repo_path(cfg.train_config)), "launcher": "local", "nodes": 1, "gpus_per_node": 0,
        "fps": 0.0, "nframes": 0, "max_pixels": 0, "total_pixels": 0, "learning_rate": 0.0, "epochs": 0,
        "global_batch_size": 0, "train_overrides": list(cfg.train_overrides),
        "max_fp8_accuracy_drop": cfg.gates.max_fp8_drop, "min_accuracy": cfg.gates.min_accuracy,
        "min_improvement": cfg.gates.min_improvement, "model_name": cfg.model_name,
        "gitops_repo": f"file://{gitops.resolve()}", "gitops_branch": "main", "values_path": SEED_VALUES[0]}
    missing = inputs - set(values) - {"subsets", "splits", "strict", "nodes"}
    if missing:
        print(f"note: pipeline parameters left at their defaults: {', '.join(sorted(missing))}")
    return {k: v for k, v in values.items() if k in inputs}


def run_pipeline(cfg: DemoConfig, out: Path, clock: StageClock, **where: Any) -> Path:
    """The compiled pipeline under kfp.local (each step a subprocess of this interpreter); returns the run's
    output directory (OUTPUT_ROOT/RUN_ID)."""
    import warnings

    from kfp import local

    from pipelines.trafficvlm import trafficvlm_pipeline

    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str((out / "pipeline" / "kfp").resolve()),
               raise_on_error=True, enable_caching=True, cache_root=str((out / "pipeline" / "kfp-cache").resolve()))
    args = pipeline_arguments(cfg, out.resolve(), inputs=set(trafficvlm_pipeline.component_spec.inputs), **where)
    root = Path(args["output_root"])
    before = set(root.iterdir()) if root.is_dir() else set()
    tee = Tee(sys.stdout, out / "logs" / "pipeline.log", clock)
    try:
        with redirect_stdout(tee):
            trafficvlm_pipeline(**args)
    finally:
        tee.close()
    new = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not new:
        raise RuntimeError(f"the pipeline finished but wrote no run directory under {root}")
    return new[-1]


def ask_live(endpoint: str, val_data: Path, media_dir: Path) -> dict[str, Any]:
    """One more held-out question to the live endpoint, to show the promoted model answering."""
    from trafficvlm.records import read_llava
    from trafficvlm.smoke import smoke_test

    rec = read_llava(val_data)[-1]
    result = smoke_test(endpoint, media_dir / rec.video, rec.question, rec.options)
    answer = rec.options.get(result.letter or "", "?")
    print(f"asked {endpoint}/v1: {rec.question!r} -> {(result.letter or '?').upper()} ({answer}); "
          f"truth {rec.answer.upper()} ({rec.options[rec.answer]})")
    return {"question": rec.question, "answer": result.letter, "truth": rec.answer, "ok": result.ok,
            "latency_s": result.latency_s, "error": result.error}


# --- results ------------------------------------------------------------------------------------------------------

def fp8_accuracy(run_dir: Path) -> float | None:
    """The FP8 gate's score of the quantized model (RUN/fp8/quantize_report.json; None when it did not run)."""
    report = run_dir / "fp8" / "quantize_report.json"
    if not report.is_file():
        return None
    acc = (json.loads(report.read_text()).get("gate") or {}).get("accuracy_fp8")
    return float(acc) if acc is not None else None


def registry_state(model_name: str) -> dict[str, Any]:
    from trafficvlm import tracking

    state = {}
    for alias in (tracking.CHAMPION, tracking.CHALLENGER):
        v = tracking.alias_version(alias, name=model_name)
        tags = (v.tags or {}) if v is not None else {}
        state[alias] = None if v is None else {"version": str(v.version), "source": v.source,
                                                "accuracy": tags.get("accuracy"), "run_id": v.run_id,
                                                "smoke_test": tags.get("smoke_test")}
    return state


def question_key(question: str) -> str:
    from trafficvlm.synth.scene import ENV_QUESTIONS

    return next((q.key for q in ENV_QUESTIONS if q.text == question), question)


def per_question(results: dict[str, Any] | None) -> dict[str, float]:
    if not results:
        return {}
    return {question_key(q): s["accuracy"] for q, s in results.get("per_question", {}).items()}


def format_table(rows: dict[str, dict[str, Any] | None]) -> str:
    """Accuracy overall and per question, one column per model."""
    names = list(rows)
    keys = sorted({k for r in rows.values() for k in per_question(r)})
    width = max([8, *(len(k) for k in keys)])
    head = f"{'':<{width}} " + " ".join(f"{n:>10}" for n in names)
    lines = [head, "-" * len(head)]

    def cell(r, k):
        v = (r or {}).get("accuracy") if k is None else per_question(r).get(k)
        return f"{v:>10.1%}" if v is not None else f"{'-':>10}"

    lines.append(f"{'overall':<{width}} " + " ".join(cell(rows[n], None) for n in names))
    lines += [f"{k:<{width}} " + " ".join(cell(rows[n], k) for n in names) for k in keys]
    return "\n".join(lines)


def _png_tag(path: Path | None) -> str:
    import base64

    if path is None or not path.is_file():
        return ""
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def plot_accuracies(rows: dict[str, dict[str, Any] | None], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["overall", *sorted({k for r in rows.values() for k in per_question(r)})]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        vals = [(r or {}).get("accuracy", 0) if k == "overall" else per_question(r).get(k, 0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=30, ha="right")
    ax.set(ylabel="accuracy (held-out synthetic val)", ylim=(0, 1))
    ax.legend(ncol=len(rows), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """report.html: the table, the plots (accuracy per question, the SFT loss curve), promotion and timing."""
    import html

    stages = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>"
                     for k, v in summary["stage_seconds"].items())
    facts = {k: summary[k] for k in ("promoted", "registry", "gitops_commit", "deployed", "live_answer", "mlflow_run")}
    body = f"""<!doctype html><meta charset="utf-8"><title>trafficvlm demo</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td{{padding:2px 10px}}</style>
<h1>trafficvlm demo</h1>
<p><b>A tiny from-scratch model on synthetic scenes</b>: this shows the pipeline working end to end, not what
Cosmos-Reason1-7B reaches on WTS.</p>
<h2>Accuracy on held-out synthetic scenarios</h2><pre>{html.escape(summary["table"])}</pre>
{"".join(_png_tag(Path(p)) for p in summary["plots"])}
<h2>Promotion, rollout, serving</h2><pre>{html.escape(json.dumps(facts, indent=1, default=str))}</pre>
<h2>Time per stage</h2><table>{stages}<tr><td><b>total</b></td><td>{summary["seconds"]:.0f} s</td></tr></table>
"""
    path = out / "report.html"
    path.write_text(body, encoding="utf-8")
    return path


# --- the demo -------------------------------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, out: Path, *, keep_services: bool = False) -> dict[str, Any]:
    """Everything above, in order; returns summary.json's content."""
    out = out.resolve()
    started = time.monotonic()
    clock = StageClock()
    state = out / "services"
    if state.exists():  # registry, bucket and Git repository start fresh each run (see the module docstring)
        shutil.rmtree(state)
    services = Services(out / "logs")
    deployer = None
    try:
        with exit_on_signals():
            with clock.stage("services: S3, MLflow, GitOps repository"):
                env, deployer = start_services(services, state, out / "pipeline")
            summary = _run(cfg, out, clock, env, deployer)
            if keep_services:
                _wait_for_ctrl_c(services)
    finally:
        if deployer is not None:
            deployer.stop()
        services.stop_all()
    summary["service_pids"] = services.started
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["stage_seconds"] = {k: round(v, 1) for k, v in clock.seconds.items()}
    summary["report"] = str(write_report(out, summary))
    return summary


def start_services(services: Services, state: Path, volume: Path) -> tuple[dict[str, str], LocalDeployer]:
    """S3, MLflow and the GitOps repository with its deployer; the environment every stage reads (as the
    Kubernetes Secrets and ConfigMaps would provide it on a cluster) is set in this process, which kfp.local's
    step subprocesses inherit."""
    env = start_s3(services)
    env["MLFLOW_TRACKING_URI"] = start_mlflow(services, state / "mlflow")
    os.environ.update(env)
    bare = state / "gitops.git"
    env["seed_commit"] = init_gitops(bare, state / "gitops-seed")
    deployer = LocalDeployer(services, bare, volume, SEED_VALUES[0])
    deployer.start()
    print(f"S3 {env['AWS_ENDPOINT_URL_S3']}, MLflow {env['MLFLOW_TRACKING_URI']}, GitOps file://{bare} "
          f"(deploys to {deployer.url}/v1)")
    return env, deployer


def _run(cfg: DemoConfig, out: Path, clock: StageClock, env: dict[str, str], deployer: LocalDeployer) -> dict:
    from trafficvlm.config import load_train_config
    from trafficvlm.stages.ingest import run_upload
    from trafficvlm.stages.prepare import run_prepare

    os.environ.setdefault("TRAFFICVLM_CACHE", str(out / "cache"))  # the decoded-frame cache, kept across runs
    s3 = env["AWS_ENDPOINT_URL_S3"]
    with clock.stage("synthetic WTS: render + upload"):
        wts = make_dataset(cfg.synth, out / "data" / "wts")
        dataset_uri = f"s3://{BUCKET}/wts"
        up = run_upload(wts, dataset_uri, endpoint_url=s3, create_bucket=True, progress=False)
        print(f"uploaded {up.uploaded} files to {dataset_uri}")
        llava = out / "data" / "llava"
        run_prepare(wts, llava, subsets=("environment",), check_videos=False)  # for the demo's own evals
    val, val_media = llava / "environment_mcq_llava_val.json", wts / "videos" / "val"
    train_cfg = load_train_config(_repo_path(cfg.train_config), cfg.train_overrides)
    with clock.stage("zero-shot: untrained model, eval, first champion"):
        base = make_tiny_model(cfg.model, train_cfg, out / "models" / "tiny")
        zero = evaluate(out / "eval" / "zero-shot", model=base, data=val, media_dir=val_media, reuse=True)
        seed_champion(base, out / "eval" / "zero-shot", cfg.model_name, s3)
    with clock.stage("pipeline (kfp.local)"):
        run_dir = run_pipeline(cfg, out, clock, dataset_uri=dataset_uri, base_model=base,
                               gitops=deployer.bare, endpoint=deployer.url)
    sft_dir = run_dir / "sft" / "final"
    with clock.stage("baselines: blind, majority"):
        blind = evaluate(out / "eval" / "blind", model=sft_dir, data=val, media_dir=val_media, baseline="blind")
        majority = evaluate(out / "eval" / "majority", model=sft_dir, data=val, media_dir=val_media,
                            baseline="majority", train_data=str(llava / "environment_mcq_llava_train.json"))
    live = ask_live(deployer.url, val, val_media) if deployer.deployed else None
    return summarize(cfg, out, run_dir, env, deployer, {"zero-shot": zero, "blind": blind, "majority": majority},
                     live)


def summarize(cfg: DemoConfig, out: Path, run_dir: Path, env: dict[str, str], deployer: LocalDeployer,
              baselines: dict[str, dict[str, Any]], live: dict[str, Any] | None) -> dict[str, Any]:
    sft = json.loads((run_dir / "eval" / "results.json").read_text())
    fp8_acc = fp8_accuracy(run_dir)
    registry = registry_state(cfg.model_name)
    champion = registry["champion"] or {}
    head = _git("--git-dir", str(deployer.bare), "rev-parse", "main")
    rows = {**baselines, "SFT": sft, "FP8": {"accuracy": fp8_acc} if fp8_acc is not None else None}
    plots = [plot_accuracies(rows, out / "accuracy.png"), run_dir / "sft" / "loss.png"]
    return {"zero_shot_accuracy": baselines["zero-shot"]["accuracy"], "blind_accuracy": baselines["blind"]["accuracy"],
            "majority_accuracy": baselines["majority"]["accuracy"], "sft_accuracy": sft["accuracy"],
            "fp8_accuracy": fp8_acc, "promoted": champion.get("version") not in (None, "1"), "registry": registry,
            "gitops_commit": head if head != env["seed_commit"] else None, "gitops_repo": str(deployer.bare),
            "deployed": deployer.deployed, "live_answer": live,
            "mlflow_run": _run_link(env["MLFLOW_TRACKING_URI"], champion["run_id"]) if champion.get("run_id") else None,
            "run_dir": str(run_dir), "table": format_table(rows), "plots": [str(p) for p in plots if p],
            "per_question": {name: per_question(r) for name, r in rows.items()}}


def _run_link(mlflow_url: str, run_id: str) -> str:
    from mlflow import MlflowClient

    run = MlflowClient(mlflow_url).get_run(run_id)
    return f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def _wait_for_ctrl_c(services: Services) -> None:
    for s in services.running.values():
        print(f"  {s.name}: {s.url}")
    print("services are up; Ctrl-C stops them")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the services")


def print_summary(summary: dict[str, Any]) -> None:
    print("\n" + "=" * 78)
    print("trafficvlm demo — a TINY from-scratch Qwen2.5-VL on SYNTHETIC traffic scenes (not Cosmos-Reason1-7B,")
    print("not WTS): the numbers show the pipeline works end to end, not what the 7B model reaches.\n")
    print(summary["table"])
    print("\ntime per stage:")
    for name, secs in summary["stage_seconds"].items():
        print(f"  {name:<50} {secs:>7.1f} s")
    print(f"  {'total':<50} {summary['seconds']:>7.1f} s")
    champion = summary["registry"]["champion"] or {}
    print(f"\npromoted: {summary['promoted']} (champion v{champion.get('version')}: {champion.get('source')})")
    print(f"MLflow run: {summary['mlflow_run']}  (the server is stopped now; its data stays in the out dir)")
    print(f"GitOps commit: {summary['gitops_commit']} in {summary['gitops_repo']}")
    print(f"smoke test (pipeline step, against the deployed endpoint): {champion.get('smoke_test') or 'not run'}")
    print(f"report: {summary['report']}")
    print("\nThe same pipeline on Kubeflow with the real WTS dataset and Cosmos-Reason1-7B:")
    print(EPILOG.split("Cosmos-Reason1-7B:\n", 1)[1].rstrip())


# --- CLI ------------------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline locally: tiny model, synthetic WTS, CPU, minutes",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (default configs/demo.toml)")
    p.add_argument("--quick", action="store_true", help="tiny everything: every stage runs, nothing learns much")
    p.add_argument("--keep-services", action="store_true", help="keep S3/MLflow up at the end until Ctrl-C")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the demo config")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = load_demo_config(args.config, args.overrides, quick=args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run_demo(cfg, out, keep_services=args.keep_services)
    keep = {k: summary[k] for k in SUMMARY_KEYS}
    (out / "summary.json").write_text(json.dumps({**keep, **{k: v for k, v in summary.items() if k not in keep}},
                                                 indent=1, default=str) + "\n")
    print_summary(summary)
    return 0
