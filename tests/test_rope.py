"""Golden tests for the project's 3-D rotary positions (DESIGN.md contract 2).

The expected positions below are computed by hand from the rule, not by running the code:
text +1; a block at s gets t = s + floor(g * second_per_grid * 2), h = s + row, w = s + col; text after
a block resumes at the block's max + 1.
"""

import math
import random
import types

import pytest
import torch

from trafficvlm.rope import batch_position_ids, mrope_position_ids, text_positions

IMG, VID = 151655, 151656
T = 7  # any text token


def ids(*parts):
    return torch.tensor([tok for tok, n in parts for _ in range(n)])


def test_text_only_is_1d():
    pos = mrope_position_ids(ids((T, 5)), None, None)
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 3


def test_one_video_fps1():
    # grid (4, 4, 4), fps 1 -> second_per_grid 2.0 -> t step 4; merged grid 4 x 2 x 2 = 16 tokens at s = 2.
    pos = mrope_position_ids(ids((T, 2), (VID, 16), (T, 2)), [[4, 4, 4]], [2.0])
    assert pos.tolist() == [
        [0, 1] + [2] * 4 + [6] * 4 + [10] * 4 + [14] * 4 + [15, 16],
        [0, 1] + [2, 2, 3, 3] * 4 + [15, 16],
        [0, 1] + [2, 3, 2, 3] * 4 + [15, 16],
    ]


def test_accepts_batch_of_one_and_tensor_grids():
    seq = ids((T, 2), (VID, 16), (T, 2))
    a = mrope_position_ids(seq[None], torch.tensor([[4, 4, 4]]), torch.tensor([2.0]))
    assert torch.equal(a, mrope_position_ids(seq, [[4, 4, 4]], [2.0]))


def test_fractional_second_per_grid_fps3():
    # fps 3 -> 2/3 s per grid; t offsets floor(g * 4/3) = 0, 1, 2, 4 (transformers 5.17 makes them all 0).
    pos = mrope_position_ids(ids((T, 1), (VID, 16), (T, 1)), [[4, 4, 4]], [2 / 3])
    assert pos.tolist() == [
        [0] + [1] * 4 + [2] * 4 + [3] * 4 + [5] * 4 + [6],
        [0] + [1, 1, 2, 2] * 4 + [6],
        [0] + [1, 2, 1, 2] * 4 + [6],
    ]


def test_fractional_second_per_grid_fps5():
    # fps 5 -> 0.4 s per grid; grid (6, 2, 2) merges to one token per step; t offsets floor(g * 0.8).
    pos = mrope_position_ids(ids((T, 3), (VID, 6), (T, 2)), [[6, 2, 2]], [0.4])
    assert pos.tolist() == [
        [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9],
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 8, 9],
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 8, 9],
    ]


def test_image_then_video_then_text():
    # image (1, 4, 6) -> 2 x 3 tokens at s = 2, t fixed; next text at 2 + 2 + 1 = 5.
    # video (2, 4, 4) at fps 1 -> 2 x 2 x 2 tokens at s = 7, t = 7, 11; next text at 12.
    seq = ids((T, 2), (IMG, 6), (T, 2), (VID, 8), (T, 2))
    pos = mrope_position_ids(seq, [[2, 4, 4]], [2.0], image_grid_thw=[[1, 4, 6]])
    assert pos.tolist() == [
        [0, 1] + [2] * 6 + [5, 6] + [7] * 4 + [11] * 4 + [12, 13],
        [0, 1] + [2, 2, 2, 3, 3, 3] + [5, 6] + [7, 7, 8, 8] * 2 + [12, 13],
        [0, 1] + [2, 3, 4, 2, 3, 4] + [5, 6] + [7, 8, 7, 8] * 2 + [12, 13],
    ]


def test_two_videos_each_with_its_own_second_per_grid():
    # A: (2, 2, 2) at fps 1 -> 1 token per step, t = 1, 5. B: (2, 4, 2) at fps 2 -> 2 x 1 per step, t = 7, 9.
    seq = ids((T, 1), (VID, 2), (T, 1), (VID, 4), (T, 1))
    pos = mrope_position_ids(seq, [[2, 2, 2], [2, 4, 2]], [2.0, 1.0])
    assert pos.tolist() == [
        [0, 1, 5, 6, 7, 7, 9, 9, 10],
        [0, 1, 1, 6, 7, 8, 7, 8, 10],
        [0, 1, 1, 6, 7, 7, 7, 7, 10],
    ]


def test_token_count_mismatch_names_the_block():
    seq = ids((T, 1), (VID, 2), (T, 1), (VID, 3), (T, 1))
    with pytest.raises(ValueError, match=r"vision block 1 \(video 1.*has 3 pad tokens.*needs 4"):
        mrope_position_ids(seq, [[2, 2, 2], [2, 4, 2]], [2.0, 1.0])


def test_grid_count_mismatch():
    with pytest.raises(ValueError, match="1 video blocks, but 0 image_grid_thw and 2 video_grid_thw"):
        mrope_position_ids(ids((T, 1), (VID, 2)), [[2, 2, 2], [2, 2, 2]], [2.0, 2.0])
    with pytest.raises(ValueError, match="second_per_grid_ts has 0 entries for 1 videos"):
        mrope_position_ids(ids((T, 1), (VID, 2)), [[2, 2, 2]], None)


# --- property test against a per-token reference written independently -----------------------------------

def reference_positions(layout, merge=2, tps=2):
    """Plain per-token loop over a layout [("text", n) | ("image", grid) | ("video", grid, spg)]."""
    t_row, h_row, w_row = [], [], []
    nxt = 0
    for item in layout:
        if item[0] == "text":
            for _ in range(item[1]):
                t_row.append(nxt), h_row.append(nxt), w_row.append(nxt)
                nxt += 1
            continue
        gt, gh, gw = item[1]
        spg = item[2] if item[0] == "video" else 0.0
        s, top = nxt, nxt
        for g in range(gt):
            for r in range(gh // merge):
                for c in range(gw // merge):
                    t, h, w = s + math.floor(g * spg * tps), s + r, s + c
                    t_row.append(t), h_row.append(h), w_row.append(w)
                    top = max(top, t, h, w)
        nxt = top + 1
    return [t_row, h_row, w_row]


def random_layout(rng):
    layout = [("text", rng.randint(0, 4))]
    for _ in range(rng.randint(0, 4)):
        grid = (rng.randint(1, 12), 2 * rng.randint(1, 5), 2 * rng.randint(1, 5))
        if rng.random() < 0.3:
            layout.append(("image", (1, grid[1], grid[2])))
        else:  # fps 0.5 .. 8, the fractional ones included
            layout.append(("video", grid, 2 / rng.choice([0.5, 1, 1.5, 2, 3, 4, 5, 6, 8])))
        # >= 1 text token between blocks, as the chat template's <|vision_end|>/<|vision_start|> guarantee
        layout.append(("text", rng.randint(1, 3)))
    return layout


def encode(layout, merge=2):
    toks, videos, times, images = [], [], [], []
    for item in layout:
        if item[0] == "text":
            toks += [T] * item[1]
            continue
        n = item[1][0] * item[1][1] * item[1][2] // merge**2
        toks += [IMG if item[0] == "image" else VID] * n
        (images if item[0] == "image" else videos).append(list(item[1]))
        if item[0] == "video":
            times.append(item[2])
    return torch.tensor(toks, dtype=torch.long), videos, times, images


def test_matches_reference_on_random_layouts():
    rng = random.Random(0)
    for _ in range(300):
        layout = random_layout(rng)
        seq, videos, times, images = encode(layout)
        got = mrope_position_ids(seq, videos, times, image_grid_thw=images)
        assert got.tolist() == reference_positions(layout), layout


# --- padded batches and packed text rows -----------------------------------------------------------------

def test_batch_positions_match_rows_and_pad_with_one():
    a = ids((T, 1), (VID, 2), (T, 1))          # video (2, 2, 2) at fps 1
    b = ids((T, 2), (VID, 4), (T, 1))          # video (1, 4, 4) at fps 2
    L = 8
    batch = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    batch[0, L - len(a):], mask[0, L - len(a):] = a, 1   # left padded
    batch[1, :len(b)], mask[1, :len(b)] = b, 1           # right padded
    out = batch_position_ids(batch, mask, [[2, 2, 2], [1, 4, 4]], [2.0, 1.0])
    assert out.shape == (3, 2, L)
    assert torch.equal(out[:, 0, L - len(a):], mrope_position_ids(a, [[2, 2, 2]], [2.0]))
    assert torch.equal(out[:, 1, :len(b)], mrope_position_ids(b, [[1, 4, 4]], [1.0]))
    assert (out[:, 0, :L - len(a)] == 1).all() and (out[:, 1, len(b):] == 1).all()


def test_batch_rejects_leftover_grids():
    with pytest.raises(ValueError, match="1 video blocks, but 0 image and 2 video grids"):
        batch_position_ids(ids((T, 1), (VID, 2))[None], None, [[2, 2, 2], [2, 2, 2]], [2.0, 2.0])


def test_text_positions_restart_per_sample():
    assert text_positions([3, 1, 0, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert text_positions(torch.tensor([2])).tolist() == [0, 1]
    with pytest.raises(ValueError):
        text_positions([2, -1])


# --- why we own this: transformers 5.17 disagrees ---------------------------------------------------------

def hf_get_rope_index(seq, video_grid, times, image_grid=None):
    """Call transformers' own Qwen2_5_VLModel.get_rope_index (5.17: modeling_qwen2_5_vl.py, the
    `time_interval = tokens_per_second * int(next(second_per_grid_ts))` and
    `current_pos += max(grid_thw[1], grid_thw[2]) // spatial_merge_size` lines) on a stand-in `self`:
    it only reads the vision config and calls the (self-free) get_vision_position_ids."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2,
                                                                          tokens_per_second=2)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(fake, *a, **k)
    types_row = torch.where(seq == IMG, 1, torch.where(seq == VID, 2, 0))
    pos, _ = Qwen2_5_VLModel.get_rope_index(
        fake, seq[None], types_row[None], image_grid_thw=torch.tensor(image_grid) if image_grid else None,
        video_grid_thw=torch.tensor(video_grid) if video_grid else None,
        second_per_grid_ts=torch.tensor(times) if times else None)
    return pos[:, 0]


def test_transformers_5_17_agrees_on_images_only():
    # Same harness, a layout where both rules coincide: proves the stand-in call is faithful.
    seq = ids((T, 2), (IMG, 6), (T, 2))
    assert torch.equal(hf_get_rope_index(seq, None, None, [[1, 4, 6]]),
                       mrope_position_ids(seq, None, None, image_grid_thw=[[1, 4, 6]]))


def test_transformers_5_17_collapses_time_at_fps3():
    seq = ids((T, 1), (VID, 16), (T, 1))
    hf = hf_get_rope_index(seq, [[4, 4, 4]], [2 / 3])
    ours = mrope_position_ids(seq, [[4, 4, 4]], [2 / 3])
    # int(2/3) == 0: every temporal step lands on t = s; and text resumes at s + max(h, w) = 3, not 6.
    assert hf[0].tolist() == [0] + [1] * 16 + [3]
    assert ours[0].tolist() == [0] + [1] * 4 + [2] * 4 + [3] * 4 + [5] * 4 + [6]
