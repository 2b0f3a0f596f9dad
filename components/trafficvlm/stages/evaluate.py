"""`trafficvlm eval` and `trafficvlm compare`: score a checkpoint or an endpoint; prove a difference.

    trafficvlm eval --model runs/sft/final --data data/llava/environment_mcq_llava_val.json \\
        --media-dir data/wts/videos/val --out runs/eval-sft
    trafficvlm eval --model models/base --data ... --media-dir ... --out runs/eval-base
    trafficvlm compare runs/eval-base runs/eval-sft --out runs/compare      # delta, 95% CI, McNemar p
    torchrun --nproc-per-node 8 -m trafficvlm eval --model ... --out ...    # data-parallel, same results

From Python (the KFP component shell, the promotion gate):

    from trafficvlm.stages.evaluate import run_eval, run_compare
    results = run_eval(model="runs/sft/final", data="val.json", media_dir="videos/val", out="runs/eval")
    gate = run_compare(["runs/eval-champion", "runs/eval-challenger"])   # gate["delta"], ["ci"], ["p_value"]

The video spec, system prompt and answer type come from the model bundle's trafficvlm.json; explicit flags
that disagree with it are an error unless --override-spec. Predictions are appended to predictions.jsonl one
clip at a time (flushed; fsynced every 30 s and at the end), so `--resume` continues a killed run where
it stopped. Under torchrun every rank
scores its own share of the clips and rank 0 merges; the merged files are identical to a one-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trafficvlm.config import ConfigError, EvalConfig, load_eval_config, save_config, to_dict

EPILOG = """\
examples:
  trafficvlm eval --model runs/sft/final --data data/llava/environment_mcq_llava_val.json \\
      --media-dir data/wts/videos/val --out runs/eval-sft
  trafficvlm eval --config configs/eval/recipe_setting_a.toml --model runs/sft/final --out runs/eval-a
  trafficvlm eval --config eval_config.yaml --out runs/eval   # the reference recipe's file, keys mapped
  trafficvlm eval ... --mode generate --answer-type reasoning --max-tokens 1024
  trafficvlm eval ... --baseline majority --train-data data/llava/environment_mcq_llava_train.json
  trafficvlm eval ... --baseline blind                        # the model without the video
  trafficvlm eval --engine openai --endpoint http://127.0.0.1:8000/v1 --api-key-env NIM_API_KEY \\
      --model runs/sft/final --data ... --media-dir ... --out runs/eval-nim
  trafficvlm eval ... --resume                                # continue a killed run
  trafficvlm eval ... --no-compile-vision --no-compile-text   # no torch.compile at all (CUDA; ~1 min less start-up)
  torchrun --nproc-per-node 4 -m trafficvlm eval ...          # data-parallel over clips
"""

COMPARE_EPILOG = """\
examples:
  trafficvlm compare runs/eval-base runs/eval-sft                 # table: delta, 95% CI, McNemar p
  trafficvlm compare runs/eval-base runs/eval-sft runs/eval-fp8 --out runs/compare
"""


# --- spec resolution (contract 4) ---------------------------------------------------------------------------

@dataclass
class Resolved:
    """What the run scores with, and where each value came from."""

    spec: Any                      # VideoSpec
    system_prompt: str
    answer_type: str
    mode: str
    bundle: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def resolve(cfg: EvalConfig) -> Resolved:
    """Bundle spec and prompt, overlaid by explicit settings; a disagreement is an error unless override_spec."""
    from trafficvlm.config import PromptSpec, VideoSpec
    from trafficvlm.evaluate import system_prompt_for
    from trafficvlm.model import read_bundle_meta

    bundle = read_bundle_meta(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None
    notes, video = [], dict(cfg.video)  # VideoSpec clears fps itself when nframes is set
    base_video, base_prompt = dict((bundle or {}).get("video", {})), dict((bundle or {}).get("prompt", {}))
    if bundle is None and cfg.baseline != "majority":
        notes.append(f"{cfg.model or cfg.endpoint}: no trafficvlm.json; video spec and prompt from the config "
                     "and defaults")
    explicit_prompt = {k: v for k, v in (("system_prompt", cfg.system_prompt), ("answer_type", cfg.answer_type))
                       if v is not None}
    clashes = [f"video.{k}: bundle {base_video[k]!r}, given {v!r}" for k, v in video.items()
               if k in base_video and base_video[k] != v]
    clashes += [f"{k}: bundle {base_prompt[k]!r}, given {v!r}" for k, v in explicit_prompt.items()
                if k in base_prompt and base_prompt[k] != v]
    if clashes and not cfg.override_spec:
        raise ConfigError(f"{cfg.model}/trafficvlm.json disagrees with the settings given (pass --override-spec "
                          "to evaluate differently from how the model was trained): " + "; ".join(clashes))
    notes += [f"override: {c}" for c in clashes]
    try:
        spec = VideoSpec(**{**base_video, **video})
        prompt = PromptSpec(**{**base_prompt, **explicit_prompt})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"video spec / prompt of {cfg.model or 'the run'}: {exc}") from None
    mode = cfg.mode
    if prompt.answer_type != "letter" and mode == "letter":
        mode = "generate"
        notes.append(f"answer_type {prompt.answer_type!r} is scored by generation (--mode generate)")
    return Resolved(spec, system_prompt_for(prompt.answer_type, prompt.system_prompt), prompt.answer_type,
                    mode, bundle, notes)


# --- distributed ------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group) under torchrun, else (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, created


def _barrier(world: int, *, destroy: bool = False) -> None:
    """Wait for every rank's predictions file; tear the group down if this run created it."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if destroy:
            dist.destroy_process_group()


# --- the run ----------------------------------------------------------------------------------------------

def run_eval(config: EvalConfig | str | Path | None = None, *, progress: bool = True, on_note=print,
             **overrides: Any) -> dict[str, Any]:
    """Score the data, write the results directory, return results.json's content.

    `config` is an EvalConfig, a TOML / recipe YAML path, or None; keyword overrides use EvalConfig names
    (`run_eval(model=..., data=..., media_dir=..., out=...)`)."""
    cfg = config if isinstance(config, EvalConfig) else load_eval_config(config, overrides, on_ignored=on_note)
    if isinstance(config, EvalConfig) and overrides:
        cfg = load_eval_config(None, {**to_dict(config), **overrides})
    _require(cfg)
    res = resolve(cfg)
    for note in res.notes:
        on_note(f"note: {note}")
    from trafficvlm.records import read_llava

    records = read_llava(cfg.data)[: cfg.limit]
    rank, world, created = _dist()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, out / "eval_config.toml")
    started = time.time()
    skipped = _score_all(cfg, res, records, out, rank, world, progress)
    _barrier(world, destroy=created)
    if rank != 0:
        return {}
    return _finish(cfg, res, records, out, world, skipped, time.time() - started)


def _require(cfg: EvalConfig) -> None:
    missing = [name for name in ("data", "out") if not getattr(cfg, name)]
    if cfg.baseline != "majority":
        missing += [name for name in ("media_dir",) if not getattr(cfg, name)]
        if cfg.engine == "local" and not cfg.model:
            missing.append("model")
    if missing:
        raise ConfigError(f"eval needs {', '.join('--' + m.replace('_', '-') for m in missing)}")


def _score_all(cfg: EvalConfig, res: Resolved, records, out: Path, rank: int, world: int,
               progress: bool) -> list[dict[str, Any]]:
    """Score this rank's clips not yet in the results dir, appending predictions per clip. Returns the
    clips skipped because their video could not be read (reported, never silent)."""
    from tqdm import tqdm

    from trafficvlm.records import group_by_video
    from trafficvlm.report import PREDICTIONS

    done = {p.id for p in _existing_predictions(out, resume=cfg.resume)}
    groups = list(group_by_video(records).items())[rank::world]
    todo = [(key, [r for r in recs if r.id not in done]) for key, recs in groups]
    todo = [(key, recs) for key, recs in todo if recs]
    engine = _engine(cfg, res, records, rank)
    per_batch = cfg.batch_videos if (cfg.engine == "local" and not cfg.shared_prefix) else 1
    path = out / (PREDICTIONS if world == 1 else f"predictions.rank{rank}.jsonl")
    skipped: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(r) for _, r in todo), unit="question", desc=f"eval[{rank}]" if world > 1 else "eval",
               disable=not progress, dynamic_ncols=True)
    slices = [todo[start:start + per_batch] for start in range(0, len(todo), per_batch)]

    def load(part):  # CPU: decode (or read cached) frames, then the engine's own preparation
        batch = _load_clips(cfg, res, part, engine, skipped)
        return part, batch, engine.prepare(batch)

    with PredictionSink(path) as sink, bar:
        for part, batch, prepared in _prefetched(load, slices):
            if batch:
                for (records_, _), answers in zip(batch, engine.score_prepared(prepared)):
                    sink.append(records_, answers)
            bar.update(sum(len(recs) for _, recs in part))
    return skipped


def _prefetched(fn, items: list, ahead: int = 1):
    """`fn(item)` for each item, in order, computed up to `ahead` items early in one background thread:
    the next clip's frames and prompts are built on the CPU while the GPU scores the current one (the
    heavy parts, torch ops such as patchify and the dtype cast, and file reads, run without the GIL).
    One worker keeps the order of side effects (the skipped list, warnings) as in a serial loop; an
    error surfaces when its item is reached."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="eval-prefetch") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _existing_predictions(out: Path, *, resume: bool):
    from trafficvlm.report import PREDICTIONS, read_predictions

    files = [out / PREDICTIONS] + sorted(out.glob("predictions.rank*.jsonl"))
    present = [f for f in files if f.is_file() and f.stat().st_size > 0]
    if present and not resume:
        raise ConfigError(f"{out} already holds predictions ({present[0].name}): pass --resume to continue that "
                          "run, or choose another --out")
    return [p for f in present for p in read_predictions(f)]


def _load_clips(cfg: EvalConfig, res: Resolved, todo, engine, skipped: list[dict[str, Any]]):
    """(records, clip) pairs; engines that need no frames get None. Unreadable videos are skipped and noted."""
    from trafficvlm.video import FrameCache, VideoError, load_clip

    if not engine.needs_frames:
        return [(recs, None) for _, recs in todo]
    cache = FrameCache(cfg.frame_cache) if cfg.frame_cache else True
    batch = []
    for (video, start, end), recs in todo:
        try:
            batch.append((recs, load_clip(Path(cfg.media_dir) / video, res.spec, start, end, cache=cache)))
        except VideoError as exc:
            print(f"warning: skipping {len(recs)} questions: {exc}", file=sys.stderr)
            skipped.append({"video": video, "start": start, "end": end, "questions": len(recs),
                            "reason": str(exc)})
    return batch


class PredictionSink:
    """predictions.jsonl opened for appending. Each clip's lines are written and flushed at once, so a killed
    process loses nothing it wrote (the OS holds it) and `--resume` starts after it; they are fsynced at most
    every `sync_every_s` seconds and on close, so a crashed node loses at most that much. An fsync per clip
    stalled the GPU between clips (milliseconds on a local disk, more on network volumes)."""

    def __init__(self, path: Path, sync_every_s: float = 30.0):
        import time

        self._clock = time.monotonic
        self.file = path.open("a", encoding="utf-8")
        self.sync_every_s, self._synced = sync_every_s, self._clock()

    def append(self, records, answers) -> None:
        from trafficvlm.records import Prediction

        for r, a in zip(records, answers):
            pred = Prediction(id=r.id, video=r.video, type=r.type, phase=r.phase, question=r.question,
                              options=r.options, correct=r.answer, predicted=a.predicted,
                              letter_probs=a.letter_probs, raw_text=a.raw_text)
            self.file.write(json.dumps(pred.to_json(), ensure_ascii=False) + "\n")
        self.file.flush()
        if self._clock() - self._synced >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())
        self._synced = self._clock()

    def __enter__(self) -> "PredictionSink":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.file.flush()
            self.sync()
        finally:
            self.file.close()


# --- engines ----------------------------------------------------------------------------------------------

def _engine(cfg: EvalConfig, res: Resolved, records, rank: int):
    from trafficvlm import evaluate
    from trafficvlm.fast_vision import vision_compiled

    max_tokens = cfg.max_tokens or evaluate.DEFAULT_MAX_TOKENS[res.answer_type]
    if cfg.baseline == "majority":
        from trafficvlm.records import read_llava

        return evaluate.MajorityEngine(read_llava(cfg.train_data) if cfg.train_data else records)
    if cfg.engine == "openai":
        key = evaluate.api_key_from_env(cfg.api_key_env)
        name = cfg.served_model or _served_model(cfg.endpoint, key)
        return evaluate.OpenAIEngine(cfg.endpoint, cfg.media_dir, res.spec, res.system_prompt, model_name=name,
                                       api_key=key, max_tokens=max_tokens, temperature=cfg.temperature,
                                       seed=cfg.seed, concurrency=cfg.concurrency, file_urls=cfg.file_urls)
    model, processor = _load_local(cfg, rank)
    engine = evaluate.LocalEngine(model, processor, res.spec, res.system_prompt, mode=res.mode,
                                  shared_prefix=cfg.shared_prefix, question_batch=cfg.question_batch,
                                  max_new_tokens=max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                  blind=cfg.baseline == "blind", max_length=cfg.max_length,
                                  compile_vision=cfg.compile_vision, compile_text=cfg.compile_text)
    compiling = [name for name, on in (("the vision blocks", vision_compiled(model)),
                                       ("the text step", engine.text is not None and engine.text.compiled)) if on]
    if compiling and rank == 0:
        print(f"note: compiling {' and '.join(compiling)} on the first clip (up to a minute; "
              "--no-compile-vision / --no-compile-text skip it)", file=sys.stderr)
    return engine


def _load_local(cfg: EvalConfig, rank: int):
    import torch

    from trafficvlm.model import load_model, load_processor

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if device.startswith("cuda"):  # compiled kernels, side streams and CUDA graphs run on the current device
        torch.cuda.set_device(device)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else None, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    model = load_model(cfg.model, dtype=dtype, device=device)
    model.eval()
    return model, load_processor(cfg.model)


def _served_model(endpoint: str, api_key: str | None) -> str:
    """The endpoint's first model id (`GET /v1/models`), when --served-model is not given."""
    import httpx

    base = endpoint.rstrip("/")
    url = base + ("" if base.endswith("/v1") else "/v1") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        data = httpx.get(url, headers=headers, timeout=30).raise_for_status().json()["data"]
        return data[0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{url}: cannot list the served models ({exc}); pass --served-model") from None


# --- results ----------------------------------------------------------------------------------------------

def _finish(cfg: EvalConfig, res: Resolved, records, out: Path, world: int, skipped: list[dict[str, Any]],
            seconds: float) -> dict[str, Any]:
    """Merge rank files, order predictions as the data, write results.json and the report, log to MLflow."""
    from trafficvlm import report

    preds = {p.id: p for p in _existing_predictions(out, resume=True)}
    ordered = [preds[r.id] for r in records if r.id in preds]
    report.write_predictions(out / report.PREDICTIONS, ordered)
    for f in out.glob("predictions.rank*.jsonl"):
        f.unlink()
    results = report.summarize(ordered, _provenance(cfg, res, skipped, len(records), seconds))
    report.write_results(out, results)
    report.write_report(out, results, ordered)
    _track(cfg, results, out)
    return results


def _provenance(cfg: EvalConfig, res: Resolved, skipped, n_records: int, seconds: float) -> dict[str, Any]:
    import torch
    import transformers

    from trafficvlm import __version__

    baseline = None
    if cfg.baseline == "majority":
        baseline = {"kind": "majority", "learned_from": cfg.train_data or f"the evaluation set itself ({cfg.data})"}
    elif cfg.baseline == "blind":
        baseline = {"kind": "blind", "note": "the model's prompt without the video part"}
    bundle = res.bundle or {}
    model = "majority baseline" if cfg.baseline == "majority" else cfg.model or cfg.endpoint
    return {"model": model, "data": cfg.data, "media_dir": cfg.media_dir,
            "engine": cfg.engine, "endpoint": cfg.endpoint,
            "mode": "majority" if cfg.baseline == "majority" else res.mode if cfg.engine == "local" else "generate", "answer_type": res.answer_type,
            "shared_prefix": cfg.shared_prefix, "baseline": baseline, "records": n_records,
            "skipped": skipped, "skipped_questions": sum(s["questions"] for s in skipped),
            "video_spec": res.spec.to_dict(), "system_prompt": res.system_prompt,
            "bundle": {"base_model": bundle.get("base_model"), "versions": bundle.get("versions")},
            "notes": res.notes, "config": to_dict(cfg),
            "versions": {"trafficvlm": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "timing": {"seconds": round(seconds, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def _track(cfg: EvalConfig, results: dict[str, Any], out: Path) -> None:
    from trafficvlm import tracking

    t = cfg.tracking
    with tracking.stage_run(t.run_name, parent_run_id=t.parent_run_id, experiment=t.experiment, uri=t.uri) as run:
        if run is None:
            return
        tracking.log_params(to_dict(cfg), uri=t.uri)
        metrics = {"accuracy": results["accuracy"], "correct": results["correct"], "total": results["total"],
                   "parse_failures": results["parse_failures"]}
        metrics.update({f"accuracy/{q}": s["accuracy"] for q, s in results["per_question"].items()})
        tracking.log_metrics(metrics, uri=t.uri)
        tracking.log_artifact(out, artifact_path="eval", uri=t.uri)


def run_compare(dirs: list[str | Path], out: str | Path | None = None, *, n_boot: int = 2000,
                seed: int = 0) -> dict[str, Any]:
    """Compare results directories (each later one against the first): see report.compare_results."""
    from trafficvlm.report import compare_results

    return compare_results(dirs, out, n_boot=n_boot, seed=seed)


# --- CLI --------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="score a checkpoint or an endpoint on LLaVA MCQ data",
                              description="Score a model on multiple-choice video questions: letter scoring "
                                          "(exact restricted greedy) or generation, a shared video prefix per "
                                          "clip, resumable, data-parallel under torchrun.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="our eval TOML, or the recipe's eval_config.yaml (keys mapped)")
    p.add_argument("--model", help="checkpoint directory (its trafficvlm.json gives video spec and prompt)")
    p.add_argument("--data", help="LLaVA JSON (e.g. environment_mcq_llava_val.json)")
    p.add_argument("--media-dir", help="directory the records' video paths are relative to")
    p.add_argument("--out", help="results directory")
    p.add_argument("--mode", choices=("letter", "generate"))
    p.add_argument("--answer-type", choices=("letter", "reasoning", "freeform"))
    p.add_argument("--shared-prefix", choices=("on", "off"), help="one prefill per clip (default: on)")
    p.add_argument("--resume", action="store_true", default=None, help="skip questions already in --out")
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--batch-videos", type=int, help="clips per padded batch with --shared-prefix off")
    p.add_argument("--question-batch", type=int, help="rows per forward (default 16)")
    p.add_argument("--baseline", choices=("majority", "blind"))
    p.add_argument("--train-data", help="LLaVA JSON the majority baseline learns from (default: the eval set)")
    p.add_argument("--engine", choices=("local", "openai"))
    p.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    p.add_argument("--served-model", help="model name at the endpoint (default: its first model)")
    p.add_argument("--file-urls", action="store_true", default=None,
                   help="send file:// URLs instead of base64 (server needs --allowed-local-media-path)")
    p.add_argument("--concurrency", type=int, help="parallel endpoint requests (default 4)")
    p.add_argument("--max-tokens", type=int, help="generation budget (default 16 / 1024 / 256 by answer type)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--seed", type=int)
    p.add_argument("--fps", type=float, help="video spec override (must match the bundle unless --override-spec)")
    p.add_argument("--nframes", type=int, help="video spec override")
    p.add_argument("--max-pixels", type=int, help="video spec override")
    p.add_argument("--total-pixels", type=int, help="video spec override")
    p.add_argument("--system-prompt", help="prompt override (must match the bundle unless --override-spec)")
    p.add_argument("--override-spec", action="store_true", default=None,
                   help="allow a video spec / prompt different from the bundle's")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--compile-vision", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each vision block on CUDA (default on; the first clip of each new "
                        "grid shape pays the compile; ignored on CPU)")
    p.add_argument("--compile-text", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the language model's decoder step that scores the letter branches and "
                        "replay the branches as CUDA graphs (default on; the first clip pays ~10-30 s of "
                        "compiling; ignored on CPU)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main_eval)

    c = subparsers.add_parser("compare", help="compare eval results: deltas, bootstrap CIs, McNemar",
                              description="Compare results directories (each against the first): overall and "
                                          "per-question accuracy, video-clustered bootstrap 95% CIs, paired "
                                          "McNemar test, flipped answers, a bar chart.",
                              epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("results", nargs="+", metavar="RESULTS_DIR")
    c.add_argument("--out", help="write compare.json and compare.png here")
    c.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_main_compare)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "data", "media_dir", "out", "mode", "answer_type", "resume", "limit", "batch_videos",
             "question_batch", "baseline", "train_data", "engine", "endpoint", "api_key_env", "served_model",
             "file_urls", "concurrency", "max_tokens", "temperature", "seed", "system_prompt", "override_spec",
             "device", "dtype", "compile_vision", "compile_text")
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.shared_prefix is not None:
        out["shared_prefix"] = args.shared_prefix == "on"
    video = {k: getattr(args, k) for k in ("fps", "nframes", "max_pixels", "total_pixels")
             if getattr(args, k) is not None}
    if video:
        out["video"] = video
    return out


def _main_eval(args: argparse.Namespace) -> int:
    try:
        results = run_eval(args.config, progress=not args.no_progress, **_overrides(args))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if results:
        print(f"accuracy {results['accuracy']:.2%} ({results['correct']}/{results['total']}, "
              f"{results['parse_failures']} unparseable, {results['skipped_questions']} skipped) -> {results['config']['out']}")
    return 0


def _main_compare(args: argparse.Namespace) -> int:
    from trafficvlm.report import format_compare

    try:
        result = run_compare(args.results, args.out, n_boot=args.resamples, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_compare(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'compare.json'} and {result['chart']}")
    return 0
