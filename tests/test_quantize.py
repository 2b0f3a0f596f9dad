"""FP8 quantization of the tiny Qwen2.5-VL: the checkpoint's files, its reload with plain transformers, the
ignore-list trap it fixes, CPU loading, and the accuracy gate (`trafficvlm quantize --gate`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")

from trafficvlm import quantize as q  # noqa: E402
from trafficvlm.model import build_tiny, read_bundle_meta  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("src") / "tiny", seed=0, vocab="byte")


@pytest.fixture(scope="module")
def fp8(tiny, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    report = q.quantize(tiny, out, device="cpu", on_note=lambda _: None)
    return out, report


def _tensors(path: Path) -> dict[str, tuple[str, bool]]:
    """key -> (dtype, has a weight_scale next to it)."""
    from safetensors import safe_open

    with safe_open(next(path.glob("*.safetensors")), "pt") as f:
        keys = set(f.keys())
        return {k: (f.get_slice(k).get_dtype(), k.replace(".weight", ".weight_scale") in keys)
                for k in keys if k.endswith(".weight")}


def test_checkpoint_carries_compressed_tensors_config_and_the_bundle_files(tiny, fp8):
    out, report = fp8
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    # every ignored vision layer named both ways: transformers 5 and the checkpoint / vLLM spelling
    assert "model.visual.blocks.0.attn.qkv" in qc["ignore"] and "visual.blocks.0.attn.qkv" in qc["ignore"]
    assert not any("layers." in name for name in qc["ignore"])
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja",
                 "generation_config.json", "vocab.json"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name
    meta, src_meta = read_bundle_meta(out), read_bundle_meta(tiny)
    assert meta["video"] == src_meta["video"] and meta["prompt"] == src_meta["prompt"]
    assert meta["quantization"]["scheme"] == "fp8-dynamic" and meta["quantization"]["verify"]["ok"]
    saved = json.loads((out / q.REPORT).read_text())
    assert saved["size_gb"]["after"] < saved["size_gb"]["before"] == report["size_gb"]["before"]
    assert saved["layers"] == {"quantized": 14, "ignored": 13}   # 2 decoder layers x 7; vision 2x5 + merger 2 + lm_head


def test_vision_tower_and_lm_head_stay_bf16_and_the_llm_is_fp8(fp8):
    tensors = _tensors(fp8[0])
    keep = {k: v for k, v in tensors.items() if k.startswith(("visual.", "lm_head."))}
    llm = {k: v for k, v in tensors.items() if k.startswith("model.layers.") and "_proj." in k}
    assert keep and all(v == ("BF16", False) for v in keep.values()), keep
    assert len(llm) == 14 and all(v == ("F8_E4M3", True) for v in llm.values()), llm


def test_plain_transformers_reload_matches_the_source(tiny, fp8):
    result = q.verify_checkpoint(tiny, fp8[0])
    assert result["ok"], result["failures"]
    assert result["vision_rel_diff"] < q.VISION_TOL
    assert 0 < result["logits_rel_diff"] < q.LOGITS_TOL      # FP8 changed something, within tolerance


# vLLM's Qwen2.5-VL `hf_to_vllm_mapper` prefixes (vllm/model_executor/models/qwen2_5_vl.py), applied in order to
# every name in the quantization ignore list (CompressedTensorsConfig.apply_vllm_mapper), and the module names
# vLLM gives the vision tower's linear layers (gate/up fused: ignored when both shards are named).
VLLM_PREFIXES = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
                 "lm_head.": "language_model.lm_head.", "model.": "language_model.model."}


def _vllm_name(name: str) -> str:
    for old, new in VLLM_PREFIXES.items():
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def test_ignore_list_names_every_vision_layer_as_vllm_maps_it(fp8):
    ignore = json.loads((fp8[0] / "config.json").read_text())["quantization_config"]["ignore"]
    mapped = {_vllm_name(n) for n in ignore}
    for block in range(2):
        for layer in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"visual.blocks.{block}.{layer}" in mapped
    assert {"visual.merger.mlp.0", "visual.merger.mlp.2"} <= mapped
    assert not any(n.startswith("language_model.model.layers") for n in mapped)


def test_unfixed_save_reproduces_the_ignore_list_trap_and_harmonize_fixes_it(tiny, tmp_path):
    """Pins why harmonize_ignore exists: llm-compressor's own save names the vision layers `visual.*`,
    transformers 5 calls them `model.visual.*`, so a plain reload quantizes the vision tower silently."""
    from trafficvlm.model import load_model

    model = load_model(tiny, dtype=torch.bfloat16)
    layers = q.quantize_model(model)
    model.save_pretrained(tmp_path, save_compressed=True)
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert "visual.blocks.0.attn.qkv" in ignore and "model.visual.blocks.0.attn.qkv" not in ignore
    assert q.ignore_gaps({"ignore": ignore})

    broken = q.verify_checkpoint(tiny, tmp_path)
    assert not broken["ok"]
    assert any("vision modules loaded as quantized" in f for f in broken["failures"])
    assert not broken["vision_rel_diff"] < q.VISION_TOL           # wrong (or NaN), yet the logits are finite

    q.harmonize_ignore(tmp_path / "config.json", layers["ignored"])
    fixed = q.verify_checkpoint(tiny, tmp_path)
    assert fixed["ok"], fixed["failures"]


def test_load_quantized_on_cpu_dequantizes_and_emulates_fp8_activations(tiny, fp8):
    from transformers import AutoModelForImageTextToText

    notes = []
    model = q.load_quantized(fp8[0], "cpu", on_note=notes.append)
    assert "dequantized" in notes[0] and "emulated in 14 layers" in notes[0]
    assert q.quantized_vision_modules(model) == []
    ref = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.bfloat16)
    weight_only = AutoModelForImageTextToText.from_pretrained(fp8[0])
    probe = q.probe_inputs(ref.config)
    (_, logits_ref), (_, logits_w8a8), (_, logits_w8) = (q._run(m, probe) for m in (ref, model, weight_only))
    assert q.rel_diff(logits_w8, logits_w8a8) > 0                 # the activation rounding is really applied
    assert q.rel_diff(logits_ref, logits_w8a8) < q.LOGITS_TOL


def test_fp8_kernel_only_for_channel_scales_on_a_capable_gpu():
    channel = {"config_groups": {"g": {"weights": {"strategy": "channel"}}}}
    ok, why = q.fp8_kernel_ok(channel, "cpu")
    assert not ok and "CUDA" in why


def test_fp8_block_refuses_sizes_that_are_not_multiples_of_128(tiny):
    from trafficvlm.model import load_model

    with pytest.raises(ValueError, match="divisible by 128.*use fp8-dynamic"):
        q.quantize_model(load_model(tiny, dtype=torch.bfloat16), "fp8-block")


def test_quantize_refuses_a_quantized_source_and_an_occupied_out(fp8, tiny, tmp_path):
    with pytest.raises(q.QuantizeError, match="already quantized"):
        q.quantize(fp8[0], tmp_path / "again", device="cpu")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        q.quantize(tiny, tmp_path / "taken", device="cpu")
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


# --- the gate ----------------------------------------------------------------------------------------------

def test_decide_compares_the_drop_in_points():
    from trafficvlm.stages.quantize import decide

    def compared(delta):
        return {"comparisons": [{"delta": delta, "accuracy_a": 0.5, "accuracy_b": 0.5 + delta, "n": 100,
                                 "only_in_a": 0, "only_in_b": 0, "ci": [delta - 0.01, delta + 0.01],
                                 "p_value": 0.5}]}

    assert decide(compared(-0.005), 1.0)["passed"]
    assert not decide(compared(-0.02), 1.0)["passed"]
    assert decide(compared(-0.02), 1.0)["drop_points"] == pytest.approx(2.0)
    assert not decide(compared(0.0), -1.0)["passed"]       # a negative threshold demands an improvement
    assert decide(compared(0.0), 0.0)["ci_points"] == [-1.0, 1.0]


@pytest.fixture(scope="module")
def gate_env(tmp_path_factory):
    from sft_fixtures import make_tiny_env

    return make_tiny_env(tmp_path_factory.mktemp("gate"))


def test_gate_prints_the_comparison_and_fails_an_impossible_threshold(gate_env, tmp_path, capsys, monkeypatch):
    from trafficvlm.cli import main
    from trafficvlm.export import ExportError, export

    monkeypatch.setenv("TRAFFICVLM_CACHE", str(gate_env.cache))
    out = tmp_path / "fp8"
    args = ["quantize", str(gate_env.model), "--out", str(out), "--device", "cpu", "--gate",
            str(gate_env.annotation), "--media-dir", str(gate_env.media), "--limit", "10", "--no-progress"]
    assert main(args + ["--max-drop", "-1"]) == 1
    printed = capsys.readouterr().out
    assert "McNemar" in printed and "FP8 gate FAILED" in printed and "paired questions" in printed
    gate = json.loads((tmp_path / "fp8-gate" / "gate.json").read_text())
    assert not gate["passed"] and gate["paired_questions"] == 10 and gate["drop_points"] > -1
    assert read_bundle_meta(out)["quantization"]["gate"]["passed"] is False
    with pytest.raises(ExportError, match="gate failed"):
        export(out, tmp_path / "bundle")

    # the same checkpoint against the source's existing results: one eval, a threshold it meets
    args[args.index(str(out))] = str(tmp_path / "fp8b")
    reference = tmp_path / "fp8-gate" / "source"
    assert main(args + ["--max-drop", "100", "--reference", str(reference)]) == 0
    assert "FP8 gate PASSED" in capsys.readouterr().out
    assert not (tmp_path / "fp8b-gate" / "source").exists()


def test_gate_needs_both_data_and_media_dir(tiny, tmp_path, capsys):
    from trafficvlm.cli import main

    assert main(["quantize", str(tiny), "--out", str(tmp_path / "o"), "--gate", "val.json"]) == 2
    assert "media_dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
