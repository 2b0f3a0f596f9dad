"""The Python half of bench/recipe_scale.sh: the commands it runs, taken from the launcher, and its summary.

    python bench/recipe_scale.py argv per-question --ngpu 8 --work runs/recipe_scale      # one arg per line
    python bench/recipe_scale.py argv warm --ngpu 8 --work runs/recipe_scale --workers 16
    python bench/recipe_scale.py summarize --ngpu 8 --work runs/recipe_scale --out bench/results/recipe_scale.json

`argv per-question|shared-prefix` is the container command of the PyTorchJob the pipeline's SFT step
creates (`launcher.spec_from_request` -> `build_pytorchjob`: `env` with the pod's variables, then
`torchrun` and `launcher.trainer_args`), with `$(MASTER_ADDR)`/`$(MASTER_PORT)` expanded from the
environment as the kubelet expands them in a pod. So this benchmark and the job cannot drift: a change to
the launcher changes both. `argv warm` is `trafficvlm cache warm` over the same annotation file, media dir,
config and video overrides as the trainer, so it fills exactly the cache keys the trainer reads.

`summarize` reads what the run left in WORK (stage times, the warm report, each variant's metrics.jsonl,
GPU memory samples) and writes one JSON document plus a table. With `--max-steps` the epoch time is a
projection: steps_per_epoch = ceil(items / global batch) x the mean step time (the first step, which
carries allocator and loader warm-up, is left out when there are at least 3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "components"))

CONFIG = "configs/sft/recipe_setting_a.toml"     # the recipe's setting A: fps 1, max_pixels 81,920, full SFT
VARIANTS = ("per-question", "shared-prefix")
SUBSET = "environment"
REFERENCE = {"epoch_min": 35.0, "gpus": 8, "card": "A100", "videos": 341, "questions_per_video": 15,
             "samples": 341 * 15, "global_batch": 128,
             "source": "the reference recipe (cosmos-rl, setting A): one epoch of WTS environment MCQ"}


# --- the commands ---------------------------------------------------------------------------------------

def request(args: argparse.Namespace, variant: str):
    """The pipeline's SFT request for one variant: same locations and trainer keys as a pipeline run."""
    from trafficvlm.launcher import SftRequest

    extra = ["model.random_init=7b"]
    if variant == "shared-prefix":
        # global_batch counts videos here: ~8 videos x ~15 questions is the recipe's ~128 questions a step
        extra += ["train.shared_prefix=true", f"train.global_batch={args.sp_global_batch}"]
    else:
        extra.append(f"train.global_batch={args.global_batch}")
    if args.max_steps:
        extra.append(f"train.max_steps={args.max_steps}")
    work = Path(args.work)
    return SftRequest(run_id=f"recipe-scale-{variant}", llava_dir=str(work / "llava"), wts_dir=str(work / "wts"),
                      base_model=str(work / "processor"), output_root=str(work / "runs"),
                      subsets=[SUBSET], train_config=args.config, nodes=1, gpus_per_node=args.ngpu,
                      extra_overrides=extra + list(args.set))


def container(req) -> dict[str, Any]:
    """The `pytorch` container of the job's Master pod, as the cluster would run it."""
    from trafficvlm.launcher import build_pytorchjob, spec_from_request

    job = build_pytorchjob(spec_from_request(req, namespace="recipe-scale"))
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """`$(VAR)` -> its value, as the kubelet expands container args; unknown variables stay as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def train_argv(req, environ: dict[str, str]) -> list[str]:
    """`env NAME=value ... torchrun ARGS`: the pod's variables, command and args, expanded."""
    c = container(req)
    pod_env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env = {**environ, **pod_env}
    return ["env", *(f"{k}={v}" for k, v in pod_env.items()),
            *(kubelet_expand(a, env) for a in [*c["command"], *c["args"]])]


def trainer_paths(req) -> tuple[str, str]:
    """The annotation file and media dir the trainer gets (from the request's overrides)."""
    from trafficvlm.launcher import TRAINER_KEYS

    values = dict(o.split("=", 1) for o in req.overrides())
    return values[TRAINER_KEYS["data"]], values[TRAINER_KEYS["media"]]


def warm_argv(req, workers: int, python: str) -> list[str]:
    data, media = trainer_paths(req)
    video = [f"--set={o}" for o in req.overrides() if o.startswith("video.")]
    return [python, "-m", "trafficvlm", "cache", "warm", data, "--media-dir", media, "--config",
            req.train_config, "--workers", str(workers), "--report", str(Path(req.llava_dir).parent / "warm.json"),
            *video]


# --- the summary ----------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def data_counts(annotation: str) -> dict[str, int]:
    from trafficvlm.records import read_llava

    records = [r for r in read_llava(annotation) if r.answer]
    videos = len({(r.video, r.video_start, r.video_end) for r in records})
    return {"samples": len(records), "videos": videos}


def peak_memory_gib(csv: Path) -> float | None:
    """Highest `memory.used` (MiB) over all GPUs in an nvidia-smi sample log, in GiB."""
    values = [float(v) for ln in csv.read_text().splitlines() if ln.strip()
              for v in [ln.split(",")[-1].strip()] if v.replace(".", "", 1).isdigit()] if csv.is_file() else []
    return round(max(values) / 1024, 2) if values else None


def variant_summary(rows: list[dict[str, Any]], items: int, global_batch: int, ngpu: int, target_gpus: int,
                    ref_items: int, complete: bool) -> dict[str, Any]:
    """Step statistics and the epoch time: measured for a complete epoch, else projected from steps."""
    if not rows:
        return {"error": "no metrics.jsonl rows (the run failed before its first step; see its log)"}
    steady = rows[1:] if len(rows) >= 3 else rows
    seconds = sum(r["step_s"] for r in steady)
    samples = sum(r["samples_per_s"] * r["step_s"] for r in steady)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in steady)
    step_s = seconds / len(steady)
    steps_per_epoch = math.ceil(items / global_batch)
    epoch_s = sum(r["step_s"] for r in rows) if complete else steps_per_epoch * step_s
    # Same per-GPU shapes on more GPUs: the accumulation shrinks by ngpu/target, so does the step time
    # (assumes FSDP's collectives stay hidden, as within one NVLink node).
    target_epoch_s = epoch_s * ngpu / target_gpus
    ref_epoch_s = math.ceil(ref_items / global_batch) * step_s * ngpu / target_gpus
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    return {"steps_run": len(rows), "steps_timed": len(steady), "step_s_mean": round(step_s, 3),
            "step_s_stdev": round(statistics.pstdev([r["step_s"] for r in steady]), 3),
            "first_step_s": round(rows[0]["step_s"], 3),
            "items": items, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
            "epoch_measured": complete, "epoch_s": round(epoch_s, 1), "epoch_min": round(epoch_s / 60, 2),
            f"epoch_min_on_{target_gpus}_gpus": round(target_epoch_s / 60, 2),
            f"epoch_min_reference_shape_on_{target_gpus}_gpus": round(ref_epoch_s / 60, 2),
            "samples_per_s": round(samples / seconds, 3), "samples_per_s_per_gpu": round(samples / seconds / ngpu, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "mfu": round(sum(m * r["step_s"] for m, r in zip(mfu, steady)) / seconds, 4) if mfu else None,
            # waiting on the loader (frame cache -> patchify -> collate), rank 0, as a share of step time
            "data_wait_frac": (round(sum(r["data_wait_s"] for r in steady) / seconds, 4)
                               if all("data_wait_s" in r for r in steady) else None),
            "final_loss": rows[-1]["loss"]}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def summarize(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    times = {p.stem: float(p.read_text()) for p in sorted((work / "times").glob("*.s"))}
    data, _ = trainer_paths(request(args, VARIANTS[0]))
    counts = data_counts(data)
    doc: dict[str, Any] = {
        "bench": "recipe_scale", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").is_file() else "unknown",
        "ngpu": args.ngpu, "target_gpus": args.target_gpus, "versions": versions(), "reference": REFERENCE,
        "config": {"train_config": args.config, "global_batch": args.global_batch,
                   "sp_global_batch": args.sp_global_batch, "max_steps": args.max_steps,
                   "synth": json.loads((work / "synth.json").read_text()) if (work / "synth.json").is_file() else None},
        "data": counts,
        "one_off": {"synth_s": times.get("synth"), "prepare_s": times.get("prepare"), "warm_s": times.get("warm"),
                    "warm": json.loads((work / "warm.json").read_text()) if (work / "warm.json").is_file() else None},
        "variants": {},
    }
    for variant in VARIANTS:
        req = request(args, variant)
        rows = read_jsonl(Path(req.output_dir) / "metrics.jsonl")
        if not rows and variant not in times:
            continue
        sp = variant == "shared-prefix"
        summary = variant_summary(rows, counts["videos"] if sp else counts["samples"],
                                  args.sp_global_batch if sp else args.global_batch, args.ngpu, args.target_gpus,
                                  REFERENCE["videos"] if sp else REFERENCE["samples"], complete=not args.max_steps)
        summary.update(process_wall_s=times.get(variant), peak_mem_gib=peak_memory_gib(work / f"mem-{variant}.csv"))
        doc["variants"][variant] = summary
    return doc


def table(doc: dict[str, Any]) -> str:
    t = doc["target_gpus"]
    head = (f"recipe scale on {doc['ngpu']} x {doc['card']}: {doc['data']['samples']} samples / "
            f"{doc['data']['videos']} videos; reference {REFERENCE['epoch_min']} min on "
            f"{REFERENCE['gpus']} x {REFERENCE['card']}")
    one_off = doc["one_off"]
    lines = [head, f"one-off: synth {one_off['synth_s']} s, prepare {one_off['prepare_s']} s, "
                   f"frame-cache warm-up {one_off['warm_s']} s (not in the epoch times)",
             f"{'variant':<14} {'step s':>8} {'steps/ep':>8} {'epoch min':>10} {f'@{t} GPUs':>9} {'ref@' + str(t):>8} "
             f"{'samples/s':>10} {'MFU':>7} {'peak GiB':>9} {'data wait':>9}"]
    for name, v in doc["variants"].items():
        if "error" in v:
            lines.append(f"{name:<14} {v['error']}")
            continue
        mfu = f"{v['mfu']:.1%}" if v["mfu"] is not None else "-"
        kind = "" if v["epoch_measured"] else "*"
        lines.append(f"{name:<14} {v['step_s_mean']:>8.2f} {v['steps_per_epoch']:>8} {v['epoch_min']:>9.1f}{kind} "
                     f"{v[f'epoch_min_on_{t}_gpus']:>9.1f} {v[f'epoch_min_reference_shape_on_{t}_gpus']:>8.1f} "
                     f"{v['samples_per_s']:>10.2f} {mfu:>7} {v['peak_mem_gib'] or '-':>9} "
                     f"{format(v['data_wait_frac'], '.1%') if v.get('data_wait_frac') is not None else '-':>9}")
    lines.append("* projected from the timed steps (--max-steps); ref@N: the reference's 341 videos x 15 questions")
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("argv", "summarize"))
    p.add_argument("what", nargs="?", choices=("warm", *VARIANTS), help="argv: which command")
    p.add_argument("--work", default="runs/recipe_scale", help="working directory of the run")
    p.add_argument("--ngpu", type=int, default=8)
    p.add_argument("--target-gpus", type=int, default=8, help="GPU count to project the epoch to")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--global-batch", type=int, default=128, help="per-question: questions per optimizer step")
    p.add_argument("--sp-global-batch", type=int, default=8, help="shared-prefix: videos per optimizer step")
    p.add_argument("--max-steps", type=int, default=0, help="0: one full epoch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer override")
    p.add_argument("--workers", type=int, default=1, help="warm: decoding processes")
    p.add_argument("--python", default=sys.executable, help="warm: the interpreter to run")
    p.add_argument("--out", default=None, help="summarize: JSON path")
    args = p.parse_args(argv)
    if args.action == "argv" and not args.what:
        p.error("argv needs one of: warm, " + ", ".join(VARIANTS))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.action == "argv":
        if args.what == "warm":
            out = warm_argv(request(args, VARIANTS[0]), args.workers, args.python)
        else:
            out = train_argv(request(args, args.what), dict(os.environ))
        print("\n".join(out))
        return 0
    doc = summarize(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
