"""The FP8 backends of `trafficvlm.quantize.load_quantized` on CPU: which one runs where, the torchao route's
conversion (exactly the checkpoint's quantized layers; the checkpoint's FP8 codes and scales reproduced),
the errors a wrong request gets, and bench/fp8_eval.py's CPU smoke path with a failing row.

torchao's float8 linears refuse to be created without an sm_89+ GPU (`_check_hardware_support`); the
conversion tests lift that check, since everything they exercise (quantizing weights, `torch._scaled_mm`)
also runs on CPU in torch 2.13."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")
pytest.importorskip("torchao")

from trafficvlm import quantize as q  # noqa: E402
from trafficvlm.model import build_tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("src") / "tiny", seed=0, vocab="byte")


@pytest.fixture(scope="module")
def fp8(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    q.quantize(tiny, out, device="cpu", on_note=lambda _: None)
    return out


@pytest.fixture
def no_gpu_check(monkeypatch):
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def _dequantized(path: Path):
    return q._from_pretrained(path, "cpu", torch.bfloat16, "sdpa", dequantize=True)


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in path.glob("*.safetensors") for k, v in load_file(file).items()}


def test_torchao_requantization_gives_back_the_checkpoints_fp8_codes_and_scales(fp8):
    from torchao.quantization import Float8Tensor, PerRow

    model, saved = _dequantized(fp8), _checkpoint_tensors(fp8)
    layers = q.quantized_layers(model, q.quantization_config_of(fp8))
    assert len(layers) == 14
    for name, module, _ in layers:
        key = name.replace("model.language_model.", "model.")            # the checkpoint's key spelling
        codes, scale = saved[f"{key}.weight"], saved[f"{key}.weight_scale"].float().flatten()
        again = Float8Tensor.from_hp(module.weight.data, granularity=PerRow())
        assert codes.dtype == again.qdata.dtype == torch.float8_e4m3fn
        assert torch.equal(again.qdata.view(torch.uint8), codes.view(torch.uint8)), name
        # the bf16 rounding of the dequantized product is the only slack (see to_torchao_float8)
        assert torch.allclose(again.scale.flatten(), scale, rtol=2 ** -8, atol=0), name


def test_to_torchao_float8_converts_exactly_the_checkpoints_quantized_linears(fp8, no_gpu_check):
    from torchao.quantization import Float8Tensor

    qc = q.quantization_config_of(fp8)
    model = _dequantized(fp8)
    converted = q.to_torchao_float8(model, qc)
    float8 = sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor))
    assert float8 == converted and len(converted) == 14
    assert all(n.startswith("model.language_model.layers.") for n in converted)
    assert not any(isinstance(p, Float8Tensor) for n, p in model.named_parameters()
                   if n.startswith("model.visual.") or n.startswith("lm_head."))
    assert model.lm_head.weight.dtype == model.model.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    # compressed-tensors' fake-quantizing forward is gone: torchao quantizes the activations itself
    assert all("forward" not in model.get_submodule(n).__dict__ for n in converted)

    # one layer: torchao's FP8 x FP8 matmul = per-token FP8-rounded activations x the dequantized weights,
    # here in float32. CPU `_scaled_mm` (oneDNN) is not float32-exact (~0.3% on a 64-wide product, more on
    # wider ones), hence 3%; a wrong scale or a mismatched weight is off by ~100%.
    layer = model.get_submodule(converted[-1])
    weight = _dequantized(fp8).get_submodule(converted[-1]).weight.float()
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    scale = x.float().abs().amax(-1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    rounded = (x.float() / scale).to(torch.float8_e4m3fn).float() * scale
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert q.rel_diff(rounded @ weight.T, got.float()) < 3e-2


def test_torchao_route_runs_the_w8a8_numerics_of_the_emulation(fp8, no_gpu_check):
    model = _dequantized(fp8)
    q.to_torchao_float8(model, q.quantization_config_of(fp8))
    emulated = q.load_quantized(fp8, "cpu", backend="emulate", on_note=lambda _: None)
    probe = q.probe_inputs(model.config)
    (vision_t, logits_t), (vision_e, logits_e) = q._run(model, probe), q._run(emulated, probe)
    assert q.rel_diff(vision_e, vision_t) == 0                 # the vision tower is untouched bf16
    assert torch.isfinite(logits_t).all() and q.rel_diff(logits_e, logits_t) < q.LOGITS_TOL


def test_compile_language_model_wraps_the_fp8_blocks_and_keeps_the_outputs(fp8):
    model = q.load_quantized(fp8, "cpu", on_note=lambda _: None)
    probe = q.probe_inputs(model.config)
    _, before = q._run(model, probe)
    assert q.compile_language_model(model, backend="eager") == 2 * 5    # 2 layers x (MLP + q, k, v, o)
    _, after = q._run(model, probe)
    assert torch.equal(before, after)


def test_backend_choice_on_cpu_and_on_a_capable_gpu(fp8, monkeypatch):
    qc = q.quantization_config_of(fp8)
    assert q.choose_fp8_backend(qc, "cpu")[0] == "emulate"
    assert q.choose_fp8_backend(qc, "cpu", "emulate") == ("emulate", "FP8 kernels turned off by the caller")
    with pytest.raises(ValueError, match="'torchao' requested but unavailable: no CUDA"):
        q.choose_fp8_backend(qc, "cpu", "torchao")
    with pytest.raises(ValueError, match="must be one of auto, scaled-mm, compressed-tensors, torchao, emulate"):
        q.choose_fp8_backend(qc, "cpu", "fp8")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # an H100, as far as the check knows
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert q.choose_fp8_backend(qc, "cuda")[0] == q.FAST_FP8_BACKEND == "scaled-mm"
    assert q.choose_fp8_backend(qc, "cuda", "torchao")[0] == "torchao"
    assert q.choose_fp8_backend(qc, "cuda", "scaled-mm")[0] == "scaled-mm"
    block = json.loads(json.dumps(qc))
    for group in block["config_groups"].values():
        group["weights"]["strategy"], group["input_activations"]["strategy"] = "block", "group"
    ok, why = q.fp8_kernel_ok(block, "cuda", "torchao")
    assert not ok and "per-channel weights and per-token activations" in why
    chosen, why = q.choose_fp8_backend(block, "cuda")   # neither kernel takes block scales: emulated, both reasons
    assert chosen == "emulate" and "scaled-mm route" in why and "vLLM" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    assert q.choose_fp8_backend(qc, "cuda")[0] == "emulate"


def test_backend_torchao_without_the_package_names_the_pin(fp8, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)                      # import torchao -> ImportError
    with pytest.raises(ImportError, match=r"pip install torchao==0\.18\.0"):
        q.load_quantized(fp8, "cpu", backend="torchao")
    assert "torchao==0.18.0" in (ROOT / "pyproject.toml").read_text()


def test_fp8_bench_cpu_smoke_records_a_failing_row_and_runs_the_rest(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import fp8_eval

    out = tmp_path / "fp8_eval.json"
    code = fp8_eval.main(["--tiny", "--device", "cpu", "--repeats", "1", "--workdir", str(tmp_path / "w"),
                          "--out", str(out), "--rows", "torchao,bf16"])
    result = json.loads(out.read_text())
    assert code == 1                                                        # a row failed: said in the exit status
    assert "no CUDA device" in result["engines"]["fp8 (torchao float8, eager)"]["error"]
    bf16 = result["engines"]["bf16"]
    assert bf16["prefill"]["repeats"] == 1 and bf16["speedup_vs_bf16"]["prefill"] == 1.0
    assert result["config"]["rows"] == ["torchao", "bf16"] and result["parity"] == {}
    with pytest.raises(SystemExit):
        fp8_eval.main(["--rows", "bf16,fast"])


def test_scaled_mm_route_converts_exactly_the_quantized_layers_and_keeps_the_logits(fp8):
    """to_fp8_rowwise on the tiny checkpoint (torch's reference scaled_mm on CPU): every quantized layer and
    nothing else becomes an Fp8RowwiseLinear, and the logits stay those of the W8A8 emulation."""
    from trafficvlm.fp8_linear import Fp8RowwiseLinear

    qc = q.quantization_config_of(fp8)
    rowwise, emulated = _dequantized(fp8), _dequantized(fp8)
    names = q.to_fp8_rowwise(rowwise, qc, fused=False)
    assert names == sorted(name for name, _, _ in q.quantized_layers(emulated, qc))
    assert {n for n, m in rowwise.named_modules() if isinstance(m, Fp8RowwiseLinear)} == set(names)
    assert not any("visual" in n or "lm_head" in n for n in names)
    q.emulate_fp8_activations(emulated, qc)
    ids = torch.randint(0, 200, (1, 12))
    with torch.inference_mode():
        a, b = rowwise(input_ids=ids).logits.float(), emulated(input_ids=ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 0.05
