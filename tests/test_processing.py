"""trafficvlm.processing on the tiny model: labels, positions, pixels, padded vs packed collation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from trafficvlm import rope
from trafficvlm.config import VideoSpec
from trafficvlm.model import PixelSpec, build_tiny, load_model, load_processor
from trafficvlm.processing import (IGNORE_INDEX, VIDEO_TYPE, Preprocessor, collate_packed, collate_padded,
                                   patchify_video)
from trafficvlm.records import VideoQARecord
from trafficvlm.video import Clip, Plan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def pre(tiny) -> Preprocessor:
    return Preprocessor(load_processor(tiny), VideoSpec())


@pytest.fixture(scope="module")
def pre4(tiny) -> Preprocessor:
    """fps 4: 0.5 s per temporal grid step, the case transformers 5.17 truncates to 0."""
    return Preprocessor(load_processor(tiny), VideoSpec(fps=4.0))


def _record(i: int = 0, answer: str | None = "b") -> VideoQARecord:
    return VideoQARecord(id=f"q{i}", video="v.mp4", question=f"What is the weather in clip {i}?" + " really" * i,
                         options={"a": "Sunny", "b": "Rainy", "c": "Foggy"}, answer=answer)


def _clip(frames: int = 4, height: int = 56, width: int = 56, second_per_grid: float = 2.0, seed: int = 0) -> Clip:
    """A clip as video.load_clip returns it: frames already sampled and sized to multiples of 28."""
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    grid = (frames // 2, height // 14, width // 14)
    plan = Plan(frames, height, width, grid[0] * grid[1] * grid[2] // 4, grid, second_per_grid,
                list(range(frames)))
    return Clip(pixels, list(range(frames)), 30.0, second_per_grid, plan, "synthetic.mp4")


def test_labels_cover_exactly_the_answer_and_im_end(pre):
    s = pre.encode(_record(), _clip())
    labelled = s.labels != IGNORE_INDEX
    assert pre.tokenizer.decode(s.input_ids[labelled]) == "B<|im_end|>"
    assert torch.equal(s.labels[labelled], s.input_ids[labelled])
    # The template's newline after <|im_end|> follows, unlabelled.
    assert pre.tokenizer.decode(s.input_ids[-1:]) == "\n" and s.labels[-1] == IGNORE_INDEX

    prompt = pre.encode(_record(), _clip(), with_answer=False)
    assert (prompt.labels == IGNORE_INDEX).all()
    assert torch.equal(s.input_ids[:len(prompt)], prompt.input_ids)
    assert pre.tokenizer.decode(prompt.input_ids[-3:]) == "<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="q0.*no answer"):
        pre.encode(_record(answer=None), _clip())


def test_sample_tensors_follow_the_clip_and_rope(pre4):
    clip = _clip(frames=6, height=56, width=84, second_per_grid=0.5)
    s = pre4.encode(_record(), clip)
    n_video = 3 * 4 * 6 // 4
    assert int((s.input_ids == 151656).sum()) == n_video
    assert torch.equal(s.mm_token_type_ids, torch.where(s.input_ids == 151656, VIDEO_TYPE, 0))
    assert s.video_grid_thw.tolist() == [[3, 4, 6]] and s.second_per_grid_ts.tolist() == [0.5]
    assert s.pixel_values_videos.shape == (3 * 4 * 6, 3 * 2 * 14 * 14)
    assert torch.equal(s.position_ids, rope.mrope_position_ids(s.input_ids, [[3, 4, 6]], [0.5]))
    assert s.record_id == "q0" and len(s) == s.input_ids.numel() == s.labels.numel()


def test_clip_must_match_the_spec_and_its_plan(pre):
    clip = _clip()
    clip.plan.grid_thw = (2, 4, 6)
    with pytest.raises(ValueError, match=r"q0.*grid \[2, 4, 4\].*plan says \[2, 4, 6\]"):
        pre.encode(_record(), clip)
    with pytest.raises(ValueError, match=r"sampled at 0.5 s per grid step.*fps 1.0"):
        pre.encode(_record(), _clip(second_per_grid=0.5))


def test_patchify_layout():
    """Patch vectors are [C, frame, row, col] blocks, merge windows of 2x2 patches are contiguous."""
    frames = np.zeros((2, 56, 56, 3), dtype=np.uint8)
    frames[1] = 255                      # second frame of the temporal pair
    frames[:, 14:28, :14, 0] = 128       # patch (row 1, col 0), red channel
    pix, grid = patchify_video(frames, PixelSpec())
    assert grid == (1, 4, 4)
    patch = pix.view(16, 3, 2, 14, 14)
    spec = PixelSpec()
    low, high = (0 - spec.image_mean[2] * 255) / (spec.image_std[2] * 255), (1 - spec.image_mean[2]) / spec.image_std[2]
    assert torch.allclose(patch[0, 2, 0], torch.full((14, 14), low)) and torch.allclose(patch[0, 2, 1], torch.full((14, 14), high))
    # Patches go by 2x2 merge window: (0,0), (0,1), (1,0), (1,1), then (0,2)...; row-major would put
    # (1,0) at index 4.
    red = (128 / 255 - spec.image_mean[0]) / spec.image_std[0]
    assert torch.allclose(patch[2, 0, 0], torch.full((14, 14), red))
    assert not torch.allclose(patch[4, 0, 0], torch.full((14, 14), red))
    with pytest.raises(ValueError, match="H, W of 28"):
        patchify_video(np.zeros((2, 50, 56, 3), dtype=np.uint8), spec)


def test_patchify_matches_the_transformers_image_processor():
    """A still frame pair equals what transformers' Qwen2-VL image processor makes of that frame."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ours, grid = patchify_video(np.stack([frame, frame]), PixelSpec())
    hf = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 10**7})
    out = hf(images=[frame], do_resize=False, return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [list(grid)]
    assert torch.allclose(ours, out["pixel_values"].float(), atol=1e-5)


def test_patchify_matches_the_transformers_video_processor():
    pytest.importorskip("torchvision")  # transformers' video processor needs it; we do not
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.random.default_rng(2).integers(0, 256, (6, 56, 84, 3), dtype=np.uint8)
    hf = Qwen2VLVideoProcessor(size={"shortest_edge": 3136, "longest_edge": 10**7})
    out = hf(videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt")
    ours, grid = patchify_video(frames, PixelSpec())
    assert out["video_grid_thw"].tolist() == [list(grid)]
    assert torch.equal(ours, out["pixel_values_videos"])


def test_padded_and_packed_give_the_same_logits(pre4, model):
    pre = pre4
    samples = [pre.encode(_record(0), _clip(second_per_grid=0.5, seed=0)),
               pre.encode(_record(3), _clip(frames=2, height=56, width=84, second_per_grid=0.5, seed=1))]
    assert len(samples[0]) != len(samples[1])
    with torch.no_grad():
        padded = model(**collate_padded(samples, pre.pad_token_id), use_cache=False)
        packed_batch = collate_packed(samples)
        packed = model(**packed_batch, use_cache=False)
    offset = 0
    for row, s in enumerate(samples):
        n = len(s)
        torch.testing.assert_close(packed.logits[0, offset:offset + n], padded.logits[row, :n], atol=1e-5, rtol=1e-5)
        offset += n
    assert packed_batch["position_ids"].shape == (4, 1, offset)
    assert packed_batch["position_ids"][0, 0, len(samples[0])] == 0
    # Same loss: both average over the same labelled tokens.
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=1e-5)


def test_explicit_positions_differ_from_transformers_own(pre4, model):
    """Why every batch carries position_ids: at fps 4 (second_per_grid 0.5) transformers 5.17 truncates
    the time step to 0, and restarts text after a video at s + max(h, w) / merge, not at max + 1."""
    s = pre4.encode(_record(), _clip(frames=4, second_per_grid=0.5))
    batch = collate_padded([s], pre4.pad_token_id)
    hf_positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 video_grid_thw=batch["video_grid_thw"],
                                                 second_per_grid_ts=batch["second_per_grid_ts"])
    video = s.input_ids == 151656
    ours_t = s.position_ids[0, video]
    assert ours_t.unique().numel() == 2                  # two temporal groups, one step apart
    assert hf_positions[0, 0, video].unique().numel() == 1  # collapsed in time
    assert not torch.equal(hf_positions[:, 0], s.position_ids)
    with torch.no_grad():
        ours = model(**batch, use_cache=False).logits
        theirs = model(**{k: v for k, v in batch.items() if k != "position_ids"}, use_cache=False).logits
    assert not torch.allclose(ours, theirs, atol=1e-4)
