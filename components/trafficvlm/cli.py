"""`trafficvlm` — one subcommand per pipeline stage, for local use and debugging.

Each module listed in COMMANDS defines `add_cli(subparsers)`, which adds its subcommand and sets
`func` to a function taking the parsed args and returning an exit code. No logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The order is the order of `trafficvlm --help`: the pipeline's stages first, then tools.
COMMANDS = (
    "trafficvlm.synth.cli",            # synth: render a synthetic dataset in the WTS layout
    "trafficvlm.stages.ingest",        # ingest / upload: S3 <-> a WTS-layout directory
    "trafficvlm.stages.prepare",       # prepare: WTS -> LLaVA MCQ JSON + validation report
    "trafficvlm.stages.sft",           # train: fine-tune (one process, or under torchrun)
    "trafficvlm.launcher",             # sft job: the PyTorchJob the cluster stage creates
    "trafficvlm.stages.evaluate",      # eval, compare: score checkpoints and endpoints
    "trafficvlm.stages.quantize",      # quantize, export: FP8 PTQ with a gate; deployable bundles
    "trafficvlm.stages.promote",       # promote, champion: the gate; MLflow registry aliases
    "trafficvlm.stages.rollout",       # rollout: GitOps / Helm promotion of a checkpoint
    "trafficvlm.serve.cli",            # serve, ask: a local OpenAI-compatible endpoint and its client
    "trafficvlm.pipeline_cli",         # pipeline compile|run|submit|schedule
    "trafficvlm.demo",                 # demo: the whole pipeline locally on the embedded default
    "trafficvlm.tokens",               # tokens: the vision-token budget planner
    "trafficvlm.cache_cli",            # cache warm: decode every clip once into the frame cache
    "trafficvlm.model",                # build-tiny: a tiny Qwen2.5-VL checkpoint, offline
    "trafficvlm.doctor",               # doctor: versions, devices, backends, known-bad combinations
)

EPILOG = """\
examples:
  trafficvlm synth data/wts --scenarios 8 --seed 0          # a synthetic WTS tree
  trafficvlm prepare data/wts --out data/llava               # LLaVA MCQ JSON + report
  trafficvlm tokens --duration 75 --resolution 1920x1080 --src-fps 30 --fps 1 --max-pixels 81920
  trafficvlm build-tiny models/tiny                          # a tiny Qwen2.5-VL checkpoint
  trafficvlm train --config configs/sft/tiny_cpu.toml train.max_steps=50
  trafficvlm eval --model runs/sft/final --data data/llava/environment_mcq_llava_val.json --media-dir data/wts/videos/val --out runs/eval
  trafficvlm pipeline compile                                # the YAML to upload in the Kubeflow UI
  trafficvlm demo                                            # everything, locally, on a CPU

Run `trafficvlm COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trafficvlm",
        description="Post-train video-language models on traffic scenes: the stages of the trafficvlm "
                    "Kubeflow pipeline, runnable one at a time.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not written yet
                continue
            raise
        module.add_cli(sub)
    return parser


def _version() -> str:
    from trafficvlm import __version__
    return f"trafficvlm {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
