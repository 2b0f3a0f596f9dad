"""A real S3-compatible HTTP server on 127.0.0.1 for tests: moto in server mode, in a subprocess.

Use it from any test file:

    from s3server import s3_server  # noqa: F401  (the pytest fixture)

    def test_something(s3_server, monkeypatch):
        s3_server.apply_env(monkeypatch)          # AWS_* env vars pointing at the server
        client = s3_server.client()
        client.create_bucket(Bucket="wts")

A subprocess (not moto's in-process decorators) keeps moto's global state away from the test process, speaks
real HTTP like MinIO/Ceph would, and can be stopped to test a dead endpoint. One server per test session
(per xdist worker); tests isolate themselves by using their own bucket names.

Authentication is off by default (any key pair is accepted). `with s3_server.auth_enforced():` turns moto's
IAM checks on, so requests signed with unknown keys get 403 InvalidAccessKeyId and wrong secrets get
SignatureDoesNotMatch; the valid keys inside are `s3_server.access_key` / `s3_server.secret_key` (an IAM user
with an allow-all policy, created on first use).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

REGION = "us-east-1"
ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def free_port() -> int:
    """A port nothing listens on right now (also what a "dead endpoint" test needs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    access_key: str = "testing"
    secret_key: str = "testing"
    _iam_ready: bool = field(default=False, repr=False)

    def env(self) -> dict[str, str]:
        """The variables a Kubernetes Secret would provide to a pipeline step."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": REGION}

    def apply_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env().items():
            monkeypatch.setenv(name, value)

    def client(self, service: str = "s3", **keys: str):
        import boto3
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=keys.get("access_key", self.access_key),
                            aws_secret_access_key=keys.get("secret_key", self.secret_key))

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[S3Server]:
        """Moto checks signatures and IAM permissions inside this block (and not outside it)."""
        if not self._iam_ready:
            self._create_iam_user()
        self._set_auth_count("0")
        try:
            yield self
        finally:
            self._set_auth_count("inf")

    def _create_iam_user(self) -> None:
        iam = self.client("iam")
        iam.create_user(UserName="trafficvlm-test")
        iam.put_user_policy(UserName="trafficvlm-test", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="trafficvlm-test")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self._iam_ready = True

    def _set_auth_count(self, count: str) -> None:
        # moto's control API: after `count` unauthenticated actions, every request is authenticated.
        # text/plain, because werkzeug swallows a form-encoded body and moto then fails with a 500.
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count.encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def start_server(timeout: float = 30.0) -> S3Server:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode} on port {port}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1):
                return S3Server(endpoint=endpoint, process=process)
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_server()
    try:
        yield server
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
