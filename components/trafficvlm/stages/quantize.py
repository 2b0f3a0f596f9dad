"""`trafficvlm quantize` and `trafficvlm export`: FP8 checkpoints with an accuracy gate; deployable bundles.

    trafficvlm quantize runs/sft/final --out runs/sft/final-fp8                  # FP8 W8A8, verified
    trafficvlm quantize runs/sft/final --out runs/sft/final-fp8 \\
        --gate data/llava/environment_mcq_llava_val.json --media-dir data/wts/videos/val --max-drop 1
    trafficvlm export runs/sft/final-fp8 --out deploy/wts-fp8 --target vllm      # + DEPLOY.md

From Python (the KFP component shell):

    from trafficvlm.stages.quantize import run_quantize, run_export
    result = run_quantize("runs/sft/final", "runs/sft/final-fp8", data="val.json", media_dir="videos/val",
                          reference="runs/eval", max_drop=1.0)    # reference: the source's eval results
    result.passed, result.accuracy, result.out_dir
    run_export("runs/sft/final-fp8", "deploy/wts-fp8", target="nim")

The gate scores the FP8 model on the same questions as the source (the source's results directory from
`trafficvlm eval`, or a fresh eval of the source) and compares them pairwise (`trafficvlm compare`: delta,
95% CI, McNemar). It fails when accuracy drops by more than `--max-drop` percentage points; a negative value
demands an improvement. The outcome is recorded in the checkpoint's quantize_report.json and trafficvlm.json,
and `trafficvlm export` refuses a checkpoint whose gate failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  trafficvlm quantize runs/sft/final --out runs/sft/final-fp8
  trafficvlm quantize runs/sft/final --out runs/sft/final-fp8 --scheme fp8-block --device cuda
  trafficvlm quantize runs/sft/final --out runs/sft/final-fp8 \\
      --gate data/llava/environment_mcq_llava_val.json --media-dir data/wts/videos/val --max-drop 1
  trafficvlm quantize runs/sft/final --out runs/sft/final-fp8 --gate val.json --media-dir videos/val \\
      --reference runs/eval-sft            # reuse the source's eval results (same data) instead of re-scoring
exit status: 0 done (and the gate passed), 1 the gate failed, 2 bad input or a checkpoint that fails its
verification against the source (vision tower output, logits).
"""

EXPORT_EPILOG = """\
examples:
  trafficvlm export runs/sft/final-fp8 --out deploy/wts-fp8 --target vllm --media-dir /data/wts/videos
  trafficvlm export runs/sft/final-fp8 --out deploy/wts-fp8 --target nim --port 8000
  trafficvlm export runs/sft/final --out deploy/wts-bf16 --target vss --base-model /models/Cosmos-Reason1-7B
"""


@dataclass
class QuantizeResult:
    """What the pipeline reads: where the FP8 model is, whether the gate passed, the FP8 accuracy."""

    out_dir: str
    report: dict[str, Any]
    gate: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.gate is None or bool(self.gate["passed"])

    @property
    def accuracy(self) -> float | None:
        return None if self.gate is None else self.gate["accuracy_fp8"]


@dataclass
class GateSpec:
    """The accuracy gate's inputs (contract: the same questions for source and FP8 model)."""

    data: str
    media_dir: str
    max_drop: float = 1.0                 # percentage points of accuracy
    reference: str | None = None          # the source's eval results dir; None: evaluate the source here
    out: str | None = None                # where the evals and compare.json go (default: OUT + "-gate")
    limit: int | None = None
    eval_overrides: dict[str, Any] = field(default_factory=dict)


def run_quantize(model: str | Path, out: str | Path, *, scheme: str = "fp8-dynamic", device: str = "auto",
                 data: str | None = None, media_dir: str | None = None, max_drop: float = 1.0,
                 reference: str | None = None, gate_out: str | None = None, limit: int | None = None,
                 overwrite: bool = False, logits_tol: float | None = None, progress: bool = True,
                 on_note=print) -> QuantizeResult:
    """Quantize (verified against the source) and, with `data`, run the accuracy gate."""
    from trafficvlm import quantize

    if (data is None) != (media_dir is None):
        raise ValueError("the gate needs both data (--gate) and media_dir (--media-dir)")
    report = quantize.quantize(model, out, scheme=scheme, device=device, overwrite=overwrite,
                               logits_tol=logits_tol, on_note=on_note)
    on_note(quantize.format_report(report))
    if data is None:
        return QuantizeResult(str(out), report)
    spec = GateSpec(data=data, media_dir=media_dir, max_drop=max_drop, reference=reference, out=gate_out,
                    limit=limit, eval_overrides={"device": device, "dtype": "bfloat16"})
    gate = run_gate(model, out, spec, overwrite=overwrite, progress=progress, on_note=on_note)
    _record_gate(Path(out), gate)
    return QuantizeResult(str(out), report, gate)


def run_gate(source: str | Path, quantized: str | Path, spec: GateSpec, *, overwrite: bool = False,
             progress: bool = True, on_note=print) -> dict[str, Any]:
    """Evaluate the FP8 model (and the source, unless `spec.reference`), compare pairwise, decide."""
    from trafficvlm.report import format_compare
    from trafficvlm.stages.evaluate import run_compare, run_eval

    if spec.reference and not (Path(spec.reference) / "results.json").is_file():
        raise FileNotFoundError(f"{spec.reference}: no results.json (pass a `trafficvlm eval` results directory)")
    root = Path(spec.out or f"{quantized}-gate")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root}: gate directory exists and is not empty (pass --overwrite, or --gate-out)")
        shutil.rmtree(root)
    common = dict(data=spec.data, media_dir=spec.media_dir, limit=spec.limit, **spec.eval_overrides)
    reference = Path(spec.reference) if spec.reference else root / "source"
    if spec.reference is None:
        on_note(f"gate: scoring the source {source}")
        run_eval(model=str(source), out=str(reference), progress=progress, on_note=on_note, **common)
    on_note(f"gate: scoring the FP8 model {quantized}")
    run_eval(model=str(quantized), out=str(root / "fp8"), progress=progress, on_note=on_note, **common)
    compared = run_compare([reference, root / "fp8"], root / "compare")
    on_note(format_compare(compared))
    gate = decide(compared, spec.max_drop)
    gate.update(reference=str(reference), results=str(root / "fp8"), compare=str(root / "compare" / "compare.json"))
    (root / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")
    on_note(format_gate(gate))
    return gate


def decide(compared: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """The gate's verdict from `run_compare`'s result: drop = source - FP8 accuracy, in points."""
    c = compared["comparisons"][0]
    drop = 0.0 - 100.0 * c["delta"]  # 0.0 - : no "-0.00" when nothing changed
    return {"passed": drop <= max_drop, "max_drop_points": max_drop, "drop_points": round(drop, 4),
            "accuracy_source": c["accuracy_a"], "accuracy_fp8": c["accuracy_b"], "paired_questions": c["n"],
            "unpaired": {"only_source": c["only_in_a"], "only_fp8": c["only_in_b"]},
            "ci_points": [round(0.0 - 100.0 * c["ci"][1], 4), round(0.0 - 100.0 * c["ci"][0], 4)],
            "p_value": c["p_value"]}


def format_gate(gate: dict[str, Any]) -> str:
    verdict = "PASSED" if gate["passed"] else "FAILED"
    lo, hi = gate["ci_points"]
    unpaired = sum(gate["unpaired"].values())
    return (f"FP8 gate {verdict}: accuracy {gate['accuracy_source']:.2%} -> {gate['accuracy_fp8']:.2%}, drop "
            f"{gate['drop_points']:+.2f} points (95% CI {lo:+.2f} .. {hi:+.2f}; "
            f"allowed <= {gate['max_drop_points']:g}) "
            f"on {gate['paired_questions']} paired questions, McNemar p = {gate['p_value']:.3g}"
            + (f"; {unpaired} questions scored by only one side left out" if unpaired else ""))


def _record_gate(out: Path, gate: dict[str, Any]) -> None:
    """The verdict travels with the checkpoint: quantize_report.json and trafficvlm.json."""
    from trafficvlm.model import read_bundle_meta, write_bundle_meta
    from trafficvlm.quantize import REPORT

    report = json.loads((out / REPORT).read_text())
    report["gate"] = gate
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    meta = read_bundle_meta(out) or {}
    meta.setdefault("quantization", {})["gate"] = gate
    write_bundle_meta(out, meta)


def run_export(model: str | Path, out: str | Path, *, target: str = "vllm", base_model: str | None = None,
               served_name: str | None = None, port: int = 8000, media_dir: str | None = None,
               overwrite: bool = False, force: bool = False):
    """A validated deployable directory plus DEPLOY.md (see trafficvlm.export)."""
    from trafficvlm import export

    return export.export(model, out, target=target, base_model=base_model,
                         served_name=served_name or export.SERVED_NAME, port=port, media_dir=media_dir,
                         overwrite=overwrite, force=force)


# --- CLI --------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="FP8 W8A8 quantization (llm-compressor), verified, with a gate",
                              description="Quantize the language model's Linear layers to FP8 (vision tower "
                                          "and lm_head stay bf16), data-free; verify the saved checkpoint "
                                          "against the source; optionally gate on eval accuracy.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="bf16/fp32 checkpoint directory (e.g. runs/sft/final)")
    p.add_argument("--out", required=True, help="output directory for the FP8 checkpoint")
    p.add_argument("--scheme", choices=("fp8-dynamic", "fp8-block"), default="fp8-dynamic",
                   help="per-channel weights + per-token activations (default), or 128x128 blocks")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and the gate directory)")
    p.add_argument("--logits-tol", type=float, metavar="REL",
                   help="largest relative L2 logits difference vs the source on the probe (default 0.15)")
    g = p.add_argument_group("accuracy gate")
    g.add_argument("--gate", metavar="VAL_JSON", help="LLaVA JSON to score source and FP8 model on")
    g.add_argument("--media-dir", help="directory the records' video paths are relative to")
    g.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="largest allowed accuracy drop in percentage points (default 1)")
    g.add_argument("--reference", metavar="RESULTS_DIR", help="the source's `trafficvlm eval` results on the "
                                                              "same data (default: score the source now)")
    g.add_argument("--gate-out", help="where the gate's evals go (default: OUT-gate)")
    g.add_argument("--limit", type=int, help="first N questions only")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main_quantize)

    e = subparsers.add_parser("export", help="a deployable bundle for vLLM, NIM or VSS, with its commands",
                              description="Copy a checkpoint into a directory vLLM / NIM / VSS load (weights + "
                                          "index, the base model's config and tokenizer files, trafficvlm.json), "
                                          "validate it, and write the serving commands to DEPLOY.md.",
                              epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", help="checkpoint directory (bf16 or FP8)")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--target", choices=("vllm", "nim", "vss"), default="vllm")
    e.add_argument("--base-model", help="take files the checkpoint lacks (tokenizer, processor, template) from here")
    e.add_argument("--served-model-name", help="name clients ask for (default cosmos-reason1-7b)")
    e.add_argument("--port", type=int, default=8000)
    e.add_argument("--media-dir", help="videos the server may read as file:// URLs (vLLM --allowed-local-media-path)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--force", action="store_true", help="export even if the checkpoint's FP8 gate failed")
    e.set_defaults(func=_main_export)


def _main_quantize(args: argparse.Namespace) -> int:
    from trafficvlm.config import ConfigError
    from trafficvlm.quantize import QuantizeError

    try:
        result = run_quantize(args.model, args.out, scheme=args.scheme, device=args.device, data=args.gate,
                              media_dir=args.media_dir, max_drop=args.max_drop, reference=args.reference,
                              gate_out=args.gate_out, limit=args.limit, overwrite=args.overwrite,
                              logits_tol=args.logits_tol, progress=not args.no_progress)
    except (QuantizeError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if result.passed else 1


def _main_export(args: argparse.Namespace) -> int:
    from trafficvlm.export import ExportError

    try:
        bundle = run_export(args.model, args.out, target=args.target, base_model=args.base_model,
                            served_name=args.served_model_name, port=args.port, media_dir=args.media_dir,
                            overwrite=args.overwrite, force=args.force)
    except (ExportError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(bundle.commands)
    print(f"wrote {bundle.path} ({len(bundle.files)} files; commands in {bundle.path / 'DEPLOY.md'})")
    return 0
