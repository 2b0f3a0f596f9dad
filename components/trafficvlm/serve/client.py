"""A small client for any OpenAI-compatible video endpoint (`trafficvlm serve`, vLLM, NIM): one video, one
question, the answer. Used by `trafficvlm ask` and the post-rollout smoke test.

    >>> from trafficvlm.serve.client import ask
    >>> r = ask("http://127.0.0.1:8000", "videos/val/x.mp4", "What is weather in the scenario?",
    ...         {"a": "Clear", "b": "Rainy", "c": "Cloudy"}, api_key=os.environ.get("TRAFFICVLM_API_KEY"))
    >>> r.letter, r.content, round(r.latency_s, 2)
    ('a', 'A', 0.31)

With options the text sent is the recipe's training user turn (`prompts.user_text`), so a vLLM/NIM server,
which uses the text as is, prompts the model as it was trained. The video travels as a
`data:video/mp4;base64,...` URL, or as a `file://` URL (`file_url=True`) when the server can read the path
(`trafficvlm serve --allowed-media-dir`, vLLM `--allowed-local-media-path`).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trafficvlm import prompts
from trafficvlm.config import VideoSpec
from trafficvlm.records import VideoQARecord


class EndpointError(RuntimeError):
    """The endpoint could not be reached or answered with an error; the message says which and why."""


@dataclass
class AskResult:
    content: str                 # the model's reply text
    letter: str | None           # the chosen option (lowercase), parsed strictly; None without options
    latency_s: float
    model: str
    response: dict[str, Any]


def v1_url(endpoint: str, path: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` + `/chat/completions` -> the full URL."""
    base = endpoint.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + path


def video_url_for(video: str | Path, *, file_url: bool = False) -> str:
    path = Path(video)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video not found")
    if file_url:
        return path.resolve().as_uri()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def chat_body(model: str, video_url: str, question: str, options: dict[str, str] | None, *,
              max_tokens: int = 16, system_prompt: str | None = None,
              spec: VideoSpec | None = None) -> dict[str, Any]:
    """The chat request: (system,) user = video part then text. `spec` adds vLLM's per-request sampling
    fields so a vLLM/NIM server samples frames as the model was trained (ours checks they agree)."""
    if options:
        text = prompts.user_text(VideoQARecord(id="ask", video="", question=question, options=options))
    else:
        text = question
    messages: list[dict[str, Any]] = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                                 {"type": "text", "text": text}]})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    if spec is not None:
        body.update(spec_fields(spec))
    return body


def spec_fields(spec: VideoSpec) -> dict[str, Any]:
    """vLLM's per-request video sampling fields for a bundle's spec (vLLM otherwise loads 32 frames):
    frame loading in `media_io_kwargs`, the processor's fps and pixel caps in `mm_processor_kwargs`.
    The same fields `trafficvlm.evaluate.OpenAIEngine` sends."""
    io = {"num_frames": spec.nframes} if spec.nframes else {"num_frames": -1, "fps": spec.fps}
    processor = {"fps": spec.fps, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    return {"mm_processor_kwargs": {k: v for k, v in processor.items() if v is not None},
            "media_io_kwargs": {"video": io}}


def ask(endpoint: str, video: str | Path, question: str, options: dict[str, str] | None = None, *,
        api_key: str | None = None, file_url: bool = False, model: str | None = None, max_tokens: int = 16,
        system_prompt: str | None = None, spec: VideoSpec | None = None, timeout_s: float = 60.0) -> AskResult:
    """Ask one question about one video. Raises EndpointError (unreachable, HTTP error, malformed reply)."""
    import httpx

    options = {k.lower(): v for k, v in options.items()} if options else None  # "A" or "a": both fine
    video_url = video_url_for(video, file_url=file_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            model = model or served_model(client, endpoint)
            body = chat_body(model, video_url, question, options, max_tokens=max_tokens,
                             system_prompt=system_prompt, spec=spec)
            resp = client.post(v1_url(endpoint, "/chat/completions"), json=body)
    except httpx.TimeoutException:
        raise EndpointError(f"{endpoint}: no answer within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise EndpointError(f"{endpoint}: cannot reach the endpoint ({type(exc).__name__}: {exc})") from None
    latency = time.perf_counter() - start
    data = _json_reply(resp, endpoint)
    try:
        content = data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{endpoint}: reply has no choices[0].message.content: {resp.text[:300]}") from None
    letter = prompts.parse_answer(content, options) if options else None
    return AskResult(content, letter, latency, model, data)


def served_model(client, endpoint: str) -> str:
    """The first model `GET /v1/models` lists (a served endpoint has one)."""
    data = _json_reply(client.get(v1_url(endpoint, "/models")), endpoint)
    try:
        return data["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{endpoint}: /v1/models lists no model") from None


def _json_reply(resp, endpoint: str) -> dict[str, Any]:
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except Exception:  # not our error format: show the start of whatever came back
            message = resp.text[:300]
        raise EndpointError(f"{endpoint}: HTTP {resp.status_code} from {resp.request.url.path}: {message}")
    try:
        data = resp.json()
    except ValueError:
        raise EndpointError(f"{endpoint}: reply is not JSON: {resp.text[:300]}") from None
    if not isinstance(data, dict):
        raise EndpointError(f"{endpoint}: reply is not a JSON object: {resp.text[:300]}")
    return data
