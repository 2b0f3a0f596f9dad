"""trafficvlm doctor: runs offline, prints JSON, and flags the known-bad combinations."""

import json

from trafficvlm import cli
from trafficvlm.config import VideoSpec
from trafficvlm.doctor import Report, check
from trafficvlm.model import write_bundle_meta


def _report(**versions) -> Report:
    base = {"transformers": "5.17.0", "torchvision": None, "flash-attn": None}
    return Report({**base, **versions}, {"cuda": []}, {"h264_decode": True}, {})


def test_doctor_json_runs_and_parses(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"versions", "devices", "video", "spec", "warnings", "notes"}
    assert report["versions"]["transformers"] and report["video"]["h264_decode"] is True
    assert report["spec"]["spec"] == VideoSpec().to_dict()
    # 74 frames at 364x196 -> 3,367 tokens: DESIGN.md's worked example for the default spec.
    assert report["spec"]["reference_clip"]["vision_tokens"] == 3367
    assert any("passes position_ids itself" in w for w in report["warnings"])


def test_doctor_reads_the_spec_of_a_checkpoint(tmp_path, capsys):
    write_bundle_meta(tmp_path, {"video": VideoSpec(fps=2.0, max_pixels=50176).to_dict()})
    assert cli.main(["doctor", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trafficvlm.json" in out and "'fps': 2.0" in out and "warning: transformers" in out


def test_known_bad_combinations():
    report = _report(transformers="5.2.0", decord="0.6.0")
    report.devices = {"cuda": [{"index": 0, "name": "Tesla V100", "capability": "7.0", "bf16": False}]}
    report.video = {"h264_decode": False}
    check(report)
    text = "\n".join(report.warnings)
    assert "truncates second_per_grid" in text and "restarts text" not in text  # 5.3 introduced the restart
    assert "decord 0.6.0" in text and "V100" in text and "H.264" in text

    newer = _report(transformers="5.20.0")
    check(newer)
    assert any("newer than the 5.17" in w for w in newer.warnings)
    assert any("flash-attn" in n for n in newer.notes) and any("torchvision" in n for n in newer.notes)


def test_pins_of_installed_packages(monkeypatch):
    """llm-compressor pins transformers; a transformers outside its range is a warning."""
    from trafficvlm import doctor

    installed = {"llmcompressor": "0.14.0.1", "transformers": "5.18.0", "torch": "2.13.0"}
    monkeypatch.setattr(doctor, "version_of", installed.get)
    monkeypatch.setattr(doctor.md, "requires", lambda name: ["transformers<=5.17.0,>=5.15.0", "torch>=2.10.0",
                                                             'torchcodec; extra == "dev"'])
    report = _report(transformers="5.18.0")
    doctor._pins(report)
    assert report.warnings == ["llmcompressor requires transformers<=5.17.0,>=5.15.0 but 5.18.0 is installed"]
