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

    Exactly one of `fps` / `nframes` drives temporal sampling. Pixel caps follow qwen-vl-utils.
    The recipe's setting A is `fps=1, max_pixels=81920`; setting B `fps=1, total_pixels=6422528`."""

    fps: float | None = 1.0
    nframes: int | None = None
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = 81920
    total_pixels: int = VIDEO_TOTAL_PIXELS

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.nframes is None):
            raise ValueError("VideoSpec: set exactly one of fps and nframes")
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
