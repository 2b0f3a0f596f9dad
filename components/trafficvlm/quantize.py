"""FP8 post-training quantization (W8A8, data-free) with llm-compressor, checked against its source.

    >>> from trafficvlm.quantize import quantize, verify_checkpoint, load_quantized
    >>> report = quantize("runs/sft/final", "runs/sft/final-fp8")            # fp8-dynamic, verified
    >>> report["size_gb"], report["verify"]["logits_rel_diff"]
    >>> model = load_quantized("runs/sft/final-fp8", "cuda")                 # real FP8 matmuls on H100
    >>> model = load_quantized("runs/sft/final-fp8", "cuda", backend="torchao", compile=True)

The language model's Linear layers become FP8 (E4M3) weights with per-output-channel scales and FP8
activations quantized per token at run time ("fp8-dynamic"), or 128x128 weight blocks and 1x128 activation
groups ("fp8-block", the layout DeepSeek-style block kernels run). The vision tower, the merger and
`lm_head` stay bf16: they are a small share of the weights and the most sensitive to rounding.

The ignore-list trap, and why `harmonize_ignore` exists. transformers 5 saves Qwen2.5-VL under the
checkpoint's original key names (`visual.blocks.0...`, `model.layers.0...`), and llm-compressor writes
`quantization_config.ignore` in those names. On reload, transformers 5 matches that list against its own
module names (`model.visual.blocks.0...`): nothing matches, so every vision Linear is set up as quantized
with a scale the checkpoint does not have (initialised to zero). Measured on the tiny model: the default
load rounds the vision weights through FP8 on the fly (vision output off by 4%), `dequantize=True`
multiplies them by the zero scale (NaN) — both silent, the logits of the default load stay finite.
vLLM maps the list with Qwen2.5-VL's `hf_to_vllm_mapper` (`model.visual.` -> `visual.`, `visual.` unchanged), so there both spellings mean its `visual.*` modules.
The saved list therefore names every ignored module in both spellings, which every loader matches; and
`verify_checkpoint` reloads each checkpoint with plain transformers and compares it with the source.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

SCHEMES = {"fp8-dynamic": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK"}
FP8_BACKENDS = ("auto", "scaled-mm", "compressed-tensors", "torchao", "emulate")
# The kernels backend="auto" runs on an FP8-capable GPU, in order of preference: bench/fp8_eval.py times the
# kernel backends against bf16 on the 7B (docs/perf.md, "FP8"); scaled-mm was the fastest there (H200:
# prefill 1.13x bf16, compressed-tensors 0.70x), compressed-tensors also takes per-tensor weight scales.
FAST_FP8_BACKENDS = ("scaled-mm", "compressed-tensors")
FAST_FP8_BACKEND = FAST_FP8_BACKENDS[0]
TORCHAO_REQUIREMENT = "torchao==0.18.0"
# Patterns for llm-compressor (both module spellings: the one it sees in memory and the checkpoint's).
IGNORE_RULES = ("lm_head", "re:visual.*", "re:model.visual.*")
VISION_PREFIXES = ("visual.", "model.visual.")
VISION_TOL = 1e-3      # vision tower is not quantized: its output must match the source (bf16 noise only)
# Relative L2 difference of the logits FP8 W8A8 may cause on the probe input. Measured on random-weight
# models (near-flat logits, the worst case for a relative measure): 0.037 at hidden 64, 0.062 (fp8-dynamic)
# and 0.066 (fp8-block) at hidden 256. A mis-loaded layer (missing or wrong scales) moves them by ~1 or
# to NaN. Accuracy itself is the gate's business, not this check's.
LOGITS_TOL = 0.15
REPORT = "quantize_report.json"
GB = 1e9


class QuantizeError(RuntimeError):
    """A quantization that must not be shipped; the message says what failed and where."""


# --- quantizing ------------------------------------------------------------------------------------------

def quantize_model(model, scheme: str = "fp8-dynamic") -> dict[str, list[str]]:
    """Apply FP8 W8A8 in place (data-free oneshot). Returns the in-memory names of the Linear layers that
    were quantized and of those that were left alone (vision tower, merger, lm_head)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "fp8-block":
        _check_block_dims(model)
    recipe = QuantizationModifier(targets="Linear", scheme=SCHEMES[scheme], ignore=list(IGNORE_RULES))
    oneshot(model=model, recipe=recipe)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    done = [n for n, m in linears if getattr(m, "quantization_scheme", None) is not None]
    left = [n for n, m in linears if getattr(m, "quantization_scheme", None) is None]
    wrong = [n for n in done if _is_vision(n) or n.endswith("lm_head")]
    if wrong or not done:
        raise QuantizeError(f"quantization hit the wrong layers (vision/lm_head quantized: {wrong[:3]}; "
                            f"{len(done)} quantized)")
    return {"quantized": done, "ignored": left}


def _check_block_dims(model, block: int = 128) -> None:
    """fp8-block quantizes 128x128 weight tiles and 1x128 activation groups: a language-model Linear whose
    sizes are not multiples of 128 would be padded at quantization and fail at inference (the 7B's are)."""
    import torch

    odd = [f"{n} ({m.out_features}x{m.in_features})" for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and not _is_vision(n) and not n.endswith("lm_head")
           and (m.in_features % block or m.out_features % block)]
    if odd:
        raise ValueError(f"fp8-block needs Linear sizes divisible by {block}; {len(odd)} are not (e.g. {odd[0]}): "
                         "use fp8-dynamic for this model")


def harmonize_ignore(config_path: str | Path, ignored: list[str]) -> list[str]:
    """Rewrite `quantization_config.ignore` in config.json so it names every ignored module both as the
    checkpoint does (what llm-compressor wrote; vLLM's spelling) and as transformers 5 does (`ignored`, the
    in-memory names). Returns the new list. See the module docstring for why both are needed."""
    path = Path(config_path)
    config = json.loads(path.read_text())
    qc = config.get("quantization_config")
    if not qc:
        raise QuantizeError(f"{path}: no quantization_config to fix")
    names = set(qc.get("ignore") or []) | set(ignored)
    names |= {_checkpoint_name(n) for n in ignored}
    qc["ignore"] = sorted(names)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return qc["ignore"]


def ignore_gaps(qc: dict[str, Any]) -> list[str]:
    """Vision modules the ignore list names in the checkpoint's spelling only (the trap): each one would
    load as quantized in transformers 5. Empty for lists `harmonize_ignore` wrote."""
    names = set(qc.get("ignore") or [])
    missing = sorted(n for n in names if n.startswith("visual.") and f"model.{n}" not in names)
    return [f"quantization_config.ignore names {len(missing)} vision modules only as the checkpoint does "
            f"(e.g. {missing[0]!r}, not 'model.{missing[0]}'): transformers 5 would load them as quantized"] \
        if missing else []


def _checkpoint_name(name: str) -> str:
    """transformers 5 module name -> the key prefix Qwen2.5-VL checkpoints use (`model.visual.` -> `visual.`)."""
    return name[len("model."):] if name.startswith("model.visual.") else name


def _is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


# --- the whole command -----------------------------------------------------------------------------------

def quantize(src: str | Path, out: str | Path, *, scheme: str = "fp8-dynamic", device: str = "auto",
             overwrite: bool = False, logits_tol: float | None = None,
             on_note: Callable[[str], Any] = print) -> dict[str, Any]:
    """Quantize checkpoint `src` into `out` (written to a temporary directory and renamed only after
    `verify_checkpoint` passes, with `logits_tol` or LOGITS_TOL). Returns the report also written to
    `out/quantize_report.json`."""
    from trafficvlm.model import check_checkpoint

    src, out = check_checkpoint(src), Path(out)
    if quantization_config_of(src):
        raise QuantizeError(f"{src}: already quantized ({quantization_config_of(src).get('quant_method')}); "
                            "quantize the bf16 checkpoint it came from")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    device = _resolve_device(device)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    layers = _quantize_and_save(src, tmp, scheme, device)
    on_note(f"quantized {len(layers['quantized'])} Linear layers to FP8 ({scheme}); "
            f"{len(layers['ignored'])} left bf16 (vision tower, merger, lm_head)")
    _write_config(src, tmp, layers["ignored"])
    _copy_base_files(src, tmp)
    report = {"source": str(src), "output": str(out), "scheme": scheme, "device": device,
              "layers": {k: len(v) for k, v in layers.items()}, "size_gb": size_report(src, tmp),
              "seconds": None,
              "verify": verify_checkpoint(src, tmp, device=device, logits_tol=logits_tol or LOGITS_TOL)}
    if not report["verify"]["ok"]:
        raise QuantizeError(f"{out}: the quantized checkpoint does not match its source: "
                            + "; ".join(report["verify"]["failures"]) + f" (left for inspection in {tmp})")
    report["seconds"] = round(time.time() - started, 2)
    _write_meta(src, tmp, report)
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return report


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _quantize_and_save(src: Path, dst: Path, scheme: str, device: str) -> dict[str, list[str]]:
    """Load the source in bf16 (the dtype the unquantized layers keep), quantize, save compressed."""
    import torch

    from trafficvlm.model import load_model

    model = load_model(src, dtype=torch.bfloat16, device=device)
    layers = quantize_model(model, scheme)
    model.save_pretrained(dst, save_compressed=True)
    return layers


def _write_config(src: Path, dst: Path, ignored: list[str]) -> None:
    """config.json in the source's own layout (older serving stacks read the v4-era layout transformers 5
    no longer writes) plus the quantization_config, with an ignore list every loader matches."""
    ignore = harmonize_ignore(dst / "config.json", ignored)
    saved = json.loads((dst / "config.json").read_text())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**saved["quantization_config"], "ignore": ignore}
    for part in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in part:
                part[key] = "bfloat16"
    if "dtype" not in config and "torch_dtype" not in config:
        config["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_base_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer, processor, chat template and generation files of the source, byte for byte."""
    from trafficvlm.checkpoint import BASE_FILES

    copied = []
    for name in BASE_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _write_meta(src: Path, dst: Path, report: dict[str, Any]) -> None:
    """trafficvlm.json of the source (video and prompt spec unchanged) plus what quantization did."""
    import compressed_tensors
    import llmcompressor

    from trafficvlm.model import read_bundle_meta, write_bundle_meta

    meta = read_bundle_meta(src) or {"format": 1, "base_model": str(src)}
    meta["quantization"] = {
        "method": "llm-compressor oneshot, data-free", "format": "compressed-tensors float-quantized",
        "scheme": report["scheme"], "targets": "Linear", "ignore_rules": list(IGNORE_RULES),
        "source": str(src), "size_gb": report["size_gb"], "verify": report["verify"],
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__},
    }
    write_bundle_meta(dst, meta)


def size_report(src: str | Path, dst: str | Path) -> dict[str, float]:
    """Weight bytes on disk (all *.safetensors) before and after, in GB (1e9 bytes)."""
    before = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    after = sum(p.stat().st_size for p in Path(dst).glob("*.safetensors"))
    return {"before": round(before / GB, 4), "after": round(after / GB, 4),
            "ratio": round(before / after, 2) if after else 0.0}


def format_report(report: dict[str, Any]) -> str:
    size, v = report["size_gb"], report["verify"]
    return (f"{report['output']}: {report['scheme']}, {report['layers']['quantized']} Linear layers FP8, "
            f"{report['layers']['ignored']} bf16\n"
            f"  weights   {size['before']:.3f} GB -> {size['after']:.3f} GB ({size['ratio']}x smaller)\n"
            f"  verified  vision rel. diff {v['vision_rel_diff']:.2e} (< {v['vision_tol']:g}), "
            f"logits rel. diff {v['logits_rel_diff']:.2e} (< {v['logits_tol']:g}), "
            f"top-1 agreement {v['top1_agreement']:.1%}")


# --- verification ----------------------------------------------------------------------------------------

def verify_checkpoint(src: str | Path, quantized: str | Path, *, device: str = "cpu",
                      vision_tol: float = VISION_TOL, logits_tol: float = LOGITS_TOL) -> dict[str, Any]:
    """Reload `quantized` the way a Hugging Face user would (plain `AutoModelForImageTextToText`) and
    compare it with `src` loaded in bf16 on one probe input (text + a short video).

    Checks: the files (vision and lm_head tensors bf16 without scales, language-model Linear weights FP8),
    no vision module set up as quantized after reload, vision output relative L2 difference < vision_tol,
    logits relative L2 difference < logits_tol. Returns the figures, `ok` and the `failures`."""
    import torch
    from transformers import AutoModelForImageTextToText

    failures = check_files(quantized)
    ref = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16, device_map=device)
    model = AutoModelForImageTextToText.from_pretrained(quantized, device_map=device)
    bad = quantized_vision_modules(model)
    if bad:
        failures.append(f"{len(bad)} vision modules loaded as quantized (e.g. {bad[0]}): "
                        "quantization_config.ignore does not name them as this loader does")
    probe = probe_inputs(ref.config, device)
    vision_ref, logits_ref = _run(ref, probe)
    vision_q, logits_q = _run(model, probe)
    result = {"vision_rel_diff": rel_diff(vision_ref, vision_q), "logits_rel_diff": rel_diff(logits_ref, logits_q),
              "top1_agreement": (logits_ref.argmax(-1) == logits_q.argmax(-1)).float().mean().item(),
              "vision_tol": vision_tol, "logits_tol": logits_tol, "device": device}
    if not result["vision_rel_diff"] < vision_tol:  # `not <` also catches NaN
        failures.append(f"vision output rel. diff {result['vision_rel_diff']:.3g} >= {vision_tol:g}")
    if not result["logits_rel_diff"] < logits_tol:
        failures.append(f"logits rel. diff {result['logits_rel_diff']:.3g} >= {logits_tol:g}")
    return {**result, "ok": not failures, "failures": failures}


def check_files(path: str | Path) -> list[str]:
    """What the safetensors headers and config.json say: problems found (an empty list is good)."""
    from safetensors import safe_open

    path = Path(path)
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    problems = [] if qc.get("quant_method") == "compressed-tensors" else \
        [f"{path}/config.json: quantization_config.quant_method is {qc.get('quant_method')!r}, not compressed-tensors"]
    problems += [f"{path}/config.json: {gap}" for gap in ignore_gaps(qc)]
    fp8 = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                keep_bf16 = _is_vision(key) or key.startswith("lm_head.")
                if keep_bf16 and (key.endswith("_scale") or dtype.startswith("F8")):
                    problems.append(f"{file.name}: {key} is quantized ({dtype}) but must stay bf16")
                fp8 += dtype.startswith("F8")
    if not fp8:
        problems.append(f"{path}: no FP8 tensors in the weights")
    return problems


def quantized_vision_modules(model) -> list[str]:
    """Vision modules that a loader set up as quantized (a compressed-tensors scheme or an FP8 layer)."""
    return [n for n, m in model.named_modules()
            if _is_vision(n) and (getattr(m, "quantization_scheme", None) is not None
                                  or type(m).__name__ == "CompressedTensorsFP8Linear")]


def probe_inputs(config, device: str = "cpu", *, seed: int = 0) -> dict[str, "torch.Tensor"]:
    """A short chat-like sequence with one 2x4x4-patch video (8 video tokens) and its 3-D positions."""
    import torch

    from trafficvlm.rope import mrope_position_ids

    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    grid = torch.tensor([[2, 4, 4]])
    n_tokens = int(grid.prod()) // vc.spatial_merge_size ** 2
    pixels = torch.randn(int(grid.prod()), vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    text = lambda n: torch.randint(0, 1000, (n,), generator=g).tolist()  # noqa: E731 - ids every vocabulary has
    ids = torch.tensor([151644, *text(8), config.vision_start_token_id, *[config.video_token_id] * n_tokens,
                        config.vision_end_token_id, *text(8)])
    pos = mrope_position_ids(ids, grid, [1.0], spatial_merge_size=vc.spatial_merge_size)
    return {"input_ids": ids[None].to(device), "position_ids": pos[:, None].to(device),
            "pixel_values_videos": pixels.to(device), "video_grid_thw": grid.to(device)}


def _run(model, probe: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(vision features, logits) of one probe, in float32."""
    import torch

    with torch.no_grad():
        vision = model.model.get_video_features(probe["pixel_values_videos"], probe["video_grid_thw"])
        logits = model(**probe, use_cache=False).logits
    return torch.cat(list(vision.pooler_output)).float(), logits[0].float()


def rel_diff(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """Relative L2 difference ||a - b|| / ||a|| (NaN stays NaN, so it fails every threshold)."""
    return ((a - b).norm() / a.norm().clamp_min(1e-12)).item()


# --- loading for inference -------------------------------------------------------------------------------

def quantization_config_of(path: str | Path) -> dict[str, Any] | None:
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("quantization_config")


def fp8_kernel_ok(qc: dict[str, Any], device: str, backend: str = "compressed-tensors") -> tuple[bool, str]:
    """Whether `backend` can run this checkpoint with real FP8 matmuls on `device`, and why not.

    Both kernel backends run a row-wise scaled matmul with per-token activation scales.
    compressed-tensors (`use_optimized_inference=True`) takes per-channel or per-tensor weight scales;
    the torchao route takes per-channel ones (PerRow), i.e. fp8-dynamic. A block-scaled checkpoint's
    scales fit neither."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, "no CUDA device: FP8 matmuls need a GPU with compute capability >= 8.9 (H100, L40S, 4090)"
    if torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        return False, f"{torch.cuda.get_device_name(torch.device(device))} has no FP8 tensor cores (needs sm_89+)"
    groups = qc.get("config_groups", {}).values()
    strategies = {g.get("weights", {}).get("strategy") for g in groups}
    if backend in ("scaled-mm", "torchao"):  # both re-quantize per row: fp8-dynamic checkpoints only
        acts = {(g.get("input_activations") or {}).get("strategy") for g in groups}
        if strategies != {"channel"} or acts != {"token"}:
            return False, (f"weight scales {sorted(map(str, strategies))}, activation scales {sorted(map(str, acts))}: "
                           f"the {backend} route takes per-channel weights and per-token activations (fp8-dynamic)")
    if backend == "scaled-mm":
        return True, "FP8 W8A8 matmuls (trafficvlm.fp8_linear: fused per-token quantization, torch scaled_mm)"
    if backend == "torchao":
        if importlib.util.find_spec("torchao") is None:
            return False, f"torchao is not installed (pip install {TORCHAO_REQUIREMENT})"
        return True, "FP8 W8A8 matmuls (torchao float8, per-row scales, torch scaled_mm)"
    if not strategies <= {"channel", "tensor"}:
        return False, (f"weight scale strategy {sorted(map(str, strategies))} has no transformers FP8 kernel "
                       "(block scales: serve with vLLM, which has block FP8 kernels)")
    return True, "FP8 W8A8 matmuls (compressed-tensors, torch scaled_mm, row-wise scales)"


def choose_fp8_backend(qc: dict[str, Any], device: str, backend: str = "auto") -> tuple[str, str]:
    """(the backend `load_quantized` runs, why): "auto" takes the first of FAST_FP8_BACKENDS that can run
    and the emulation where none can; a named kernel backend that cannot run here is an error, never a silent fallback."""
    if backend not in FP8_BACKENDS:
        raise ValueError(f"FP8 backend must be one of {', '.join(FP8_BACKENDS)}, got {backend!r}")
    if backend == "emulate":
        return "emulate", "FP8 kernels turned off by the caller"
    if backend == "torchao":
        _require_torchao()
    if backend != "auto":
        ok, why = fp8_kernel_ok(qc, device, backend)
        if not ok:
            raise ValueError(f"FP8 backend {backend!r} requested but unavailable: {why}")
        return backend, why
    reasons = []
    for wanted in FAST_FP8_BACKENDS:
        ok, why = fp8_kernel_ok(qc, device, wanted)
        if ok:
            return wanted, why
        reasons.append(why)
    return "emulate", reasons[0] if len(set(reasons)) == 1 else "; ".join(reasons)


def _require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"backend='torchao' needs the torchao package: pip install {TORCHAO_REQUIREMENT} "
                          "(the version this project pins in pyproject.toml)") from exc


def load_quantized(path: str | Path, device: str = "cpu", *, dtype: "torch.dtype | None" = None,
                   attn_implementation: str = "sdpa", backend: str = "auto", compile: bool = False,
                   on_note: Callable[[str], Any] = print):
    """Load a compressed-tensors FP8 checkpoint for inference, as fast as the device allows.

    Backends (`choose_fp8_backend`):
    - "compressed-tensors": weights stay FP8 and the language model's Linear layers run FP8 x FP8 matmuls
      with per-token activation scales (`CompressedTensorsConfig(use_optimized_inference=True)`), the
      numerics vLLM serves. fp8-dynamic (or per-tensor) checkpoints, sm_89+ GPUs.
    - "torchao": loaded dequantized to bf16, then exactly the layers the checkpoint quantized become
      torchao float8 linears (`to_torchao_float8`: the same FP8 weights and scales, per-token FP8
      activations, `torch._scaled_mm`). fp8-dynamic checkpoints, sm_89+ GPUs, `pip install torchao`.
    - "emulate": weights dequantized at load time and the activations entering those layers rounded
      through FP8 as the scheme says (`emulate_fp8_activations`): the same W8A8 numerics, full-precision
      matmuls, no speed-up. What CPUs (and the CPU accuracy gate) run.
    - "auto": the first of FAST_FP8_BACKENDS that can run, else the emulation with a note saying why.
    A named kernel backend that cannot run here raises. `compile=True` wraps the language model's
    FP8 blocks with torch.compile (`compile_language_model`); the first forward of each new shape
    compiles. vLLM is the serving path."""
    import torch

    qc = quantization_config_of(path)
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}/config.json: no compressed-tensors quantization_config")
    chosen, why = choose_fp8_backend(qc, device, backend)
    bf16_only = chosen in ("torchao", "scaled-mm")
    if bf16_only and dtype not in (None, torch.bfloat16):
        raise ValueError(f"backend={chosen!r} runs bf16 (its per-row FP8 path quantizes bf16 weights), got {dtype}")
    model = _from_pretrained(path, device, torch.bfloat16 if bf16_only else dtype, attn_implementation,
                             dequantize=chosen != "compressed-tensors")
    if chosen == "emulate":
        n = emulate_fp8_activations(model, qc)
        on_note(f"note: {path}: FP8 weights dequantized, FP8 activations emulated in {n} layers, matmuls in "
                f"{model.dtype} ({why})")
    elif chosen == "torchao":
        n = len(to_torchao_float8(model, qc))
        on_note(f"note: {path}: {why} in {n} layers")
    elif chosen == "scaled-mm":
        n = len(to_fp8_rowwise(model, qc))
        on_note(f"note: {path}: {why} in {n} layers")
    else:
        on_note(f"note: {path}: {why}")
    if compile:
        on_note(f"note: {path}: torch.compile on {compile_language_model(model)} language-model blocks "
                "(compiles on the first forward of each new shape)")
    return model


def _from_pretrained(path: str | Path, device: str, dtype, attn_implementation: str, *, dequantize: bool):
    """The checkpoint through transformers' compressed-tensors loader: FP8 kernels, or dequantized to `dtype`."""
    import transformers
    from transformers import CompressedTensorsConfig

    from trafficvlm.model import family, model_type_of

    loading = CompressedTensorsConfig(dequantize=True) if dequantize else \
        CompressedTensorsConfig(use_optimized_inference=True)
    cls = getattr(transformers, family(model_type_of(path)).model_class)
    with warnings.catch_warnings():  # "loading attributes will be overwritten": exactly what we ask for
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`")
        return cls.from_pretrained(path, dtype=dtype or "auto", device_map=device, quantization_config=loading,
                                   attn_implementation=attn_implementation)


def quantized_layers(model, qc: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, module, config group) of every layer the checkpoint quantized: each group's `targets`
    minus `ignore`, matched by compressed-tensors itself (the same matcher the loader used)."""
    from compressed_tensors.utils.match import match_named_modules

    return [(name, module, group) for group in qc.get("config_groups", {}).values()
            for name, module in match_named_modules(model, group.get("targets", []), ignore=qc.get("ignore", []))]


def to_torchao_float8(model, qc: dict[str, Any]) -> list[str]:
    """Turn exactly the Linear layers `qc` quantized into torchao float8 linears (FP8 E4M3 weights with
    per-row scales; activations quantized per token at run time; `torch._scaled_mm`). `model` must be the
    dequantized bf16 load of the checkpoint. Returns the converted layer names.

    Why re-quantizing reproduces the checkpoint: each row's weights are FP8 codes q (|q| <= 448, the row's
    largest exactly 448) times the row scale s; dequantized, that row's absmax is 448*s, so torchao's
    per-row scale absmax/448 is s again (up to the bf16 rounding of the dequantized product, ~2^-9
    relative) and w/s rounds back to the same code q: FP8 codes carry 3 mantissa bits, 2^-9 moves no
    value across a rounding boundary. tests/test_quantize_torchao.py checks the codes bit for bit and the
    scales to that rounding.

    compressed-tensors leaves its offloading wrappers and a fake-quantizing `forward` on the dequantized
    layers; they are removed here, since torchao quantizes the activations itself (and a tensor subclass
    weight must not pass through those wrappers)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8Tensor, PerRow, quantize_

    names = _plain_quantized_layers(model, qc)
    for name in names:
        model.get_submodule(name).__dict__.pop("forward", None)  # back to the class's own Linear.forward
    # set_inductor_config=False: torchao would otherwise switch on process-wide inductor autotuning
    # (coordinate descent), which multiplies compile time; callers who compile choose their own settings.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    # torchao silently skips weights whose sizes are not multiples of 16 (scaled_mm's constraint)
    left = sorted(n for n in names if not isinstance(model.get_submodule(n).weight, Float8Tensor))
    if left:
        raise QuantizeError(f"torchao left {len(left)} of {len(names)} FP8 layers unconverted (e.g. {left[0]}: "
                            "scaled_mm needs both sizes divisible by 16); use backend='compressed-tensors'")
    return sorted(names)


def to_fp8_rowwise(model, qc: dict[str, Any], fused: bool = True) -> list[str]:
    """Turn exactly the Linear layers `qc` quantized into `trafficvlm.fp8_linear.Fp8RowwiseLinear` (the same
    FP8 codes and per-row scales: see `to_torchao_float8` for why re-quantizing reproduces them). `model`
    must be the dequantized bf16 load of the checkpoint. Returns the converted layer names."""
    from trafficvlm.fp8_linear import convert_linears

    return convert_linears(model, _plain_quantized_layers(model, qc), fused=fused)


def _plain_quantized_layers(model, qc: dict[str, Any]) -> set[str]:
    """The names of the layers `qc` quantizes, with compressed-tensors' offloading wrappers removed from
    `model` (the FP8 routes replace or re-quantize those layers themselves)."""
    from compressed_tensors.offload import remove_dispatch

    names = {name for name, _, _ in quantized_layers(model, qc)}
    if not names:
        raise QuantizeError("the checkpoint's quantization_config matches no layer of this model")
    remove_dispatch(model, onload_tensors=True)
    return names


def compile_language_model(model, **options) -> int:
    """torch.compile the FP8 blocks of every decoder layer: the MLP and the four attention projections
    (`dynamic=True` unless `options` say otherwise). Returns how many modules were wrapped.

    Not the whole decoder layer: with a DynamicCache (the eval's shared prefix) Dynamo guards on the
    cache's per-layer state, so each layer recompiles and past the recompile limit (8) the rest run
    eagerly (seen on a 12-layer model). The MLP and the projections never touch the cache: all layers
    share one compiled graph per shape class (2-3 graphs in all on that model). Where Dynamo traces
    torchao's float8 tensor without graph breaks, the per-token activation quantization fuses with the
    elementwise work around it; torch 2.13 (CPU) breaks inside torchao's dispatch, so bench/fp8_eval.py
    records the graph breaks beside the compiled timings."""
    options = {"dynamic": True, **options}
    compiled = 0
    for layer in model.model.language_model.layers:
        blocks = [layer.mlp] + [getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        for block in blocks:
            block.compile(**options)
        compiled += len(blocks)
    return compiled


def emulate_fp8_activations(model, qc: dict[str, Any]) -> int:
    """Round the inputs of the layers `qc` quantizes through FP8 E4M3 (dynamic scales per token, or per
    group of `group_size` channels), so a dequantized model computes what W8A8 kernels compute. Returns
    the number of layers hooked."""
    hooked = 0
    for _, module, group in quantized_layers(model, qc):
        act = group.get("input_activations") or {}
        if act.get("type") != "float" or act.get("num_bits") != 8 or not act.get("dynamic"):
            continue
        module.register_forward_pre_hook(_fp8_input_hook(act.get("group_size") if act.get("strategy") == "group"
                                                         else None))
        hooked += 1
    return hooked


def _fp8_input_hook(group_size: int | None):
    import torch

    fp8 = torch.float8_e4m3fn
    top = torch.finfo(fp8).max

    def hook(module, args):
        x = args[0]
        shape = x.shape
        groups = x.reshape(*shape[:-1], -1, group_size) if group_size and shape[-1] % group_size == 0 \
            else x.unsqueeze(-2)
        scale = groups.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / top
        rounded = (groups.float() / scale).clamp(-top, top).to(fp8).float() * scale
        return (rounded.to(x.dtype).reshape(shape), *args[1:])

    return hook
