"""The post-rollout smoke test: one WTS clip and one environment question through the served model's
OpenAI-compatible `/v1/chat/completions` (a `video_url` part, as NIM/vLLM take it); it passes when a valid
option letter comes back within the timeout.

    >>> from trafficvlm.smoke import smoke_test
    >>> r = smoke_test("http://127.0.0.1:8000", "data/wts/videos/val/20230707_12_SN17_T1.mp4",
    ...                "What is the road inclination in the scene?",
    ...                {"a": "Steep downhill", "b": "Level", "c": "Gentle downhill", "d": "Steep uphill"},
    ...                api_key=os.environ.get("TRAFFICVLM_API_KEY"))
    >>> r.ok, r.letter, r.error
    (True, 'b', None)

It never raises for a failing endpoint: the result says what went wrong (unreachable, HTTP error, timeout,
an answer that names no option), so the rollout stage can log it to MLflow and fail the run with that reason.
`trafficvlm ask` is the same request from the command line.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trafficvlm.config import VideoSpec


@dataclass
class SmokeResult:
    ok: bool
    endpoint: str
    letter: str | None = None        # the option chosen (lowercase)
    latency_s: float | None = None   # wall time of the whole exchange
    error: str | None = None         # why it failed; None when ok
    content: str | None = None       # the raw reply text
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            return f"smoke test passed: {self.endpoint} answered {self.letter.upper()} in {self.latency_s:.2f} s"
        return f"smoke test FAILED: {self.error}"


def smoke_test(endpoint: str, video_path: str | Path, question: str, options: dict[str, str], *,
               api_key: str | None = None, timeout_s: float = 60, file_url: bool = False,
               model: str | None = None, spec: VideoSpec | None = None) -> SmokeResult:
    """Ask `question` (with `options`, lowercase letters -> texts) about `video_path` at `endpoint`."""
    from trafficvlm.serve.client import EndpointError, ask

    if not options:
        raise ValueError("smoke_test needs a multiple-choice question: options must not be empty")
    start = time.perf_counter()
    try:
        result = ask(endpoint, video_path, question, options, api_key=api_key, file_url=file_url, model=model,
                     spec=spec, timeout_s=timeout_s)
    except (EndpointError, FileNotFoundError) as exc:
        return SmokeResult(False, endpoint, latency_s=time.perf_counter() - start, error=str(exc))
    latency = time.perf_counter() - start
    if latency > timeout_s:  # httpx's timeout bounds each read, not the whole exchange
        return SmokeResult(False, endpoint, result.letter, latency, f"{endpoint}: answered after {latency:.1f} s, "
                           f"over the {timeout_s:g} s limit", result.content, result.model)
    if result.letter is None:
        valid = ", ".join(k.upper() for k in options)
        return SmokeResult(False, endpoint, None, latency, f"{endpoint}: the answer {result.content[:200]!r} "
                           f"names none of the options ({valid})", result.content, result.model)
    return SmokeResult(True, endpoint, result.letter, latency, None, result.content, result.model)
