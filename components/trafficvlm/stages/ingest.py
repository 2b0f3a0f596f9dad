"""Ingest stage: copy what the requested WTS splits/subsets need from S3 into a local WTS-layout directory,
verified, incremental and resumable; and `upload`, its mirror image, for pushing a WTS tree to a bucket.

    trafficvlm ingest s3://wts/raw --out data/wts --splits val --subsets environment
    trafficvlm ingest s3://wts/raw --out data/wts --endpoint-url http://minio:9000 --workers 16 \\
        --include 'annotations/caption/**' --manifest sha256.json
    trafficvlm upload data/wts s3://wts/raw --endpoint-url http://127.0.0.1:9000 --create-bucket

Python (the KFP component calls these; credentials come from the environment, see trafficvlm.s3):

    report = run_ingest("s3://wts/raw", "/data/wts", splits=("val",), subsets=("environment",))
    run_upload("/data/wts", "s3://wts/raw", create_bucket=True)

How a rerun stays cheap: `DIR/.trafficvlm-ingest.json` records key -> size, ETag, sha256 and the local
mtime of every verified file. A file whose size and mtime still match its record, and whose remote ETag is
unchanged, is skipped without reading it; otherwise it is re-hashed (or refetched). Downloads land in
`<name>.trafficvlm-tmp` next to their destination and are renamed only after size, ETag (multipart ETags
recomputed with the uploader's part size) and, with `--manifest`, sha256 all match — so a killed run leaves
only temp files, which the next run deletes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trafficvlm.s3 import (MULTIPART_CHUNKSIZE, MULTIPART_THRESHOLD, S3Error, S3Uri, check_bucket, describe_error,
                           error_code, etag_of, etag_part_count, is_md5_etag, make_client, redact,
                           remote_part_size, transfer_errors)
# The WTS layout as object keys lives with the rest of the layout knowledge, in sources/wts.py.
from trafficvlm.sources.wts import OBJECT_PATTERNS as SUBSETS, VIEW_CSV, referenced_videos

STATE_FILE = ".trafficvlm-ingest.json"
MANIFEST_FILE = "ingest_manifest.json"
TMP_SUFFIX = ".trafficvlm-tmp"
SPLITS = ("train", "val")
# Transfers retried by us on top of botocore's per-request retries (a multipart download is many requests;
# botocore cannot restart the whole object after a mid-stream reset or a failed verification).
TRANSFER_ATTEMPTS = 3
_FATAL_CODES = {"403", "404", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchKey",
                "NoSuchBucket"}


class IngestError(S3Error):
    """The stage failed; `report` (when set) says what was done before it did."""

    def __init__(self, message: str, report: IngestReport | UploadReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class RemoteObject:
    key: str       # relative to the prefix: the path under the destination directory
    size: int
    etag: str      # without quotes


@dataclass
class IngestReport:
    source: str
    out: str
    listed: int = 0
    selected: int = 0
    downloaded: int = 0
    skipped: int = 0
    retried: int = 0
    failed: int = 0
    etag_unchecked: int = 0      # non-MD5 ETags, or multipart without a way to learn the part size
    stale_temp_removed: int = 0
    bytes_downloaded: int = 0
    bytes_selected: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 3)}

    def summary(self) -> str:
        lines = [f"ingest {self.source} -> {self.out}",
                 f"  listed {self.listed}, selected {self.selected} ({self.bytes_selected / 1e6:.1f} MB), "
                 f"downloaded {self.downloaded} ({self.bytes_downloaded / 1e6:.1f} MB, "
                 f"{self.mb_per_s:.1f} MB/s), skipped {self.skipped} (already present), "
                 f"retried {self.retried}, failed {self.failed}"]
        if self.etag_unchecked:
            lines.append(f"  {self.etag_unchecked} object(s) verified by size only (ETag not an MD5)")
        if self.stale_temp_removed:
            lines.append(f"  removed {self.stale_temp_removed} temp file(s) of an interrupted run")
        lines += [f"  FAILED {item}" for item in self.failures] + [f"  MISSING {k}" for k in self.missing]
        return "\n".join(lines)


@dataclass
class UploadReport:
    source: str
    dest: str
    files: int = 0
    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.bytes_uploaded / 1e6 / self.seconds if self.seconds > 0 else 0.0
        lines = [f"upload {self.source} -> {self.dest}",
                 f"  files {self.files}, uploaded {self.uploaded} ({self.bytes_uploaded / 1e6:.1f} MB, "
                 f"{rate:.1f} MB/s), skipped {self.skipped} (unchanged), failed {self.failed}"]
        return "\n".join(lines + [f"  FAILED {item}" for item in self.failures])


# --- selection -------------------------------------------------------------------------------------------

def glob_regex(pattern: str) -> re.Pattern[str]:
    """`**/` spans any number of directories (also none), `*` and `?` stay within one path segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def select(objects: dict[str, RemoteObject], uri: S3Uri, splits: Iterable[str], subsets: Iterable[str],
           include: Iterable[str] = ()) -> tuple[dict[str, RemoteObject], list[str]]:
    """The objects the request needs, and one error per required pattern that matched nothing."""
    chosen: dict[str, RemoteObject] = {}
    errors: list[str] = []

    def take(pattern: str) -> int:
        regex = glob_regex(pattern)
        hits = [key for key in objects if regex.fullmatch(key)]
        chosen.update((key, objects[key]) for key in hits)
        return len(hits)

    subsets = list(subsets)
    for split in splits:
        for subset in subsets:
            found = 0
            for pattern, required in SUBSETS[subset]:
                count = take(pattern.format(split=split))
                found += count
                if required and not count:
                    errors.append(f"split '{split}', subset '{subset}': no object matches "
                                  f"{uri}{pattern.format(split=split)}")
            if not found and not any(required for _, required in SUBSETS[subset]):
                errors.append(f"split '{split}', subset '{subset}': no objects under {uri} for it")
    if any(s != "bdd" for s in subsets) and not take(VIEW_CSV):
        errors.append(f"missing {uri}{VIEW_CSV}")
    for pattern in include:
        if not take(pattern):
            errors.append(f"--include {pattern!r}: no object matches under {uri}")
    return chosen, errors


# --- listing, manifest, state ------------------------------------------------------------------------------

def list_objects(client, uri: S3Uri) -> dict[str, RemoteObject]:
    objects: dict[str, RemoteObject] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(uri.prefix):]
                if relative and not relative.endswith("/"):  # "folder" marker objects carry no data
                    objects[relative] = RemoteObject(relative, int(item["Size"]), item["ETag"].strip('"'))
    except Exception as exc:  # noqa: BLE001 - translated into one line
        raise describe_error(exc, bucket=uri.bucket, endpoint=client.meta.endpoint_url) from None
    return objects


def load_checksum_manifest(path: Path, uri: S3Uri) -> dict[str, str]:
    """sha256 per key from a JSON mapping {key: sha256}, our own ingest_manifest.json, or `sha256sum`
    output. Keys may be full keys or relative to the prefix."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise IngestError(f"cannot read checksum manifest {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
        pairs = (data.items() if isinstance(data, dict) and "objects" not in data
                 else ((o["key"], o["sha256"]) for o in data["objects"]))
    except json.JSONDecodeError:
        pairs = (line.split(None, 1)[::-1] for line in text.splitlines() if line.strip())
    except (KeyError, TypeError) as exc:
        raise IngestError(f"checksum manifest {path}: unexpected structure ({exc})") from None
    table = {}
    for key, digest in pairs:
        key = key.strip().lstrip("*")
        table[key[len(uri.prefix):] if uri.prefix and key.startswith(uri.prefix) else key] = digest.lower()
    return table


def _load_state(out: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged state only costs re-hashing: every file is checked against S3 again


def _save_state(out: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = out / (STATE_FILE + TMP_SUFFIX)
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, out / STATE_FILE)


def remove_stale_temps(out: Path) -> int:
    """Delete the temp files of an interrupted run (ours and boto3's random-suffixed ones inside them)."""
    count = 0
    for path in out.rglob(f"*{TMP_SUFFIX}*"):
        if path.is_file():
            path.unlink()
            count += 1
    return count


# --- one object ------------------------------------------------------------------------------------------

class _Mismatch(Exception):
    """The bytes on disk are not the object's (size, ETag or sha256 differs). `permanent`: downloading
    again cannot help (the bucket's object disagrees with the checksum manifest)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class _Job:
    client: Any
    uri: S3Uri
    out: Path
    transfer: Any                     # boto3.s3.transfer.TransferConfig
    checksums: dict[str, str] | None  # --manifest
    rehash: bool = False
    attempts: int = TRANSFER_ATTEMPTS


@dataclass
class _Fetched:
    obj: RemoteObject
    sha256: str
    downloaded: bool
    retries: int = 0
    etag_checked: bool = True


def _content_check(job: _Job, obj: RemoteObject, path: Path) -> tuple[str, bool]:
    """sha256 of `path` after checking it against the object's size, ETag and manifest entry.
    Returns (sha256, etag_checked); raises _Mismatch naming what differs."""
    if path.stat().st_size != obj.size:
        raise _Mismatch(f"size {path.stat().st_size} != {obj.size}")
    parts = etag_part_count(obj.etag)
    part_size = remote_part_size(job.client, job.uri.bucket, job.uri.key(obj.key)) if parts else None
    checkable = is_md5_etag(obj.etag) and (not parts or part_size is not None)
    etag, sha = etag_of(path, part_size if parts else None)
    if checkable and etag != obj.etag:
        raise _Mismatch(f"ETag {etag} != {obj.etag}")
    expected = job.checksums.get(obj.key) if job.checksums is not None else None
    if job.checksums is not None and expected is None:
        raise _Mismatch("not listed in the checksum manifest", permanent=True)
    if expected and sha != expected:
        raise _Mismatch(f"sha256 {sha} != manifest {expected}", permanent=True)
    return sha, checkable


def _local_copy(job: _Job, obj: RemoteObject, entry: dict[str, Any] | None) -> _Fetched | None:
    """A _Fetched for a local file that already holds this object, else None."""
    path = job.out / obj.key
    if not path.is_file() or path.stat().st_size != obj.size:
        return None
    stat = path.stat()
    if entry and entry.get("etag") == obj.etag and entry.get("size") == obj.size:
        expected = entry["sha256"] if job.checksums is None else job.checksums.get(obj.key)
        if not job.rehash and entry.get("mtime_ns") == stat.st_mtime_ns:
            return _Fetched(obj, entry["sha256"], False) if expected == entry["sha256"] else None
        _, sha = etag_of(path, None)
        return _Fetched(obj, sha, False) if sha == entry["sha256"] == expected else None
    try:  # no record (state lost, or files copied in): compare the content with S3's ETag
        sha, checked = _content_check(job, obj, path)
    except _Mismatch:
        return None
    return _Fetched(obj, sha, False, etag_checked=checked) if checked or job.checksums else None


def _download(job: _Job, obj: RemoteObject) -> _Fetched:
    """Download to a temp name, verify, rename; retry transient failures with jittered backoff."""
    final = job.out / obj.key
    tmp = final.with_name(final.name + TMP_SUFFIX)
    final.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, job.attempts + 1):
        try:
            # (s3transfer pins the parts of one multipart download to one ETag with If-Match itself.)
            job.client.download_file(job.uri.bucket, job.uri.key(obj.key), str(tmp), Config=job.transfer)
            sha, checked = _content_check(job, obj, tmp)
            os.replace(tmp, final)
            return _Fetched(obj, sha, True, attempt - 1, checked)
        except _Mismatch as exc:
            if attempt == job.attempts or exc.permanent:
                raise IngestError(f"{job.uri.key(obj.key)}: {exc}") from None
            obj = _refresh(job, obj)  # the object may have been overwritten since it was listed
        except transfer_errors() as exc:
            if error_code(exc) in ("412", "PreconditionFailed"):
                obj = _refresh(job, obj)
            elif error_code(exc) in _FATAL_CODES or attempt == job.attempts:
                raise describe_error(exc, bucket=job.uri.bucket, key=job.uri.key(obj.key),
                                     endpoint=job.client.meta.endpoint_url) from None
        finally:
            tmp.unlink(missing_ok=True)
        time.sleep(min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _refresh(job: _Job, obj: RemoteObject) -> RemoteObject:
    try:
        head = job.client.head_object(Bucket=job.uri.bucket, Key=job.uri.key(obj.key))
    except transfer_errors() as exc:  # e.g. deleted since it was listed
        raise describe_error(exc, bucket=job.uri.bucket, key=job.uri.key(obj.key),
                             endpoint=job.client.meta.endpoint_url) from None
    return RemoteObject(obj.key, int(head["ContentLength"]), head["ETag"].strip('"'))


def _ingest_one(job: _Job, obj: RemoteObject, entry: dict[str, Any] | None) -> _Fetched:
    return _local_copy(job, obj, entry) or _download(job, obj)


# --- the stage -------------------------------------------------------------------------------------------

def _transfer_config(threshold: int, chunksize: int):
    from boto3.s3.transfer import TransferConfig
    # A few threads per object: the pool of `workers` objects is the main source of parallelism.
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunksize, max_concurrency=4)


def _parse_choice(values: Iterable[str], allowed: Iterable[str], what: str) -> list[str]:
    values, allowed = [v for v in values if v], list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise IngestError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return values


def run_ingest(source: str, out: str | Path, *, splits: Iterable[str] = SPLITS,
               subsets: Iterable[str] = ("environment",), include: Iterable[str] = (),
               endpoint_url: str | None = None, workers: int = 8, manifest: str | Path | None = None,
               rehash: bool = False, allow_missing_videos: bool = False,
               multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunksize: int = MULTIPART_CHUNKSIZE,
               progress: bool = True, on_object: Callable[[str, bool], None] | None = None) -> IngestReport:
    """Bring `source` (s3://BUCKET/PREFIX) into `out`; returns the report, raises IngestError (with
    `.report`) when anything required is missing or failed. `on_object(key, downloaded)` is called in the
    calling thread after each object is in place (progress logging in a pipeline step)."""
    splits = _parse_choice(splits, SPLITS, "split")
    subsets = _parse_choice(subsets, SUBSETS, "subset")
    uri, out = S3Uri.parse(source), Path(out)
    check_bucket(uri.bucket, endpoint_url)
    client = make_client(endpoint_url, workers=workers)
    objects = list_objects(client, uri)
    if not objects:
        raise IngestError(f"prefix {uri} is empty or does not exist")
    chosen, errors = select(objects, uri, splits, subsets, include)
    if errors:
        raise IngestError("; ".join(errors))
    checksums = load_checksum_manifest(Path(manifest), uri) if manifest else None
    out.mkdir(parents=True, exist_ok=True)
    report = IngestReport(str(uri), str(out), listed=len(objects), selected=len(chosen),
                          bytes_selected=sum(o.size for o in chosen.values()),
                          stale_temp_removed=remove_stale_temps(out))
    job = _Job(client, uri, out, _transfer_config(multipart_threshold, multipart_chunksize), checksums, rehash)
    started = time.monotonic()
    state = _load_state(out)
    try:
        _run_pool(job, chosen, state, report, workers, progress, on_object)
    finally:
        report.seconds = time.monotonic() - started
        _save_state(out, state)
    report.missing = _missing_videos(out, chosen, objects)
    _write_manifest(out, uri, chosen, state, report)
    if report.failed or (report.missing and not allow_missing_videos):
        problems = report.failures + [f"{uri}{k} is referenced by a VQA file but not in the bucket"
                                      for k in report.missing]
        raise IngestError(f"{len(problems)} problem(s): " + "; ".join(problems[:5])
                          + (" ..." if len(problems) > 5 else ""), report)
    return report


def _run_pool(job: _Job, chosen: dict[str, RemoteObject], state: dict[str, dict[str, Any]],
              report: IngestReport, workers: int, progress: bool,
              on_object: Callable[[str, bool], None] | None) -> None:
    from tqdm import tqdm

    saved_at = time.monotonic()
    with tqdm(total=report.bytes_selected, unit="B", unit_scale=True, desc="ingest", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {pool.submit(_ingest_one, job, obj, state.get(key)): key for key, obj in sorted(chosen.items())}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    downloaded = _record(job, key, future, state, report)
                    bar.update(chosen[key].size)
                    if on_object and downloaded is not None:
                        on_object(key, downloaded)
                if time.monotonic() - saved_at > 2.0:  # a killed run keeps (almost) all its progress
                    _save_state(job.out, state)
                    saved_at = time.monotonic()
        finally:
            for future in pending:
                future.cancel()


def _record(job: _Job, key: str, future, state: dict[str, dict[str, Any]], report: IngestReport) -> bool | None:
    """Count one finished object into the report and the state; returns whether it was downloaded
    (None: it failed)."""
    try:
        fetched: _Fetched = future.result()
    except S3Error as exc:
        report.failed += 1
        report.failures.append(redact(str(exc)))
        state.pop(key, None)
        return None
    obj = fetched.obj
    report.retried += fetched.retries
    report.etag_unchecked += not fetched.etag_checked
    if fetched.downloaded:
        report.downloaded += 1
        report.bytes_downloaded += obj.size
    else:
        report.skipped += 1
    state[key] = {"size": obj.size, "etag": obj.etag, "sha256": fetched.sha256,
                  "mtime_ns": (job.out / key).stat().st_mtime_ns}
    return fetched.downloaded


def _missing_videos(out: Path, chosen: dict[str, RemoteObject], objects: dict[str, RemoteObject]) -> list[str]:
    missing: set[str] = set()
    for key in chosen:
        path = out / key
        if "/vqa/" in key and path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}: not valid JSON ({exc})") from None
            missing.update(video for video in referenced_videos(key, data) if video not in objects)
    return sorted(missing)


def _write_manifest(out: Path, uri: S3Uri, chosen: dict[str, RemoteObject], state: dict[str, dict[str, Any]],
                    report: IngestReport) -> None:
    objects = [{"key": key, "size": state[key]["size"], "etag": state[key]["etag"],
                "sha256": state[key]["sha256"]} for key in sorted(chosen) if key in state]
    body = {"source": str(uri), "objects": objects, "report": report.to_dict()}
    (out / MANIFEST_FILE).write_text(json.dumps(body, indent=1) + "\n")


# --- upload ----------------------------------------------------------------------------------------------

def _local_files(src: Path) -> list[str]:
    """Relative paths of the files to push; our own bookkeeping files stay local."""
    skip = {STATE_FILE, MANIFEST_FILE}
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                  if p.is_file() and p.name not in skip and TMP_SUFFIX not in p.name)


def _ensure_bucket(uri: S3Uri, endpoint_url: str | None, create: bool) -> None:
    try:
        check_bucket(uri.bucket, endpoint_url)
    except S3Error as exc:
        if not (create and exc.code in ("NoSuchBucket", "404")):
            raise IngestError(f"{exc}" + ("" if create else "; pass --create-bucket to create it")) from None
        client = make_client(endpoint_url, workers=1)
        region = client.meta.region_name
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        try:
            client.create_bucket(Bucket=uri.bucket, **extra)
        except Exception as err:  # noqa: BLE001
            raise describe_error(err, bucket=uri.bucket, endpoint=client.meta.endpoint_url) from None


def _unchanged(path: Path, remote: RemoteObject | None, chunksize: int) -> bool:
    if remote is None or path.stat().st_size != remote.size or not is_md5_etag(remote.etag):
        return False
    parts = etag_part_count(remote.etag)
    # A multipart ETag is reproducible only with the uploader's part size; ours is the likely one.
    return etag_of(path, chunksize if parts else None, sha256=False)[0] == remote.etag


def _upload_one(client, uri: S3Uri, src: Path, key: str, remote: RemoteObject | None, transfer,
                attempts: int = TRANSFER_ATTEMPTS) -> bool:
    """Upload unless unchanged; returns whether it uploaded."""
    path = src / key
    if _unchanged(path, remote, transfer.multipart_chunksize):
        return False
    for attempt in range(1, attempts + 1):
        try:
            client.upload_file(str(path), uri.bucket, uri.key(key), Config=transfer)
            return True
        except transfer_errors() as exc:
            if error_code(exc) in _FATAL_CODES or attempt == attempts:
                raise describe_error(exc, bucket=uri.bucket, key=uri.key(key),
                                     endpoint=client.meta.endpoint_url) from None
        time.sleep(min(8.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def run_upload(src: str | Path, dest: str, *, endpoint_url: str | None = None, workers: int = 8,
               create_bucket: bool = False, multipart_threshold: int = MULTIPART_THRESHOLD,
               multipart_chunksize: int = MULTIPART_CHUNKSIZE, progress: bool = True) -> UploadReport:
    """Push a local tree to s3://BUCKET/PREFIX, skipping objects whose size and ETag already match."""
    from tqdm import tqdm

    src, uri = Path(src), S3Uri.parse(dest)
    if not src.is_dir():
        raise IngestError(f"{src} is not a directory")
    _ensure_bucket(uri, endpoint_url, create_bucket)
    client = make_client(endpoint_url, workers=workers)
    remote = list_objects(client, uri)
    keys = _local_files(src)
    report = UploadReport(str(src), str(uri), files=len(keys))
    transfer = _transfer_config(multipart_threshold, multipart_chunksize)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(keys), unit="file", desc="upload", disable=not progress) as bar:
        futures = {pool.submit(_upload_one, client, uri, src, key, remote.get(key), transfer): key for key in keys}
        for future in futures:
            key = futures[future]
            try:
                uploaded = future.result()
            except S3Error as exc:
                report.failed += 1
                report.failures.append(redact(str(exc)))
            else:
                report.uploaded += uploaded
                report.skipped += not uploaded
                report.bytes_uploaded += (src / key).stat().st_size if uploaded else 0
            bar.update(1)
    report.seconds = time.monotonic() - started
    if report.failed:
        raise IngestError(f"{report.failed} upload(s) failed: " + "; ".join(report.failures[:5]), report)
    return report


# --- CLI -------------------------------------------------------------------------------------------------

INGEST_EPILOG = """\
examples:
  trafficvlm ingest s3://wts/raw --out data/wts                               # environment subset, train+val
  trafficvlm ingest s3://wts/raw --out data/wts --splits val --subsets environment,overhead
  trafficvlm ingest s3://wts/raw --out data/wts --endpoint-url http://minio.data:9000 --workers 16
  trafficvlm ingest s3://wts/raw --out data/wts --include 'annotations/caption/**' --manifest sha256.json

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or an
instance role); the endpoint from --endpoint-url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL.
Subsets: environment (overhead videos + environment VQA), overhead and vehicle (videos, phase VQA,
captions), bdd (external/BDD_PC_5K), bbox (annotated and generated boxes). A rerun fetches only missing or
changed objects. Writes DIR/ingest_manifest.json (key, size, etag, sha256 of every object) and the report.
"""

UPLOAD_EPILOG = """\
examples:
  trafficvlm upload data/wts s3://wts/raw --create-bucket
  AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 trafficvlm upload data/wts s3://wts/raw --workers 16

Objects whose size and ETag already match are skipped.
"""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mib(text: str) -> int:
    return int(float(text) * 1024 * 1024)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("ingest", help="copy the WTS splits/subsets you need from S3, verified and resumable",
                              description=__doc__.split("\n\n")[0], epilog=INGEST_EPILOG, formatter_class=fmt)
    p.add_argument("source", help="s3://BUCKET/PREFIX holding the WTS layout")
    p.add_argument("--out", required=True, type=Path, help="destination directory (the WTS root)")
    p.add_argument("--splits", type=_csv, default=list(SPLITS), help="comma-separated (default: train,val)")
    p.add_argument("--subsets", type=_csv, default=["environment"],
                   help=f"comma-separated from {','.join(SUBSETS)} (default: environment)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="also fetch keys (relative to PREFIX) matching GLOB; ** spans directories; repeatable")
    _common(p)
    p.add_argument("--manifest", type=Path, help="checksum manifest: sha256 per key (JSON {key: sha256}, "
                   "an ingest_manifest.json, or sha256sum output); every object must match")
    p.add_argument("--rehash", action="store_true", help="re-hash local files even when size and mtime match")
    p.add_argument("--allow-missing-videos", action="store_true",
                   help="report videos named by VQA files but absent from the bucket instead of failing")
    p.set_defaults(func=_ingest_main)

    u = subparsers.add_parser("upload", help="push a WTS-layout directory to S3 (skips unchanged objects)",
                              description="Upload a local tree to s3://BUCKET/PREFIX.", epilog=UPLOAD_EPILOG,
                              formatter_class=fmt)
    u.add_argument("src", type=Path, help="local directory (e.g. a `trafficvlm synth` output)")
    u.add_argument("dest", help="s3://BUCKET/PREFIX")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    _common(u)
    u.set_defaults(func=_upload_main)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO/Ceph); default from AWS_ENDPOINT_URL_S3")
    p.add_argument("--workers", type=int, default=8, help="objects transferred in parallel (default: 8)")
    p.add_argument("--part-size-mb", type=_mib, default=MULTIPART_CHUNKSIZE, dest="part_size",
                   help="multipart threshold and part size in MiB (default: 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _ingest_main(args: argparse.Namespace) -> int:
    try:
        report = run_ingest(args.source, args.out, splits=args.splits, subsets=args.subsets,
                            include=args.include, endpoint_url=args.endpoint_url, workers=args.workers,
                            manifest=args.manifest, rehash=args.rehash,
                            allow_missing_videos=args.allow_missing_videos, multipart_threshold=args.part_size,
                            multipart_chunksize=args.part_size, progress=not args.quiet)
    except S3Error as exc:
        return _fail("ingest", exc)
    print(report.summary())
    print(f"  manifest: {Path(args.out) / MANIFEST_FILE}")
    return 0


def _upload_main(args: argparse.Namespace) -> int:
    try:
        report = run_upload(args.src, args.dest, endpoint_url=args.endpoint_url, workers=args.workers,
                            create_bucket=args.create_bucket, multipart_threshold=args.part_size,
                            multipart_chunksize=args.part_size, progress=not args.quiet)
    except S3Error as exc:
        return _fail("upload", exc)
    print(report.summary())
    return 0


def _fail(command: str, exc: S3Error) -> int:
    report = getattr(exc, "report", None)
    if report is not None:
        print(report.summary())
    print(f"trafficvlm {command}: error: {redact(str(exc))}", file=sys.stderr)
    return 1
