"""FP8 W8A8 linear layers for in-process inference on Hopper: FP8 weights with per-row scales, activations
quantized per token at run time in ONE fused kernel, then one `torch._scaled_mm` (row-wise scales).

    >>> from trafficvlm.quantize import load_quantized
    >>> model = load_quantized("runs/sft/final-fp8", "cuda", backend="scaled-mm")

Why our own module: the two library routes measured slower than bf16 on the 7B prefill (H200, 3,450
tokens; docs/perf.md): compressed-tensors' optimized path and torchao's float8 linears quantize the
activations with several eager kernels per layer (absmax, divide, clamp, cast), and torchao under
torch.compile does not trace with torch 2.11. Here the activation quantization is a small pure function
compiled once by Inductor into a single row-wise reduction + cast kernel (`dynamic=True`: every prompt
length shares it); the matmul is cuBLAS's FP8 GEMM, exactly what the libraries call.

Numerics are those of the checkpoint (fp8-dynamic: per-channel weight scales, per-token dynamic activation
scales, E4M3): `from_linear` re-derives each row's code and scale from the dequantized weight, which gives
back the checkpoint's codes (see quantize.to_torchao_float8 for why), and the activation rule is the one
compressed-tensors and vLLM apply.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0           # largest finite E4M3 value
MIN_SCALE = 1e-12         # an all-zero row gets a tiny scale instead of a division by zero


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic FP8: (codes [M, K] E4M3, scales [M, 1] fp32) with x ~= codes * scales."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


@functools.cache
def _fused_quantize_rows():
    # One Inductor kernel per dtype/rank (dynamic shapes): the reduction and the cast in a single pass.
    return torch.compile(quantize_rows, dynamic=True, fullgraph=True)


class Fp8RowwiseLinear(nn.Module):
    """y = (q(x) @ W_fp8^T) * s_x * s_w + b in bf16 via `torch._scaled_mm`; W stays FP8 in memory."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16, fused: bool = True):
        super().__init__()
        n, k = weight_fp8.shape
        if n % 16 or k % 16:
            raise ValueError(f"FP8 scaled_mm needs both weight sizes divisible by 16, got {n}x{k}")
        self.in_features, self.out_features = k, n
        self.register_buffer("weight", weight_fp8)                           # [N, K] row-major
        self.register_buffer("weight_scale", weight_scale.float().view(1, n))  # [1, N]
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype, self.fused = out_dtype, fused

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused: bool = True) -> "Fp8RowwiseLinear":
        """Per-row FP8 codes and scales of a (dequantized) Linear's weight."""
        codes, scale = quantize_rows(linear.weight.detach())
        return cls(codes, scale.view(-1), linear.bias, out_dtype=linear.weight.dtype, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        # Inside a compiled caller (fast_text's decoder step) the plain function is traced into the caller's
        # graph, where Inductor fuses it with the norm or gating before it; eager callers get the kernel.
        fused = self.fused and not torch.compiler.is_compiling()
        codes, scale = (_fused_quantize_rows() if fused else quantize_rows)(flat)
        # cuBLAS takes the second operand column-major: the row-major [N, K] weight, transposed (a view).
        out = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 row-wise, fused={self.fused}"


def convert_linears(model: nn.Module, names: set[str], fused: bool = True) -> list[str]:
    """Replace the named nn.Linear submodules of `model` (dequantized weights) with Fp8RowwiseLinear."""
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, found {type(linear).__name__}")
        setattr(parent, child, Fp8RowwiseLinear.from_linear(linear, fused=fused))
    return sorted(names)
