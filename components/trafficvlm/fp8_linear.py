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

Sibling projections that read the same input (q/k/v of an attention, gate/up of an MLP) share one
quantization and one GEMM (`fuse_siblings`): the first sibling called runs the concatenated weight and
keeps the others' slices for their calls with that same input tensor. A decoder layer then runs 4
activation quantizations and 4 FP8 GEMMs instead of 7, and the small k/v GEMMs (512 rows on the 7B)
ride on q's. The per-row weight scales concatenate exactly, so every output element is the same sum.

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
        self.group: SiblingGroup | None = None   # set by fuse_siblings

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused: bool = True) -> "Fp8RowwiseLinear":
        """Per-row FP8 codes and scales of a (dequantized) Linear's weight."""
        codes, scale = quantize_rows(linear.weight.detach())
        return cls(codes, scale.view(-1), linear.bias, out_dtype=linear.weight.dtype, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        return fp8_matmul(x, self.weight, self.weight_scale, self.bias, self.out_dtype, self.fused)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 row-wise, fused={self.fused}"


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, fused: bool = True) -> torch.Tensor:
    """x [..., K] (bf16) @ weight [N, K] (E4M3, per-row scales [1, N]) -> [..., N] in out_dtype."""
    shape = x.shape
    codes, scale = (_fused_quantize_rows() if fused else quantize_rows)(x.reshape(-1, weight.shape[1]))
    # cuBLAS takes the second operand column-major: the row-major [N, K] weight, transposed (a view).
    out = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias, out_dtype=out_dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


class SiblingGroup:
    """Linears called one after another on the same input, run as one GEMM over their concatenated rows.

    Not a module (the members keep their names, buffers and state-dict keys); holds the concatenated
    weight, and the slices of the last input's output that members have not collected yet. A member called
    with another tensor than the pending one recomputes, so a caller that does not follow the pattern
    gets correct (only slower) results."""

    def __init__(self, members: list[Fp8RowwiseLinear]):
        first = members[0]
        self.members = members
        self.weight = torch.cat([m.weight for m in members])
        self.weight_scale = torch.cat([m.weight_scale for m in members], dim=1)
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features, dtype=first.out_dtype, device=m.weight.device)
             for b, m in zip(biases, members)])
        self.sizes = [m.out_features for m in members]
        # The members' weights become views of the concatenation: one copy of the FP8 weights in memory.
        for m, part in zip(members, self.weight.split(self.sizes)):
            m._buffers["weight"] = part
        self.out_dtype, self.fused = first.out_dtype, first.fused
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, member: Fp8RowwiseLinear, x: torch.Tensor) -> torch.Tensor:
        key = id(member)
        if x is not self._input or key not in self._pending:
            out = fp8_matmul(x, self.weight, self.weight_scale, self.bias, self.out_dtype, self.fused)
            self._input = x
            self._pending = {id(m): part for m, part in zip(self.members, out.split(self.sizes, dim=-1))}
        part = self._pending.pop(key)
        if not self._pending:
            self._input = None  # all collected: hold no reference to the activations
        return part


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Group each module's Fp8RowwiseLinear children named in SIBLINGS (all of a tuple present) into a
    `SiblingGroup`. Returns how many groups were made."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, Fp8RowwiseLinear) for m in members) and \
                    len({(m.in_features, m.out_dtype, m.fused) for m in members}) == 1:
                group = SiblingGroup(members)
                for m in members:
                    m.group = group
                groups += 1
    return groups


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
