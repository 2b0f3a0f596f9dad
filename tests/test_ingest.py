"""S3 ingest/upload against a real S3-compatible HTTP server (moto, tests/s3server.py) on 127.0.0.1.

    .venv/bin/python -m pytest -q tests/test_ingest.py
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest
from s3server import free_port, s3_server  # noqa: F401  (fixture)

import trafficvlm.stages.ingest as ingest_module
from trafficvlm.cli import main
from trafficvlm.s3 import S3Error, etag_of, redact, s3_env_secret_names
from trafficvlm.stages.ingest import (MANIFEST_FILE, STATE_FILE, TMP_SUFFIX, IngestError, glob_regex,
                                      run_ingest, run_upload)

PART = 5 * 1024 * 1024  # the S3 minimum part size; the 6 MiB video goes multipart in 2 parts
BIG = "videos/val/S2/overhead_view/S2_Camera1_0.mp4"


def _blob(seed: str, size: int) -> bytes:
    return (hashlib.sha256(seed.encode()).digest() * (size // 32 + 1))[:size]


def _vqa(videos: list[str]) -> str:
    return json.dumps([{"id": 1, "overhead_videos": videos, "environment": [
        {"question": "What is weather in the scenario?", "a": "Cloudy", "b": "Clear", "correct": "b"}]}])


def make_tree(root: Path) -> Path:
    files = {
        "view_used_as_main_reference_for_multiview_scenario.csv": "Scene,Viewpoint1\nS1,S1_Camera1_0.mp4\n",
        "videos/train/S1/overhead_view/S1_Camera1_0.mp4": _blob("a", 3000),
        "videos/train/S1/vehicle_view/S1_vehicle_view.mp4": _blob("b", 2000),
        BIG: os.urandom(6 * 1024 * 1024 + 123),
        "videos/val/normal_trimmed/N1/overhead_view/N1.mp4": _blob("c", 1500),
        "annotations/vqa/train/S1/environment/S1.json": _vqa(["S1_Camera1_0.mp4"]),
        "annotations/vqa/train/S1/overhead_view/S1.json": _vqa(["S1_Camera1_0.mp4"]),
        "annotations/vqa/train/S1/vehicle_view/S1.json": json.dumps([{"vehicle_view": "S1_vehicle_view.mp4"}]),
        "annotations/caption/train/S1/overhead_view/S1_caption.json": json.dumps({"id": 1}),
        "annotations/vqa/val/S2/environment/S2.json": _vqa(["S2_Camera1_0.mp4"]),
        "annotations/vqa/val/normal_trimmed/N1/environment/N1.json": _vqa(["N1.mp4"]),
        "videos/val/S2/vehicle_view/S2_vehicle_view.mp4": _blob("d", 2500),
        "annotations/vqa/val/S2/overhead_view/S2.json": _vqa(["S2_Camera1_0.mp4"]),
        "annotations/vqa/val/S2/vehicle_view/S2.json": json.dumps([{"vehicle_view": "S2_vehicle_view.mp4"}]),
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (STATE_FILE, MANIFEST_FILE)}


def upload_tree(src: Path) -> str:
    uri = f"s3://wts-{uuid.uuid4().hex[:10]}/wts"
    report = run_upload(src, uri, create_bucket=True, workers=4, progress=False,
                        multipart_threshold=PART, multipart_chunksize=PART)
    assert report.uploaded == report.files == 14
    return uri


@pytest.fixture(autouse=True)
def s3_env(s3_server, monkeypatch):  # noqa: F811
    s3_server.apply_env(monkeypatch)


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory):  # noqa: F811
    """One bucket for the tests that only read it: (uri, source dir)."""
    with pytest.MonkeyPatch.context() as patch:
        s3_server.apply_env(patch)
        src = make_tree(tmp_path_factory.mktemp("shared") / "src")
        return upload_tree(src), src


@pytest.fixture
def bucket(tmp_path):
    """A fresh bucket for a test that changes it: (uri, source dir)."""
    src = make_tree(tmp_path / "src")
    return upload_tree(src), src


def ingest(uri: str, out: Path, **kw):
    kw = {"subsets": ("environment", "overhead", "vehicle"), "workers": 4, **kw}
    return run_ingest(uri, out, progress=False, multipart_threshold=PART, multipart_chunksize=PART, **kw)


def test_roundtrip_then_rerun_transfers_nothing(shared, s3_server, tmp_path):  # noqa: F811
    uri, src = shared
    out = tmp_path / "out"
    first = ingest(uri, out)
    assert tree_bytes(out) == tree_bytes(src)  # byte-for-byte, the multipart object included
    assert (first.downloaded, first.skipped, first.failed, first.etag_unchecked) == (14, 0, 0, 0)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    entries = {o["key"]: o for o in manifest["objects"]}
    assert entries[BIG]["etag"].endswith("-2")  # really multipart, and verified as such
    assert all(hashlib.sha256((out / k).read_bytes()).hexdigest() == o["sha256"] for k, o in entries.items())
    assert manifest["report"]["downloaded"] == 14

    second = ingest(uri, out)
    assert (second.downloaded, second.skipped, second.bytes_downloaded) == (0, 14, 0)
    (out / STATE_FILE).unlink()  # state lost: files are checked against S3's ETags, still nothing fetched
    assert ingest(uri, out).downloaded == 0
    again = run_upload(src, uri, progress=False, multipart_threshold=PART, multipart_chunksize=PART)
    assert (again.uploaded, again.skipped) == (0, 14)


def test_val_only_fetches_no_train_objects(shared, tmp_path):
    uri, _ = shared
    out = tmp_path / "out"
    report = ingest(uri, out, splits=["val"], subsets=["environment"])
    keys = set(tree_bytes(out))
    assert keys == {"view_used_as_main_reference_for_multiview_scenario.csv", BIG,
                    "videos/val/normal_trimmed/N1/overhead_view/N1.mp4",
                    "annotations/vqa/val/S2/environment/S2.json",
                    "annotations/vqa/val/normal_trimmed/N1/environment/N1.json"}
    assert report.listed == 14 and report.selected == 5


def test_include_glob_adds_objects(shared, tmp_path):
    uri, _ = shared
    report = ingest(uri, tmp_path / "out", splits=["val"], subsets=["environment"],
                    include=["annotations/caption/**"])
    assert report.selected == 6
    assert (tmp_path / "out/annotations/caption/train/S1/overhead_view/S1_caption.json").is_file()
    assert glob_regex("videos/val/**/overhead_view/*.mp4").fullmatch(BIG)
    assert not glob_regex("videos/val/*/x.mp4").fullmatch("videos/val/a/b/x.mp4")


def test_interrupted_run_resumes(shared, tmp_path):
    uri, src = shared
    out = tmp_path / "out"
    seen: list[str] = []

    def crash_after_three(key: str, downloaded: bool) -> None:
        seen.append(key)
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C / a killed step looks like to the loop
    with pytest.raises(KeyboardInterrupt):
        ingest(uri, out, on_object=crash_after_three)
    # A transfer cut off mid-way leaves a temp file behind (as a SIGKILL would).
    stale = out / (BIG + TMP_SUFFIX)
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    done_before = {k for k in tree_bytes(out) if TMP_SUFFIX not in k}
    assert 3 <= len(done_before) < 14

    resumed = ingest(uri, out)
    assert resumed.downloaded == 14 - len(done_before) and resumed.skipped == len(done_before)
    assert resumed.stale_temp_removed == 1 and not stale.exists()
    assert tree_bytes(out) == tree_bytes(src)


def test_corrupted_local_files_are_refetched(shared, tmp_path):
    uri, src = shared
    out = tmp_path / "out"
    ingest(uri, out)
    small = out / "videos/train/S1/overhead_view/S1_Camera1_0.mp4"
    small.write_bytes(small.read_bytes()[:-10])  # size changed
    big = out / BIG
    data = bytearray(big.read_bytes())
    data[100] ^= 0xFF  # same size, other content
    stat = big.stat()
    big.write_bytes(bytes(data))
    # A coarse filesystem clock may give the rewrite the old mtime; an edit always moves it in practice.
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    report = ingest(uri, out)
    assert (report.downloaded, report.skipped) == (2, 12)
    assert tree_bytes(out) == tree_bytes(src)


def test_object_changed_in_bucket_is_refetched(bucket, s3_server, tmp_path):  # noqa: F811
    uri, _ = bucket
    out = tmp_path / "out"
    ingest(uri, out)
    bucket_name = uri.split("/")[2]
    key = "annotations/vqa/val/S2/environment/S2.json"
    s3_server.client().put_object(Bucket=bucket_name, Key=f"wts/{key}", Body=_vqa(["S2_Camera1_0.mp4"]) + " ")
    report = ingest(uri, out)
    assert report.downloaded == 1
    assert (out / key).read_text().endswith(" ")


def test_checksum_manifest(shared, tmp_path):
    uri, src = shared
    good = {k: hashlib.sha256(v).hexdigest() for k, v in tree_bytes(src).items()}
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert ingest(uri, tmp_path / "ok", manifest=tmp_path / "good.json").downloaded == 14

    bad = dict(good, **{BIG: "0" * 64})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(IngestError, match=r"wts/videos/val/S2/overhead_view/S2_Camera1_0\.mp4: sha256") as err:
        ingest(uri, tmp_path / "bad", manifest=tmp_path / "bad.json")
    assert err.value.report.failed == 1 and err.value.report.downloaded == 13
    assert not (tmp_path / "bad" / BIG).exists()  # never renamed into place


def test_video_referenced_by_vqa_but_absent_fails_naming_it(bucket, s3_server, tmp_path):  # noqa: F811
    uri, _ = bucket
    s3_server.client().delete_object(Bucket=uri.split("/")[2],
                                     Key="wts/videos/val/normal_trimmed/N1/overhead_view/N1.mp4")
    with pytest.raises(IngestError, match=r"wts/videos/val/normal_trimmed/N1/overhead_view/N1\.mp4 is referenced"):
        ingest(uri, tmp_path / "out", splits=["val"], subsets=["environment"])
    report = ingest(uri, tmp_path / "out", splits=["val"], subsets=["environment"], allow_missing_videos=True)
    assert report.missing == ["videos/val/normal_trimmed/N1/overhead_view/N1.mp4"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err.strip()


def test_cli_roundtrip_and_report(s3_server, monkeypatch, tmp_path, capsys):  # noqa: F811
    s3_server.apply_env(monkeypatch)
    src = make_tree(tmp_path / "src")
    name = f"cli-{uuid.uuid4().hex[:10]}"
    assert _cli(capsys, "upload", str(src), f"s3://{name}/x", "--quiet")[0] == 1  # no --create-bucket
    assert main(["upload", str(src), f"s3://{name}/x", "--create-bucket", "--quiet"]) == 0
    code = main(["ingest", f"s3://{name}/x", "--out", str(tmp_path / "o"), "--splits", "val", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "downloaded 5" in printed and "skipped 0" in printed and "MB/s" in printed


@pytest.mark.parametrize("case", ["missing bucket", "empty prefix", "missing split", "bad subset"])
def test_cli_clear_errors(case, shared, tmp_path, capsys):
    uri, _ = shared
    name = uri.split("/")[2]
    argv, expected = {
        "missing bucket": (["s3://no-such-bucket-x/wts"], "bucket 'no-such-bucket-x' does not exist"),
        "empty prefix": ([f"s3://{name}/nothing-here"], f"prefix s3://{name}/nothing-here/ is empty"),
        "missing split": ([uri, "--subsets", "bdd"],
                          f"no object matches s3://{name}/wts/external/BDD_PC_5K/videos/train/*.mp4"),
        "bad subset": ([uri, "--subsets", "weather"], "unknown subset weather"),
    }[case]
    code, err = _cli(capsys, "ingest", *argv, "--out", str(tmp_path / "o"), "--quiet")
    assert code == 1 and expected in err and len(err.splitlines()) == 1


def test_wrong_credentials_are_denied_without_leaking_them(shared, s3_server, monkeypatch, tmp_path,  # noqa: F811
                                                          capsys):
    uri, _ = shared
    with s3_server.auth_enforced():
        s3_server.apply_env(monkeypatch)
        assert ingest(uri, tmp_path / "ok", splits=["val"], subsets=["environment"]).downloaded == 5  # the real keys work
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-abcdef")
        code, err = _cli(capsys, "ingest", uri, "--out", str(tmp_path / "o"), "--quiet")
        assert code == 1 and "access denied" in err and "SignatureDoesNotMatch" in err
        assert "wrong-secret-abcdef" not in err
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        with pytest.raises(S3Error, match="access denied.*InvalidAccessKeyId"):
            run_ingest(uri, tmp_path / "o", progress=False)


def test_dead_endpoint_fails_with_clear_message(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    code, err = _cli(capsys, "ingest", "s3://wts/raw", "--out", str(tmp_path), "--endpoint-url", dead, "--quiet")
    assert code == 1 and f"cannot reach the S3 endpoint {dead}" in err


def test_helpers():
    assert s3_env_secret_names(required_only=True) == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    assert "AWS_ENDPOINT_URL_S3" in s3_env_secret_names()
    assert etag_of(Path(__file__), None)[0] == hashlib.md5(Path(__file__).read_bytes()).hexdigest()


def test_failed_verification_is_retried_and_counted(shared, tmp_path, monkeypatch):
    uri, src = shared
    real = ingest_module.etag_of
    calls: list[Path] = []

    def flaky(path: Path, part_size, **kw):
        etag, sha = real(path, part_size, **kw)
        calls.append(path)
        return ("0" * 32 if len(calls) == 1 else etag), sha  # the first downloaded file reads wrong once
    monkeypatch.setattr(ingest_module, "etag_of", flaky)
    report = ingest(uri, tmp_path / "out", splits=["val"], subsets=["environment"], workers=1)
    assert (report.downloaded, report.retried, report.failed) == (5, 1, 0)
    assert calls[0].name.endswith(TMP_SUFFIX)  # verified before the rename


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    text = redact("failed with s3cr3t-value at https://x/?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x")
    assert "s3cr3t-value" not in text and "abc123" not in text and "AKIA/x" not in text


def test_sigkilled_cli_run_is_completed_by_a_rerun(s3_server, tmp_path):  # noqa: F811
    """A real `trafficvlm ingest` process killed with SIGKILL half-way; the rerun fetches only the rest."""
    import signal
    import subprocess
    import sys
    import time

    src = make_tree(tmp_path / "src")
    for i in range(400):  # enough objects that one worker is still busy when the kill lands
        (src / f"videos/train/S1/overhead_view/S1_Camera1_{i + 1}.mp4").write_bytes(_blob(f"x{i}", 4000))
    uri = f"s3://wts-{uuid.uuid4().hex[:10]}/wts"
    run_upload(src, uri, create_bucket=True, workers=8, progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trafficvlm", "ingest", uri, "--out", str(out), "--workers", "1", "--quiet",
           "--subsets", "environment,overhead,vehicle", "--allow-missing-videos"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    videos = out / "videos/train/S1/overhead_view"
    while time.monotonic() < deadline and proc.poll() is None:
        if videos.is_dir() and len(list(videos.glob("*.mp4"))) >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ingest finished before it could be killed; raise the object count"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {k for k in tree_bytes(out) if TMP_SUFFIX not in k}
    assert 40 <= len(done_before) < 414

    resumed = ingest(uri, out, allow_missing_videos=True)
    assert resumed.downloaded <= 414 - len(done_before) + 1  # the object in flight at the kill may repeat
    assert tree_bytes(out) == tree_bytes(src)
