"""S3 plumbing shared by ingest, upload, checkpoint upload and rollout: client construction, `s3://` URIs,
ETag arithmetic, and one-line error messages with credentials redacted.

Credentials are never parameters: boto3's standard chain reads them (in a pipeline step, from a Kubernetes
Secret mapped to the env vars in `S3_SECRET_KEYS`). The endpoint (MinIO, Ceph, AWS) comes from an explicit
`endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`.

    from trafficvlm.s3 import S3Uri, make_client, check_bucket
    uri = S3Uri.parse("s3://wts/raw/")
    client = make_client(endpoint_url=None, workers=8)
    check_bucket(client, uri.bucket)          # raises S3Error("bucket 'wts' does not exist at ...")
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

# The keys of the Kubernetes Secret a pipeline step maps into its environment (name -> required?).
S3_SECRET_KEYS: dict[str, bool] = {
    "AWS_ACCESS_KEY_ID": True,
    "AWS_SECRET_ACCESS_KEY": True,
    "AWS_ENDPOINT_URL_S3": False,   # MinIO / Ceph; absent means AWS
    "AWS_DEFAULT_REGION": False,    # defaults to us-east-1
}
DEFAULT_REGION = "us-east-1"
MiB = 1024 * 1024
# boto3's defaults (8 MiB); AWS allows parts of 5 MiB .. 5 GiB and at most 10,000 parts.
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNKSIZE = 8 * MiB
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def s3_env_secret_names(required_only: bool = False) -> list[str]:
    """The env var names (= Secret keys) an S3-using component reads; for kfp-kubernetes'
    `use_secret_as_env(task, secret_name, {key: key for key in s3_env_secret_names()})`."""
    return [name for name, required in S3_SECRET_KEYS.items() if required or not required_only]


class S3Error(RuntimeError):
    """A one-line, credential-free explanation of what went wrong (the CLI prints it without a traceback).
    `code` is the S3 error code or HTTP status when there was one (e.g. "NoSuchBucket", "403")."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri.strip())
        if not match or not match.group(1):
            raise S3Error(f"not an S3 URI: {uri!r} (expected s3://BUCKET/PREFIX)")
        prefix = match.group(2).strip("/")
        return cls(match.group(1), prefix + "/" if prefix else "")

    def key(self, relative: str) -> str:
        return self.prefix + relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def make_client(endpoint_url: str | None = None, *, workers: int = 8, max_attempts: int = 5,
                retry_mode: str = "standard", connect_timeout: float = 5.0, read_timeout: float = 60.0):
    """An S3 client on the standard credential chain with bounded retries and timeouts.

    The short connect timeout is what makes a dead endpoint fail in seconds; `standard` retry mode backs
    off exponentially with jitter on throttling and 5xx, `adaptive` also rate-limits the client."""
    import boto3
    from botocore.config import Config

    endpoint = resolve_endpoint(endpoint_url)
    config = Config(
        retries={"max_attempts": max_attempts, "mode": retry_mode},
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        max_pool_connections=max(10, workers * 4),  # `workers` objects x 4 part requests each (TransferConfig)
        # MinIO/Ceph want path-style addressing (no wildcard DNS for bucket subdomains).
        s3={"addressing_style": "path"} if endpoint else None,
        # botocore >= 1.36 adds CRC checksums to every upload by default; Ceph RGW and older MinIO reject
        # them, so only send checksums where the API requires them.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def check_bucket(bucket: str, endpoint_url: str | None = None) -> None:
    """Fail fast with a clear message when the bucket is missing, access is denied or nothing answers.

    The probe makes a single attempt, so a dead endpoint costs one connect timeout, not a retry ladder.
    It lists rather than HEADs: a HEAD error has no body, so it could not tell InvalidAccessKeyId from
    SignatureDoesNotMatch from AccessDenied (and listing is the permission ingest and upload need anyway)."""
    probe = make_client(endpoint_url, workers=1, max_attempts=1)
    try:
        probe.list_objects_v2(Bucket=bucket, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001 - translated into one line
        raise describe_error(exc, bucket=bucket, endpoint=probe.meta.endpoint_url) from None


def transfer_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a transfer may raise for reasons outside our code (worth a retry or a clear message);
    anything else is a bug and keeps its traceback."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    return BotoCoreError, ClientError, Boto3Error, OSError


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def describe_error(exc: BaseException, *, bucket: str, key: str | None = None,
                   endpoint: str | None = None) -> S3Error:
    """Map a boto3/botocore exception to an S3Error whose message says what to check."""
    from botocore import exceptions as bx

    where = f"s3://{bucket}/{key}" if key else f"bucket '{bucket}'"
    at = f" at {endpoint}" if endpoint else ""
    code = error_code(exc)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        msg = f"cannot reach the S3 endpoint {endpoint or '(AWS default)'}: {exc}"
    elif isinstance(exc, bx.NoCredentialsError):
        msg = "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif code in ("NoSuchBucket",) or (code == "404" and not key):
        msg = f"bucket '{bucket}' does not exist{at}"
    elif code in ("NoSuchKey", "404"):
        msg = f"{where} does not exist{at}"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
        msg = (f"access denied to {where}{at} ({code or '403'}): check AWS_ACCESS_KEY_ID / "
               f"AWS_SECRET_ACCESS_KEY and the bucket policy")
    else:
        msg = f"S3 request for {where}{at} failed: {exc}"
    return S3Error(redact(msg), code)


def redact(text: str) -> str:
    """Remove credential values (from the environment) and presigned-URL signatures from a message."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s]+", r"\1***", text)


def etag_of(path: Path, part_size: int | None, *, sha256: bool = True) -> tuple[str, str | None]:
    """(S3 ETag, sha256 hex) of a local file in one pass.

    With `part_size=None` the ETag is the plain MD5 (single PUT). Otherwise it is the multipart ETag: the MD5
    of the concatenated part MD5s, then `-<number of parts>` — which only matches the remote one when
    computed with the uploader's part size."""
    sha = hashlib.sha256() if sha256 else None
    whole, parts = hashlib.md5(usedforsecurity=False), []
    chunk = part_size or 8 * MiB
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            if sha:
                sha.update(block)
            if part_size:
                parts.append(hashlib.md5(block, usedforsecurity=False).digest())
            else:
                whole.update(block)
    if part_size:
        etag = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"
    else:
        etag = whole.hexdigest()
    return etag, sha.hexdigest() if sha else None


def etag_part_count(etag: str) -> int | None:
    """Parts of a multipart ETag ("<md5>-<n>"), None for a single-PUT ETag."""
    _, _, count = etag.strip('"').partition("-")
    return int(count) if count.isdigit() else None


def is_md5_etag(etag: str) -> bool:
    """False for ETags that are not MD5-based (SSE-KMS, some gateways): those cannot verify content."""
    return re.fullmatch(r"[0-9a-f]{32}(-\d+)?", etag.strip('"')) is not None


def remote_part_size(client, bucket: str, key: str) -> int | None:
    """The uploader's part size of a multipart object (the length of part 1), or None if the server does
    not answer part-number HEADs. Needed to recompute a multipart ETag locally."""
    try:
        head = client.head_object(Bucket=bucket, Key=key, PartNumber=1)
    except Exception:  # noqa: BLE001 - an unsupported feature, not an error: the caller falls back
        return None
    return int(head["ContentLength"]) if head.get("PartsCount") else None
