"""The OpenAI-compatible HTTP API of `trafficvlm serve`: the stand-in for NIM / vLLM in the demo and tests.

    POST /v1/chat/completions   one user turn: a `video_url` part (data: or file:// URL) and the question text
    GET  /v1/models             the served model name
    GET  /health                liveness, open without a key (Kubernetes probes)

    app = create_app(ServeEngine.load("models/tiny"), ServeSettings(api_key="k", allowed_media_dirs=["data"]))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every failure is an OpenAI-style JSON error (`{"error": {"message", "type", "code"}}`) with a 4xx/5xx status;
nothing a client sends crashes the server. Checks run cheapest first: the API key (constant-time compare),
then the body size (Content-Length, then counted while streaming, so an oversized body is refused before it
is read), then the JSON, then the media. Model calls run in worker threads behind the engine's lock, so
`/health` answers while a request is being scored; at most `max_concurrency` requests decode at once.
Answers are greedy whatever `temperature` says (letter scoring is exact greedy decoding over the options).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from trafficvlm.serve.engine import ChatQuery, Reply, ServeEngine
from trafficvlm.serve.media import MediaError, MediaResolver

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    served_model_name: str | None = None        # None: the engine's name (the bundle directory's name)
    api_key: str | None = None
    allowed_media_dirs: list[str] = field(default_factory=list)
    max_request_bytes: int = 64 * 2**20
    max_concurrency: int = 4
    tmp_dir: str | None = None                  # where data: URL videos are written; None: a private temp dir


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: ServeEngine, settings: ServeSettings) -> FastAPI:
    name = settings.served_model_name or engine.name
    tmp_dir = settings.tmp_dir or tempfile.mkdtemp(prefix="trafficvlm-serve-")
    media = MediaResolver(settings.allowed_media_dirs, tmp_dir, settings.max_request_bytes)
    slots = asyncio.Semaphore(max(1, settings.max_concurrency))
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if settings.tmp_dir is None:  # our private upload directory; uploads are deleted per request already
            shutil.rmtree(tmp_dir, ignore_errors=True)

    app = FastAPI(title="trafficvlm serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown routes, wrong methods
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # a backstop: bugs outside the answer path
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (see the server log)", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, settings.api_key)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "trafficvlm", "root": engine.name}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, settings.api_key)
        body = _parse_json(await read_body(request, settings.max_request_bytes))
        query, video_url = parse_chat_request(body, name, engine)
        async with slots:
            try:
                reply = await run_in_threadpool(_complete, engine, media, query, video_url)
            except ApiError:
                raise
            except Exception:  # a bug, not bad input: log it here, tell the client only that it happened
                log.exception("request %s failed", query.request_id)
                raise ApiError(500, "internal error while answering the request (see the server log)",
                               "server_error") from None
        log.info("%s: %s answer in %.2f s (%d prompt tokens)", query.request_id, reply.mode, reply.seconds,
                 reply.prompt_tokens)
        return chat_response(query.request_id, name, reply)

    return app


# --- request checks -------------------------------------------------------------------------------------

def _check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest on bytes: constant time whatever the token holds (str needs ASCII)
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked uploads carry no Content-Length: count as they arrive
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_chat_request(body: dict[str, Any], served_name: str, engine: ServeEngine) -> tuple[ChatQuery, str]:
    """(query, video URL) of a chat request: an optional system message and one user message holding
    exactly one `video_url` part and text. Anything else is a 400 that says what was expected."""
    model = body.get("model")
    if model is not None and model != served_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_name!r}",
                       "not_found_error")
    if body.get("stream"):
        raise ApiError(400, "streaming responses are not supported; send stream=false")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported")
    _check_video_kwargs(body, engine)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of message objects")
    system = [m for m in messages if m.get("role") == "system"]
    users = [m for m in messages if m.get("role") == "user"]
    if len(users) != 1 or len(system) + len(users) != len(messages) or len(system) > 1:
        raise ApiError(400, "expected at most one system message and exactly one user message (multi-turn "
                            "conversations are not supported)")
    texts, videos = _user_parts(users[0].get("content"))
    if len(videos) != 1:
        raise ApiError(400, f"the user message must hold exactly one video_url part, found {len(videos)}")
    question = "".join(texts)
    if not question.strip():
        raise ApiError(400, "the user message has no question text")
    system_prompt = _text_of(system[0].get("content"), "system") if system else None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return ChatQuery(question, system_prompt, _max_tokens(body), request_id), videos[0]


def _user_parts(content: Any) -> tuple[list[str], list[str]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, "user message 'content' must be a string or a list of parts")
    texts, videos = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url":
            ref = part.get("video_url")
            url = ref.get("url") if isinstance(ref, dict) else ref  # {"url": ...} (OpenAI/vLLM) or a bare string
            if not isinstance(url, str):
                raise ApiError(400, "video_url part needs {'video_url': {'url': '...'}}")
            videos.append(url)
        else:
            raise ApiError(400, f"unsupported content part {kind!r}: this server takes 'text' and 'video_url'")
    return texts, videos


def _text_of(content: Any, role: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"{role} message content must be text")


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"max_tokens must be a positive integer, got {value!r}")
    return value


def _check_video_kwargs(body: dict[str, Any], engine: ServeEngine) -> None:
    """vLLM-style per-request sampling (`mm_processor_kwargs`, `media_io_kwargs`) must agree with the bundle's video spec: the
    server samples frames exactly as the model was trained, never silently otherwise."""
    kwargs = body.get("mm_processor_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "mm_processor_kwargs must be an object")
    io = body.get("media_io_kwargs") or {}
    video_io = io.get("video") if isinstance(io, dict) else None
    if not isinstance(video_io, (dict, type(None))):
        raise ApiError(400, "media_io_kwargs must be an object like {'video': {'num_frames': -1, 'fps': 1}}")
    spec = engine.spec.to_dict()
    asked = {f"mm_processor_kwargs.{k}": (kwargs[k], spec[k])
             for k in ("fps", "nframes", "min_pixels", "max_pixels", "total_pixels") if k in kwargs}
    if video_io and "fps" in video_io:
        asked["media_io_kwargs.video.fps"] = (video_io["fps"], spec["fps"])
    if video_io and video_io.get("num_frames", -1) not in (-1, None):  # -1: all frames, sampled by fps
        asked["media_io_kwargs.video.num_frames"] = (video_io["num_frames"], spec["nframes"])
    for key, (value, served) in asked.items():
        if value != served:
            raise ApiError(400, f"{key}={value!r} differs from the served bundle's video spec ({served!r}); "
                                "this server samples frames by the bundle's spec only")


# --- answering ------------------------------------------------------------------------------------------

def _complete(engine: ServeEngine, media: MediaResolver, query: ChatQuery, video_url: str) -> Reply:
    """Runs in a worker thread: fetch the media, decode by the bundle's spec, answer."""
    from trafficvlm.video import VideoError

    try:
        with media.open(video_url) as video:
            try:
                clip = engine.load_clip(video.path, cacheable=video.cacheable)
            except VideoError as exc:  # its message names the server-side path; name the client's instead
                raise ApiError(400, f"{video.label}: {exc.reason}") from None
    except MediaError as exc:
        raise ApiError(exc.status, exc.message) from None
    return engine.answer(query, clip)


def chat_response(request_id: str, model: str, reply: Reply) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                         "finish_reason": reply.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens}}
