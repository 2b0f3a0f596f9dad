"""The model behind `trafficvlm serve`: a checkpoint bundle answering chat questions about one video, on the
eval stage's scoring path (`trafficvlm.evaluate.LocalEngine`), so the endpoint answers what `eval` scores.

    >>> engine = ServeEngine.load("models/tiny")
    >>> clip = engine.load_clip("videos/val/x.mp4")                   # the one video path, bundle's spec
    >>> engine.answer(ChatQuery(text=" \\n Is it raining? \\n A: Yes \\n B: No \\n "), clip).content
    'B'

A multiple-choice question (the recipe's user turn, or a question followed by "A: ..." lines) is rebuilt as
a `VideoQARecord`, so the model sees exactly its training prompt however the client spelled it, and is
answered by letter scoring: one forward and an argmax over the option letters (exact greedy decoding
restricted to the options). Bundles trained for reasoning answers, and free-form questions, generate
greedily instead (bounded by `max_tokens`). Model calls are serialized behind one lock; video decoding is
not, so concurrent requests decode in parallel while one runs the model.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trafficvlm import prompts
from trafficvlm.config import PromptSpec, VideoSpec
from trafficvlm.processing import IGNORE_INDEX, Preprocessor
from trafficvlm.records import ANSWER_SUFFIX, VIDEO_TAG, VideoQARecord, parse_human_prompt

if TYPE_CHECKING:
    from trafficvlm.video import Clip

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 1024          # the most any request may generate, whatever its max_tokens says
DEFAULT_NEW_TOKENS = 256       # when a free-form request names no max_tokens
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[):.]\s*(.+?)\s*$")


@dataclass
class ChatQuery:
    """What a chat request asks, once the server has taken it apart."""

    text: str
    system_prompt: str | None = None       # None: the bundle's training system prompt
    max_tokens: int | None = None
    request_id: str = "request"


@dataclass
class Reply:
    content: str
    mode: str                              # "letter" or "generate"
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                     # "stop" or "length"
    letter: str | None = None              # lowercase option letter, when the question had options
    letter_probs: dict[str, float] | None = None
    seconds: float = 0.0                   # time spent on the model, lock wait included


# --- reading the question ---------------------------------------------------------------------------------

def parse_mcq(text: str) -> tuple[str, dict[str, str]] | None:
    """(question, options) of a multiple-choice text, or None for a free-form question.

    Accepts the recipe's human turn (`records.human_prompt`, with or without the `<video>` tag and with the
    answer instruction once or twice, as `prompts.user_text` sends it) and the plain form: question lines,
    then consecutive "A: ..." / "B) ..." / "(C) ..." lines from A, then optional instruction lines."""
    body = text
    while body.endswith(ANSWER_SUFFIX * 2):
        body = body[: -len(ANSWER_SUFFIX)]
    try:
        return parse_human_prompt(body if body.startswith(VIDEO_TAG) else VIDEO_TAG + body)
    except ValueError:
        pass
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for start, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if m and m.group(1) == "A":
            break
    else:
        return None
    options: dict[str, str] = {}
    for line in lines[start:]:
        m = _OPTION_LINE.match(line)
        if not m or m.group(1).lower() != chr(ord("a") + len(options)):
            break  # the options end at the first line that does not continue the A, B, C... run
        options[m.group(1).lower()] = m.group(2)
    question = " ".join(line.replace(VIDEO_TAG, "").strip() for line in lines[:start]).strip()
    return (question, options) if question and len(options) >= 2 else None


class ChatPreprocessor(Preprocessor):
    """The training preprocessor, plus free-form questions: a record without options is sent as the user's
    own text (the recipe's MCQ wrapping would instruct the model to answer with a letter). Remembers the
    length of the last prompt it encoded, for the response's `usage`."""

    last_length = 0

    def encode(self, record, clip, *, with_answer=True):
        sample = super().encode(record, clip, with_answer=with_answer)
        self.last_length = len(sample)
        return sample

    def _ids_and_labels(self, record, with_answer):
        if record.options:
            return super()._ids_and_labels(record, with_answer)
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": record.question}]}]
        ids = self._tokenize(prompts.render_messages(messages, add_generation_prompt=True))
        return ids, [IGNORE_INDEX] * len(ids)


# --- the engine -----------------------------------------------------------------------------------------

class ServeEngine:
    """A loaded checkpoint bundle: its model, processor, video spec and prompt spec."""

    def __init__(self, model, processor, spec: VideoSpec, prompt: PromptSpec, *, name: str, cache: Any = True):
        self.model, self.processor, self.spec, self.prompt = model, processor, spec, prompt
        self.name = name
        self.cache = cache            # video.load_clip's frame cache for file:// media
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: str | None = None,
             cache: Any = True) -> "ServeEngine":
        """Load a bundle; its trafficvlm.json gives the video and prompt spec (defaults, with a warning,
        for a plain Hugging Face checkpoint)."""
        from trafficvlm.model import load_model, load_processor, read_bundle_meta

        model_dir = Path(model_dir)
        meta = read_bundle_meta(model_dir)
        if meta is None:
            log.warning("%s has no trafficvlm.json: serving with the default video spec and prompt", model_dir)
            meta = {}
        try:
            spec = VideoSpec(**meta.get("video", {}))
            prompt = PromptSpec(**meta.get("prompt", {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{model_dir / 'trafficvlm.json'}: bad video/prompt spec ({exc})") from None
        model = load_model(model_dir, dtype=dtype, device=device).eval()
        return cls(model, load_processor(model_dir), spec, prompt, name=model_dir.name, cache=cache)

    def load_clip(self, path: str | Path, *, cacheable: bool = True) -> "Clip":
        """Frames by the bundle's spec, through the one video path (raises video.VideoError)."""
        from trafficvlm.video import load_clip

        return load_clip(path, self.spec, cache=self.cache if cacheable else None)

    def answer(self, query: ChatQuery, clip: "Clip") -> Reply:
        """Letter scoring for multiple choice (generation for reasoning bundles), else generation."""
        mcq = parse_mcq(query.text)
        question, options = mcq if mcq else (query.text, {})
        record = VideoQARecord(id=query.request_id, video=clip.path, question=question, options=options)
        letter_mode = bool(options) and self.prompt.answer_type == "letter"
        max_new = 1 if letter_mode else min(query.max_tokens or DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS)
        start = time.perf_counter()
        with self._lock:  # one model call at a time; callers run this in worker threads
            scorer = self._scorer("letter" if letter_mode else "generate", query.system_prompt, max_new)
            answer = scorer.score([([record], clip)])[0][0]
            prompt_tokens = scorer.pre.last_length
        seconds = time.perf_counter() - start
        if letter_mode:
            return Reply(answer.raw_text or "", "letter", prompt_tokens, 1, "stop", answer.predicted,
                         answer.letter_probs, seconds)
        text = answer.raw_text or ""
        produced = len(self.processor.tokenizer.encode(text, add_special_tokens=False))
        return Reply(text, "generate", prompt_tokens, produced, "length" if produced >= max_new else "stop",
                     answer.predicted, None, seconds)

    def _scorer(self, mode: str, system_prompt: str | None, max_new_tokens: int):
        """The eval stage's engine for one request (cheap to build: it wraps the loaded model)."""
        from trafficvlm.evaluate import LocalEngine, system_prompt_for

        system = system_prompt or system_prompt_for(self.prompt.answer_type, self.prompt.system_prompt)
        scorer = LocalEngine(self.model, self.processor, self.spec, system, mode=mode,
                             max_new_tokens=max_new_tokens)
        scorer.pre = ChatPreprocessor(self.processor, self.spec, system)
        return scorer
