"""Scoring engines for `trafficvlm eval`: a model in this process, an OpenAI-compatible endpoint, baselines.

Every engine maps groups of questions (the questions of one clip, `records.group_by_video`) to `Answer`s.
The stage (`stages/evaluate.py`) owns files, resume and reports; this module owns the arithmetic.

    from trafficvlm.evaluate import LocalEngine
    engine = LocalEngine(model, processor, spec, system_prompt)          # letter scoring, shared prefix
    answers = engine.score([(records_of_one_video, clip)])[0]           # one Answer per record

Letter mode (default): one forward per question and an argmax over the logits of the option letters' tokens
("A", "B", ...) at the first answer position. That is greedy decoding restricted to the valid options,
exactly; the softmax over those letters is kept as `letter_probs`.

Generate mode (reasoning / free-form answers): greedy (or temperature-sampled) decoding parsed by
`prompts.parse_answer`, with our own loop over the KV cache: the prefill takes `rope.mrope_position_ids`,
every new token the row's next text position on all three axes. (Checked in transformers 5.17: `generate`
left to itself computes positions with `get_rope_index`, which truncates `second_per_grid` to an int and
falls back to 1-D positions without `mm_token_type_ids`; given explicit 3-D `position_ids` it keeps them
and appends last + 1 per token, which would be right for one question. It has no way to continue many
questions from one copied prefix cache, which is why the loop is ours. A test checks it token by token
against full re-forwards.)

Shared prefix (default): the questions of one clip share system prompt + video. The prefix (everything up to
`<|vision_end|>`) runs once, with the vision tower, into a KV cache. In letter mode all the questions'
suffixes then run as *one* row of branches appended to that cache: a 4-D mask (`data.branch_mask`, the
same one shared-prefix training uses) lets each branch see the prefix and itself only, and the logits are
read at each branch's last token. The cache is never copied, and the prefix keeps the causal flash kernel;
only the ~15 x 40 branch tokens attend through the mask. (The former path ran the suffixes as a padded
batch on 15 expanded copies of the cache: 15 x 3.4k keys materialised per layer, ~140 ms a clip on an
H200; docs/perf.md.) Generate mode still continues a left-padded batch on copies of the cache, because
each row then decodes on its own. Suffix positions are the slice of the full sequence's positions (text
continues after the video block), so both equal per-question scoring. The prefix is encoded once per clip
and each question only as its suffix (`Preprocessor.encode_prefix` / `encode_suffix`, tested equal to
the full `encode`).

The CPU side of `score` (prompts, positions, pixels cast to the model dtype and pinned) is `prepare`; a
caller that overlaps it with the GPU runs `prepare` for the next clip in a thread while `score_prepared`
runs the current one (`stages/evaluate.py` does):

    prepared = engine.prepare([(records, clip)])     # CPU only; thread-safe beside score_prepared
    answers = engine.score_prepared(prepared)[0]

`compile_vision=True` (the default) wraps each vision block in torch.compile on CUDA (the 7B tower 7x
faster than transformers' on an H100, docs/perf.md; the first clip of each new grid shape pays the compile);
it does nothing on CPU, where compiling costs minutes and gains little. Letter mode's prefix and branches
run on `fast_text.TextRunner`: transformers' modules and weights, our decoder loop over a preallocated KV
buffer, one compiled step shared by every layer on CUDA (`compile_text`), so ~700 branch tokens are no
longer bound by Python-side work per layer.
"""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from trafficvlm import prompts
from trafficvlm.config import VideoSpec
from trafficvlm.records import LETTERS, VideoQARecord

if TYPE_CHECKING:
    import torch

    from trafficvlm.video import Clip

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The reference recipe's evaluate.py appends this to the system prompt for answer_type "reasoning" (unless
# the prompt already mentions <think>); we do the same so reasoning scores are comparable.
REASONING_FORMAT = ("Answer the question with provided options in the following format: \n<think>\nyour "
                    "reasoning\n</think> <answer>\nyour answer\n</answer>.")
DEFAULT_MAX_TOKENS = {"letter": 16, "reasoning": 1024, "freeform": 256}

Group = tuple[list[VideoQARecord], "Clip | None"]


@dataclass
class PreparedClip:
    """One clip's shared-prefix inputs, built on the CPU ahead of the GPU work (`LocalEngine.prepare`)."""

    records: list[VideoQARecord]
    prefix: Any                        # processing.PromptPrefix
    suffixes: list[Any]                # processing.Suffix, one per record
    vision: dict[str, Any]             # pixels in the model dtype (pinned for CUDA) and the grid
    branches: list["Branches"]         # letter mode: the suffixes as masked branches, question_batch a chunk


@dataclass
class Branches:
    """Suffixes back to back in one row after a prefix (`branch_row`, `LocalEngine._branches`)."""

    input_ids: Any                     # [1, n] the suffixes' tokens
    position_ids: Any                  # [3, 1, n] their 3-D positions (each continuing from the prefix)
    mask: Any                          # [1, 1, n, prefix_len + n] bool: the prefix and its own branch, causal
    ends: Any                          # [k] index of each suffix's last token in the row


def branch_row(prefix_len: int, suffixes: list[tuple["torch.Tensor", "torch.Tensor"]]) -> Branches:
    """The row and mask for suffixes that each see the prefix and themselves only: the branch tokens'
    rows of `data.branch_mask`, the mask shared-prefix training uses."""
    import torch

    from trafficvlm.data import branch_mask

    lengths = torch.tensor([len(ids) for ids, _ in suffixes])
    ends = prefix_len + lengths.cumsum(0)
    spans = [(int(end) - int(n), int(n)) for end, n in zip(ends, lengths)]
    return Branches(torch.cat([ids for ids, _ in suffixes])[None], torch.cat([pos for _, pos in suffixes], dim=1)[:, None],
                    branch_mask(prefix_len, spans, int(ends[-1]), first_row=prefix_len), ends - prefix_len - 1)


@dataclass
class Answer:
    """One engine's answer to one question."""

    predicted: str | None                      # lowercase option letter, None when unparseable
    letter_probs: dict[str, float] | None = None
    raw_text: str | None = None


def system_prompt_for(answer_type: str, system_prompt: str) -> str:
    if answer_type == "reasoning" and "<think>" not in system_prompt:
        return system_prompt + REASONING_FORMAT
    return system_prompt


# --- letter scoring ---------------------------------------------------------------------------------------

def letter_token_ids(tokenizer, letters: str = LETTERS) -> dict[str, int]:
    """Token id of each uppercase option letter as the answer's first token ("B" right after
    `<|im_start|>assistant\\n`, as trained). Each must be one token, else letter scoring is not exact."""
    out = {}
    for letter in letters:
        ids = tokenizer.encode(letter.upper(), add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits option letter {letter.upper()!r} into {ids}: letter scoring "
                             "needs one token per letter (use --mode generate)")
        out[letter] = ids[0]
    return out


def letter_answer(logits: "torch.Tensor", options: dict[str, str], letter_ids: dict[str, int]) -> Answer:
    """Argmax and softmax over the options' letter logits (a [V] row at the first answer position)."""
    import torch

    letters = list(options)
    chosen = logits[[letter_ids[k] for k in letters]].float()
    probs = torch.softmax(chosen, dim=-1).tolist()
    best = letters[int(chosen.argmax())]
    return Answer(best, dict(zip(letters, probs)), best.upper())


# --- the engines -------------------------------------------------------------------------------------------

class Engine:
    """What the eval loop calls. `prepare` is the CPU work that may run ahead in a thread while
    `score_prepared` runs earlier groups; engines with nothing to prepare pass the groups through."""

    def score(self, groups: Sequence[Group]) -> list[list[Answer]]:
        raise NotImplementedError

    def prepare(self, groups: Sequence[Group]) -> list:
        return list(groups)

    def score_prepared(self, prepared: Sequence) -> list[list[Answer]]:
        return self.score(prepared)


class LocalEngine(Engine):
    """Scores with a transformers Qwen2.5-VL model in this process, passing our 3-D positions everywhere.

    `mode`: "letter" or "generate". `shared_prefix`: one prefill per clip (see the module docstring);
    without it, letter mode runs right-padded batches of up to `question_batch` questions across clips,
    and generate mode one question at a time. `blind=True` removes the video from the prompt (baseline).
    `branches=False` runs letter mode's suffixes on expanded copies of the prefix cache instead of as
    masked branches of one row (the former path; kept for the benchmark and as a cross-check).
    Letter branches run on `fast_text.TextRunner` (our decoder loop over a preallocated KV buffer, compiled
    and the branch pass replayed as CUDA graphs on CUDA unless `compile_text=False`; `text_graphs`
    overrides the graphs alone); `fast_text=False` runs them through transformers' forward."""

    def __init__(self, model, processor, spec: VideoSpec, system_prompt: str, *, mode: str = "letter",
                 shared_prefix: bool = True, question_batch: int = 16, max_new_tokens: int = 16,
                 temperature: float = 0.0, seed: int = 0, blind: bool = False, max_length: int | None = None,
                 compile_vision: bool = True, branches: bool = True, fast_text: bool = True,
                 compile_text: bool = True, text_graphs: bool | None = None):
        import torch

        from trafficvlm.processing import Preprocessor

        if mode not in ("letter", "generate"):
            raise ValueError(f"mode must be 'letter' or 'generate', got {mode!r}")
        self.model, self.mode, self.blind = model, mode, blind
        self.shared_prefix, self.question_batch = shared_prefix, max(1, question_batch)
        self.branches = branches and mode == "letter"
        self.max_new_tokens, self.temperature, self.max_length = max_new_tokens, temperature, max_length
        self.pre = Preprocessor(processor, spec, system_prompt)
        self.tokenizer = processor.tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.letter_ids = letter_token_ids(self.tokenizer) if mode == "letter" else {}
        self.eos_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS}
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        if compile_vision and not blind:
            from trafficvlm.fast_vision import compile_vision_blocks

            compile_vision_blocks(model)  # CUDA only
        self.text = None
        if fast_text and self.branches and shared_prefix and not blind:
            from trafficvlm.fast_text import TextRunner

            # compiled only on CUDA, like the vision blocks: on a CPU compiling costs more than it saves;
            # the branch pass replayed as CUDA graphs with the compiled step unless text_graphs says otherwise
            compiled = compile_text and self.device.type == "cuda"
            self.text = TextRunner(model, compile=compiled, graphs=compiled if text_graphs is None else text_graphs)

    @property
    def needs_frames(self) -> bool:
        return not self.blind

    def score(self, groups: Sequence[Group]) -> list[list[Answer]]:
        """Answers for each group's records, in order."""
        return self.score_prepared(self.prepare(groups))

    def prepare(self, groups: Sequence[Group]) -> list:
        """The CPU work of `score` that can run ahead: with a shared prefix, one PreparedClip per group
        (other modes encode as they score and get the groups back). Touches no model state, so a thread
        may prepare the next clips while `score_prepared` runs earlier ones."""
        if self.blind or not self.shared_prefix:
            return list(groups)
        return [self._prepare_clip(records, clip) for records, clip in groups]

    def score_prepared(self, prepared: Sequence) -> list[list[Answer]]:
        """Answers for `prepare`'s output, in order."""
        import torch

        with torch.inference_mode():
            if self.blind:
                return [self._score_blind(records) for records, _ in prepared]
            if self.shared_prefix:
                return [self._score_shared(p) for p in prepared]
            if self.mode == "generate":
                return [[self._score_shared(self._prepare_clip([r], clip))[0] for r in records]
                        for records, clip in prepared]
            return self._score_padded_groups(prepared)

    # -- shared prefix ------------------------------------------------------------------------------------

    def _prepare_clip(self, records: list[VideoQARecord], clip: "Clip") -> PreparedClip:
        """Prefix encoded once, each question as its suffix; pixels cast to the model dtype here (the same
        round-to-nearest cast `.to(device, dtype)` does) and pinned, so the upload is an async copy."""
        prefix = self.pre.encode_prefix(records[0], clip)
        suffixes = [self.pre.encode_suffix(r, prefix) for r in records]
        for r, s in zip(records, suffixes):
            self._check_length(r, len(prefix) + len(s))
        pixels = prefix.pixel_values_videos.to(self.dtype)
        chunks = []
        if self.branches:
            chunks = [branch_row(len(prefix), [(s.input_ids, s.position_ids) for s in suffixes[i:i + self.question_batch]])
                      for i in range(0, len(suffixes), self.question_batch)]
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
            chunks = [Branches(*(t.pin_memory() for t in (c.input_ids, c.position_ids, c.mask, c.ends))) for c in chunks]
        return PreparedClip(records, prefix, suffixes,
                            {"pixel_values_videos": pixels, "video_grid_thw": prefix.video_grid_thw}, chunks)

    def _score_shared(self, p: PreparedClip) -> list[Answer]:
        split = len(p.prefix)
        cache = self._prefix(p)
        answers: list[Answer] = []
        for k, start in enumerate(range(0, len(p.suffixes), self.question_batch)):
            records = p.records[start:start + self.question_batch]
            if self.branches:
                chunk = p.branches[k]
                answers += self._branches(cache, chunk, records)
                cache.crop(split - cache.get_seq_length())  # back to the prefix: the next chunk must not see these
            else:
                answers += self._continue(cache, split, records, [(s.input_ids, s.position_ids)
                                                                  for s in p.suffixes[start:start + len(records)]])
        return answers

    def _prefix(self, p: PreparedClip):
        """The clip's prompt prefix through vision and the language model; returns its KV cache (the
        TextRunner itself when branches run on it)."""
        vision = {k: v.to(self.device, non_blocking=True) for k, v in p.vision.items()}
        ids, pos = p.prefix.input_ids[None], p.prefix.position_ids[:, None]
        if self.text is not None:
            self.text.prefill(ids, pos, vision)
            return self.text
        return self._forward(ids, pos, None, cache=None, vision=vision)[1]

    def _branches(self, cache, chunk: "Branches", records: list[VideoQARecord]) -> list[Answer]:
        """Letter answers for one chunk of branches run as one row on `cache` (appends them to it)."""
        if self.text is not None:  # CPU rows: the padded CUDA-graph inputs are built without waiting on the GPU
            hidden = self.text.extend(chunk.input_ids, chunk.position_ids, chunk.mask, rows=chunk.ends)
        else:
            hidden, _ = self._forward(chunk.input_ids, chunk.position_ids, chunk.mask, cache=cache)
            hidden = hidden[0, chunk.ends.to(self.device, non_blocking=True)]
        logits = self.model.lm_head(hidden).float().cpu()  # one copy, then CPU-side letter picks
        return [letter_answer(logits[k], r.options, self.letter_ids) for k, r in enumerate(records)]

    def _encode(self, record: VideoQARecord, clip: "Clip"):
        sample = self.pre.encode(record, clip, with_answer=False)
        self._check_length(record, len(sample))
        return sample

    def _check_length(self, record: VideoQARecord, n_tokens: int) -> None:
        if self.max_length and n_tokens > self.max_length:
            raise ValueError(f"record {record.id!r}: prompt of {n_tokens} tokens exceeds max_length "
                             f"{self.max_length} (video tokens are never truncated: lower fps or max_pixels)")

    def _continue(self, cache, prefix_len: int, records: list[VideoQARecord],
                  suffixes: list[tuple["torch.Tensor", "torch.Tensor"]]) -> list[Answer]:
        """Run the suffixes as one batch on copies of `cache` (prefix_len tokens), then answer."""
        import torch

        from trafficvlm.rope import PAD_POSITION

        b, width = len(suffixes), max(len(ids) for ids, _ in suffixes)
        ids = torch.full((b, width), self.pre.pad_token_id, dtype=torch.long)
        pos = torch.full((3, b, width), PAD_POSITION, dtype=torch.long)
        mask = torch.zeros((b, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, (row_ids, row_pos) in enumerate(suffixes):  # left-pad: pads sit between prefix and suffix
            n = len(row_ids)
            ids[row, width - n:], pos[:, row, width - n:] = row_ids, row_pos
            mask[row, prefix_len + width - n:] = 1
        if cache is None:  # nothing shared: a plain prefill (blind baseline); no padding in this case
            mask = None if b == 1 else mask
        hidden, cache = self._forward(ids, pos, mask, cache=_expand_cache(cache, b))
        logits = self.model.lm_head(hidden[:, -1])
        if self.mode == "letter":
            return [letter_answer(logits[k], r.options, self.letter_ids) for k, r in enumerate(records)]
        next_pos = pos[:, :, -1].max(dim=0).values + 1
        texts = self._decode(logits, cache, mask, next_pos)
        return [Answer(prompts.parse_answer(t, r.options), None, t) for t, r in zip(texts, records)]

    # -- generation -------------------------------------------------------------------------------------

    def _decode(self, logits, cache, mask, next_pos) -> list[str]:
        """Greedy / sampled decoding from the last logits; each new token gets the row's next text position
        on all three axes (the 3-D rule: text after the last block advances by 1)."""
        import torch

        b = logits.shape[0]
        tokens: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(self.max_new_tokens):
            new = self._pick(logits).cpu()
            for row in range(b):
                if not done[row]:
                    if int(new[row]) in self.eos_ids:
                        done[row] = True
                    else:
                        tokens[row].append(int(new[row]))
            if bool(done.all()) or step == self.max_new_tokens - 1:
                break
            new = torch.where(done, torch.tensor(self.pre.pad_token_id), new)
            mask = None if mask is None else torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype)], dim=1)
            hidden, cache = self._forward(new[:, None], next_pos.view(1, b, 1).expand(3, b, 1), mask, cache=cache)
            logits = self.model.lm_head(hidden[:, -1])
            next_pos = next_pos + 1
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def _pick(self, logits):
        import torch

        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    # -- padded batches across clips (letter mode without a shared prefix) --------------------------------

    def _score_padded_groups(self, groups: Sequence[Group]) -> list[list[Answer]]:
        flat = [(r, self._encode(r, clip)) for records, clip in groups for r in records]
        answers: list[Answer] = []
        for start in range(0, len(flat), self.question_batch):
            chunk = flat[start:start + self.question_batch]
            seqs = [(s.input_ids, s.position_ids) for _, s in chunk]
            logits = self._last_logits(seqs, self._vision([s for _, s in chunk]))
            answers += [letter_answer(logits[k], r.options, self.letter_ids) for k, (r, _) in enumerate(chunk)]
        return _regroup(answers, groups)

    def _last_logits(self, seqs: list[tuple["torch.Tensor", "torch.Tensor"]], vision: dict | None):
        """Right-padded batch (the padding follows every real token, so causal attention never sees it);
        logits at each row's last real token."""
        import torch

        from trafficvlm.rope import PAD_POSITION

        b, width = len(seqs), max(len(ids) for ids, _ in seqs)
        ids = torch.full((b, width), self.pre.pad_token_id, dtype=torch.long)
        pos = torch.full((3, b, width), PAD_POSITION, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for row, (row_ids, row_pos) in enumerate(seqs):
            n = len(row_ids)
            ids[row, :n], pos[:, row, :n], mask[row, :n] = row_ids, row_pos, 1
        hidden, _ = self._forward(ids, pos, mask, cache=None, vision=vision, use_cache=False)
        last = mask.sum(dim=1) - 1
        return self.model.lm_head(hidden[torch.arange(b), last.to(hidden.device)])

    # -- blind baseline --------------------------------------------------------------------------------

    def _score_blind(self, records: list[VideoQARecord]) -> list[Answer]:
        seqs = [self._encode_blind(r) for r in records]
        if self.mode == "generate":
            return [self._continue(None, 0, [r], [seq])[0] for r, seq in zip(records, seqs)]
        answers: list[Answer] = []
        for start in range(0, len(seqs), self.question_batch):
            logits = self._last_logits(seqs[start:start + self.question_batch], None)
            answers += [letter_answer(logits[k], r.options, self.letter_ids)
                        for k, r in enumerate(records[start:start + self.question_batch])]
        return answers

    def _encode_blind(self, record: VideoQARecord):
        """The same prompt with the video part removed from the user turn; text-only positions."""
        import torch

        messages = prompts.build_messages(record, system_prompt=self.pre.system_prompt, with_answer=False)
        for m in messages:
            m["content"] = [part for part in m["content"] if part.get("type") != "video"]
        text = prompts.render_messages(messages, add_generation_prompt=True)
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        return ids, torch.arange(len(ids)).view(1, -1).expand(3, -1)

    # -- the model call -----------------------------------------------------------------------------------

    def _vision(self, samples) -> dict[str, Any]:
        import torch

        return {"pixel_values_videos": torch.cat([s.pixel_values_videos for s in samples]).to(self.device, self.dtype),
                "video_grid_thw": torch.cat([s.video_grid_thw for s in samples]).to(self.device)}

    def _forward(self, ids, pos, mask, *, cache, vision: dict | None = None, use_cache: bool = True):
        """The base model (no LM head: callers project only the positions they read) with explicit 3-D
        positions. Returns (last hidden states, KV cache)."""
        out = self.model.model(input_ids=ids.to(self.device, non_blocking=True),
                               position_ids=pos.to(self.device, non_blocking=True),
                               attention_mask=None if mask is None else mask.to(self.device, non_blocking=True),
                               past_key_values=cache, use_cache=use_cache, **(vision or {}))
        return out.last_hidden_state, out.past_key_values


def _expand_cache(cache, batch: int):
    """A fresh DynamicCache holding `batch` copies of a batch-1 cache (None: an empty cache)."""
    from transformers import DynamicCache

    if cache is None:
        return DynamicCache()
    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v, *_ in cache])


def _regroup(flat: list[Answer], groups: Sequence[Group]) -> list[list[Answer]]:
    out, at = [], 0
    for records, _ in groups:
        out.append(flat[at:at + len(records)])
        at += len(records)
    return out


# --- the OpenAI-compatible engine -------------------------------------------------------------------------

class OpenAIEngine(Engine):
    """The same questions through any OpenAI-compatible `/v1/chat/completions` (vLLM, NIM, `trafficvlm
    serve`). The clip file travels as a `video_url` part (`data:video/mp4;base64,...`, or `file://` when
    the server was started with `--allowed-local-media-path`), the bundle's video spec in vLLM's extra body
    fields, and the reply text is parsed by `prompts.parse_answer`. The API key comes from an environment
    variable and is never logged."""

    needs_frames = False

    def __init__(self, endpoint: str, media_dir: str | Path, spec: VideoSpec, system_prompt: str, *,
                 model_name: str, api_key: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
                 seed: int = 0, concurrency: int = 4, file_urls: bool = False, timeout_s: float = 600.0):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1") else "/v1") + \
            "/chat/completions"
        self.media_dir, self.spec, self.system_prompt = Path(media_dir), spec, system_prompt
        self.model_name, self.max_tokens, self.temperature, self.seed = model_name, max_tokens, temperature, seed
        self.concurrency, self.file_urls, self.timeout_s = max(1, concurrency), file_urls, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def score(self, groups: Sequence[Group]) -> list[list[Answer]]:
        import httpx

        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client, \
                ThreadPoolExecutor(self.concurrency) as pool:
            out = []
            for records, _ in groups:
                url = self._video_url(records[0])
                out.append(list(pool.map(lambda r: self._ask(client, r, url), records)))
            return out

    def request_body(self, record: VideoQARecord, video_url: str) -> dict[str, Any]:
        """The chat request: system prompt, then the user turn (video first, then the training text)."""
        spec = self.spec
        io = {"num_frames": spec.nframes} if spec.nframes else {"num_frames": -1, "fps": spec.fps}
        return {"model": self.model_name, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "seed": self.seed,
                "messages": [{"role": "system", "content": self.system_prompt},
                             {"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                                          {"type": "text", "text": prompts.user_text(record)}]}],
                "mm_processor_kwargs": {k: v for k, v in {"fps": spec.fps, "min_pixels": spec.min_pixels,
                                                          "max_pixels": spec.max_pixels}.items() if v is not None},
                "media_io_kwargs": {"video": io}}

    def _video_url(self, record: VideoQARecord) -> str:
        if record.video_start is not None or record.video_end is not None:
            raise ValueError(f"record {record.id!r}: clip spans ({record.video_start}..{record.video_end} s) "
                             "cannot be sent to an endpoint, which receives whole files; use --engine local")
        path = (self.media_dir / record.video).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"record {record.id!r}: video {path} not found")
        if self.file_urls:
            return path.as_uri()
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")

    def _ask(self, client, record: VideoQARecord, video_url: str) -> Answer:
        resp = client.post(self.url, json=self.request_body(record, video_url))
        if resp.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {resp.status_code} for record {record.id!r}: {resp.text[:300]}")
        try:
            text = resp.json()["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"{self.url}: unexpected reply for record {record.id!r} ({exc}): "
                               f"{resp.text[:300]}") from None
        return Answer(prompts.parse_answer(text, record.options), None, text)


def api_key_from_env(var: str | None) -> str | None:
    """The endpoint's API key from the named environment variable; an unset named variable is an error."""
    if not var:
        return None
    if not os.environ.get(var):
        raise ValueError(f"--api-key-env {var}: the environment variable is not set")
    return os.environ[var]


# --- the majority baseline --------------------------------------------------------------------------------

class MajorityEngine(Engine):
    """Predicts the most frequent correct letter per question text, learned from `train` records (or the
    evaluation records themselves; the caller records which). Unseen question texts get the overall most
    frequent letter; ties go to the earlier letter. `letter_probs` is the learned frequency."""

    needs_frames = False

    def __init__(self, train: Sequence[VideoQARecord]):
        from collections import Counter, defaultdict

        self.per_question: dict[str, Counter] = defaultdict(Counter)
        self.overall: Counter = Counter()
        for r in train:
            if r.answer:
                self.per_question[r.question][r.answer] += 1
                self.overall[r.answer] += 1
        if not self.overall:
            raise ValueError("majority baseline: no answered records to learn from")

    def score(self, groups: Sequence[Group]) -> list[list[Answer]]:
        return [[self._answer(r) for r in records] for records, _ in groups]

    def _answer(self, record: VideoQARecord) -> Answer:
        counts = self.per_question.get(record.question) or self.overall
        valid = {k: counts.get(k, 0) for k in record.options}
        total = sum(valid.values())
        best = max(record.options, key=lambda k: (valid[k], -ord(k)))
        probs = {k: (v / total if total else 1 / len(valid)) for k, v in valid.items()}
        return Answer(best, probs, best.upper())
