"""Training data: LLaVA records + media dir -> processing Samples -> per-rank micro-batches, in a seeded,
deterministic, resumable order.

The order is a function of (seed, step) only: epoch `e` is `randperm(n)` under seed `seed + e`, step `s`
of it takes the next `global_batch` items, and rank `r` of `W` takes every W-th of those. So a resumed run
continues at exactly the step it stopped at, and 1 GPU and N GPUs see the same global batches.

    plan = BatchPlan(n_items=len(ds), global_batch=8, micro_batch=1, world_size=2, rank=0, seed=0)
    loader = make_loader(ds, plan, start_step=0, total_steps=100, collate=...)
    for step in range(100):
        micro_batches = [next(it) for _ in range(plan.accumulation)]

Unit of data: one question (`SFTDataset`), or with shared-prefix training one video with all its
questions (`VideoGroupDataset` + `shared_prefix_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from trafficvlm.config import VideoSpec
from trafficvlm.records import VideoQARecord, group_by_video

IGNORE_INDEX = -100


class SampleTooLong(ValueError):
    """A sample longer than model.max_length: video tokens are never truncated, so this is an error."""


class SFTDataset(Dataset):
    """One question per item: decode (through the frame cache) and encode with the one prompt."""

    def __init__(self, records: Sequence[VideoQARecord], media_dir: str | Path, spec: VideoSpec, preprocessor,
                 *, max_length: int, cache: Any = True):
        self.records, self.media_dir, self.spec = list(records), Path(media_dir), spec
        self.pre, self.max_length, self.cache = preprocessor, max_length, cache

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, rec: VideoQARecord):
        from trafficvlm.video import load_clip

        clip = load_clip(self.media_dir / rec.video, self.spec, rec.video_start, rec.video_end, cache=self.cache)
        sample = self.pre.encode(rec, clip, with_answer=True)
        if len(sample) > self.max_length:
            n_video = int((sample.input_ids == self.pre.video_token_id).sum())
            raise SampleTooLong(f"sample {rec.id!r} ({rec.video}) has {len(sample)} tokens ({n_video} of them "
                                f"video) > model.max_length {self.max_length}; video tokens are never truncated: "
                                "lower video.fps / video.max_pixels / video.total_pixels, or raise model.max_length")
        return sample

    def __getitem__(self, i: int):
        return self.encode(self.records[i])


class VideoGroupDataset(SFTDataset):
    """One video (clip) per item with all of its questions: the unit of shared-prefix training."""

    def __init__(self, records: Sequence[VideoQARecord], *args, **kw):
        super().__init__(records, *args, **kw)
        self.groups = list(group_by_video(self.records).values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        return [self.encode(rec) for rec in self.groups[i]]


# --- order ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    n_items: int
    global_batch: int
    micro_batch: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        per_step = self.world_size * self.micro_batch
        if self.global_batch % per_step:
            raise ValueError(f"train.global_batch {self.global_batch} must be a multiple of micro_batch x "
                             f"world size = {self.micro_batch} x {self.world_size}")
        if self.n_items < self.global_batch:
            raise ValueError(f"{self.n_items} training items, fewer than one global batch "
                             f"({self.global_batch}); lower train.global_batch")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world_size * self.micro_batch)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch  # the incomplete last batch of an epoch is dropped

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_items, generator=g).tolist()

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of optimizer step `step`."""
        mine = self.global_indices(step)[self.rank::self.world_size]
        return [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def index_stream(self, start_step: int, total_steps: int) -> Iterator[list[int]]:
        for step in range(start_step, total_steps):
            yield from self.micro_batches(step)


class _Batches:
    """A re-iterable batch sampler over steps [start, total) (DataLoader iterates it once per loader)."""

    def __init__(self, plan: BatchPlan, start: int, total: int):
        self.plan, self.start, self.total = plan, start, total

    def __iter__(self):
        return self.plan.index_stream(self.start, self.total)

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.accumulation


def make_loader(dataset: Dataset, plan: BatchPlan, *, start_step: int, total_steps: int,
                collate: Callable, num_workers: int = 0) -> DataLoader:
    """Micro-batches in plan order from `start_step` on; workers decode ahead while the model trains."""
    return DataLoader(dataset, batch_sampler=_Batches(plan, start_step, total_steps), collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=2 if num_workers else None)


# --- collation --------------------------------------------------------------------------------------------

def collate_fn(batching: str, pad_token_id: int) -> Callable:
    """processing's collation (`packed`: one padding-free row; `padded`), plus the record ids for errors."""
    from trafficvlm import processing

    def collate(samples):
        if batching == "packed":
            batch = processing.collate_packed(samples)
        else:
            batch = processing.collate_padded(samples, pad_token_id)
        return dict(batch), [s.record_id for s in samples]

    return collate


def collate_shared(groups):
    """Shared-prefix collation: each video (all of its questions) is one shared-prefix sequence; several
    videos in a micro-batch are packed into one row (`pack_sequences`)."""
    batches = [shared_prefix_batch(g) for g in groups]
    ids = [s.record_id for g in groups for s in g]
    return (batches[0] if len(batches) == 1 else pack_sequences(batches)), ids


def pack_sequences(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several one-row batches with 4-D masks (shared-prefix sequences) as one row: tokens, labels and
    3-D positions concatenated, the masks block-diagonal (no token sees another sequence), the videos
    in the same order as their tokens. One forward then runs every matrix product, the LM head's
    152k-row weight included, once for all of them instead of once per video."""
    lengths = [b["input_ids"].shape[1] for b in batches]
    total = sum(lengths)
    mask = torch.zeros(1, 1, total, total, dtype=torch.bool)
    start = 0
    for b, n in zip(batches, lengths):
        mask[..., start:start + n, start:start + n] = b["attention_mask"]
        start += n
    out = {"input_ids": torch.cat([b["input_ids"] for b in batches], 1),
           "labels": torch.cat([b["labels"] for b in batches], 1),
           "position_ids": torch.cat([b["position_ids"] for b in batches], -1), "attention_mask": mask}
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if batches[0].get(key) is not None:
            out[key] = torch.cat([b[key] for b in batches], 0)
    return out


def shared_prefix_batch(samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """One sequence for several questions about the same clip: the common prefix (system prompt + video)
    once, then each question's remaining tokens as a branch that sees the prefix and itself only.

    Each branch keeps the positions it had in its own sample, so it continues from the prefix end exactly
    as in the per-question sequence; with the block mask, every branch's logits equal its per-question
    logits and the loss (a sum) has the gradient of the sum of per-question losses."""
    first = samples[0]
    for s in samples[1:]:
        if not torch.equal(s.pixel_values_videos, first.pixel_values_videos):
            raise ValueError(f"shared prefix: {s.record_id!r} and {first.record_id!r} do not share a clip")
    p = _common_prefix(samples)
    ids, labels, pos = [first.input_ids[:p]], [torch.full((p,), IGNORE_INDEX)], [first.position_ids[:, :p]]
    spans = []
    for s in samples:
        spans.append((sum(x.numel() for x in ids), len(s) - p))
        ids.append(s.input_ids[p:])
        labels.append(s.labels[p:])
        pos.append(s.position_ids[:, p:])
    length = sum(x.numel() for x in ids)
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(pos, dim=1)[:, None], "attention_mask": branch_mask(p, spans, length),
            "pixel_values_videos": first.pixel_values_videos, "video_grid_thw": first.video_grid_thw,
            "second_per_grid_ts": first.second_per_grid_ts}


def _common_prefix(samples: Sequence[Any]) -> int:
    """Length of the longest token prefix all samples share (system prompt, video, shared question text),
    cut so that every token predicting a label lies in a branch (a prefix token has one next token only)."""
    n = min(len(s) for s in samples)
    ids = torch.stack([s.input_ids[:n] for s in samples])
    differs = (ids != ids[0]).any(0).nonzero()
    p = int(differs[0]) if differs.numel() else n
    first_labels = [int((s.labels != IGNORE_INDEX).nonzero()[0]) for s in samples]
    return min([p, *(f - 1 for f in first_labels)])


def branch_mask(prefix: int, spans: list[tuple[int, int]], length: int, first_row: int = 0) -> torch.Tensor:
    """Bool [1, 1, L - first_row, L] attention mask (True = may attend): causal in the prefix; each branch
    (start, length) sees the whole prefix and itself causally, never another branch. `first_row` keeps
    only the query rows from there on (eval's branches on a cached prefix: first_row = prefix)."""
    allowed = torch.zeros(length - first_row, length, dtype=torch.bool)
    allowed[:, :prefix] = True
    for start, n in spans:
        allowed[max(start - first_row, 0):start + n - first_row, start:start + n] = True
    causal = torch.ones(length - first_row, length, dtype=torch.bool).tril(diagonal=first_row)
    return (allowed & causal)[None, None]