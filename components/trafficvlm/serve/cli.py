"""`trafficvlm serve` (a local OpenAI-compatible endpoint for a checkpoint bundle) and `trafficvlm ask` (its
client, which also talks to vLLM and NIM). Heavy imports happen inside the command functions."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

SERVE_EPILOG = """\
examples:
  trafficvlm serve models/tiny                                     # http://127.0.0.1:8000/v1, no key
  TRAFFICVLM_API_KEY=s3cret trafficvlm serve runs/sft/final --api-key-env TRAFFICVLM_API_KEY \\
      --allowed-media-dir data/wts/videos --served-model-name cosmos-reason1-7b --port 8000
  curl -s http://127.0.0.1:8000/health

Requests carry the video as a data:video/mp4;base64,... URL, or as file:///... under an
--allowed-media-dir; http(s) URLs are refused (the server is offline-only). Frames are sampled by the
bundle's video spec (trafficvlm.json). Multiple-choice questions are answered by letter scoring.
"""

ASK_EPILOG = """\
examples:
  trafficvlm ask http://127.0.0.1:8000 data/wts/videos/val/x.mp4 "What is weather in the scenario?" \\
      --option A=Clear --option B=Rainy --option C=Cloudy
  trafficvlm ask http://nim.example:8000/v1 x.mp4 "Describe the traffic." --api-key-env NIM_API_KEY \\
      --spec-from runs/sft/final --max-tokens 128
  trafficvlm ask http://127.0.0.1:8000 /data/wts/videos/val/x.mp4 "How many lanes are there?" \\
      --option A=1 --option B=2 --option C=3 --file-url --json

Exit status: 0 when the endpoint answered (with --option: with one of the options), 1 otherwise.
"""


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible API (local NIM stand-in)",
                              description="Serve a checkpoint bundle on /v1/chat/completions, /v1/models and "
                                          "/health, answering questions about videos.",
                              epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (a trafficvlm bundle or a Hugging Face Qwen2.5-VL dir)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (visible in `ps`: prefer --api-key-env)")
    key.add_argument("--api-key-env", metavar="VAR", help="read the API key from environment variable VAR")
    p.add_argument("--allowed-media-dir", action="append", default=[], metavar="DIR",
                   help="allow file:// video URLs below DIR (repeatable); none: file:// is refused")
    p.add_argument("--max-request-mb", type=float, default=64, help="largest request body, in MiB (default 64)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="requests decoding video at once; the model itself runs one request at a time")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1; default cpu)")
    p.add_argument("--dtype", help="model dtype (bfloat16, float32; default: the checkpoint's)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_cli_serve)

    q = subparsers.add_parser("ask", help="ask an OpenAI-compatible endpoint a question about a video",
                              description="Send one video and one question to /v1/chat/completions and print "
                                          "the answer.",
                              epilog=ASK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("endpoint", help="base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    q.add_argument("video", help="video file")
    q.add_argument("question")
    q.add_argument("--option", action="append", default=[], metavar="L=TEXT",
                   help="a multiple-choice option, e.g. A=Clear (repeat, in order from A)")
    q.add_argument("--api-key-env", metavar="VAR", help="read the API key from environment variable VAR")
    q.add_argument("--file-url", action="store_true",
                   help="send a file:// URL instead of the bytes (the server must be allowed to read the path)")
    q.add_argument("--model", help="model id (default: the first one /v1/models lists)")
    q.add_argument("--spec-from", metavar="BUNDLE",
                   help="send this checkpoint bundle's video spec (trafficvlm.json) as vLLM's sampling fields, "
                        "so vLLM/NIM sample frames as the model was trained")
    q.add_argument("--max-tokens", type=int, default=16)
    q.add_argument("--timeout", type=float, default=60, help="seconds to wait for the answer (default 60)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=_cli_ask)


def api_key_from(args) -> str | None:
    """--api-key, or the variable --api-key-env names (which must be set)."""
    if getattr(args, "api_key", None):
        return args.api_key
    var = getattr(args, "api_key_env", None)
    if var is None:
        return None
    if not os.environ.get(var):
        raise SystemExit(f"error: --api-key-env {var}: the environment variable is not set or empty")
    return os.environ[var]


def parse_options(items: list[str]) -> dict[str, str]:
    """["A=Clear", "B=Rainy"] -> {"a": "Clear", "b": "Rainy"}; letters consecutive from A."""
    options: dict[str, str] = {}
    for item in items:
        letter, sep, text = item.partition("=")
        letter = letter.strip().lower()
        if not sep or len(letter) != 1 or letter != chr(ord("a") + len(options)) or not text.strip():
            raise SystemExit(f"error: --option {item!r}: expected L=TEXT with letters in order from A "
                             f"(next: {chr(ord('A') + len(options))})")
        options[letter] = text.strip()
    return options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cli_serve(args) -> int:
    import logging

    import uvicorn

    from trafficvlm.serve.app import ServeSettings, create_app
    from trafficvlm.serve.engine import ServeEngine

    api_key = api_key_from(args)
    for d in args.allowed_media_dir:
        if not os.path.isdir(d):
            raise SystemExit(f"error: --allowed-media-dir {d}: not a directory")
    if not _is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine = ServeEngine.load(args.model, device=args.device, dtype=args.dtype)
    settings = ServeSettings(served_model_name=args.served_model_name, api_key=api_key,
                             allowed_media_dirs=args.allowed_media_dir,
                             max_request_bytes=int(args.max_request_mb * 2**20),
                             max_concurrency=args.max_concurrency)
    app = create_app(engine, settings)
    print(f"serving {args.model} as {settings.served_model_name or engine.name!r} on "
          f"http://{args.host}:{args.port}/v1 (video spec {engine.spec.to_dict()})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _cli_ask(args) -> int:
    from trafficvlm.serve.client import EndpointError, ask

    options = parse_options(args.option)
    spec = None
    if args.spec_from:
        from trafficvlm.model import bundle_video_spec

        spec = bundle_video_spec(args.spec_from)
        if spec is None:
            raise SystemExit(f"error: --spec-from {args.spec_from}: no trafficvlm.json there")
    try:
        r = ask(args.endpoint, args.video, args.question, options or None, api_key=api_key_from(args),
                file_url=args.file_url, model=args.model, max_tokens=args.max_tokens, spec=spec,
                timeout_s=args.timeout)
    except (EndpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ok = not options or r.letter is not None
    if args.json:
        print(json.dumps({"ok": ok, "content": r.content, "letter": r.letter, "model": r.model,
                          "latency_s": round(r.latency_s, 3)}))
    else:
        chosen = f" -> {r.letter.upper()}: {options[r.letter]}" if r.letter else ""
        print(f"{r.content}{chosen}    ({r.model}, {r.latency_s:.2f} s)")
        if not ok:
            print(f"error: the answer names none of the options {', '.join(options).upper()}", file=sys.stderr)
    return 0 if ok else 1
