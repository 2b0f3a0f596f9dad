"""Learnability sweep for `make demo`: which synthetic data, tiny-model shape and SFT schedule reach the
accuracy floor in the fewest CPU minutes. Runs many (data, model, training) variants at once, each a real
`trafficvlm train` + `trafficvlm eval` subprocess, and writes one JSON row per run (val accuracy overall
and per question type, train loss curve, wall time). Accuracy at a given number of optimizer steps does not
depend on the device, so the sweep can run on a GPU machine (many runs share the card) or on CPU.

    python bench/demo_sweep.py --out /tmp/sweep --parallel 12 --device cuda      # the whole grid
    python bench/demo_sweep.py --out /tmp/sweep --only base,frozen --device cpu  # a few runs, on CPU
    bash bench/device.sh demo-sweep                                              # on the device machine

Variants are named in GRID below; `--only` picks a comma-separated subset. CPU seconds per step, which
decide what fits the demo's budget, are measured separately (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "configs" / "sft" / "demo_cpu.toml"

# Data variants: `trafficvlm synth` arguments (main scenarios only, as in configs/demo.toml); `style`
# names a set of renderer constants below.
DATA = {
    "d160": dict(scenarios=160, val_fraction=0.15),
    "d1000": dict(scenarios=1000, val_fraction=0.024),  # ~24 val scenarios, like d160
    "s1000": dict(scenarios=1000, val_fraction=0.024, style="salient"),
    "t400": dict(scenarios=400, val_fraction=0.06, style="distinct"),
    "t600": dict(scenarios=600, val_fraction=0.04, style="distinct"),
    "t1000": dict(scenarios=1000, val_fraction=0.024, style="distinct"),
}
# Renderer changes tried (trafficvlm.synth.render constants). "salient": a bigger pedestrian, wider
# sidewalks and lane stripes, white lamps on grey poles, magenta brake lights. "distinct": that, and no
# object near a clothing colour or the sidewalk's tan (a magenta ego car with white brake lights, dark
# trousers instead of bare legs).
STYLES = {
    "salient": dict(PED_W=0.2, PED_H=0.28, SIDEWALK_W=0.14, STRIPE_W=0.05, LAMP=(250, 250, 250),
                    POLE=(160, 160, 160), BRAKE_ON=(200, 0, 200)),
}
STYLES["distinct"] = {**STYLES["salient"], "EGO": (255, 0, 255), "BRAKE_ON": (255, 255, 255),
                      "LEGS": (40, 40, 60)}
# Tiny-model variants: trafficvlm.model.build_tiny arguments.
MODELS = {
    "m128": dict(hidden=128, layers=2, vision_depth=2, vision_hidden=32, vision_heads=2),
    "v64": dict(hidden=128, layers=2, vision_depth=2, vision_hidden=64, vision_heads=2),
    "v128": dict(hidden=128, layers=2, vision_depth=2, vision_hidden=128, vision_heads=2),
    "v64d1": dict(hidden=128, layers=2, vision_depth=1, vision_hidden=64, vision_heads=2),
    "v64L3": dict(hidden=128, layers=3, vision_depth=2, vision_hidden=64, vision_heads=2),
}
FROZEN = ["train.freeze_embeddings=true"]
LR5 = [*FROZEN, "train.lr=5e-4"]
# run name -> (data, model, train overrides on top of configs/sft/demo_cpu.toml)
GRID = {
    "t1000-v64-f960-lr5-seed1": ("t1000", "v64", [*LR5, "train.max_steps=960", "train.seed=1"]),
    "t1000-v64-f960-lr5-seed2": ("t1000", "v64", [*LR5, "train.max_steps=960", "train.seed=2"]),
    "t1000-v64-f1200-lr5": ("t1000", "v64", [*LR5, "train.max_steps=1200"]),
    "t1000-v64-f1200-lr5-seed1": ("t1000", "v64", [*LR5, "train.max_steps=1200", "train.seed=1"]),
    "t1000-v64-f960-lr3": ("t1000", "v64", [*FROZEN, "train.lr=3e-4", "train.max_steps=960"]),
    "t1000-v64-f960-lr7": ("t1000", "v64", [*FROZEN, "train.lr=7e-4", "train.max_steps=960"]),
    "t600-v64-f960-lr5": ("t600", "v64", [*LR5, "train.max_steps=960"]),
    "t600-v64-f1200-lr5": ("t600", "v64", [*LR5, "train.max_steps=1200"]),
    "t1000-v64-f960-lr5-mb4": ("t1000", "v64", [*LR5, "train.max_steps=960", "train.micro_batch=4"]),
    "t1000-v64L3-f960-lr5": ("t1000", "v64L3", [*LR5, "train.max_steps=960"]),
    "t1000-v64-960-lr5": ("t1000", "v64", ["train.lr=5e-4", "train.max_steps=960"]),
    "t1000-v64-f1200-lr5-mb4-seed2": ("t1000", "v64", [*LR5, "train.max_steps=1200", "train.micro_batch=4",
                                                       "train.seed=2"]),
}
# CPU seconds per optimizer step (what decides the demo's budget): 30 steps each, one after another, on
# two CPUs of their own (`--cpu-timing`), 2 threads like a 2-core laptop.
CPU_TIMING = {
    "cpu-v64-frozen-mb1": ("t1000", "v64", [*LR5]),
    "cpu-v64-frozen-mb4": ("t1000", "v64", [*LR5, "train.micro_batch=4"]),
    "cpu-v64-mb4": ("t1000", "v64", ["train.micro_batch=4"]),
    "cpu-m128-mb1": ("t1000", "m128", []),
}


def cli(*args: str, log: Path, threads: int) -> float:
    """Run `trafficvlm ARGS` (output to LOG); returns wall seconds; raises with the log's tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "trafficvlm.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc:
        raise RuntimeError(f"trafficvlm {args[0]} failed ({rc}):\n" + "".join(log.read_text().splitlines(True)[-20:]))
    return time.perf_counter() - t0


def make_data(name: str, out: Path) -> Path:
    root = out / "data" / name
    if not (root / "llava" / "environment_mcq_llava_val.json").is_file():
        from trafficvlm.stages.prepare import run_prepare
        from trafficvlm.synth import render, synthesize

        spec = DATA[name]
        style = STYLES.get(spec.get("style"), {})
        saved = {k: getattr(render, k) for k in style}
        for key, value in style.items():       # worker processes are forked, so they see the change
            setattr(render, key, value)
        synthesize(root / "wts", seed=0, scenarios=spec["scenarios"], normal=0, bdd=0, size=(160, 96), fps=4.0,
                   duration=4.0, val_fraction=spec["val_fraction"], workers=os.cpu_count() or 1)
        for key, value in saved.items():
            setattr(render, key, value)
        run_prepare(root / "wts", root / "llava", subsets=("environment",), check_videos=False)
    return root


def make_model(name: str, out: Path) -> Path:
    from trafficvlm.config import load_train_config
    from trafficvlm.model import build_tiny

    path = out / "models" / name
    if not (path / "config.json").is_file():
        cfg = load_train_config(DEMO_TRAIN, [])
        build_tiny(path, seed=0, spec=cfg.video, prompt=cfg.prompt, **MODELS[name])
    return path


def run_one(name: str, out: Path, device: str, threads: int, extra: list[str]) -> dict:
    from trafficvlm.demo import per_question

    data, model, overrides = GRID[name]
    overrides = [*overrides, *extra]
    root, run = out / "data" / data, out / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    llava, media = root / "llava", root / "wts" / "videos"
    row = {"run": name, "data": data, "data_spec": DATA[data], "model": model, "model_spec": MODELS[model],
           "overrides": overrides, "device": device}
    try:
        row["train_s"] = cli("train", "--config", str(DEMO_TRAIN), f"model.path={out / 'models' / model}",
                             f"data.annotation_path={llava / 'environment_mcq_llava_train.json'}",
                             f"data.media_path={media / 'train'}", f"train.output_dir={run / 'sft'}",
                             f"train.device={device}", "train.log_every=20", *overrides,
                             log=run / "train.log", threads=threads)
        row["eval_s"] = cli("eval", "--model", str(run / "sft" / "final"),
                            "--data", str(llava / "environment_mcq_llava_val.json"), "--media-dir",
                            str(media / "val"), "--out", str(run / "eval"), "--device", device, "--no-progress",
                            log=run / "eval.log", threads=threads)
        results = json.loads((run / "eval" / "results.json").read_text())
        row["val_accuracy"] = results["accuracy"]
        row["per_question"] = per_question(results)
        metrics = run / "sft" / "metrics.jsonl"
        losses = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        row["loss_curve"] = [(m["step"], round(m["loss"], 4)) for m in losses]
    except Exception as exc:  # one failed variant must not lose the others' rows
        row["error"] = str(exc)[-2000:]
    print(json.dumps({k: row.get(k) for k in ("run", "val_accuracy", "train_s", "error")}), flush=True)
    return row


def cpu_timing(name: str, out: Path, cpus: str) -> dict:
    """Median seconds per optimizer step of 30 CPU steps (the first 5 are warm-up), pinned to `cpus`."""
    import statistics

    data, model, overrides = CPU_TIMING[name]
    root, run = out / "data" / data, out / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "trafficvlm.cli", "train", "--config", str(DEMO_TRAIN),
           f"model.path={out / 'models' / model}",
           f"data.annotation_path={root / 'llava' / 'environment_mcq_llava_train.json'}",
           f"data.media_path={root / 'wts' / 'videos' / 'train'}", f"train.output_dir={run / 'sft'}",
           "train.device=cpu", "train.max_steps=30", "train.log_every=1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    with (run / "train.log").open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    row = {"run": name, "data": data, "model": model, "overrides": overrides, "cpus": cpus, "rc": rc}
    metrics = run / "sft" / "metrics.jsonl"
    if metrics.is_file():
        steps = [json.loads(line)["step_s"] for line in metrics.read_text().splitlines()][5:]
        row["cpu_step_s_median"] = statistics.median(steps) if steps else None
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated run names (default: the whole GRID)")
    ap.add_argument("--parallel", type=int, default=4, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cpu-timing", default="", metavar="CPUS",
                    help="also time CPU_TIMING's runs pinned to these CPUs (e.g. 14,15), one after another")
    ap.add_argument("--smoke", action="store_true", help="2 optimizer steps per run (checks the plumbing)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default OUT/demo_sweep.json)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(GRID)
    unknown = [n for n in names if n not in GRID]
    if unknown:
        ap.error(f"unknown runs {unknown}; known: {', '.join(GRID)}")
    os.environ.setdefault("TRAFFICVLM_CACHE", str(args.out / "cache"))
    timing = list(CPU_TIMING) if args.cpu_timing else []
    for data in sorted({GRID[n][0] for n in names} | {CPU_TIMING[n][0] for n in timing}):
        make_data(data, args.out)
    for model in sorted({GRID[n][1] for n in names} | {CPU_TIMING[n][1] for n in timing}):
        make_model(model, args.out)
    path = args.json or args.out / "demo_sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    lock = threading.Lock()

    def one(name: str) -> None:
        row = run_one(name, args.out, args.device, args.threads, ["train.max_steps=2"] if args.smoke else [])
        with lock:  # rewritten after every run: a sweep cut short keeps what finished
            rows.append(row)
            path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")

    def timed() -> None:
        for name in timing:
            row = cpu_timing(name, args.out, args.cpu_timing)
            with lock:
                rows.append(row)
                path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")

    with ThreadPoolExecutor(args.parallel + 1) as pool:
        waits = [pool.submit(timed)] + [pool.submit(one, n) for n in names]
        for w in waits:
            w.result()
    print(f"\n{'run':<30} {'data':<6} {'model':<9} {'val acc':>8} {'train s':>8} {'cpu s/step':>8}")
    for r in rows:
        acc = f"{r['val_accuracy']:.3f}" if "val_accuracy" in r else "-"
        print(f"{r['run']:<30} {r['data']:<6} {r['model']:<9} {acc:>8} {r.get('train_s', 0):8.0f}"
              f" {r.get('cpu_step_s_median') or '':>8}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
