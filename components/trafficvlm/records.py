"""The records every stage passes along: one multiple-choice question about one video clip.

`VideoQARecord` is what `sources/wts.py` produces, what `prepare` writes as LLaVA JSON, and what train,
eval and serve read back. The LLaVA entry format and its human prompt string are the reference recipe's
(see wts-format.md): this module is the only place that builds or parses that string.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

LETTERS = "abcdefghij"
ANSWER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
VIDEO_TAG = "<video>"


@dataclass
class VideoQARecord:
    """One question about one video (or a clip of it).

    `video` is relative to the media directory (the recipe's `media_path`, i.e. `videos/<split>/`).
    `options` maps lowercase letters to option texts, in order; `answer` is a lowercase letter or None.
    """

    id: str
    video: str
    question: str
    options: dict[str, str]
    answer: str | None = None
    type: str = "environment"
    phase: str = "full_video"
    video_start: float | None = None
    video_end: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def clip(self) -> tuple[float | None, float | None]:
        return self.video_start, self.video_end


@dataclass
class Prediction:
    """One scored question: what `eval` writes per line of `predictions.jsonl`."""

    id: str
    video: str
    type: str
    phase: str
    question: str
    options: dict[str, str]
    correct: str | None
    predicted: str | None
    letter_probs: dict[str, float] | None = None
    raw_text: str | None = None

    @property
    def is_correct(self) -> bool:
        return self.predicted is not None and self.predicted == self.correct

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the recipe's human prompt -------------------------------------------------------------------------

def human_prompt(question: str, options: dict[str, str]) -> str:
    """The reference converter's human turn, byte for byte:
    `"<video> \\n " + question + " \\n "`, then `"<LETTER>: <text> \\n "` per option, then the suffix."""
    text = f"{VIDEO_TAG} \n {question} \n "
    for letter, option in options.items():
        text += f"{letter.upper()}: {option} \n "
    return text + ANSWER_SUFFIX


_OPTION_RE = re.compile(r"^([A-J]): (.*)$", re.S)


def parse_human_prompt(value: str) -> tuple[str, dict[str, str]]:
    """Inverse of `human_prompt`: the question and the options of a recipe-style human turn.

    Raises ValueError (with the reason) on text that is not in that shape."""
    if not value.endswith(ANSWER_SUFFIX):
        raise ValueError("human turn does not end with the recipe's answer instruction")
    body = value[: -len(ANSWER_SUFFIX)]
    if not body.startswith(f"{VIDEO_TAG} \n "):
        raise ValueError("human turn does not start with '<video> \\n '")
    parts = body[len(VIDEO_TAG) + 3:].split(" \n ")
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if len(parts) < 2:
        raise ValueError("human turn has no options")
    # Question text may itself contain " \n " in principle; options are the trailing "X: ..." parts.
    options: dict[str, str] = {}
    split_at = len(parts)
    for i in range(len(parts) - 1, 0, -1):
        m = _OPTION_RE.match(parts[i])
        if not m:
            break
        split_at = i
    for part in parts[split_at:]:
        m = _OPTION_RE.match(part)
        assert m is not None
        options[m.group(1).lower()] = m.group(2)
    if not options:
        raise ValueError("human turn has no 'A: ...' options")
    expected = list(LETTERS[: len(options)])
    if list(options) != expected:
        raise ValueError(f"options are not consecutive letters from A: {[k.upper() for k in options]}")
    return " \n ".join(parts[:split_at]), options


# --- LLaVA entries -------------------------------------------------------------------------------------

def to_llava(rec: VideoQARecord) -> dict[str, Any]:
    """The LLaVA entry for a record. Environment records give exactly the reference converter's keys."""
    entry: dict[str, Any] = {"id": rec.id}
    if "wts_id" in rec.meta:
        entry["wts_id"] = rec.meta["wts_id"]
    entry["video"] = rec.video
    entry["type"] = rec.type
    entry["phase"] = rec.phase
    if rec.video_start is not None or rec.video_end is not None:
        entry["video_start"] = rec.video_start
        entry["video_end"] = rec.video_end
    for key in ("view", "split", "scenario"):
        if key in rec.meta and rec.type != "environment":
            entry[key] = rec.meta[key]
    entry["conversations"] = [
        {"from": "human", "value": human_prompt(rec.question, rec.options)},
        {"from": "gpt", "value": rec.answer.upper() if rec.answer else ""},
    ]
    return entry


def from_llava(entry: dict[str, Any]) -> VideoQARecord:
    """A record from a LLaVA entry (ours or the recipe's). Raises ValueError naming the entry on bad input."""
    ident = entry.get("id", "<no id>")
    try:
        convs = entry["conversations"]
        human = next(c["value"] for c in convs if c.get("from") == "human")
        gpt = next((c["value"] for c in convs if c.get("from") == "gpt"), "")
        question, options = parse_human_prompt(human)
        video = entry["video"]
    except (KeyError, StopIteration, TypeError) as exc:
        raise ValueError(f"LLaVA entry {ident!r}: missing field {exc}") from None
    except ValueError as exc:
        raise ValueError(f"LLaVA entry {ident!r}: {exc}") from None
    answer = gpt.strip().lower() or None
    if answer is not None and answer not in options:
        raise ValueError(f"LLaVA entry {ident!r}: answer {gpt!r} is not among the options {list(options)}")
    meta = {k: entry[k] for k in ("wts_id", "view", "split", "scenario") if k in entry}
    return VideoQARecord(
        id=str(entry["id"]), video=video, question=question, options=options, answer=answer,
        type=entry.get("type", "environment"), phase=entry.get("phase", "full_video"),
        video_start=_opt_float(entry.get("video_start")), video_end=_opt_float(entry.get("video_end")),
        meta=meta,
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def read_llava(path: str | os.PathLike) -> list[VideoQARecord]:
    """Read a LLaVA JSON file (a list of entries). Errors name the file and the entry."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such LLaVA JSON file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA entries, got {type(entries).__name__}")
    records = []
    for i, entry in enumerate(entries):
        try:
            records.append(from_llava(entry))
        except ValueError as exc:
            raise ValueError(f"{path}: entry {i}: {exc}") from None
    return records


def write_llava(path: str | os.PathLike, records: Iterable[VideoQARecord]) -> None:
    write_json_atomic(path, [to_llava(r) for r in records])


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def group_by_video(records: Iterable[VideoQARecord]) -> dict[tuple[str, float | None, float | None], list[VideoQARecord]]:
    """Questions that share one clip (same video and span) — the unit of shared-prefix train and eval."""
    groups: dict[tuple[str, float | None, float | None], list[VideoQARecord]] = {}
    for rec in records:
        groups.setdefault((rec.video, rec.video_start, rec.video_end), []).append(rec)
    return groups
