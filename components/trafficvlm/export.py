"""Deployable bundles: a checkpoint copied into a directory vLLM, NIM and VSS load, validated, with the exact
commands that serve it written to DEPLOY.md.

    trafficvlm export runs/sft/final-fp8 --out deploy/wts-fp8 --target vllm --media-dir /data/wts/videos

    >>> from trafficvlm.export import export, validate_bundle
    >>> bundle = export("runs/sft/final-fp8", "deploy/wts-fp8", target="nim")
    >>> print(bundle.commands)                      # also in deploy/wts-fp8/DEPLOY.md
    >>> validate_bundle("deploy/wts-fp8")           # [] when every required file is present and consistent

A bundle (DESIGN.md contract 4): the weights (*.safetensors) and their index, config.json in the layout the
checkpoint carries (our stages copy the base model's original, which older serving stacks read; transformers
5 writes a newer one), tokenizer, processor config, chat template, generation config and trafficvlm.json,
whose video spec becomes the server's frame sampling (vLLM samples 32 frames per video unless told).
"""

from __future__ import annotations

import json
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("vllm", "nim", "vss")
SERVED_NAME = "cosmos-reason1-7b"
NIM_IMAGE = "nvcr.io/nim/nvidia/cosmos-reason1-7b:1.4.0"    # as helm/trafficvlm-nim/values.yaml
NIM_MOUNT = "/opt/trafficvlm/model"                          # as helm/values/nim-finetuned.yaml
MAX_MODEL_LEN = 16384      # a 75 s clip at fps 1 is ~3.4k video tokens; room for prompt and answer
INDEX = "model.safetensors.index.json"
REQUIRED_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "generation_config.json", "trafficvlm.json")
EXTRA_FILES = ("quantize_report.json", "recipe.yaml")
DEPLOY = "DEPLOY.md"


class ExportError(ValueError):
    """A bundle that would not deploy; the message names the file and the reason."""


@dataclass
class Bundle:
    """An exported bundle: where it is, for which target, its files, and the commands that serve it."""

    path: Path
    target: str
    files: list[str]
    commands: str


def export(model: str | Path, out: str | Path, *, target: str = "vllm", base_model: str | Path | None = None,
           served_name: str = SERVED_NAME, port: int = 8000, media_dir: str | None = None,
           overwrite: bool = False, force: bool = False) -> Bundle:
    """Copy `model` into `out` (files it lacks from `base_model`), validate, write DEPLOY.md. The bundle is
    assembled in a temporary directory and appears at `out` only once valid."""
    from trafficvlm.model import check_checkpoint, read_bundle_meta

    if target not in TARGETS:
        raise ExportError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    model, out = check_checkpoint(model), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    gate = ((read_bundle_meta(model) or {}).get("quantization") or {}).get("gate")
    if gate and not gate.get("passed") and not force:
        raise ExportError(f"{model}: its FP8 accuracy gate failed (drop {gate.get('drop_points')} points > "
                          f"{gate.get('max_drop_points')}); pass --force to export it anyway")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _assemble(model, tmp, Path(base_model) if base_model else None)
    problems = validate_bundle(tmp)
    if problems:
        shutil.rmtree(tmp)
        raise ExportError(f"{model}: the bundle would not deploy:\n  " + "\n  ".join(problems))
    final = out.resolve()
    commands = deploy_commands(target, final, read_bundle_meta(tmp), served_name=served_name, port=port,
                               media_dir=media_dir)
    (tmp / DEPLOY).write_text(_deploy_md(target, final, read_bundle_meta(tmp), commands, port), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return Bundle(final, target, sorted(files + [DEPLOY]), commands)


def _assemble(model: Path, dst: Path, base: Path | None) -> list[str]:
    """Weights and index from the checkpoint only; every other file from the checkpoint, else the base."""
    from trafficvlm.checkpoint import BASE_FILES

    own = [p.name for p in sorted(model.glob("*.safetensors"))] + [INDEX]
    shared = ["trafficvlm.json", *EXTRA_FILES, *BASE_FILES]
    copied = []
    for name in own + shared:
        source = model / name
        if not source.is_file() and base is not None and name in shared:
            source = base / name
        if source.is_file():
            shutil.copy2(source, dst / name)
            copied.append(name)
    if INDEX not in copied:
        write_index(dst)
        copied.append(INDEX)
    return copied


# --- weights index ---------------------------------------------------------------------------------------

def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), without torch."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ExportError(f"{path}: truncated (no safetensors header)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header


def write_index(path: str | Path) -> Path:
    """model.safetensors.index.json for the *.safetensors in `path` (Hugging Face's sharded layout, which
    every loader reads whether there is one shard or many)."""
    path = Path(path)
    weight_map, total = {}, 0
    for file in sorted(path.glob("*.safetensors")):
        for key, info in safetensors_header(file).items():
            weight_map[key] = file.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path / INDEX


# --- validation ------------------------------------------------------------------------------------------

def validate_bundle(path: str | Path) -> list[str]:
    """Everything that would stop a bundle from deploying (an empty list: none found)."""
    path = Path(path)
    docs, problems = {}, []
    for name in REQUIRED_JSON:
        try:
            docs[name] = json.loads((path / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{name}: missing")
        except json.JSONDecodeError as exc:
            problems.append(f"{name}: not valid JSON ({exc})")
    problems += _check_template(path, docs.get("tokenizer_config.json") or {})
    problems += _check_config(docs.get("config.json"))
    problems += _check_weights(path)
    problems += _check_meta(docs.get("trafficvlm.json"))
    qc = (docs.get("config.json") or {}).get("quantization_config")
    if qc:
        from trafficvlm.quantize import check_files

        problems += check_files(path)
    return problems


def _check_template(path: Path, tokenizer_config: dict[str, Any]) -> list[str]:
    if (path / "chat_template.jinja").is_file() or tokenizer_config.get("chat_template"):
        return []
    if (path / "chat_template.json").is_file():
        try:
            if json.loads((path / "chat_template.json").read_text()).get("chat_template"):
                return []
        except json.JSONDecodeError as exc:
            return [f"chat_template.json: not valid JSON ({exc})"]
    return ["chat template: none (chat_template.jinja, chat_template.json or tokenizer_config.json)"]


def _check_config(config: dict[str, Any] | None) -> list[str]:
    from trafficvlm.model import FAMILIES

    if config is None:
        return []
    problems = [] if config.get("model_type") in FAMILIES else \
        [f"config.json: model_type {config.get('model_type')!r} is not one of {sorted(FAMILIES)}"]
    if not config.get("architectures"):
        problems.append("config.json: no 'architectures' (vLLM picks the model class from it)")
    return problems


def _check_weights(path: Path) -> list[str]:
    """The index names exactly the tensors the files hold, each in the file that holds it."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return ["weights: no *.safetensors"]
    try:
        index = json.loads((path / INDEX).read_text())["weight_map"]
    except FileNotFoundError:
        return [f"{INDEX}: missing"]
    except (json.JSONDecodeError, KeyError) as exc:
        return [f"{INDEX}: unreadable ({exc})"]
    problems, held = [], {}
    for file in files:
        try:
            held.update({key: file.name for key in safetensors_header(file)})
        except ExportError as exc:
            problems.append(str(exc))
    missing_files = sorted({f for f in index.values() if not (path / f).is_file()})
    problems += [f"{INDEX}: names {f}, which is missing" for f in missing_files]
    unindexed, phantom = sorted(set(held) - set(index)), sorted(set(index) - set(held))
    misplaced = sorted(k for k in set(held) & set(index) if held[k] != index[k])
    for what, keys in (("tensors not in the index", unindexed), ("index entries with no tensor", phantom),
                       ("tensors in another file than the index says", misplaced)):
        if keys:
            problems.append(f"{INDEX}: {len(keys)} {what} (e.g. {keys[0]})")
    return problems


def _check_meta(meta: dict[str, Any] | None) -> list[str]:
    from trafficvlm.config import VideoSpec

    if meta is None:
        return []
    try:
        VideoSpec(**meta["video"])
    except KeyError:
        return ["trafficvlm.json: no 'video' spec (the server would not know how to sample frames)"]
    except (TypeError, ValueError) as exc:
        return [f"trafficvlm.json: bad 'video' spec ({exc})"]
    return []


# --- commands --------------------------------------------------------------------------------------------

def deploy_commands(target: str, path: Path, meta: dict[str, Any], *, served_name: str = SERVED_NAME,
                    port: int = 8000, media_dir: str | None = None) -> str:
    """The shell commands that serve bundle `path` on `target`, with its video spec."""
    from trafficvlm.config import VideoSpec
    from trafficvlm.serve.client import spec_fields

    fields = spec_fields(VideoSpec(**meta["video"]))  # what our clients send per request, as server defaults
    if target == "vllm":
        args = [("--served-model-name", served_name), ("--port", str(port)), ("--max-model-len", str(MAX_MODEL_LEN)),
                ("--limit-mm-per-prompt", json.dumps({"video": 1})),
                ("--media-io-kwargs", json.dumps(fields["media_io_kwargs"])),
                ("--mm-processor-kwargs", json.dumps(fields["mm_processor_kwargs"]))]
        if media_dir:
            args.append(("--allowed-local-media-path", str(Path(media_dir).resolve())))
        return _continued(["vllm", "serve", str(path)], args)
    if target == "nim":
        args = [("--gpus", "all"), ("--shm-size", "16g"), ("-e", "NGC_API_KEY"),
                ("-e", f"NIM_MODEL_NAME={NIM_MOUNT}"), ("-e", f"NIM_SERVED_MODEL_NAME={served_name}"),
                ("-e", f"NIM_MAX_MODEL_LEN={MAX_MODEL_LEN}"), ("-v", f"{path}:{NIM_MOUNT}:ro"),
                ("-v", "$HOME/.cache/nim:/opt/nim/.cache"), ("-p", f"{port}:8000")]
        return "export NGC_API_KEY=...   # your key, from your secret store; never on the command line\n" + \
            _continued(["docker", "run", "--rm"], args, tail=[NIM_IMAGE])
    return "\n".join(["export VLM_MODEL_TO_USE=cosmos-reason1", f"export MODEL_PATH={shlex.quote(str(path))}"])


def _continued(head: list[str], args: list[tuple[str, str]], tail: list[str] = ()) -> str:
    """One command, one option per line (`$HOME` left for the shell to expand)."""
    quote = lambda v: v if v.startswith("$HOME") else shlex.quote(v)  # noqa: E731
    lines = [" ".join(quote(h) for h in head)] + [f"  {flag} {quote(value)}" for flag, value in args]
    lines += [f"  {quote(t)}" for t in tail]
    return " \\\n".join(lines)


def _deploy_md(target: str, path: Path, meta: dict[str, Any], commands: str, port: int) -> str:
    q = meta.get("quantization") or {}
    gate = q.get("gate")
    lines = [f"# Deploying {path.name} ({target})", "",
             f"- base model: {meta.get('base_model', 'unknown')}",
             "- weights: " + (f"FP8 {q['scheme']} (compressed-tensors; vision tower and lm_head bf16)" if q
                              else "unquantized"),
             f"- video spec (trafficvlm.json): {json.dumps(meta['video'])}"]
    if gate:
        lines.append(f"- FP8 gate: {'passed' if gate['passed'] else 'FAILED'}, accuracy {gate['accuracy_source']:.2%}"
                     f" -> {gate['accuracy_fp8']:.2%} (allowed drop {gate['max_drop_points']:g} points)")
    lines += ["", "## Serve", "", "```sh", commands, "```", "", _NOTES[target], ""]
    if target != "vss":
        lines += ["## Smoke test", "", "```sh", f"curl -s http://127.0.0.1:{port}/v1/models",
                  f"trafficvlm eval --engine openai --endpoint http://127.0.0.1:{port}/v1 \\",
                  f"  --model {shlex.quote(str(path))} \\",
                  "  --data VAL_JSON --media-dir VIDEO_DIR --out runs/eval-served", "```", ""]
    return "\n".join(lines)


_NOTES = {
    "vllm": "vLLM reads the FP8 scheme from config.json (no `--quantization` flag). The sampling flags make the "
            "server sample frames as the model was trained; clients (`trafficvlm eval --engine openai`, "
            "`trafficvlm ask`) also send them per request. Known difference: vLLM's loader samples "
            "floor(duration x fps) frames where qwen-vl-utils (training) rounds down to an even count, so a 75 s "
            "clip gives 75 frames (38 temporal groups once padded, 3,458 video tokens) instead of 74 (37, 3,367). "
            "`total_pixels` has no vLLM equivalent; `max_pixels` caps each frame.",
    "nim": "NIM serves with vLLM inside. NGC_API_KEY is passed from your environment (`-e NGC_API_KEY` with no "
           "value), never written here. NIM does not take vLLM's sampling flags: clients send `media_io_kwargs` "
           "and `mm_processor_kwargs` per request (`trafficvlm eval --engine openai` and `trafficvlm ask` do). "
           "On Kubernetes use helm/trafficvlm-nim with helm/values/nim-finetuned.yaml.",
    "vss": "Set these in the VSS container (helm/values/vss.yaml carries them; `trafficvlm rollout` edits "
           "MODEL_PATH in place, GitOps applies it). MODEL_PATH must be the bundle's path as the VSS pod sees "
           "it (the mounted claim). VSS samples frames per chunk with its own settings: keep them at the "
           "video spec above.",
}
