"""trafficvlm.fast_vision: one attention call per vision layer, same outputs and gradients as transformers.

    .venv/bin/python -m pytest -q tests/test_fast_vision.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trafficvlm import fast_vision
from trafficvlm.fast_vision import SegmentLayout, disable_fast_vision, enable_fast_vision, fast_vision_backend
from trafficvlm.model import config_tiny

TOL = dict(atol=1e-5, rtol=1e-5)
# (4,14,26): merged 7x13, edge windows 4x1, 3x4, 3x1; (2,10,6): merged 5x3, one 4x3 and one 1x3 window per
# group; (2,16,16): merged 8x8, every window full (all segments equal); a mixed batch: unequal groups too.
GRIDS = {
    "uneven": [(4, 14, 26)],
    "small": [(2, 10, 6)],
    "divisible": [(2, 16, 16)],
    "mixed": [(2, 10, 6), (1, 14, 26)],
}


def make_tower(depth: int = 4, full=(1, 3)):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = config_tiny(vision_depth=depth, vision_hidden=32, vision_heads=2).vision_config
    config.fullatt_block_indexes = list(full)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config).float()


@pytest.fixture(scope="module")
def tower():
    return make_tower()


def pixels_for(tower, grids, seed: int = 1):
    config = tower.config
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    grid = torch.tensor(grids)
    torch.manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), patch_dim), grid


def forward_and_grads(tower, pixels, grid):
    """Pooled output, input gradient and parameter gradients of a scalar loss on the output."""
    tower.zero_grad(set_to_none=True)
    x = pixels.clone().requires_grad_(True)
    out = tower(x, grid_thw=grid).pooler_output
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in tower.named_parameters()}


@pytest.fixture(autouse=True)
def _restore(tower):
    yield
    disable_fast_vision(tower)


@pytest.mark.parametrize("case", list(GRIDS))
def test_sdpa_batched_matches_hf_outputs_and_gradients(tower, case):
    pixels, grid = pixels_for(tower, GRIDS[case])
    ref_out, ref_dx, ref_dw = forward_and_grads(tower, pixels, grid)
    enable_fast_vision(tower, backend="sdpa_batched")
    out, dx, dw = forward_and_grads(tower, pixels, grid)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    for name, grad in ref_dw.items():
        torch.testing.assert_close(dw[name], grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_one_attention_call_per_layer(tower, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    pixels, grid = pixels_for(tower, GRIDS["mixed"])
    with torch.no_grad():
        tower(pixels, grid_thw=grid)
        stock = len(calls)
        enable_fast_vision(tower)
        tower(pixels, grid_thw=grid)
    assert stock > 20 and len(calls) - stock == len(tower.blocks)


@pytest.mark.parametrize("case", ["uneven", "mixed"])
def test_flex_matches_hf_forward(tower, case):
    # Eager flex on CPU has no backward; its gradients run (compiled) on GPU only — bench/vision_7b.py.
    pixels, grid = pixels_for(tower, GRIDS[case])
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid).pooler_output
        enable_fast_vision(tower, backend="flex")
        out = tower(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("how", ["transformers", "composable"])
def test_activation_checkpointing_gives_the_same_gradients(how):
    # "composable" is how trafficvlm.parallel checkpoints blocks; a fresh tower, as it cannot be undone.
    tower = make_tower()
    pixels, grid = pixels_for(tower, GRIDS["mixed"])
    ref = forward_and_grads(tower, pixels, grid)
    enable_fast_vision(tower)
    if how == "transformers":
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from torch.distributed._composable import checkpoint

        for block in tower.blocks:
            checkpoint(block)
    tower.train()
    got = forward_and_grads(tower, pixels, grid)
    torch.testing.assert_close(got[0], ref[0], **TOL)
    torch.testing.assert_close(got[1], ref[1], **TOL)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], **TOL)


def test_layout_runs_unequal_segments_as_one_padded_call():
    lengths = [3, 5, 1, 5]
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    layout = SegmentLayout.build(cu, "sdpa_batched", torch.device("cpu"))
    assert (layout.num, layout.max_len, layout.total, layout.equal) == (4, 5, 14, False)
    assert layout.key_mask.shape == (4, 1, 1, 5) and int(layout.key_mask.sum()) == 14
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 14, 2, 8).unbind(0)
    expected = torch.cat([
        F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
        for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(layout.attend(q, k, v, 8 ** -0.5), expected, **TOL)
    equal = SegmentLayout.build([0, 4, 8, 12], "flex", torch.device("cpu"))
    assert equal.equal and equal.slot is None and equal.block_mask is None  # equal segments: a reshape


@pytest.mark.parametrize("case", ["uneven", "mixed"])
@pytest.mark.parametrize("block", [16, 128])
def test_flex_block_mask_equals_create_block_mask(case, block):
    # The eager CPU flex used above evaluates mask_mod densely; the GPU kernel trusts the block lists.
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.vision_utils import get_vision_window_index

    bounds = get_vision_window_index(torch.tensor(GRIDS[case]), 2, 112, 14)[1].long()
    total = int(bounds[-1])
    segment = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    ours = fast_vision._segment_block_mask(bounds, torch.device("cpu"), block)
    ref = create_block_mask(lambda b, h, q, kv: segment[q] == segment[kv], None, None, total, total,
                            device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())  # the same tiles are visited
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)  # and the same skip the mask_mod
    for row, count in enumerate(ours.full_kv_num_blocks[0, 0].tolist()):
        assert set(ours.full_kv_indices[0, 0, row, :count].tolist()) == \
            set(ref.full_kv_indices[0, 0, row, :count].tolist())


def test_plan_is_cached_per_grid_and_matches_hf_indices(tower):
    from transformers.vision_utils import get_vision_window_index

    enable_fast_vision(tower)
    state = getattr(tower, fast_vision._STATE_ATTR)
    for case in ("uneven", "small", "uneven"):
        pixels, grid = pixels_for(tower, GRIDS[case])
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
    assert len(state.plans) == 2  # the repeated grid reused its plan
    plan = state.plan(tower, torch.tensor(GRIDS["uneven"]), torch.device("cpu"))
    window_index, cu_window = get_vision_window_index(torch.tensor(GRIDS["uneven"]), 2, 112, 14)
    assert torch.equal(plan.window_index, window_index) and torch.equal(plan.cu_window_seqlens, cu_window)
    assert plan.full.equal and not plan.window.equal


def test_enable_disable_round_trip_on_a_full_model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = config_tiny(vision_depth=2)
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    keys = list(model.state_dict())
    pixels, grid = pixels_for(model.model.visual, GRIDS["uneven"])
    with torch.no_grad():
        ref = model.model.get_video_features(pixels, grid).pooler_output[0]
        assert fast_vision_backend(model) is None
        assert enable_fast_vision(model) == 1 and fast_vision_backend(model) == "auto"
        assert "forward" in vars(model.model.visual.patch_embed)  # the Conv3d runs as a GEMM
        fast = model.model.get_video_features(pixels, grid).pooler_output[0]
        assert disable_fast_vision(model) == 1 and fast_vision_backend(model) is None
        again = model.model.get_video_features(pixels, grid).pooler_output[0]
    visual = model.model.visual
    for module in [visual, visual.patch_embed, *(b.attn for b in visual.blocks)]:
        assert "forward" not in vars(module)  # the class forward shows through again
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(fast, ref, **TOL)
    assert torch.equal(again, ref)
    assert disable_fast_vision(model) == 0


def test_linear_patch_embed_equals_the_conv(tower):
    pixels, _ = pixels_for(tower, GRIDS["small"])
    with torch.no_grad():
        ref = tower.patch_embed(pixels)
        enable_fast_vision(tower, backend="hf")
        got = tower.patch_embed(pixels)
    assert "forward" in vars(tower.patch_embed)
    torch.testing.assert_close(got, ref, **TOL)
    enable_fast_vision(tower, backend="hf", linear_patch_embed=False)  # re-enabling starts from stock
    assert "forward" not in vars(tower.patch_embed)


def test_bad_arguments_are_rejected(tower):
    with pytest.raises(ValueError, match="not one of"):
        enable_fast_vision(tower, backend="xformers")
    with pytest.raises(ValueError, match="no Qwen2.5-VL vision tower"):
        enable_fast_vision(torch.nn.Linear(2, 2))
