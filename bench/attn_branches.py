"""GPU micro-benchmark: the question-branch attention of one decoder layer of the 7B at setting A, in the
ways `fast_text.layer_step` could run it (it is ~8 ms of a clip's ~30 ms branch pass on an H200).

    PYTHONPATH=components python3 bench/attn_branches.py --out bench/results/attn_branches.json

Shapes: 28 query heads over 4 KV heads (head dim 128), a 3,456-token prefix rounded up to 3,584 (the
CUDA-graph layout: a masked gap), 15 branches in a 768-token padded row. Variants:
- `grouped_bias`: what runs now: the 7 query heads of a KV head stacked along the query axis, an additive
  mask repeated 7 times (one SDPA call, 4 heads);
- `grouped_bool`: the same with the boolean mask;
- `gqa_flag`: 28 query heads, `enable_gqa=True`, the mask once;
- `repeat_kv`: K/V copied to 28 heads (transformers' SDPA path with a mask);
- `split_lse`: the prefix part without a mask (flash attention; the gap cut off by slicing) and the
  branch part with its small mask (memory-efficient attention), merged through their log-sum-exps;
- `split_gap_mask`: the same, the prefix part keeping the gap behind one broadcast row of key padding (a
  shape that does not depend on the prefix length, so one CUDA graph serves a rounded bucket).
Each is checked against a float32 reference (relative error) and timed with CUDA events (median of 30).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def setup(prefix=3456, start=3584, n=704, width=768, heads=28, kv_heads=4, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(1, heads, width, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(1, kv_heads, start + width, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(1, kv_heads, start + width, d, device="cuda", dtype=dt, generator=g)
    mask = torch.zeros(1, 1, width, start + width, dtype=torch.bool, device="cuda")
    mask[..., :n, :prefix] = True
    lengths = [n // 15] * 14 + [n - 14 * (n // 15)]
    pos = 0
    for L in lengths:  # each branch sees the prefix and itself, causally
        mask[0, 0, pos:pos + L, start + pos:start + pos + L] = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()
        pos += L
    pad = torch.arange(n, width, device="cuda")
    mask[0, 0, pad, start + pad] = True
    return q, k, v, mask, dict(prefix=prefix, start=start, n=n, width=width, heads=heads, kv_heads=kv_heads, d=d)


def reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask)


def variants(q, k, v, mask, s):
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    grouped_bias, grouped_bool = bias.repeat(1, 1, groups, 1), mask.repeat(1, 1, groups, 1)
    qg = q.reshape(b, kv_heads, groups * n, d)
    prefix, start = s["prefix"], s["start"]
    small = bias[..., start:].repeat(1, 1, groups, 1).expand(b, kv_heads, -1, -1)
    gap = torch.zeros(1, 1, 1, start, dtype=q.dtype, device=q.device)
    gap[..., prefix:] = float("-inf")
    gap = gap.expand(b, kv_heads, groups * n, start)  # one row of key padding, stride 0 over the queries

    def ungroup(out):
        return out.reshape(b, heads, n, d)

    def split_lse():
        o1, l1 = torch.ops.aten._scaled_dot_product_flash_attention(qg, k[:, :, :prefix], v[:, :, :prefix])[:2]
        o2, l2 = torch.ops.aten._scaled_dot_product_efficient_attention(
            qg, k[:, :, start:], v[:, :, start:], small, True)[:2]
        return merge(o1, l1, o2, l2)

    def merge(o1, l1, o2, l2):
        l1, l2 = l1[..., :o1.shape[2]], l2[..., :o2.shape[2]]
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
        return ungroup(((o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / (w1 + w2).unsqueeze(-1)).to(q.dtype))

    def split_gap_mask():
        o1, l1 = torch.ops.aten._scaled_dot_product_efficient_attention(
            qg, k[:, :, :start], v[:, :, :start], gap, True)[:2]
        o2, l2 = torch.ops.aten._scaled_dot_product_efficient_attention(
            qg, k[:, :, start:], v[:, :, start:], small, True)[:2]
        return merge(o1, l1, o2, l2)

    return {
        "split_gap_mask": split_gap_mask,
        "grouped_bias": lambda: ungroup(F.scaled_dot_product_attention(qg, k, v, attn_mask=grouped_bias)),
        "grouped_bool": lambda: ungroup(F.scaled_dot_product_attention(qg, k, v, attn_mask=grouped_bool)),
        "gqa_flag": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
        "repeat_kv": lambda: F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1),
                                                            v.repeat_interleave(groups, 1), attn_mask=bias),
        "split_lse": split_lse,
    }


def timed(fn, repeats=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "attn_branches.json"))
    args = parser.parse_args(argv)
    q, k, v, mask, shapes = setup()
    ref = reference(q, k, v, mask)
    rows = {}
    with torch.inference_mode():
        for name, fn in variants(q, k, v, mask, shapes).items():
            try:
                out = fn()
                n = shapes["n"]
                err = float((out[:, :, :n].float() - ref[:, :, :n]).norm() / ref[:, :, :n].norm())
                rows[name] = {"ms": timed(fn), "rel_err_vs_fp32": err}
            except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(name, rows[name], flush=True)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "shapes": shapes, "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
