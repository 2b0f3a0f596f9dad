"""trafficvlm.fp8_linear: the FP8 row-wise linear (run on CPU through torch's reference scaled_mm)."""

from __future__ import annotations

import pytest
import torch

from trafficvlm.fp8_linear import Fp8RowwiseLinear, convert_linears, quantize_rows


def test_quantize_rows_round_trips_within_fp8_precision_and_handles_zero_rows():
    x = torch.randn(6, 32)
    x[2] = 0
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    back = codes.float() * scale
    assert torch.isfinite(back).all() and back[2].abs().max() == 0
    assert float((back - x).abs().max() / x.abs().max()) < 2 ** -3   # E4M3: 3 mantissa bits
    assert float(codes.float().abs().amax(dim=1)[[0, 1, 3]].min()) == 448.0  # each row uses the full range


@pytest.mark.parametrize("fused", [False, True])
def test_linear_matches_the_dequantized_w8a8_product(fused):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16)
    fp8 = Fp8RowwiseLinear.from_linear(lin, fused=fused)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    y = fp8(x)
    xc, xs = quantize_rows(x.reshape(-1, 64))
    wc, ws = quantize_rows(lin.weight)
    ref = (xc.float() * xs) @ (wc.float() * ws).T + lin.bias.float()
    assert y.shape == (3, 5, 32) and y.dtype == torch.bfloat16
    assert float((y.float().reshape(-1, 32) - ref).abs().max() / ref.abs().max()) < 1e-2
    assert fp8.weight.dtype == torch.float8_e4m3fn   # the weight stays FP8 in memory


def test_convert_replaces_exactly_the_named_linears_and_rejects_odd_sizes():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(torch.bfloat16)
    assert convert_linears(model, {"0"}) == ["0"]
    assert isinstance(model[0], Fp8RowwiseLinear) and isinstance(model[2], torch.nn.Linear)
    with pytest.raises(TypeError, match="1: expected nn.Linear"):
        convert_linears(model, {"1"})
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8RowwiseLinear.from_linear(torch.nn.Linear(30, 16))
