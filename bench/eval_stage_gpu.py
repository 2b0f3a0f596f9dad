"""GPU check of the eval and quantize stages as the pipeline calls them (a correctness check, not a speed
benchmark): synthetic WTS clips of several lengths, the tiny model, `run_eval` on CUDA with the compiled
text step and CUDA-graph branches (the default) against `--no-compile-text`, then `run_quantize` with its
accuracy gate, whose two evaluations run the FP8 checkpoint through `fp8_linear` on the same engine.

    PYTHONPATH=components python3 bench/eval_stage_gpu.py --out bench/results/eval_stage_gpu.json
    bash bench/device.sh eval-stage                       # on the device machine
    PYTHONPATH=components python3 bench/eval_stage_gpu.py --dp 2    # + `torchrun -m trafficvlm eval` on 2 GPUs

`--dp N` also runs the eval CLI data-parallel under torchrun on N GPUs (ranks past the first put their
model, compiled kernels and CUDA graphs on cuda:1...) and checks its merged predictions against the
one-GPU run.

Exit status 1 when the compiled and uncompiled evaluations disagree beyond bf16 noise (letter
probabilities differ by more than --tol, or a different letter wins where the top two are not within it),
or when a stage fails. Random tiny weights: accuracies mean nothing, agreement does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "components"))


def predictions(out: Path) -> dict[str, dict]:
    from trafficvlm.report import PREDICTIONS, read_predictions

    return {p.id: {"predicted": p.predicted, "probs": p.letter_probs} for p in read_predictions(out / PREDICTIONS)}


def agreement(a: dict[str, dict], b: dict[str, dict], tol: float) -> dict:
    """Largest letter-probability difference, and questions whose winner differs although a's top two are
    further apart than `tol` (a real disagreement, not a near tie flipped by rounding)."""
    assert a.keys() == b.keys(), "the two runs scored different questions"
    worst, flips = 0.0, []
    for qid in a:
        pa, pb = a[qid]["probs"], b[qid]["probs"]
        worst = max(worst, max(abs(pa[k] - pb[k]) for k in pa))
        top = sorted(pa.values(), reverse=True)
        if a[qid]["predicted"] != b[qid]["predicted"] and (len(top) < 2 or top[0] - top[1] > tol):
            flips.append(qid)
    return {"questions": len(a), "max_letter_prob_diff": worst, "real_flips": flips,
            "same_prediction": sum(a[q]["predicted"] == b[q]["predicted"] for q in a)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from trafficvlm.model import build_tiny
    from trafficvlm.stages.evaluate import run_eval
    from trafficvlm.stages.prepare import run_prepare
    from trafficvlm.stages.quantize import run_quantize
    from trafficvlm.synth import synthesize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/trafficvlm-eval-stage")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_stage_gpu.json"))
    parser.add_argument("--tol", type=float, default=0.02, help="bf16 tolerance on letter probabilities")
    parser.add_argument("--dp", type=int, default=0, help="also run the eval CLI under torchrun on this many GPUs")
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same steps as a smoke test")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    synthesize(work / "wts", seed=0, scenarios=6, normal=0, bdd=0, size=(160, 96), fps=4.0, duration=8.0,
               val_fraction=0.5, progress=False)
    run_prepare(work / "wts", work / "llava", check_videos=False)
    tiny = build_tiny(work / "tiny", seed=0)
    data, media = work / "llava" / "environment_mcq_llava_val.json", work / "wts" / "videos" / "val"
    common = dict(model=str(tiny), data=str(data), media_dir=str(media), device=args.device, progress=False)

    runs, seconds = {}, {}
    for name, extra in (("compiled text + CUDA graphs (default)", {}),
                        ("--no-compile-text", {"compile_text": False})):
        out = work / "eval" / name.split()[0].strip("-")
        t0 = time.perf_counter()
        run_eval(out=str(out), **common, **extra)
        seconds[name] = round(time.perf_counter() - t0, 1)
        runs[name] = predictions(out)
    default, plain = runs.values()
    check = agreement(default, plain, args.tol)
    dp_check = None
    if args.dp > 1:
        import os
        import subprocess

        out = work / "eval" / f"dp{args.dp}"
        t0 = time.perf_counter()
        subprocess.run(["torchrun", "--standalone", f"--nproc-per-node={args.dp}", "-m", "trafficvlm", "eval",
                        "--model", str(tiny), "--data", str(data), "--media-dir", str(media), "--out", str(out),
                        "--device", "cuda", "--no-progress"], check=True, env={**os.environ})
        seconds[f"torchrun eval on {args.dp} GPUs"] = round(time.perf_counter() - t0, 1)
        dp_check = agreement(default, predictions(out), args.tol)

    t0 = time.perf_counter()
    gate = run_quantize(tiny, work / "fp8", device=args.device, data=str(data), media_dir=str(media), max_drop=100.0,
                        gate_out=str(work / "gate"), progress=False)
    seconds["quantize + gate (two evaluations)"] = round(time.perf_counter() - t0, 1)
    result = {"card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d"),
              "seconds": seconds, "compiled_vs_uncompiled": check, "data_parallel_vs_one_gpu": dp_check,
              "gate": {"passed": gate.passed, "fp8_accuracy": gate.accuracy, "report": gate.gate},
              "fp8_backend_note": "see the run's log: quantize's loader names the FP8 matmul route"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("card", "seconds", "compiled_vs_uncompiled")}, indent=2))
    print(f"gate passed: {gate.passed}, FP8 accuracy {gate.accuracy}")
    if dp_check:
        print(f"data-parallel on {args.dp} GPUs vs one GPU: {json.dumps(dp_check)}")
    ok = all(not c["real_flips"] and c["max_letter_prob_diff"] <= args.tol for c in (check, dp_check) if c)
    print("OK" if ok else "DISAGREEMENT beyond bf16 noise")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
