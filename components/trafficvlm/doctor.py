"""`trafficvlm doctor`: what this environment runs with, and the known-bad combinations it is in.

    trafficvlm doctor                        # versions, devices, video backend, sampling spec, warnings
    trafficvlm doctor --json                 # the same as one JSON object (CI logs, bug reports)
    trafficvlm doctor --model runs/sft/final # the sampling spec that checkpoint's trafficvlm.json carries

Warnings name a known-bad combination (DESIGN.md "Facts about the stack") and what trafficvlm does about
it, so a user calling transformers directly knows what they would get; notes need no action. The exit code is 0 unless the report itself cannot be made.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trafficvlm.config import VideoSpec

PACKAGES = ("trafficvlm", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft",
            "llmcompressor", "compressed-tensors", "kfp", "kfp-kubernetes", "mlflow", "boto3", "av",
            "numpy", "torchvision", "flash-attn", "vllm", "qwen-vl-utils", "decord", "decord2", "torchcodec")
# Packages whose own pins on these are checked against what is installed (llmcompressor pins transformers).
PINNED = ("torch", "transformers", "compressed-tensors")
PIN_HOLDERS = ("llmcompressor", "peft", "vllm", "compressed-tensors")
# The reference clip: what the sampling spec makes of one WTS video (75 s, 1080p, 30 fps).
REFERENCE_CLIP = dict(duration=75.0, width=1920, height=1080, src_fps=30.0)


@dataclass
class Report:
    versions: dict[str, str | None]
    devices: dict[str, Any]
    video: dict[str, Any]
    spec: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def version_of(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{p: version_of(p) for p in PACKAGES}}


def devices() -> dict[str, Any]:
    import torch

    cuda = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cuda.append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1),
                     "bf16": props.major >= 8})  # Ampere and newer run bf16 matmuls natively
    return {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda, "cuda": cuda,
            "cpu_threads": torch.get_num_threads()}


def video_backend() -> dict[str, Any]:
    """PyAV (the decoder trafficvlm uses) and whether its bundled FFmpeg decodes/encodes H.264."""
    try:
        import av
    except ImportError:
        return {"pyav": None, "h264_decode": False, "h264_encode": False}
    ffmpeg = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    return {"pyav": av.__version__, "ffmpeg": ffmpeg, "h264_decode": _codec(av, "h264", "r"),
            "h264_encode": _codec(av, "libx264", "w")}


def _codec(av, name: str, mode: str) -> bool:
    try:
        av.codec.Codec(name, mode)
        return True
    except Exception:  # av raises UnknownCodecError (a ValueError) or FFmpegError depending on the build
        return False


def sampling_spec(model_dir: str | None) -> dict[str, Any]:
    """The effective VideoSpec (defaults, or the checkpoint's) and what it makes of the reference clip."""
    from trafficvlm import video
    from trafficvlm.model import bundle_video_spec

    spec, source = VideoSpec(), "VideoSpec defaults"
    if model_dir:
        found = bundle_video_spec(model_dir)
        spec, source = (found, f"{Path(model_dir) / 'trafficvlm.json'}") if found else \
            (spec, f"VideoSpec defaults ({model_dir} has no trafficvlm.json)")
    plan = video.plan(spec=spec, **REFERENCE_CLIP)
    return {"source": source, "spec": spec.to_dict(),
            "reference_clip": {**REFERENCE_CLIP, "frames": plan.frames, "frame_size": f"{plan.width}x{plan.height}",
                               "grid_thw": list(plan.grid_thw), "vision_tokens": plan.vision_tokens}}


# --- known-bad combinations ---------------------------------------------------------------------------------

def check(report: Report) -> None:
    """Fill report.warnings / report.notes from DESIGN.md's facts about the stack."""
    v = report.versions
    _transformers_rules(v.get("transformers"), report)
    _pins(report)
    for name in ("decord", "decord2", "torchcodec"):
        if v.get(name):
            report.warnings.append(f"{name} {v[name]} is installed: trafficvlm decodes with PyAV only (video.py), "
                                "but transformers' own load_video may pick it; do not mix the two in one run")
    if not v.get("torchvision"):
        report.notes.append("torchvision is not installed: transformers' AutoProcessor cannot build the Qwen2-VL "
                            "video processor; trafficvlm's load_processor/patchify_video do not need it")
    if not v.get("flash-attn"):
        report.notes.append("flash-attn is not installed: irrelevant, trafficvlm uses sdpa (packed batches too)")
    _device_checks(report)
    if not report.video.get("h264_decode"):
        report.warnings.append("PyAV is missing or its FFmpeg cannot decode H.264: WTS videos will not load")


def _transformers_rules(version: str | None, report: Report) -> None:
    if version is None:
        report.warnings.append("transformers is not installed")
        return
    from packaging.version import Version

    tv = Version(version)
    if tv >= Version("5.3"):
        report.warnings.append(f"transformers {version} restarts text after a vision block at s + max(h, w); "
                            "Qwen2.5-VL was trained with max + 1: trafficvlm passes position_ids itself (rope.py)")
    if Version("5.0") <= tv <= Version("5.17.0"):
        report.warnings.append(f"transformers {version} truncates second_per_grid to an integer (time collapses at "
                            "fps > 2): trafficvlm passes position_ids itself (rope.py)")
    elif tv > Version("5.17.0"):
        report.warnings.append(f"transformers {version} is newer than the 5.17 source the stack facts were "
                               "checked against; rerun tests/test_processing.py and tests/test_rope.py")


def _pins(report: Report) -> None:
    """Packages that pin torch / transformers / compressed-tensors to versions other than the installed."""
    from packaging.requirements import InvalidRequirement, Requirement

    for holder in PIN_HOLDERS:
        if not version_of(holder):
            continue
        for line in md.requires(holder) or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            have = version_of(req.name)
            if req.name in PINNED and req.marker is None and have and not req.specifier.contains(have, prereleases=True):
                report.warnings.append(f"{holder} requires {req.name}{req.specifier} but {have} is installed")


def _device_checks(report: Report) -> None:
    cuda = report.devices.get("cuda") or []
    if not cuda:
        report.notes.append("no CUDA device: CPU runs suit the tiny model only")
    for dev in cuda:
        if not dev["bf16"]:
            report.warnings.append(f"cuda:{dev['index']} {dev['name']} (sm {dev['capability']}) has no native bf16: "
                                   "train in fp32 or use an Ampere-or-newer GPU")


def make_report(model_dir: str | None = None) -> Report:
    report = Report(versions(), devices(), video_backend(), sampling_spec(model_dir))
    check(report)
    return report


# --- CLI ----------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  trafficvlm doctor
  trafficvlm doctor --json > doctor.json
  trafficvlm doctor --model models/tiny
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="versions, devices, video backend, known-bad combinations",
                              description="Report the environment trafficvlm runs in and warn about "
                                          "combinations known to give wrong results.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", metavar="DIR", help="checkpoint whose trafficvlm.json gives the sampling spec")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from dataclasses import asdict

    report = make_report(args.model)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(render(report))
    return 0


def render(report: Report) -> str:
    v = report.versions
    lines = ["versions:"] + [f"  {k:<20} {val or '-'}" for k, val in v.items()]
    cuda = report.devices["cuda"]
    lines.append("devices:")
    lines += [f"  cuda:{d['index']} {d['name']} sm {d['capability']} {d['memory_gib']} GiB bf16={d['bf16']}"
              for d in cuda] or [f"  CPU only ({report.devices['cpu_threads']} threads)"]
    vid = report.video
    lines.append(f"video: PyAV {vid.get('pyav') or '-'}, h264 decode {vid['h264_decode']}, "
                 f"encode {vid['h264_encode']}")
    spec, ref = report.spec, report.spec["reference_clip"]
    lines.append(f"sampling spec ({spec['source']}): {spec['spec']}")
    lines.append(f"  a {ref['duration']:g} s {ref['width']}x{ref['height']} clip -> {ref['frames']} frames at "
                 f"{ref['frame_size']}, grid {ref['grid_thw']}, {ref['vision_tokens']} vision tokens")
    lines += [f"warning: {w}" for w in report.warnings] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
