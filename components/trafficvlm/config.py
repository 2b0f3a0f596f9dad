"""Typed configs: dataclass schemas, TOML loading, dotted `key=value` overrides, the resolved copy saved
next to every run. No torch here (the KFP launcher images import this).

Stage configs (train, eval, ...) are dataclasses built from these pieces; `load_config(Schema, path,
overrides)` fills them and rejects unknown keys with the key's dotted name.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

# qwen-vl-utils constants (the reference recipe's video path; DESIGN.md contract 1).
IMAGE_FACTOR = 28
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

SYSTEM_PROMPT = "You are a helpful assistant that can answer questions about a street-view CCTV footage."


@dataclass
class VideoSpec:
    """How a video becomes frames: the one spec shared by train, eval, calibration and serve.

    One of `fps` / `nframes` drives temporal sampling; `nframes`, when set, wins and clears `fps` (a TOML
    file or a `video.nframes=8` override cannot unset the default fps). Pixel caps follow qwen-vl-utils.
    The recipe's setting A is `fps=1, max_pixels=81920`; setting B `fps=1, total_pixels=6422528`."""

    fps: float | None = 1.0
    nframes: int | None = None
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = 81920
    total_pixels: int = VIDEO_TOTAL_PIXELS

    def __post_init__(self) -> None:
        if self.nframes is not None:
            self.fps = None
        if self.fps is None and self.nframes is None:
            raise ValueError("VideoSpec: set one of fps and nframes")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"VideoSpec.fps must be > 0, got {self.fps}")
        if self.nframes is not None and self.nframes < FRAME_FACTOR:
            raise ValueError(f"VideoSpec.nframes must be >= {FRAME_FACTOR}, got {self.nframes}")
        # min_pixels > max_pixels is legal (setting A: 100,352 > 81,920): smart_resize checks the cap first.

    @property
    def second_per_grid(self) -> float:
        """Seconds covered by one temporal grid step (2 frames): `2 / fps`. With nframes the caller
        computes it from the sampled span (see video.sample)."""
        if self.fps is None:
            raise ValueError("second_per_grid needs fps; with nframes it depends on the clip")
        return FRAME_FACTOR / self.fps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_A = VideoSpec(fps=1.0, max_pixels=81920)
SETTING_B = VideoSpec(fps=1.0, max_pixels=VIDEO_MAX_PIXELS, total_pixels=6422528)


@dataclass
class PromptSpec:
    """The prompt a model was trained with (contract 3)."""

    system_prompt: str = SYSTEM_PROMPT
    answer_type: str = "letter"  # letter | reasoning | freeform


# --- generic loading ------------------------------------------------------------------------------------

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the dotted key."""


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.max_steps=10", "video.fps=2"]` -> nested dict. Values are parsed as TOML scalars/arrays
    when they parse, else kept as strings (so `model.path=/x/y` needs no quotes)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def from_dict(schema: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `schema` from a nested dict, checking keys and scalar types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(schema)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or schema.__name__}: {exc}") from None


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {hint}")
    if is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint in (int, bool) and type(value) is hint:
        return value
    if hint in (int, float, str, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Schema defaults <- `base` <- TOML file <- dotted overrides."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_toml(path))
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(schema, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for resolved configs (nested tables of scalars and arrays; None is omitted)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {scalar(x)}" for k, x in v.items() if x is not None) + " }"
        return json.dumps(str(v))

    def table(d: dict[str, Any], name: str) -> None:
        plain = {k: v for k, v in d.items() if not (isinstance(v, dict) and _is_table(v)) and v is not None}
        subs = {k: v for k, v in d.items() if isinstance(v, dict) and _is_table(v)}
        if name and (plain or not subs):
            lines.append(f"[{name}]")
        for k, v in plain.items():
            lines.append(f"{k} = {scalar(v)}")
        if plain:
            lines.append("")
        for k, v in subs.items():
            table(v, f"{name}.{k}" if name else k)

    table(data, "")
    return "\n".join(lines).rstrip() + "\n"


def _is_table(d: dict[str, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) for k in d)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as TOML (the file a rerun can take with --config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(to_dict(cfg)))
    return path


# --- SFT (trafficvlm train) -----------------------------------------------------------------------------

@dataclass
class ModelSection:
    """The base checkpoint. `build_tiny`: write a tiny random model at `path` when it is missing (CPU demo)."""

    path: str = "models/tiny"
    build_tiny: bool = False
    max_length: int = 32768          # the recipe's policy.model_max_length; longer samples are an error
    attn_implementation: str = "sdpa"
    # "7b" (or "tiny", for CPU smoke runs): train that architecture (model.config_7b / config_tiny) from
    # random weights, for benchmarks with no checkpoint at hand; `path` then supplies only the tokenizer and
    # processor (build_tiny writes them). Random weights are not worth saving: such a run writes no
    # checkpoints and no final/ bundle.
    random_init: str | None = None

    def __post_init__(self) -> None:
        if self.random_init not in (None, "7b", "tiny"):
            raise ValueError(f"random_init must be \"7b\", \"tiny\" or unset, got {self.random_init!r}")


@dataclass
class DataSection:
    """LLaVA JSON + media dir. With `synth_root`, a missing annotation file is made first: synthetic WTS at
    `synth_root` (trafficvlm.synth), then `prepare` into the annotation file's directory."""

    annotation_path: str = ""
    media_path: str = ""
    synth_root: str | None = None
    synth_scenarios: int = 8
    num_workers: int = 0
    frame_cache: str | None = None   # directory; None = the shared default ($TRAFFICVLM_CACHE)
    limit: int | None = None         # use the first N records (smoke runs)


@dataclass
class TrainSection:
    output_dir: str = "runs/sft"
    mode: str = "full"               # full | lora
    epochs: int = 1
    max_steps: int | None = None     # optimizer steps; overrides epochs when set
    micro_batch: int = 1             # samples per forward per rank
    global_batch: int = 8            # samples per optimizer step over all ranks (accumulation fills the gap)
    lr: float = 1e-5
    warmup_steps: int = 0
    decay: str = "cosine"            # cosine | linear | constant
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # The dtype of the master weights AdamW updates (docs/training.md, "Full fine-tuning on one GPU"):
    # float32 is torch's fused AdamW over fp32 weights (16 B a trainable parameter; the 7B's LLM needs
    # ~122 GB); bfloat16 keeps weights, gradients and moments in bf16 (8 B) and applies each update with
    # stochastic rounding (torchao's AdamW), so small updates are not rounded away: the 7B's LLM trains on
    # one 80 GB card (68 GB peak at setting A, H200 capped to 79 GB).
    master_dtype: str = "float32"    # float32 | bfloat16
    seed: int = 0
    freeze_vision: bool = True
    freeze_merger: bool = False
    freeze_llm: bool = False
    # The LLM's input embedding table (152k rows, most of them never seen in fine-tuning data). Frozen,
    # the optimizer skips a quarter of a small model's parameters (and their dense gradient); lm_head trains.
    freeze_embeddings: bool = False
    grad_checkpointing: bool = True
    compile: bool = False
    compile_vision: bool = True      # torch.compile the vision blocks when the tower is frozen (CUDA only)
    batching: str = "packed"         # packed (padding-free, one row) | padded
    shared_prefix: bool = False      # one sequence per video: prefix once, each question a branch; the
                                     # batch unit becomes a video (global_batch and micro_batch count videos;
                                     # a micro-batch of several videos is packed into one row)
    save_every: int = 0              # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2
    log_every: int = 1
    device: str = "auto"             # auto | cpu | cuda
    stall_timeout_s: float = 900     # a step running longer: report rank, step, samples, stacks; exit (0: off)
    # trafficvlm: our torchrun + FSDP2 trainer. cosmos-rl: write the reference recipe's sft_config.toml and
    # dataset script from this config and run cosmos-rl (only in images/cosmos-rl.Dockerfile; see cosmos_rl.py)
    engine: str = "trafficvlm"

    def __post_init__(self) -> None:
        choices = {"mode": ("full", "lora"), "decay": ("cosine", "linear", "constant"),
                   "batching": ("packed", "padded"), "device": ("auto", "cpu", "cuda"),
                   "engine": ("trafficvlm", "cosmos-rl"), "master_dtype": ("float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.micro_batch < 1 or self.global_batch < self.micro_batch:
            raise ValueError(f"need 1 <= micro_batch <= global_batch, got {self.micro_batch}, {self.global_batch}")


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class TrackingSection:
    uri: str | None = None           # else MLFLOW_TRACKING_URI; neither: no MLflow
    experiment: str = "trafficvlm"
    run_name: str = "sft"
    parent_run_id: str | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    video: VideoSpec = field(default_factory=lambda: VideoSpec(fps=1.0, max_pixels=81920))
    prompt: PromptSpec = field(default_factory=PromptSpec)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


# The reference recipe's cosmos-rl sft_config.toml: which of its keys map to ours (dotted -> dotted).
RECIPE_SFT_KEYS = {
    "custom.dataset.annotation_path": "data.annotation_path",
    "custom.dataset.media_path": "data.media_path",
    "custom.dataset.system_prompt": "prompt.system_prompt",
    "custom.vision.fps": "video.fps",
    "custom.vision.nframes": "video.nframes",
    "custom.vision.max_pixels": "video.max_pixels",
    "custom.vision.total_pixels": "video.total_pixels",
    "custom.vision.min_pixels": "video.min_pixels",
    "custom.vision.min_frames": "video.min_frames",
    "custom.vision.max_frames": "video.max_frames",
    "train.output_dir": "train.output_dir",
    "train.epoch": "train.epochs",
    "train.optm_lr": "train.lr",
    "train.optm_warmup_steps": "train.warmup_steps",
    "train.optm_decay_type": "train.decay",
    "train.optm_weight_decay": "train.weight_decay",
    "train.optm_grad_norm_clip": "train.max_grad_norm",
    "train.optm_min_lr_factor": "train.min_lr_ratio",
    "train.optm_betas": "train.betas",
    "train.compile": "train.compile",
    "train.max_num_steps": "train.max_steps",
    "policy.model_gradient_checkpointing": "train.grad_checkpointing",
    "train.train_policy.mini_batch": "train.micro_batch",
    "policy.model_name_or_path": "model.path",
    "policy.model_max_length": "model.max_length",
    "train.ckpt.save_freq": "train.save_every",
    "train.ckpt.max_keep": "train.keep_last",
}
# What a recipe file means where it leaves a key out: cosmos-rl's SFT trains the whole model (vision tower
# included) for one epoch; the learning rate and decay are our choices (the recipe file does not set them).
RECIPE_SFT_DEFAULTS = {"train.mode": "full", "train.freeze_vision": False, "train.lr": 1e-5,
                       "train.decay": "cosine", "train.epochs": 1}


def is_recipe_sft(data: dict[str, Any]) -> bool:
    """A cosmos-rl style file: it has `[custom]` or `[policy]` tables, which our schema never has."""
    return "custom" in data or "policy" in data


def map_recipe_sft(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our nested config dict from a recipe sft_config.toml, and the dotted recipe keys it ignores.

    The global batch is `train_batch_per_replica x dp_shard_size` (cosmos-rl's meaning of the two)."""
    flat = _flatten(data)
    out: dict[str, Any] = {}
    for key, value in RECIPE_SFT_DEFAULTS.items():
        _put(out, key, value)
    if any(k.startswith("custom.vision.") for k in flat):
        # A [custom.vision] table replaces the recipe script's default (fps 1, max_pixels 81,920): the keys
        # it leaves out take qwen-vl-utils' defaults (setting B sets only fps and total_pixels).
        _put(out, "video.fps", FPS)
        _put(out, "video.max_pixels", VIDEO_MAX_PIXELS)
    ignored = []
    for key, value in flat.items():
        if key in RECIPE_SFT_KEYS:
            _put(out, RECIPE_SFT_KEYS[key], value)
        elif key not in ("train.train_batch_per_replica", "policy.parallelism.dp_shard_size"):
            ignored.append(key)
    if "custom.vision.nframes" in flat:
        _put(out, "video.fps", None)
    if flat.get("train.optm_decay_type") == "none":
        _put(out, "train.decay", "constant")  # cosmos-rl's "none": no decay after warmup
    per_replica = flat.get("train.train_batch_per_replica")
    if per_replica is not None:
        _put(out, "train.global_batch", int(per_replica) * int(flat.get("policy.parallelism.dp_shard_size", 1)))
    return out, sorted(ignored)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _put(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def load_train_config(path: str | Path | None, overrides: list[str] | None = None,
                      on_ignored=print) -> TrainConfig:
    """Our TOML schema or the recipe's sft_config.toml (detected), then dotted overrides (our keys)."""
    data: dict[str, Any] = load_toml(path) if path is not None else {}
    if is_recipe_sft(data):
        data, ignored = map_recipe_sft(data)
        if ignored:
            on_ignored(f"{path}: recipe (cosmos-rl) config; ignoring keys it sets that we do not use: "
                       f"{', '.join(ignored)}")
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(TrainConfig, data)


# --- evaluation (trafficvlm eval) -----------------------------------------------------------------------

@dataclass
class EvalConfig:
    """`trafficvlm eval`: what to score, how, and where the results go.

    `system_prompt` / `answer_type` left unset, and every VideoSpec field `video` leaves out, come from the
    model bundle's trafficvlm.json; set ones must agree with it unless `override_spec` (contract 4). With
    `engine = "openai"` they come from `model` when it is a bundle directory, else from these fields and
    the VideoSpec defaults."""

    model: str = ""                  # checkpoint directory; with engine "openai", the bundle the server serves
    data: str = ""                   # LLaVA JSON
    media_dir: str = ""              # what the records' `video` paths are relative to
    out: str = "runs/eval"
    mode: str = "letter"             # letter (one forward, argmax over option letters) | generate
    answer_type: str | None = None   # letter | reasoning | freeform; reasoning/freeform imply generate
    system_prompt: str | None = None
    video: dict[str, Any] = field(default_factory=dict)   # VideoSpec fields, over the bundle's
    override_spec: bool = False
    shared_prefix: bool = True
    batch_videos: int = 1            # without shared prefix: clips per padded batch
    question_batch: int = 16         # rows per forward (suffix batch / padded batch)
    limit: int | None = None         # first N questions
    resume: bool = False
    baseline: str | None = None      # majority | blind
    train_data: str | None = None    # LLaVA JSON the majority baseline learns from (else the eval set)
    engine: str = "local"            # local | openai
    endpoint: str | None = None      # e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None   # name of the environment variable holding the API key
    served_model: str | None = None  # the endpoint's model name (default: the endpoint's first model)
    concurrency: int = 4             # parallel requests to the endpoint
    file_urls: bool = False          # send file:// URLs (server started with --allowed-local-media-path)
    max_tokens: int | None = None    # generate mode; default by answer type (16 / 1024 / 256)
    temperature: float = 0.0
    seed: int = 1
    dtype: str = "auto"              # auto (bf16 on GPU, the checkpoint's on CPU) | bfloat16 | float16 | float32
    device: str = "auto"             # auto | cpu | cuda
    max_length: int | None = None    # longer prompts are an error naming the record
    compile_vision: bool = True      # torch.compile each vision block on CUDA (ignored on CPU)
    compile_text: bool = True        # torch.compile the language model's decoder step for letter scoring (CUDA)
    frame_cache: str | None = None   # directory; None = the shared default ($TRAFFICVLM_CACHE)
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(run_name="eval"))

    def __post_init__(self) -> None:
        choices = {"mode": ("letter", "generate"), "engine": ("local", "openai"),
                   "answer_type": (None, "letter", "reasoning", "freeform"),
                   "baseline": (None, "majority", "blind"), "device": ("auto", "cpu", "cuda"),
                   "dtype": ("auto", "bfloat16", "float16", "float32")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.engine == "openai" and not self.endpoint:
            raise ValueError("engine 'openai' needs endpoint (e.g. http://127.0.0.1:8000/v1)")
        unknown = sorted(set(self.video) - set(VideoSpec.__dataclass_fields__))
        if unknown:
            raise ValueError(f"video: unknown VideoSpec field(s) {unknown}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


# The reference recipe's eval_config.yaml (its evaluate.py, vLLM offline): its keys -> ours.
RECIPE_EVAL_KEYS = {
    "model.model_name": "model",
    "model.dtype": "dtype",
    "model.max_length": "max_length",
    "evaluation.answer_type": "answer_type",
    "evaluation.seed": "seed",
    "evaluation.skip_saved": "resume",
    "generation.max_tokens": "max_tokens",
    "generation.temperature": "temperature",
}
RECIPE_VISION_KEYS = ("fps", "nframes", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames")


def is_recipe_eval(data: dict[str, Any]) -> bool:
    """The recipe's eval_config.yaml: `datasets:` and `evaluation:` sections, which our schema never has."""
    return "datasets" in data or "evaluation" in data


def map_recipe_eval(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our EvalConfig dict from a recipe eval_config.yaml, and the dotted recipe keys it ignores.

    One dataset entry is supported (the recipe has one, `environment`). `vision.*` keys become the video
    spec (an explicit spec: a bundle that disagrees is an error unless override_spec)."""
    datasets = data.get("datasets") or {}
    if len(datasets) != 1:
        raise ConfigError(f"datasets: expected exactly one dataset entry, got {sorted(datasets) or 'none'}")
    (name, ds), = datasets.items()
    out: dict[str, Any] = {}
    for key, ours in (("annotation_path", "data"), ("media_dir", "media_dir"), ("system_prompt", "system_prompt")):
        if key in (ds or {}):
            out[ours] = ds[key]
    ignored = [f"datasets.{name}.{k}" for k in (ds or {}) if k not in ("annotation_path", "media_dir",
                                                                         "system_prompt")]
    for key, value in _flatten({k: v for k, v in data.items() if k != "datasets"}).items():
        if key in RECIPE_EVAL_KEYS:
            out[RECIPE_EVAL_KEYS[key]] = value
        elif key.startswith("vision.") and key.split(".", 1)[1] in RECIPE_VISION_KEYS:
            _put(out, "video." + key.split(".", 1)[1], value)
        else:
            ignored.append(key)
    if out.get("answer_type") in ("reasoning", "freeform"):
        out["mode"] = "generate"
    return out, sorted(ignored)


def load_eval_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                     on_ignored=print) -> EvalConfig:
    """Our TOML, or the recipe's eval_config.yaml (detected by content), then `overrides` (our keys, e.g.
    from command-line flags; None values are skipped)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _load_yaml(path) if str(path).endswith((".yaml", ".yml")) else load_toml(path)
        if is_recipe_eval(data):
            data, ignored = map_recipe_eval(data)
            if ignored:
                on_ignored(f"{path}: recipe eval config; ignoring keys we do not use: {', '.join(ignored)}")
    data = deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(EvalConfig, data)


def _load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
