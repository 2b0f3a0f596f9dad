"""Qwen2.5-VL 3-D rotary position ids (M-RoPE), owned here (DESIGN.md contract 2).

Cosmos-Reason1 / Qwen2.5-VL was trained, and vLLM serves it, with this rule:

- text tokens advance by 1 on all three axes (t, h, w);
- a vision block (a run of `<|image_pad|>` or `<|video_pad|>` tokens) starting at position `s` covers its
  merged grid (`grid_t x grid_h/merge x grid_w/merge`, row-major in t, h, w) with
  `t = s + floor(g * second_per_grid * tokens_per_second)`, `h = s + row`, `w = s + col`
  (images: `second_per_grid = 0`, so `t = s`);
- the text after a block starts at the block's maximum over all three axes, plus 1.

transformers 5.x departs from this (it truncates `second_per_grid` to an int before scaling, collapsing
time at fps > 2, and since 5.3 restarts text at `s + max(h, w)`), and without `mm_token_type_ids` it falls
back to 1-D positions. So every forward we run passes these `position_ids` explicitly.

    >>> import torch
    >>> from trafficvlm.rope import mrope_position_ids
    >>> ids = torch.tensor([1, 2] + [151656] * 4 + [3])       # text, 1 video of grid (1, 4, 4), text
    >>> mrope_position_ids(ids, [[1, 4, 4]], [2.0]).tolist()
    [[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 2, 3, 3, 4], [0, 1, 2, 3, 2, 3, 4]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
PAD_POSITION = 1  # what padded slots get (HF 4.x filled them with 1; 5.17 uses 0); attention masks them out

GridLike = torch.Tensor | Sequence[Sequence[int]] | None
TimesLike = torch.Tensor | Sequence[float] | None


@dataclass(frozen=True)
class _Block:
    """One run of vision pad tokens: `input_ids[start:end]` all equal `token_id`."""

    start: int
    end: int
    token_id: int


def _as_grids(grids: GridLike, name: str) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    rows = grids.tolist() if isinstance(grids, torch.Tensor) else [list(g) for g in grids]
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise ValueError(f"{name}[{i}]: expected (t, h, w), got {row}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def _as_times(times: TimesLike) -> list[float]:
    if times is None:
        return []
    return [float(x) for x in (times.tolist() if isinstance(times, torch.Tensor) else times)]


def _vision_blocks(ids: torch.Tensor, image_token_id: int, video_token_id: int) -> list[_Block]:
    """Runs of image/video pad tokens, found without a per-token Python loop (a 75 s clip is 3.4k tokens)."""
    kind = torch.where((ids == image_token_id) | (ids == video_token_id), ids, torch.full_like(ids, -1))
    if ids.numel() == 0:
        return []
    change = torch.ones_like(kind, dtype=torch.bool)
    change[1:] = kind[1:] != kind[:-1]
    starts = torch.nonzero(change).flatten().tolist()
    ends = starts[1:] + [ids.numel()]
    kinds = kind[change].tolist()
    return [_Block(s, e, k) for s, e, k in zip(starts, ends, kinds) if k != -1]


def _block_positions(start: int, grid: tuple[int, int, int], second_per_grid: float, merge: int,
                     tokens_per_second: float) -> torch.Tensor:
    """[3, n] positions of one merged grid starting at `start`.

    Time is computed as float32 `arange * second_per_grid * tokens_per_second` then truncated, the same
    arithmetic vLLM and transformers 4.x use, so that fractional products land on the same integers."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt = (torch.arange(t, dtype=torch.float32) * second_per_grid * tokens_per_second).long()
    t_idx = tt.view(t, 1, 1).expand(t, h, w)
    h_idx = torch.arange(h).view(1, h, 1).expand(t, h, w)
    w_idx = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([t_idx, h_idx, w_idx]).reshape(3, -1) + start


def mrope_position_ids(input_ids: torch.Tensor, video_grid_thw: GridLike, second_per_grid_ts: TimesLike, *,
                       image_grid_thw: GridLike = None, spatial_merge_size: int = 2,
                       tokens_per_second: float = 2, image_token_id: int = IMAGE_TOKEN_ID,
                       video_token_id: int = VIDEO_TOKEN_ID) -> torch.Tensor:
    """LongTensor[3, L] positions of one unpadded sequence (`input_ids` of shape [L] or [1, L]).

    Vision blocks are matched to grids in order of appearance, images and videos each in their own order;
    `second_per_grid_ts[i]` (seconds per temporal grid step, `2 / fps`) belongs to video i. Two blocks of
    the same kind must be separated by text (the chat template's `<|vision_end|><|vision_start|>`). Raises
    ValueError when a block's token count does not match its grid, or grids and blocks differ in number."""
    ids = input_ids.reshape(-1) if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if ids.dim() != 1:
        raise ValueError(f"input_ids: expected shape [L] or [1, L], got {list(input_ids.shape)}")
    videos, images = _as_grids(video_grid_thw, "video_grid_thw"), _as_grids(image_grid_thw, "image_grid_thw")
    times = _as_times(second_per_grid_ts)
    if len(times) < len(videos):
        raise ValueError(f"second_per_grid_ts has {len(times)} entries for {len(videos)} videos")
    blocks = _vision_blocks(ids.cpu(), image_token_id, video_token_id)
    _check_counts(blocks, image_token_id, len(images), len(videos))

    pos = torch.empty(3, ids.numel(), dtype=torch.long)
    next_pos, text_from, n_img, n_vid = 0, 0, 0, 0
    for i, block in enumerate(blocks):
        n_text = block.start - text_from
        pos[:, text_from:block.start] = torch.arange(next_pos, next_pos + n_text)
        if block.token_id == image_token_id:
            grid, spg, kind, n_img = images[n_img], 0.0, f"image {n_img}", n_img + 1
        else:
            grid, spg, kind, n_vid = videos[n_vid], times[n_vid], f"video {n_vid}", n_vid + 1
        expected = grid[0] * grid[1] * grid[2] // spatial_merge_size**2
        if block.end - block.start != expected:
            raise ValueError(f"vision block {i} ({kind}, tokens {block.start}:{block.end}) has "
                             f"{block.end - block.start} pad tokens but grid {list(grid)} / merge "
                             f"{spatial_merge_size}^2 needs {expected}")
        block_pos = _block_positions(next_pos + n_text, grid, spg, spatial_merge_size, tokens_per_second)
        pos[:, block.start:block.end] = block_pos
        next_pos, text_from = int(block_pos.max()) + 1, block.end
    pos[:, text_from:] = torch.arange(next_pos, next_pos + ids.numel() - text_from)
    return pos.to(ids.device)


def _check_counts(blocks: list[_Block], image_token_id: int, n_images: int, n_videos: int) -> None:
    found_img = sum(b.token_id == image_token_id for b in blocks)
    found_vid = len(blocks) - found_img
    if found_img != n_images or found_vid != n_videos:
        raise ValueError(f"input_ids hold {found_img} image and {found_vid} video blocks, but "
                         f"{n_images} image_grid_thw and {n_videos} video_grid_thw rows were given")


def batch_position_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, video_grid_thw: GridLike,
                       second_per_grid_ts: TimesLike, image_grid_thw: GridLike = None,
                       **kw) -> torch.Tensor:
    """LongTensor[3, B, L] for a padded batch (left or right padding).

    Grids are consumed in batch order (row 0's videos first), as the HF processor lays them out. Each row's
    real tokens (attention_mask == 1) get `mrope_position_ids`; padded slots get PAD_POSITION (1)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [B, L], got {list(input_ids.shape)}")
    image_id, video_id = kw.get("image_token_id", IMAGE_TOKEN_ID), kw.get("video_token_id", VIDEO_TOKEN_ID)
    videos, images = _as_grids(video_grid_thw, "video_grid_thw"), _as_grids(image_grid_thw, "image_grid_thw")
    times = _as_times(second_per_grid_ts)
    out = torch.full((3, *input_ids.shape), PAD_POSITION, dtype=torch.long, device=input_ids.device)
    n_img = n_vid = 0
    for row in range(input_ids.shape[0]):
        keep = (attention_mask[row] if attention_mask is not None else torch.ones_like(input_ids[row])).bool()
        ids = input_ids[row][keep]
        blocks = _vision_blocks(ids.cpu(), image_id, video_id)
        row_img = sum(b.token_id == image_id for b in blocks)
        row_vid = len(blocks) - row_img
        out[:, row, keep] = mrope_position_ids(
            ids, videos[n_vid:n_vid + row_vid], times[n_vid:n_vid + row_vid],
            image_grid_thw=images[n_img:n_img + row_img], **kw)
        n_img, n_vid = n_img + row_img, n_vid + row_vid
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"batch holds {n_img} image and {n_vid} video blocks, but {len(images)} image and "
                         f"{len(videos)} video grids were given")
    return out


def text_positions(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Row 0 of packed 4-row position_ids: 0..n-1 per sample, concatenated (LongTensor[sum(lengths)]).

    With sdpa, transformers finds packed-sample boundaries where this row restarts at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
