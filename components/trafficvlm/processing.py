"""Record + decoded clip -> model tensors (input ids, labels, pixels, grid, 3-D positions), and collation.

Reads no files: frames come from `trafficvlm.video.load_clip` (the one video path, already sampled and
resized), the prompt from `trafficvlm.prompts`, positions from `trafficvlm.rope`.

    >>> from trafficvlm.model import load_model, load_processor
    >>> from trafficvlm.processing import Preprocessor, collate_padded
    >>> pre = Preprocessor(load_processor("models/tiny"), spec)
    >>> batch = collate_padded([pre.encode(rec, load_clip(path, spec))], pre.pad_token_id)
    >>> loss = load_model("models/tiny")(**batch, use_cache=False).loss
    >>> prefix = pre.encode_prefix(records[0], clip)          # a clip's questions share system prompt + video
    >>> suffixes = [pre.encode_suffix(r, prefix) for r in records]   # == encode(r, clip) after len(prefix)

Every batch carries `position_ids` (contract 2): transformers 5.17 would otherwise compute its own, which
differ from the rule Qwen2.5-VL was trained and is served with. `second_per_grid_ts` and
`mm_token_type_ids` ride along for code that inspects batches; with explicit positions the model ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from trafficvlm import prompts, rope
from trafficvlm.config import SYSTEM_PROMPT, VideoSpec
from trafficvlm.records import VideoQARecord

if TYPE_CHECKING:
    from trafficvlm.video import Clip

IGNORE_INDEX = -100
VISION_END = "<|vision_end|>"
# transformers' ProcessorMixin.create_mm_token_type_ids: 0 text, 1 image, 2 video (3 audio).
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass
class Sample:
    """One question about one clip, ready to collate. Labels are IGNORE_INDEX except the answer tokens
    and the `<|im_end|>` that closes them."""

    input_ids: torch.Tensor            # LongTensor [L]
    labels: torch.Tensor               # LongTensor [L]
    pixel_values_videos: torch.Tensor  # FloatTensor [N, C * temporal_patch * patch * patch]
    video_grid_thw: torch.Tensor       # LongTensor [1, 3]
    second_per_grid_ts: torch.Tensor   # FloatTensor [1]
    position_ids: torch.Tensor         # LongTensor [3, L], from trafficvlm.rope
    mm_token_type_ids: torch.Tensor    # LongTensor [L]
    record_id: str

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class PromptPrefix:
    """The shared start of one clip's prompts (`Preprocessor.encode_prefix`): system prompt + video up to
    and including `<|vision_end|>`, with the clip's pixels. Its labels are all IGNORE_INDEX."""

    input_ids: torch.Tensor            # LongTensor [P]
    position_ids: torch.Tensor         # LongTensor [3, P]
    next_position: int                 # where the text after the prefix starts (block max + 1 rule)
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: torch.Tensor
    template_ids: list[int]            # the prefix as tokenized, one `<|video_pad|>`: what suffixes must extend
    record_id: str

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class Suffix:
    """One question's tokens after a PromptPrefix (`Preprocessor.encode_suffix`)."""

    input_ids: torch.Tensor            # LongTensor [S]
    labels: torch.Tensor               # LongTensor [S]
    position_ids: torch.Tensor         # LongTensor [3, S]
    record_id: str

    def __len__(self) -> int:
        return self.input_ids.numel()


def patchify_video(frames: np.ndarray, pixels: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (FloatTensor [T*H*W / (temporal*patch^2), C*temporal*patch^2], grid).

    The same numbers transformers' Qwen2VLVideoProcessor gives with do_resize=False and
    do_sample_frames=False (fused rescale+normalise in float32, then its patch order: temporal group,
    merge-window row/col, row/col inside the window, then channel, frame, patch row, patch col), without
    needing torchvision. `pixels` is a model.PixelSpec or a transformers video processor."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    p, tp, m = pixels.patch_size, pixels.temporal_patch_size, pixels.merge_size
    t, h, w, c = frames.shape
    if t % tp or h % (p * m) or w % (p * m):
        raise ValueError(f"frames [T={t}, H={h}, W={w}]: T must be a multiple of {tp} and H, W of {p * m} "
                         "(video.load_clip sizes frames this way)")
    mean = torch.tensor(pixels.image_mean) * (1.0 / pixels.rescale_factor)
    std = torch.tensor(pixels.image_std) * (1.0 / pixels.rescale_factor)
    gt, gh, gw = t // tp, h // p, w // p
    # Reorder while still uint8 (a quarter of the bytes of float32), then convert and normalise in place
    # per channel: the same float32 (x - mean) / std per element, ~3x faster than reordering floats.
    x = torch.from_numpy(frames).reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(gt * gh * gw, c, tp * p * p)
    x = x.to(torch.float32).sub_(mean.view(1, c, 1)).div_(std.view(1, c, 1))
    return x.view(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


class Preprocessor:
    """Turns (record, clip) into a Sample with the one prompt (contract 3) and our positions (contract 2).

    `processor` is model.load_processor's result (or a transformers Qwen2_5_VLProcessor): its `tokenizer`
    and `video_processor` pixel constants are used. `spec` is the one the clips were loaded with; a clip
    sampled at another rate is refused (its positions would not match what the model was trained on)."""

    def __init__(self, processor: Any, spec: VideoSpec, system_prompt: str = SYSTEM_PROMPT):
        self.tokenizer = processor.tokenizer
        self.pixels = processor.video_processor
        self.spec = spec
        self.system_prompt = system_prompt
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(prompts.VIDEO_PAD)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = self.tokenizer.pad_token_id
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids(VISION_END)
        self._pixels_memo: tuple[Any, torch.Tensor, tuple[int, int, int]] | None = None

    def _patchify(self, clip: "Clip") -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Pixel tensor of a clip, memoised for the last clip: a clip's ~15 questions are encoded one after
        another (eval, serve, shared-prefix training) and patchifying 74 frames costs ~50 ms on one core."""
        if self._pixels_memo is not None and self._pixels_memo[0] is clip.frames:
            return self._pixels_memo[1], self._pixels_memo[2]
        pixel_values, grid = patchify_video(clip.frames, self.pixels)
        self._pixels_memo = (clip.frames, pixel_values, tuple(grid))
        return pixel_values, tuple(grid)

    def encode(self, record: VideoQARecord, clip: "Clip", *, with_answer: bool = True) -> Sample:
        """The training sample (`with_answer`) or the eval/serve prompt (labels all IGNORE_INDEX)."""
        if self.spec.fps is not None and abs(clip.second_per_grid - self.spec.second_per_grid) > 1e-9:
            raise ValueError(f"record {record.id!r}: clip {clip.path} was sampled at {clip.second_per_grid} s per "
                             f"grid step, the spec (fps {self.spec.fps}) needs {self.spec.second_per_grid}")
        pixel_values, grid = self._patchify(clip)
        if tuple(grid) != tuple(clip.plan.grid_thw):
            raise ValueError(f"record {record.id!r}: clip {clip.path} gives grid {list(grid)} but its plan "
                             f"says {list(clip.plan.grid_thw)}")
        ids, labels = self._ids_and_labels(record, with_answer)
        n_video = grid[0] * grid[1] * grid[2] // self.pixels.merge_size ** 2
        ids, labels = self._expand_video(ids, labels, n_video, record)
        input_ids = torch.tensor(ids, dtype=torch.long)
        grid_thw = torch.tensor([grid], dtype=torch.long)
        second_per_grid = torch.tensor([clip.second_per_grid], dtype=torch.float32)
        types = torch.where(input_ids == self.video_token_id, VIDEO_TYPE, TEXT_TYPE)
        positions = rope.mrope_position_ids(input_ids, grid_thw, second_per_grid,
                                            spatial_merge_size=self.pixels.merge_size,
                                            video_token_id=self.video_token_id)
        return Sample(input_ids, torch.tensor(labels, dtype=torch.long), pixel_values, grid_thw, second_per_grid,
                      positions, types, record.id)

    def encode_prefix(self, record: VideoQARecord, clip: "Clip") -> PromptPrefix:
        """What every question about `clip` shares: system prompt + video, up to and including the last
        `<|vision_end|>` (a special token, so tokenization never merges across it). One full `encode`."""
        sample = self.encode(record, clip, with_answer=False)
        template_ids, _ = self._ids_and_labels(record, with_answer=False)
        ends = (sample.input_ids == self.vision_end_id).nonzero().flatten()
        if ends.numel() == 0:
            raise ValueError(f"record {record.id!r}: no {VISION_END} in the prompt; cannot share a prefix")
        split = int(ends[-1]) + 1
        template_split = len(template_ids) - (len(sample) - split)  # the same cut in the one-pad token list
        positions = sample.position_ids[:, :split]
        return PromptPrefix(sample.input_ids[:split], positions, int(positions[:, -1].max()) + 1,
                            sample.pixel_values_videos, sample.video_grid_thw, sample.second_per_grid_ts,
                            template_ids[:template_split], record.id)

    def encode_suffix(self, record: VideoQARecord, prefix: PromptPrefix, *, with_answer: bool = False) -> Suffix:
        """The tokens after `prefix` for one question of the same clip: equal to `encode(record, clip)`
        sliced at `len(prefix)`, without rebuilding the video's thousands of ids and positions. The suffix
        is text only, so by the 3-D rule its positions run on from `prefix.next_position` on all axes."""
        ids, labels = self._ids_and_labels(record, with_answer)
        n_shared = len(prefix.template_ids)
        if ids[:n_shared] != prefix.template_ids or len(ids) == n_shared:
            raise ValueError(f"records {prefix.record_id!r} and {record.id!r} share a clip but not the prompt "
                             "prefix (system prompt + video); score them without a shared prefix")
        rest = torch.tensor(ids[n_shared:], dtype=torch.long)
        if (rest == self.video_token_id).any():
            raise ValueError(f"record {record.id!r}: video tokens after {VISION_END}; cannot share a prefix")
        start = prefix.next_position
        positions = torch.arange(start, start + rest.numel()).repeat(3, 1)
        return Suffix(rest, torch.tensor(labels[n_shared:], dtype=torch.long), positions, record.id)

    def _ids_and_labels(self, record: VideoQARecord, with_answer: bool) -> tuple[list[int], list[int]]:
        """Token ids (one video pad) and labels. With the answer the text is the generation prompt, then
        "B<|im_end|>\n": the answer and its `<|im_end|>` are labelled, the template's trailing newline not."""
        prompt = prompts.render_prompt(record, system_prompt=self.system_prompt, add_generation_prompt=True)
        prompt_ids = self._tokenize(prompt)
        if not with_answer:
            return prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
        full = prompts.render_prompt(record, system_prompt=self.system_prompt, with_answer=True,
                                     add_generation_prompt=False)
        ids = self._tokenize(full)
        n = len(prompt_ids)
        if ids[:n] != prompt_ids or self.im_end_id not in ids[n:]:
            raise ValueError(f"record {record.id!r}: the answered prompt does not extend the generation "
                             "prompt with an answer and <|im_end|>; chat template and prompts disagree")
        end = n + ids[n:].index(self.im_end_id) + 1
        return ids, [IGNORE_INDEX] * n + ids[n:end] + [IGNORE_INDEX] * (len(ids) - end)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand_video(self, ids: list[int], labels: list[int], n: int,
                      record: VideoQARecord) -> tuple[list[int], list[int]]:
        """Replace the template's single `<|video_pad|>` with the clip's `n` vision tokens (at id level: the
        pad is one atomic special token, and tokenizing thousands of copies would only be slower)."""
        at = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(at) != 1:
            raise ValueError(f"record {record.id!r}: the prompt holds {len(at)} {prompts.VIDEO_PAD} tokens, "
                             "expected exactly one")
        i = at[0]
        return (ids[:i] + [self.video_token_id] * n + ids[i + 1:],
                labels[:i] + [IGNORE_INDEX] * n + labels[i + 1:])


# --- collation ----------------------------------------------------------------------------------------------

def _vision(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    return {"pixel_values_videos": torch.cat([s.pixel_values_videos for s in samples]),
            "video_grid_thw": torch.cat([s.video_grid_thw for s in samples]),
            "second_per_grid_ts": torch.cat([s.second_per_grid_ts for s in samples])}


def collate_padded(samples: Sequence[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for `model(**batch, use_cache=False)`: input_ids / attention_mask / labels /
    mm_token_type_ids [B, L], position_ids [3, B, L] (padded slots get rope.PAD_POSITION; they are masked)."""
    if not samples:
        raise ValueError("collate_padded: no samples")
    width = max(len(s) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    types = torch.zeros((b, width), dtype=torch.long)
    positions = torch.full((3, b, width), rope.PAD_POSITION, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        input_ids[row, :n], attention_mask[row, :n], labels[row, :n] = s.input_ids, 1, s.labels
        types[row, :n], positions[:, row, :n] = s.mm_token_type_ids, s.position_ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": positions, "mm_token_type_ids": types, **_vision(samples)}


def collate_packed(samples: Sequence[Sample]) -> dict[str, Any]:
    """Padding-free batch: every sample back to back in one row of length sum(L).

    position_ids is [4, 1, sum L]: row 0 restarts at 0 for each sample (transformers derives the
    per-sample causal blocks from it), rows 1-3 are the 3-D positions. attention_mask is None. This needs
    attn_implementation "sdpa" or "flash_attention_2" and use_cache=False (DESIGN.md facts); eager
    attention would let samples see each other. Each sample's first label is IGNORE_INDEX, so the loss
    never asks one sample's last token to predict the next sample's first."""
    if not samples:
        raise ValueError("collate_packed: no samples")
    labels = torch.cat([s.labels for s in samples])
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in samples[:-1]]), 0)
    labels[starts] = IGNORE_INDEX
    text = rope.text_positions([len(s) for s in samples])
    positions = torch.cat([text.view(1, -1), torch.cat([s.position_ids for s in samples], dim=1)])
    return {"input_ids": torch.cat([s.input_ids for s in samples]).view(1, -1), "attention_mask": None,
            "labels": labels.view(1, -1), "position_ids": positions.view(4, 1, -1),
            "mm_token_type_ids": torch.cat([s.mm_token_type_ids for s in samples]).view(1, -1),
            **_vision(samples)}
