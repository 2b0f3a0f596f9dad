"""A real MLflow tracking server on 127.0.0.1 for tests: `mlflow server` in a subprocess.

Use it from any test file:

    from mlflow_server import mlflow_server  # noqa: F401  (the pytest fixture)

    def test_something(mlflow_server, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)

The server is what the cluster runs, shrunk: a SQLite backend and a local artifact root in a temporary
directory, artifacts proxied by the server (`--serve-artifacts`, so clients log to `mlflow-artifacts:/`
without touching the server's disk), one worker. `--allowed-hosts` lists the names the tests use: MLflow 3
answers 403 to a Host header it does not know (the in-cluster service name needs the same flag).

Starting it imports all of MLflow and runs the database migrations: 10-40 s on a busy 2-core machine. So there
is one server per test session (per xdist worker); tests isolate themselves by their own model and experiment
names.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3server import free_port

START_TIMEOUT_S = 90.0


@dataclass
class MlflowServer:
    uri: str                 # http://127.0.0.1:PORT
    process: subprocess.Popen
    root: Path               # backend database, artifact root and the server's log
    log: Path


def _mlflow_cli() -> str:
    # The venv's own `mlflow` script, next to the interpreter running the tests.
    script = Path(sys.executable).with_name("mlflow")
    return str(script) if script.exists() else shutil.which("mlflow") or "mlflow"


def start_server(timeout: float = START_TIMEOUT_S) -> MlflowServer:
    root = Path(tempfile.mkdtemp(prefix="trafficvlm-mlflow-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    cmd = [_mlflow_cli(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
           "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost"]
    # No background job runner (GenAI evaluation jobs): nothing here uses it, and it is one more process.
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as sink:  # the child keeps its own descriptor
        # A new session so that stopping it also stops the uvicorn/gunicorn worker it forks.
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    server = MlflowServer(uri=uri, process=process, root=root, log=log)
    _wait_healthy(server, timeout)
    return server


def _wait_healthy(server: MlflowServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {server.process.returncode}; "
                               f"its log:\n{_tail(server.log)}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer {server.uri}/health within {timeout:.0f} s; "
                       f"its log:\n{_tail(server.log)}")


def stop_server(server: MlflowServer) -> None:
    """SIGTERM to the server's process group (the CLI and its worker), SIGKILL if it lingers."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=5)
    shutil.rmtree(server.root, ignore_errors=True)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)
