"""Shared-prefix eval inputs: `Preprocessor.encode_prefix` / `encode_suffix` equal the full `encode`, the
engine's prepared path equals scoring from full encodes, the eval loop's prefetch keeps order and errors,
letter branches on one cache equal suffixes on expanded copies of it, and `compile_vision` is a no-op on CPU. Tiny random model, synthetic clips; a few seconds on a CPU."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from trafficvlm.config import VideoSpec
from trafficvlm.model import build_tiny, load_model, load_processor
from trafficvlm.processing import IGNORE_INDEX, Preprocessor
from trafficvlm.records import VideoQARecord
from trafficvlm.video import Clip, Plan

SYSTEM = "You watch traffic."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def processor(tiny):
    return load_processor(tiny)


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny, attn_implementation="sdpa").eval()


def _records(n: int = 4) -> list[VideoQARecord]:
    """Questions of different lengths and option counts about one clip."""
    opts = [{"a": "Sunny", "b": "Rainy"}, {"a": "Dry", "b": "Wet", "c": "Icy", "d": "Snowy"}]
    return [VideoQARecord(id=f"q{i}", video="v.mp4", question=f"Question {i}?" + " and more" * i,
                          options=opts[i % 2], answer="b") for i in range(n)]


def _clip(frames: int = 6, height: int = 56, width: int = 84, second_per_grid: float = 0.5) -> Clip:
    pixels = np.random.default_rng(0).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    grid = (frames // 2, height // 14, width // 14)
    plan = Plan(frames, height, width, grid[0] * grid[1] * grid[2] // 4, grid, second_per_grid,
                list(range(frames)))
    return Clip(pixels, list(range(frames)), 30.0, second_per_grid, plan, "synthetic.mp4")


@pytest.mark.parametrize("with_answer", [False, True])
def test_prefix_plus_suffix_equals_the_full_encoding(processor, with_answer):
    pre = Preprocessor(processor, VideoSpec(fps=4.0), SYSTEM)  # 0.5 s per grid step: fractional times
    clip, records = _clip(), _records()
    prefix = pre.encode_prefix(records[0], clip)
    assert pre.tokenizer.convert_ids_to_tokens(int(prefix.input_ids[-1])) == "<|vision_end|>"
    for r in records:
        full = pre.encode(r, clip, with_answer=with_answer)
        suffix = pre.encode_suffix(r, prefix, with_answer=with_answer)
        assert torch.equal(torch.cat([prefix.input_ids, suffix.input_ids]), full.input_ids)
        assert torch.equal(torch.cat([prefix.position_ids, suffix.position_ids], dim=1), full.position_ids)
        assert torch.equal(torch.cat([torch.full((len(prefix),), IGNORE_INDEX), suffix.labels]), full.labels)
        assert torch.equal(prefix.pixel_values_videos, full.pixel_values_videos)
        assert torch.equal(prefix.video_grid_thw, full.video_grid_thw)
        assert torch.equal(prefix.second_per_grid_ts, full.second_per_grid_ts)
        assert suffix.record_id == r.id


def test_a_suffix_must_extend_the_same_prefix(processor):
    clip, record = _clip(), _records(1)[0]
    prefix = Preprocessor(processor, VideoSpec(fps=4.0), SYSTEM).encode_prefix(record, clip)
    other = Preprocessor(processor, VideoSpec(fps=4.0), SYSTEM + " Be brief.")
    with pytest.raises(ValueError, match="share a clip but not the prompt prefix"):
        other.encode_suffix(record, prefix)


def test_prepared_scoring_equals_scoring_from_full_encodes(model, processor):
    """The engine's answers are bit-identical to the former path: every question fully encoded, the
    prefill and the suffixes sliced out of those encodings."""
    from trafficvlm.evaluate import LocalEngine

    spec, clip, records = VideoSpec(fps=4.0), _clip(), _records(5)
    engine = LocalEngine(model, processor, spec, SYSTEM, question_batch=3, branches=False)
    new = engine.score([(records, clip)])[0]
    assert engine.score_prepared(engine.prepare([(records, clip)]))[0] == new

    full = [engine.pre.encode(r, clip, with_answer=False) for r in records]
    split = int((full[0].input_ids == engine.pre.vision_end_id).nonzero()[-1]) + 1
    with torch.inference_mode():
        _, cache = engine._forward(full[0].input_ids[None, :split], full[0].position_ids[:, None, :split], None,
                                   cache=None, vision=engine._vision(full[:1]))
        old = []
        for start in range(0, len(records), 3):
            old += engine._continue(cache, split, records[start:start + 3],
                                    [(s.input_ids[split:], s.position_ids[:, split:]) for s in full[start:start + 3]])
    assert [a.predicted for a in new] == [a.predicted for a in old]
    assert [a.letter_probs for a in new] == [a.letter_probs for a in old]


def test_max_length_still_names_the_record(model, processor):
    from trafficvlm.evaluate import LocalEngine

    engine = LocalEngine(model, processor, VideoSpec(fps=4.0), SYSTEM, max_length=10)
    with pytest.raises(ValueError, match="record 'q0'.*exceeds max_length 10"):
        engine.prepare([(_records(2), _clip())])


def test_prefetch_keeps_order_and_raises_at_the_failing_item():
    from trafficvlm.stages.evaluate import _prefetched

    seen = []

    def work(x):
        seen.append(x)
        if x == 3:
            raise RuntimeError("bad clip 3")
        return x * 10

    got = []
    with pytest.raises(RuntimeError, match="bad clip 3"):
        for y in _prefetched(work, [0, 1, 2, 3, 4]):
            got.append(y)
    assert got == [0, 10, 20] and seen[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize("question_batch", [16, 3])
def test_branches_equal_suffixes_on_expanded_cache_copies(model, processor, question_batch):
    """Masked branches on one cache (the default) answer as the padded batch on expanded copies does; with
    question_batch 3 the five questions take two chunks, so the cache must be cropped between them (a
    chunk seeing the previous chunk's branches would change its probabilities)."""
    from trafficvlm.evaluate import LocalEngine

    spec, clip, records = VideoSpec(fps=4.0), _clip(), _records(5)
    branched = LocalEngine(model, processor, spec, SYSTEM, question_batch=question_batch)
    expanded = LocalEngine(model, processor, spec, SYSTEM, question_batch=question_batch, branches=False)
    assert branched.branches and not expanded.branches
    a, b = branched.score([(records, clip)])[0], expanded.score([(records, clip)])[0]
    assert [x.predicted for x in a] == [x.predicted for x in b]
    for x, y in zip(a, b):
        assert x.letter_probs.keys() == y.letter_probs.keys()
        assert max(abs(x.letter_probs[k] - y.letter_probs[k]) for k in x.letter_probs) < 1e-5


def test_branches_see_nothing_of_each_other(model, processor):
    """A question's answer does not depend on which other questions share its forward."""
    from trafficvlm.evaluate import LocalEngine

    spec, clip, records = VideoSpec(fps=4.0), _clip(), _records(4)
    engine = LocalEngine(model, processor, spec, SYSTEM)
    together = engine.score([(records, clip)])[0]
    alone = [engine.score([([r], clip)])[0][0] for r in records]
    for x, y in zip(together, alone):
        assert max(abs(x.letter_probs[k] - y.letter_probs[k]) for k in x.letter_probs) < 1e-5


def test_compile_vision_is_a_noop_on_cpu(model, processor):
    from trafficvlm.evaluate import LocalEngine
    from trafficvlm.fast_vision import compile_vision_blocks, vision_compiled

    assert compile_vision_blocks(model) == 0 and not vision_compiled(model)
    engine = LocalEngine(model, processor, VideoSpec(fps=4.0), SYSTEM)  # compile_vision defaults to True
    assert len(engine.score([(_records(2), _clip())])[0]) == 2


@pytest.mark.parametrize("flag", ["compile_vision", "compile_text"])
def test_cli_compile_flags_reach_the_config(flag):
    from trafficvlm.config import load_eval_config
    from trafficvlm.stages.evaluate import _overrides, add_cli

    sub = argparse.ArgumentParser().add_subparsers()
    add_cli(sub)
    args = sub.choices["eval"].parse_args(["--no-" + flag.replace("_", "-"), "--out", "x"])
    assert _overrides(args)[flag] is False
    assert getattr(load_eval_config(None, _overrides(args)), flag) is False
    assert getattr(load_eval_config(None, {}), flag) is True
    assert flag not in _overrides(sub.choices["eval"].parse_args(["--out", "x"]))


def test_patchify_equals_the_float_reordering_it_replaced():
    """patchify_video reorders uint8 before converting; the numbers must be the float path's, bit for bit."""
    from trafficvlm.model import PixelSpec
    from trafficvlm.processing import patchify_video

    px = PixelSpec()
    frames = np.random.default_rng(3).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    p, tp, m = px.patch_size, px.temporal_patch_size, px.merge_size
    mean = torch.tensor(px.image_mean) * (1.0 / px.rescale_factor)
    std = torch.tensor(px.image_std) * (1.0 / px.rescale_factor)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    gt, gh, gw = 4 // tp, 56 // p, 84 // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    got, grid = patchify_video(frames, px)
    assert grid == (gt, gh, gw)
    assert torch.equal(got, x.reshape(gt * gh * gw, 3 * tp * p * p))
    wider = np.concatenate([frames, frames[:, :, :28]], axis=2)
    assert torch.equal(patchify_video(wider[:, :, :84], px)[0], got)  # a non-contiguous view of the frames


def test_branch_row_mask_is_the_branch_rows_of_the_training_mask():
    from trafficvlm.data import branch_mask
    from trafficvlm.evaluate import branch_row

    suffixes = [(torch.arange(n) + 100 * n, torch.arange(n).view(1, -1).expand(3, -1) + 7) for n in (3, 1, 4)]
    row = branch_row(5, suffixes)
    spans = [(5, 3), (8, 1), (9, 4)]
    assert torch.equal(row.mask, branch_mask(5, spans, 13)[:, :, 5:])
    assert row.input_ids.shape == (1, 8) and row.position_ids.shape == (3, 1, 8)
    assert row.ends.tolist() == [2, 3, 7]
