"""Shared by test_serve.py and test_smoke.py: a tiny served bundle, a tiny clip, a server on a free port.

    with running(create_app(engine, ServeSettings(...))) as url:   # http://127.0.0.1:<port>
        httpx.get(url + "/health")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import av
import numpy as np
import uvicorn

from trafficvlm.config import VideoSpec

# 64x48 frames resize to 56x56: a (2, 4, 4) grid, 8 vision tokens per clip.
TINY_SPEC = VideoSpec(fps=1.0, min_pixels=28 * 28, max_pixels=56 * 56)
QUESTION = "What is weather in the scenario?"
OPTIONS = {"a": "Clear", "b": "Rainy", "c": "Cloudy"}


def make_video(path: Path, frames: int = 20, fps: int = 10, width: int = 64, height: int = 48) -> Path:
    """A small H.264 MP4 with a moving gradient (so frames differ)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = np.arange(width, dtype=np.uint8)[None, :] * 4
            img[..., 1] = (i * 12) % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


@contextlib.contextmanager
def running(app, *, timeout_s: float = 30.0):
    """Serve `app` with uvicorn in a daemon thread on 127.0.0.1, on a port bound before the thread starts
    (so no other process can take it in between); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
