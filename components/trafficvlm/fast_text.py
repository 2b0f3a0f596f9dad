"""The language model's inference forward for shared-prefix letter scoring: a preallocated KV buffer,
ONE compiled function that every decoder layer runs, and the question branches replayed as CUDA graphs.

    >>> runner = TextRunner(model, compile=True, graphs=True)  # what eval runs on CUDA (bf16 or FP8 model)
    >>> runner.prefill(input_ids, position_ids, vision)        # a clip's prompt prefix: fills the buffer
    >>> hidden = runner.extend(ids, pos, mask, rows=ends)      # the question branches on top of it
    >>> runner.crop(prefix_len)                                # back to the prefix for the next chunk

Why: the 15 question branches of a clip are ~700 tokens, too few for the GPU to hide the host-side
cost of transformers' eager decoder (~30 PyTorch calls per layer, the DynamicCache bookkeeping, and in
FP8 a separate quantization call before each of the 196 GEMMs): on an H200 they took ~38 ms of which
~15 ms were kernels (docs/perf.md, "Fourth run"). Compiling transformers' decoder layer does not work
with a DynamicCache (Dynamo guards on each layer's cache state and recompiles per layer), so this module
owns the orchestration: the KV cache is a plain tensor per layer whose cached part goes *into*
`layer_step` (which returns the new keys and values for the caller to store), so all 28 layers share one
graph per shape class (prefix, branches), and Inductor fuses RMSNorm, rotary embedding, residual adds,
SiLU-gating and (in FP8) the per-token activation quantization into the GEMMs' neighbours. The branch
pass, padded to fixed shapes, is then captured once per shape and replayed (`TextRunner`, `graphs`).
Measured on an H200 (docs/perf.md, "Fifth run"): bf16 eval 79.8 -> 89.3 questions/s, FP8 eval 105-108.

What it reuses from transformers: the modules and weights themselves (norms, projections, MLP), the
rotary embedding (`language_model.rotary_emb`, which builds the 3-D mRoPE cos/sin from our positions),
and the vision merge (`get_video_features`, `get_placeholder_mask`). What it owns: the order of the
layer's operations (those of `Qwen2_5_VLDecoderLayer` with SDPA attention) and the cache. CPU tests check
it against transformers' forward in float32 (`tests/test_fast_text.py`). Generation and training keep
transformers' forward.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_step(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_past: torch.Tensor | None,
               v_past: torch.Tensor | None, mask: torch.Tensor | None):
    """One decoder layer on x [1, n, hidden] after the cached keys/values k_past, v_past [1, kv_heads,
    cached, head_dim] (None for a prefix). Returns (the layer's output, the n tokens' keys, values): the
    caller stores those, so the graph mutates none of its inputs. `mask` None: a causal prefix; else
    `attn_bias(...)` of the [1, 1, n, cached + n] mask."""
    attn = layer.self_attn
    b, n, _ = x.shape
    d = attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, n, -1, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    if mask is None:  # the prefix: causal over itself, grouped-query heads handled by the kernel
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
    else:  # branches: the query heads that share a KV head stacked along the query axis, so K/V are read
        # once per KV head (no per-head copies), with the additive mask `attn_bias` built once for all layers
        keys, values = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
        kv_heads, heads = keys.shape[1], q.shape[1]
        grouped = q.reshape(b, kv_heads, heads // kv_heads * n, d)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=attn.scaling)
        out = out.reshape(b, heads, n, d)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x)), k, v


def attn_bias(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a [1, 1, n, keys] bool mask (True = may attend) for `layer_step`'s grouped
    queries: [1, 1, groups * n, keys], 0 or -inf, the n rows repeated once per query head of a KV group."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat(1, 1, groups, 1)


@functools.cache
def _compiled_step():
    # dynamic=True: every prompt and branch length shares the graphs (one for prefixes, without cached
    # keys or a mask, and one for branches).
    return torch.compile(layer_step, dynamic=True)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass
class _Static:
    """The fixed-address inputs and output of one padded branch shape (`TextRunner.static`)."""

    ids: torch.Tensor        # [1, n_b] token ids, padding after the real ones
    pos: torch.Tensor        # [3, 1, n_b] positions
    mask: torch.Tensor       # [1, 1, n_b, start + n_b] bool
    rows: torch.Tensor       # [k_b] rows to return (padding repeats row 0)
    out: torch.Tensor | None = None
    graph: Any = None        # torch.cuda.CUDAGraph once captured


class TextRunner:
    """Prefix-then-branches inference on `model`'s language model with its own KV buffer (batch 1).

    Quacks like the part of a transformers Cache the eval engine uses (`crop`, `get_seq_length`), so the
    engine's loop is the same whichever forward produced the cache. `compile=True` runs `layer_step`
    compiled (on an H200 the two graphs of the 7B took 10-30 s on the first clip).

    `static=True` runs branches at padded shapes from fixed-address buffers: the branch row padded to a
    multiple of `row_step` tokens and placed at the prefix length rounded up to `start_step`, the mask
    padded to match (padding rows see only themselves; real rows never see padding). On CUDA the whole
    branch pass of each padded shape is then captured once as a CUDA graph and replayed, so ~700 tokens
    through 28 layers cost one launch instead of hundreds (`graphs=True`, which implies `static`). A KV
    buffer that has to grow drops the captured graphs (their addresses are gone); shapes past `max_graphs`
    run uncaptured, and so does everything after a failed capture (with one warning)."""

    block = 1024        # KV buffer growth step in tokens
    start_step = 256    # static branches start at the prefix length rounded up to this
    row_step = 64       # ... and their row is padded to a multiple of this
    rows_step = 16      # ... and the rows returned to a multiple of this
    max_graphs = 32

    def __init__(self, model, *, compile: bool = False, static: bool = False, graphs: bool = False):
        self.model = model
        self.lm = model.model.language_model
        cfg = self.lm.config
        attn = self.lm.layers[0].self_attn
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, attn.head_dim
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        param = next(self.lm.parameters())
        self.device = param.device
        self.dtype = self.lm.embed_tokens.weight.dtype
        self.compiled = compile
        self.step = _compiled_step() if compile else layer_step
        self.static = static or graphs
        self.graphs = graphs and self.device.type == "cuda"
        self.shapes: dict[tuple[int, int, int], _Static] = {}
        self._pool = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    # -- the cache --------------------------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many from the end), as DynamicCache.crop."""
        self.length = max_length if max_length >= 0 else self.length + max_length

    def _reserve(self, total: int) -> None:
        """Room for `total` tokens; grows in steps of `block` tokens so a run reallocates a handful of times."""
        capacity = self.keys[0].shape[2] if self.keys else 0
        if total <= capacity:
            return
        capacity = _round_up(total, self.block)
        shape = (1, self.kv_heads, capacity, self.head_dim)
        old = list(zip(self.keys, self.values))
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lm.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.lm.layers]
        for (k_old, v_old), k, v in zip(old, self.keys, self.values):
            k[:, :, :self.length] = k_old[:, :, :self.length]
            v[:, :, :self.length] = v_old[:, :, :self.length]
        self.shapes.clear()  # captured graphs and static buffers point at the old tensors

    # -- forward passes ---------------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, vision: dict[str, Any] | None = None) -> None:
        """A new prefix ([1, n] ids, [3, 1, n] positions, and the clip's pixels): resets the buffer and fills
        it. Returns nothing: letter scoring reads only the branches' outputs."""
        embeds = self._embed(input_ids, vision)
        self.length = 0
        self._layers(embeds, position_ids, None)

    def extend(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens after the cached ones, attending as `mask` [1, 1, n, cached + n] says; appends their K/V.
        Returns the final-normed hidden states [1, n, hidden], or only `rows` of them ([k, hidden])."""
        if self.static and rows is not None:
            self._check_mask(mask, input_ids.shape[1], self.length)  # the padded pass checks only its own mask
            return self._extend_static(input_ids, position_ids, mask, rows)
        hidden = self._layers(self._embed(input_ids, None), position_ids, mask)
        hidden = hidden[0, rows.to(self.device, non_blocking=True)] if rows is not None else hidden
        return self.lm.norm(hidden)

    def _embed(self, input_ids: torch.Tensor, vision: dict[str, Any] | None) -> torch.Tensor:
        input_ids = input_ids.to(self.device, non_blocking=True)
        embeds = self.lm.embed_tokens(input_ids)
        if vision:
            base = self.model.model
            feats = base.get_video_features(vision["pixel_values_videos"], vision["video_grid_thw"]).pooler_output
            feats = torch.cat(list(feats), dim=0).to(embeds.device, embeds.dtype)
            _, where = base.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=feats)
            embeds = embeds.masked_scatter(where, feats)
        return embeds

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, n: int, start: int) -> None:
        if mask is None and start:
            raise ValueError("a causal prefix must start an empty cache (prefill resets it)")
        if mask is not None and tuple(mask.shape[-2:]) != (n, start + n):
            raise ValueError(f"mask covers {tuple(mask.shape[-2:])} (queries, keys); expected ({n}, {start + n})")

    def _layers(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                start: int | None = None) -> torch.Tensor:
        n = x.shape[1]
        start = self.length if start is None else start
        self._check_mask(mask, n, start)
        self._reserve(start + n)
        cos, sin = self.lm.rotary_emb(x, position_ids.to(self.device, non_blocking=True))
        if mask is not None:
            mask = attn_bias(mask.to(self.device, non_blocking=True), self.groups, x.dtype)
        for layer, k_buf, v_buf in zip(self.lm.layers, self.keys, self.values):
            past = (None, None) if mask is None else (k_buf[:, :, :start], v_buf[:, :, :start])
            x, k, v = self.step(layer, x, cos, sin, *past, mask)
            k_buf[:, :, start:start + n] = k
            v_buf[:, :, start:start + n] = v
        self.length = start + n
        return x

    # -- padded branches, replayed as CUDA graphs ----------------------------------------------------------

    def _extend_static(self, input_ids, position_ids, mask, rows) -> torch.Tensor:
        prefix, n, k = self.length, input_ids.shape[1], len(rows)
        start, width, k_b = _round_up(prefix, self.start_step), _round_up(n, self.row_step), _round_up(k, self.rows_step)
        self._reserve(start + width)
        st = self.shapes.get((start, width, k_b))
        if st is None:
            st = self.shapes[(start, width, k_b)] = self._new_static(start, width, k_b)
        # padded inputs built on the CPU, then one async copy each into the fixed-address buffers
        ids = torch.full((1, width), getattr(self.lm.config, "pad_token_id", None) or 0, dtype=torch.long)
        pos = torch.zeros((3, 1, width), dtype=torch.long)
        full = torch.zeros((1, 1, width, start + width), dtype=torch.bool)
        ids[:, :n], pos[..., :n] = input_ids, position_ids
        mask = mask.cpu()
        full[..., :n, :prefix] = mask[..., :prefix]                   # the prefix (gap columns stay False)
        full[..., :n, start:start + n] = mask[..., prefix:]           # the branches among themselves
        pad = torch.arange(n, width)
        full[0, 0, pad, start + pad] = True                           # a padding row sees only itself
        picks = torch.zeros(k_b, dtype=torch.long)
        picks[:k] = rows.cpu()  # give CPU rows: a GPU tensor here would make the host wait for the prefix
        for dst, src in ((st.ids, ids), (st.pos, pos), (st.mask, full), (st.rows, picks)):
            dst.copy_(src.pin_memory() if self.device.type == "cuda" else src, non_blocking=True)
        if st.graph is not None:
            with torch.cuda.device(self.device):  # a rank's model need not be on the current device
                st.graph.replay()
        elif self.graphs and len(self.shapes) <= self.max_graphs:
            try:
                self._capture(st, start)
            except RuntimeError as exc:  # a setup whose kernels cannot be captured: run uncaptured, say so once
                print(f"warning: CUDA graph capture of the question branches failed ({exc}); running them "
                      "without graphs (same results, more host time per clip)", file=sys.stderr)
                self.graphs = False
                self._run_static(st, start)
        else:
            self._run_static(st, start)
        self.length = start + width  # crop(prefix) brings it back
        return st.out[:k]

    def _new_static(self, start: int, width: int, k_b: int) -> _Static:
        dev = self.device
        return _Static(torch.zeros((1, width), dtype=torch.long, device=dev),
                       torch.zeros((3, 1, width), dtype=torch.long, device=dev),
                       torch.zeros((1, 1, width, start + width), dtype=torch.bool, device=dev),
                       torch.zeros(k_b, dtype=torch.long, device=dev))

    def _run_static(self, st: _Static, start: int) -> None:
        x = self._layers(self.lm.embed_tokens(st.ids), st.pos, st.mask, start=start)
        out = self.lm.norm(x[0, st.rows])
        if st.out is None:
            st.out = out
        else:
            st.out.copy_(out)

    def _capture(self, st: _Static, start: int) -> None:
        """Warm up on a side stream (compiles, cuBLAS and cuDNN plans), then capture one branch pass."""
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run_static(st, start)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._run_static(st, start)
            st.graph = graph
            graph.replay()
