"""One attention call per layer in the Qwen2.5-VL vision tower (same outputs and gradients as transformers).

    >>> from trafficvlm.fast_vision import enable_fast_vision, disable_fast_vision
    >>> enable_fast_vision(model)            # after loading; before activation checkpointing, compile, FSDP
    >>> model(**batch)                       # the vision tower now runs 32 attention calls, not ~8,400
    >>> disable_fast_vision(model)           # back to the transformers code path

Why: with sdpa/eager, transformers splits every vision attention layer into one SDPA call per segment — per
temporal group in the 4 full-attention layers and per 112-px window in the other 28. The recipe's clip (74
frames at 196x364, grid (37, 14, 26)) has 296 windows, so each window layer is ~296 tiny kernel launches plus
a `.tolist()` host sync; on an H200 that loop costs 5.5 ms per layer, half the tower's time.

What changes, and nothing else (norms, MLPs, rotary, merger and output capture stay transformers' code):

- Index plan cached per `grid_thw`: position ids, `cu_seqlens`, window order and `cu_window_seqlens` are
  computed once per grid (with transformers' own helpers, so they are identical) and handed to the stock
  forward through its documented precomputed kwargs (`transformers.vision_utils`).
- Patch embedding (`linear_patch_embed=True`): the Conv3d whose kernel equals its stride is one GEMM over
  flattened patches with the same weight viewed as a matrix; cuDNN picks slow kernels for that degenerate
  convolution on some GPU/dtype/version combinations (transformers#45750, vLLM and SGLang do the same).
- Attention: each vision attention module runs its segments as ONE call:
  * segments of equal length (full attention over a video's temporal groups; always true for one video or
    equal-grid videos) are a pure reshape to `[segments, heads, len, dim]` and one SDPA;
  * unequal segments (edge windows, mixed grids), backend `sdpa_batched`: pad each segment to the longest,
    one SDPA with a key-padding mask, unpad;
  * backend `flex`: one `flex_attention` call over the packed sequence with a "same segment" block mask
    (built once per grid from the segment bounds, shared by all layers of that kind); compiled on CUDA.
    Eager flex on CPU has no backward: use `sdpa_batched` there.

Backends: `auto` (= `sdpa_batched` everywhere, until bench/vision_7b.py shows flex ahead on GPU),
`sdpa_batched`, `flex`, `hf` (index plan cache and patch GEMM only; transformers' per-segment attention).
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_qwen

BACKENDS = ("auto", "sdpa_batched", "flex", "hf")
_CACHE_SIZE = 8  # distinct grids kept per tower; a training set of same-resolution clips has only a few
_STATE_ATTR = "_trafficvlm_fast_vision"  # on a patched tower: its _TowerState
_FULL_ATTR = "_trafficvlm_full_attention"  # on a patched attention module: full (True) or window layer
_COMPILED_ATTR = "_trafficvlm_compiled"  # on a vision block whose forward compile_vision_blocks wrapped
_PLAN_KWARG = "fast_vision_plan"


# --- one attention call over many segments --------------------------------------------------------------

@dataclass
class SegmentLayout:
    """How a packed sequence of `total` tokens splits into attention segments, prepared for one call.

    `slot` maps token -> row of the padded `[num, max_len]` layout (None when all segments are equal);
    `key_mask` is the matching `[num, 1, 1, max_len]` key-padding mask; `block_mask` is set for flex."""
    total: int
    num: int
    max_len: int
    slot: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    block_mask: Any = None

    @property
    def equal(self) -> bool:
        return self.num * self.max_len == self.total

    @classmethod
    def build(cls, cu_seqlens: list[int], backend: str, device: torch.device) -> SegmentLayout:
        bounds = torch.tensor(cu_seqlens, dtype=torch.long)
        lengths = bounds[1:] - bounds[:-1]
        layout = cls(total=int(bounds[-1]), num=len(lengths), max_len=int(lengths.max()))
        if layout.equal:
            return layout  # a reshape: no padding, no mask, flash-friendly
        if backend == "flex":
            layout.block_mask = _segment_block_mask(bounds, device)
            return layout
        segment = torch.repeat_interleave(torch.arange(layout.num), lengths)
        offset = torch.arange(layout.total) - bounds[:-1][segment]
        layout.slot = (segment * layout.max_len + offset).to(device)
        layout.key_mask = (torch.arange(layout.max_len) < lengths[:, None])[:, None, None, :].to(device)
        return layout

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention within each segment; q, k, v and the result are `[total, heads, head_dim]`."""
        heads, dim = q.shape[1:]
        if self.block_mask is not None:
            flex = _flex(q.device.type)
            out = flex(*(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)), block_mask=self.block_mask,
                       scale=scale)
            return out.squeeze(0).transpose(0, 1)
        if self.equal:
            batched = (x.view(self.num, self.max_len, heads, dim).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(*batched, scale=scale)
            return out.transpose(1, 2).reshape(self.total, heads, dim)
        out = F.scaled_dot_product_attention(*(self._pad(x) for x in (q, k, v)), attn_mask=self.key_mask,
                                             scale=scale)
        # Padded query rows are dropped here, padded keys were masked: neither reaches a gradient.
        return out.transpose(1, 2).reshape(self.num * self.max_len, heads, dim)[self.slot]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """`[total, heads, dim]` -> `[num, heads, max_len, dim]`, zeros in the padding. index_copy rather
        than a gather through a padded index, so the backward is a plain gather (deterministic)."""
        padded = x.new_zeros(self.num * self.max_len, *x.shape[1:]).index_copy(0, self.slot, x)
        return padded.view(self.num, self.max_len, *x.shape[1:]).transpose(1, 2)


def _segment_block_mask(bounds: torch.Tensor, device: torch.device, block: int = 128):
    """flex BlockMask for "attend within your segment", built from the segment bounds at block granularity:
    O((tokens/block)^2) work and memory, where `create_block_mask` would evaluate the mask on every
    (query, key) pair (0.2 GB of booleans for the recipe clip, ~1 GB at 8k merged tokens)."""
    from torch.nn.attention.flex_attention import BlockMask

    total = int(bounds[-1])
    segment = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff())
    first = torch.arange(0, total, block)
    last = (first + block).clamp(max=total) - 1
    seg_first, seg_last = segment[first], segment[last]
    cols = torch.arange(len(first))
    # Key blocks a query block can see: from its first token's segment start to its last token's segment end.
    touched = (cols >= (bounds[seg_first] // block)[:, None]) & (cols <= ((bounds[seg_last + 1] - 1) // block)[:, None])
    # A tile needs no per-element mask when both blocks are complete and lie inside the same segment.
    pure = (seg_first == seg_last) & (last - first + 1 == block)
    full = touched & pure[:, None] & pure[None, :] & (seg_first[:, None] == seg_first[None, :])
    segment = segment.to(device)

    def same_segment(b, h, q_idx, kv_idx):
        return segment[q_idx] == segment[kv_idx]

    return BlockMask.from_kv_blocks(*_block_lists(touched & ~full, device), *_block_lists(full, device),
                                    BLOCK_SIZE=block, mask_mod=same_segment, seq_lengths=(total, total))


def _block_lists(tiles: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[q_blocks, kv_blocks]` booleans -> (count per row, kv block indices with the selected ones first)."""
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
    return (tiles.sum(-1).to(torch.int32)[None, None].to(device),
            order.to(torch.int32)[None, None].to(device))


def _flex(device_type: str):
    """flex_attention, compiled on GPU: eager flex is a dense reference implementation. Inside a compiled
    region (blocks under torch.compile) the plain function is traced into the enclosing graph."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cpu" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# --- the per-grid plan ----------------------------------------------------------------------------------

@dataclass
class VisionPlan:
    """Everything about one `grid_thw` the tower would otherwise recompute on every forward."""
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    window_index: torch.Tensor
    cu_window_seqlens: torch.Tensor
    full: SegmentLayout
    window: SegmentLayout

    def hf_kwargs(self) -> dict[str, torch.Tensor]:
        """The precomputed-index kwargs the stock transformers forward pops instead of computing."""
        return dict(position_ids=self.position_ids, cu_seqlens=self.cu_seqlens, window_index=self.window_index,
                    cu_window_seqlens=self.cu_window_seqlens)


def build_plan(tower, grid_thw: torch.Tensor, backend: str, device: torch.device) -> VisionPlan:
    """Index plan for `grid_thw` on `device`, from transformers' own helpers (so identical to its forward)."""
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    grid = grid_thw.detach().to("cpu", torch.long)
    cu_seqlens = get_vision_cu_seqlens(grid)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
        patch_size=tower.patch_size)
    layout_backend = "sdpa_batched" if backend == "auto" else backend
    return VisionPlan(
        position_ids=get_vision_position_ids(grid, tower.spatial_merge_size).to(device),
        cu_seqlens=cu_seqlens.to(device), window_index=window_index.to(device),
        cu_window_seqlens=cu_window_seqlens.to(device),
        full=SegmentLayout.build(cu_seqlens.tolist(), layout_backend, device),
        window=SegmentLayout.build(cu_window_seqlens.tolist(), layout_backend, device))


@dataclass
class _TowerState:
    backend: str
    plans: OrderedDict

    def plan(self, tower, grid_thw: torch.Tensor, device: torch.device) -> VisionPlan:
        key = (tuple(map(tuple, grid_thw.tolist())), str(device))
        if key in self.plans:
            self.plans.move_to_end(key)
            return self.plans[key]
        plan = self.plans[key] = build_plan(tower, grid_thw, self.backend, device)
        if len(self.plans) > _CACHE_SIZE:
            self.plans.popitem(last=False)
        return plan


# --- patched forwards -----------------------------------------------------------------------------------

def _tower_forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
    """The stock forward, fed the cached plan (and, unless backend `hf`, the plan for the attention layers)."""
    state: _TowerState = getattr(self, _STATE_ATTR)
    plan = state.plan(self, grid_thw, hidden_states.device)
    kwargs.update(plan.hf_kwargs())
    if state.backend != "hf":
        kwargs[_PLAN_KWARG] = plan
    return type(self).forward(self, hidden_states, grid_thw, **kwargs)


def _attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """transformers' vision attention with its per-segment loop replaced by one `SegmentLayout.attend`."""
    plan: VisionPlan | None = kwargs.pop(_PLAN_KWARG, None)
    if plan is None:  # called outside a patched tower forward: the stock code path
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq_len = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_len, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = hf_qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
    layout = plan.full if getattr(self, _FULL_ATTR) else plan.window
    out = layout.attend(q, k, v, self.scaling)
    return self.proj(out.reshape(seq_len, -1))


def _patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The patch Conv3d as a GEMM: each input row is one whole (channel, time, row, col) patch, laid out in
    the weight's own order, so `weight.view(embed, -1)` is the same linear map."""
    weight = self.proj.weight
    flat = hidden_states.view(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.view(weight.shape[0], -1), self.proj.bias)


def _is_patchwise(conv: torch.nn.Module) -> bool:
    return (isinstance(conv, torch.nn.Conv3d) and tuple(conv.kernel_size) == tuple(conv.stride)
            and not any(conv.padding) and set(conv.dilation) == {1} and conv.groups == 1)


# --- public API -----------------------------------------------------------------------------------------

def vision_towers(model) -> list:
    """The Qwen2.5-VL vision towers inside `model` (a full model, its `.model`, or a tower itself)."""
    return [m for m in model.modules() if isinstance(m, hf_qwen.Qwen2_5_VisionTransformerPretrainedModel)]


def enable_fast_vision(model, *, backend: str = "auto", linear_patch_embed: bool = True) -> int:
    """Patch every Qwen2.5-VL vision tower in `model` in place; returns how many were patched.

    Weights, module names and state dicts are untouched (checkpoints and FSDP wrapping see the same
    modules); calling it again switches the backend. Call it before `torch.compile` / FSDP wrapping.
    Raises ValueError on an unknown backend or a model without a Qwen2.5-VL vision tower."""
    if backend not in BACKENDS:
        raise ValueError(f"fast vision backend {backend!r} is not one of {', '.join(BACKENDS)}")
    towers = vision_towers(model)
    if not towers:
        raise ValueError(f"{type(model).__name__} has no Qwen2.5-VL vision tower to patch")
    disable_fast_vision(model)  # a second call starts from the stock modules
    for tower in towers:
        setattr(tower, _STATE_ATTR, _TowerState(backend, OrderedDict()))
        tower.forward = types.MethodType(_tower_forward, tower)
        if linear_patch_embed and _is_patchwise(tower.patch_embed.proj):
            tower.patch_embed.forward = types.MethodType(_patch_embed_forward, tower.patch_embed)
        for index, block in enumerate(tower.blocks):
            setattr(block.attn, _FULL_ATTR, index in tower.fullatt_block_indexes)
            block.attn.forward = types.MethodType(_attention_forward, block.attn)
    return len(towers)


def compile_vision_blocks(model) -> int:
    """torch.compile each vision block's `forward` of `model` (one graph per block; window and full-attention
    blocks and each new clip grid are separate graphs, then dynamic shapes). On an H100 the 7B tower went
    from 126 ms (fast attention alone) to ~52 ms per setting-A clip, 7x transformers' 367 ms
    (docs/perf.md). The instance `forward` is compiled, not the module call, so FSDP's and activation
    checkpointing's hooks stay outside the graph. Returns how many blocks were wrapped now: 0 on CPU,
    where compiling costs minutes and gains little, and 0 for blocks already wrapped (idempotent)."""
    if next(model.parameters()).device.type != "cuda":
        return 0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    wrapped = 0
    for tower in vision_towers(model):
        for block in tower.blocks:
            if not getattr(block, _COMPILED_ATTR, False):
                block.forward = torch.compile(block.forward)
                setattr(block, _COMPILED_ATTR, True)
                wrapped += 1
    return wrapped


def vision_compiled(model) -> bool:
    """Whether `compile_vision_blocks` wrapped the blocks of every vision tower in `model`."""
    towers = vision_towers(model)
    return bool(towers) and all(getattr(b, _COMPILED_ATTR, False) for t in towers for b in t.blocks)


def disable_fast_vision(model) -> int:
    """Undo `enable_fast_vision`; returns how many towers were restored (0 if none was patched)."""
    restored = 0
    for tower in vision_towers(model):
        if not hasattr(tower, _STATE_ATTR):
            continue
        for module in [tower, tower.patch_embed, *(block.attn for block in tower.blocks)]:
            for attr in (_STATE_ATTR, _FULL_ATTR, "forward"):
                vars(module).pop(attr, None)  # without the instance forward, the class method shows again
        restored += 1
    return restored


def fast_vision_backend(model) -> str | None:
    """The backend of the first patched tower in `model`, or None when none is patched."""
    for tower in vision_towers(model):
        if hasattr(tower, _STATE_ATTR):
            return getattr(tower, _STATE_ATTR).backend
    return None
