"""`trafficvlm export`: the bundle's file set, its validation, and the serving commands for each target."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trafficvlm import export as ex  # noqa: E402
from trafficvlm.model import build_tiny, read_bundle_meta, write_bundle_meta  # noqa: E402

FILES = {"config.json", "model.safetensors", ex.INDEX, "tokenizer.json", "tokenizer_config.json",
         "preprocessor_config.json", "chat_template.jinja", "generation_config.json", "trafficvlm.json", ex.DEPLOY}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("src") / "tiny", seed=0, vocab="byte")


@pytest.fixture(scope="module")
def fp8(tiny, tmp_path_factory) -> Path:
    pytest.importorskip("llmcompressor")
    from trafficvlm.quantize import quantize

    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    quantize(tiny, out, device="cpu", on_note=lambda _: None)
    return out


def _flags(command: str) -> dict[str, list[str]]:
    """A printed command (backslash continuations) parsed back into flag -> values."""
    words = shlex.split(command.replace("\\\n", " "))
    flags: dict[str, list[str]] = {}
    for flag, value in zip(words, words[1:]):
        if flag.startswith("-"):
            flags.setdefault(flag, []).append(value)
    return flags


def test_vllm_bundle_has_the_file_set_and_the_spec_flags(fp8, tmp_path):
    bundle = ex.export(fp8, tmp_path / "b", target="vllm", media_dir=str(tmp_path / "videos"))
    names = {p.name for p in bundle.path.iterdir()}
    assert FILES <= names and "quantize_report.json" in names
    assert ex.validate_bundle(bundle.path) == []
    index = json.loads((bundle.path / ex.INDEX).read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] > 0
    first = bundle.commands.splitlines()[0]
    assert first == f"vllm serve {bundle.path} \\"
    flags = _flags(bundle.commands)
    assert flags["--served-model-name"] == ["cosmos-reason1-7b"]
    assert json.loads(flags["--media-io-kwargs"][0]) == {"video": {"num_frames": -1, "fps": 1.0}}
    processor = json.loads(flags["--mm-processor-kwargs"][0])
    assert processor["fps"] == 1.0 and processor["max_pixels"] == 81920
    assert json.loads(flags["--limit-mm-per-prompt"][0]) == {"video": 1}
    assert flags["--allowed-local-media-path"] == [str((tmp_path / "videos").resolve())]
    deploy = (bundle.path / ex.DEPLOY).read_text()
    assert bundle.commands in deploy and "FP8 fp8-dynamic" in deploy


def test_nim_command_passes_the_key_by_name_and_mounts_the_bundle(tiny, tmp_path):
    bundle = ex.export(tiny, tmp_path / "nim", target="nim", served_name="wts", port=9000)
    docker = bundle.commands[bundle.commands.index("docker run"):]
    flags = _flags(docker)
    assert "NGC_API_KEY" in flags["-e"]                       # from the environment: no value anywhere
    assert f"NIM_MODEL_NAME={ex.NIM_MOUNT}" in flags["-e"] and "NIM_SERVED_MODEL_NAME=wts" in flags["-e"]
    assert f"{bundle.path}:{ex.NIM_MOUNT}:ro" in flags["-v"] and flags["--gpus"] == ["all"]
    assert flags["-p"] == ["9000:8000"] and docker.rstrip().endswith(ex.NIM_IMAGE)
    assert "NGC_API_KEY=" not in docker


def test_vss_bundle_gives_the_environment(tiny, tmp_path):
    bundle = ex.export(tiny, tmp_path / "vss", target="vss")
    assert bundle.commands.splitlines() == ["export VLM_MODEL_TO_USE=cosmos-reason1",
                                            f"export MODEL_PATH={bundle.path}"]
    assert FILES <= {p.name for p in bundle.path.iterdir()}
    assert "Smoke test" not in (bundle.path / ex.DEPLOY).read_text()


def test_exported_fp8_bundle_reloads_and_matches_its_source(tiny, fp8, tmp_path):
    from trafficvlm.quantize import verify_checkpoint

    bundle = ex.export(fp8, tmp_path / "b", target="vllm")
    result = verify_checkpoint(tiny, bundle.path)
    assert result["ok"], result["failures"]


def test_missing_files_come_from_the_base_model_or_fail_by_name(tiny, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny, partial)
    (partial / "tokenizer.json").unlink()
    with pytest.raises(ex.ExportError, match="tokenizer.json: missing"):
        ex.export(partial, tmp_path / "b1")
    assert not (tmp_path / "b1").exists() and not (tmp_path / ".b1.tmp").exists()
    bundle = ex.export(partial, tmp_path / "b2", base_model=tiny)
    assert (bundle.path / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_validation_catches_a_bad_index_a_bad_spec_and_bad_json(tiny, tmp_path):
    bundle = ex.export(tiny, tmp_path / "b").path
    index = json.loads((bundle / ex.INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00002-of-00002.safetensors"
    index["weight_map"]["ghost.weight"] = "model.safetensors"
    (bundle / ex.INDEX).write_text(json.dumps(index))
    meta = read_bundle_meta(bundle)
    del meta["video"]
    write_bundle_meta(bundle, meta)
    (bundle / "generation_config.json").write_text("{not json")
    problems = "\n".join(ex.validate_bundle(bundle))
    assert "names model-00002-of-00002.safetensors, which is missing" in problems
    assert "index entries with no tensor (e.g. ghost.weight)" in problems
    assert "no 'video' spec" in problems and "generation_config.json: not valid JSON" in problems


def test_fp8_bundle_with_the_trap_ignore_list_is_rejected(fp8, tmp_path):
    bundle = ex.export(fp8, tmp_path / "b").path
    config = json.loads((bundle / "config.json").read_text())
    qc = config["quantization_config"]
    qc["ignore"] = [n for n in qc["ignore"] if not n.startswith("model.visual.")]
    (bundle / "config.json").write_text(json.dumps(config))
    assert any("transformers 5 would load them as quantized" in p for p in ex.validate_bundle(bundle))


def test_cli_prints_the_commands_and_refuses_to_overwrite(tiny, tmp_path, capsys):
    from trafficvlm.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny), "--out", str(out), "--target", "vllm"]) == 0
    printed = capsys.readouterr().out
    assert f"vllm serve {out.resolve()}" in printed and "DEPLOY.md" in printed
    assert main(["export", str(tiny), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tiny), "--out", str(out), "--overwrite", "--target", "vss"]) == 0
