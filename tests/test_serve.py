"""`trafficvlm serve` on the tiny model: the OpenAI API (official client and raw httpx), letter answers that
match the eval stage's scoring, API keys, media path safety, body limits, bad input, concurrency, `ask`."""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import OPTIONS, QUESTION, TINY_SPEC, make_video, running

from trafficvlm import cli, prompts
from trafficvlm.model import build_tiny
from trafficvlm.records import VideoQARecord, human_prompt
from trafficvlm.serve.app import ServeSettings, create_app
from trafficvlm.serve.engine import ServeEngine, parse_mcq
from trafficvlm.video import FrameCache

KEY = "test-key-123"
LIMIT = 1 << 20  # 1 MiB request bodies


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = build_tiny(root / "tiny-bundle", spec=TINY_SPEC)
    media = root / "media"
    media.mkdir()
    video = make_video(media / "clip.mp4")
    outside = make_video(root / "outside.mp4")
    engine = ServeEngine.load(model_dir, cache=FrameCache(root / "frames"))
    settings = ServeSettings(served_model_name="cosmos-reason1-7b", api_key=KEY, allowed_media_dirs=[str(media)],
                             max_request_bytes=LIMIT, max_concurrency=4, tmp_dir=str(root / "uploads"))
    with running(create_app(engine, settings)) as url:
        yield {"url": url, "engine": engine, "video": video, "outside": outside, "media": media,
               "uploads": root / "uploads", "root": root}


def data_url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def mcq_body(video_url: str, text: str | None = None, **extra) -> dict:
    record = VideoQARecord(id="q", video="", question=QUESTION, options=OPTIONS)
    content = [{"type": "video_url", "video_url": {"url": video_url}},
               {"type": "text", "text": text if text is not None else prompts.user_text(record)}]
    return {"model": "cosmos-reason1-7b", "messages": [{"role": "user", "content": content}], **extra}


def post(env, body, key=KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(env["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


# --- the happy path -------------------------------------------------------------------------------------------

def test_openai_client_gets_a_letter_that_matches_eval_scoring(env):
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["cosmos-reason1-7b"]
    resp = client.chat.completions.create(**mcq_body(data_url(env["video"])))
    letter = resp.choices[0].message.content
    assert letter in {"A", "B", "C"}
    assert resp.model == "cosmos-reason1-7b" and resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 1 and resp.usage.prompt_tokens > 8  # 8 vision tokens + the text

    # The eval stage's engine on the same clip and record gives the same answer (one scoring path).
    from trafficvlm.evaluate import LocalEngine

    engine = env["engine"]
    clip = engine.load_clip(env["video"])
    record = VideoQARecord(id="q", video="clip.mp4", question=QUESTION, options=OPTIONS)
    scored = LocalEngine(engine.model, engine.processor, engine.spec, engine.prompt.system_prompt).score(
        [([record], clip)])[0][0]
    assert scored.predicted == letter.lower()


def test_the_eval_stages_openai_engine_gets_the_same_answer(env):
    """`trafficvlm eval --engine openai` against this server: its request (recipe text, the bundle's spec in
    vLLM's fields, a data: or file:// URL) is accepted and scored like the local engine."""
    from trafficvlm.evaluate import LocalEngine, OpenAIEngine

    engine = env["engine"]
    record = VideoQARecord(id="q", video="clip.mp4", question=QUESTION, options=OPTIONS)
    local = LocalEngine(engine.model, engine.processor, engine.spec, engine.prompt.system_prompt)
    expected = local.score([([record], engine.load_clip(env["video"]))])[0][0].predicted
    for file_urls in (False, True):
        remote = OpenAIEngine(env["url"], env["media"], engine.spec, engine.prompt.system_prompt,
                              model_name="cosmos-reason1-7b", api_key=KEY, file_urls=file_urls)
        assert remote.score([([record], None)])[0][0].predicted == expected


def test_question_spelling_and_media_form_do_not_change_the_answer(env):
    """The server rebuilds the training prompt from any MCQ spelling; file:// and data: give the same frames."""
    plain = QUESTION + "\nA: Clear\nB: Rainy\nC: Cloudy\nAnswer with the option's letter."
    answers = {post(env, mcq_body(data_url(env["video"]))).json()["choices"][0]["message"]["content"],
               post(env, mcq_body(data_url(env["video"]), text=plain)).json()["choices"][0]["message"]["content"],
               post(env, mcq_body(env["video"].as_uri())).json()["choices"][0]["message"]["content"]}
    assert len(answers) == 1 and answers <= {"A", "B", "C"}


def test_free_form_question_generates_within_max_tokens(env):
    body = mcq_body(data_url(env["video"]), text="Describe the traffic in this video.", max_tokens=4)
    resp = post(env, body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    assert resp.json()["usage"]["prompt_tokens"] > 8


def test_parse_mcq_accepts_the_recipe_turn_and_plain_lines():
    expected = (QUESTION, OPTIONS)
    record = VideoQARecord(id="q", video="", question=QUESTION, options=OPTIONS)
    assert parse_mcq(human_prompt(QUESTION, OPTIONS)) == expected
    assert parse_mcq(prompts.user_text(record)) == expected            # tag removed, instruction twice
    assert parse_mcq(QUESTION + "\n(A) Clear\n(B) Rainy\n(C) Cloudy\n") == expected
    assert parse_mcq(QUESTION + "\nA. Clear\nC. Cloudy") is None       # letters must run A, B, C...
    assert parse_mcq("Describe the scene.") is None


# --- security ---------------------------------------------------------------------------------------------------

def test_api_key_is_required_on_v1_but_not_on_health(env):
    body = mcq_body(data_url(env["video"]))
    assert post(env, body, key=None).status_code == 401
    wrong = post(env, body, key="test-key-124")
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(env["url"] + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=env["url"] + "/v1", api_key="nope").models.list()
    assert httpx.get(env["url"] + "/health").status_code == 200


def test_file_urls_stay_inside_the_allowed_dirs(env):
    media, outside = env["media"], env["outside"]
    link = media / "link.mp4"
    if not link.exists():
        link.symlink_to(outside)
    cases = {
        outside.as_uri(): 403,                                          # outside the allowed dir
        f"file://{media}/../outside.mp4": 403,                          # '..' escape
        link.as_uri(): 403,                                             # symlink pointing outside
        media.as_uri(): 400,                                            # not a regular file
        (media / "missing.mp4").as_uri(): 404,
        "http://example.com/clip.mp4": 400,                             # offline-only
        "ftp://example.com/clip.mp4": 400,
    }
    for url, status in cases.items():
        resp = post(env, mcq_body(url))
        assert resp.status_code == status, (url, resp.text)
    http = post(env, mcq_body("https://example.com/x.mp4")).json()["error"]["message"]
    assert "offline" in http
    escaped = post(env, mcq_body(link.as_uri())).json()["error"]["message"]
    assert str(outside) not in escaped  # the symlink's target is not revealed


def test_oversized_bodies_are_refused_with_413(env):
    big = b"x" * (LIMIT + 1024)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    resp = httpx.post(env["url"] + "/v1/chat/completions", content=big, headers=headers, timeout=30)
    assert resp.status_code == 413

    def chunks():  # no Content-Length: the server must count while streaming
        for _ in range(8):
            yield b"y" * (LIMIT // 4)

    resp = httpx.post(env["url"] + "/v1/chat/completions", content=chunks(), headers=headers, timeout=30)
    assert resp.status_code == 413
    assert httpx.get(env["url"] + "/health").status_code == 200


def test_garbage_video_is_a_400_naming_the_data_url_and_health_survives(env):
    junk = "data:video/mp4;base64," + base64.b64encode(os.urandom(4096)).decode()
    resp = post(env, mcq_body(junk))
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert message.startswith("<data: URL>:") and str(env["uploads"]) not in message
    assert httpx.get(env["url"] + "/health").json()["status"] == "ok"
    assert list(env["uploads"].iterdir()) == []  # the temporary upload was deleted


@pytest.mark.parametrize("body, status", [
    (b"", 400),
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b"\xff\xfe\x00", 400),
    ({"messages": "hello"}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400),          # no video
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": 7}}]}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4,abc"}},
                                                {"type": "text", "text": "q"}]}]}, 400),           # not base64
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@"}},
                                                {"type": "text", "text": "q"}]}]}, 400),
    ({"messages": [{"role": "user", "content": None}]}, 400),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, 400),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "y"}]}, 404),
    ({"stream": True, "messages": [{"role": "user", "content": "y"}]}, 400),
    ({"max_tokens": -3, "messages": [{"role": "user", "content": "y"}]}, 400),
    ({"mm_processor_kwargs": {"fps": 2.0}, "messages": [{"role": "user", "content": "y"}]}, 400),  # spec mismatch
    ({"media_io_kwargs": {"video": {"num_frames": 32}}, "messages": [{"role": "user", "content": "y"}]}, 400),
    ({"media_io_kwargs": {"video": 5}, "messages": [{"role": "user", "content": "y"}]}, 400),
])
def test_bad_requests_get_json_errors(env, body, status):
    headers = {"Authorization": f"Bearer {KEY}"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(env["url"] + "/v1/chat/completions", headers=headers, timeout=30, **kw)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]
    assert httpx.get(env["url"] + "/health").status_code == 200


def test_an_engine_failure_is_a_json_500_and_the_server_lives_on(env, monkeypatch):
    def broken(query, clip):
        raise RuntimeError("/secret/server/path exploded")

    monkeypatch.setattr(env["engine"], "answer", broken)
    resp = post(env, mcq_body(data_url(env["video"])))
    assert resp.status_code == 500 and "/secret" not in resp.text
    assert resp.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert post(env, mcq_body(data_url(env["video"]))).status_code == 200


def test_unknown_routes_and_methods_are_json_errors(env):
    assert httpx.get(env["url"] + "/v1/nope").json()["error"]["code"] == 404
    assert httpx.get(env["url"] + "/v1/chat/completions").status_code == 405


# --- concurrency -----------------------------------------------------------------------------------------------

def test_64_concurrent_requests_are_all_answered(env):
    body = mcq_body(data_url(env["video"]))
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      limits=httpx.Limits(max_connections=64)) as client, ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda _: client.post(env["url"] + "/v1/chat/completions", json=body), range(64)))
        health = list(pool.map(lambda _: client.get(env["url"] + "/health"), range(8)))
    assert [r.status_code for r in replies] == [200] * 64 and [r.status_code for r in health] == [200] * 8
    letters = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(letters) == 1 and letters <= {"A", "B", "C"}  # same input, same answer, under concurrency
    assert len({r.json()["id"] for r in replies}) == 64
    assert list(env["uploads"].iterdir()) == []


# --- the `ask` client -------------------------------------------------------------------------------------------

def test_ask_cli_prints_the_letter(env, capsys, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    argv = ["ask", env["url"], str(env["video"]), QUESTION, "--option", "A=Clear", "--option", "B=Rainy",
            "--option", "C=Cloudy", "--api-key-env", "SERVE_TEST_KEY"]
    assert cli.main(argv + ["--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["letter"] in OPTIONS and out["model"] == "cosmos-reason1-7b"
    assert cli.main(argv + ["--file-url"]) == 0
    assert "->" in capsys.readouterr().out
    monkeypatch.setenv("SERVE_TEST_KEY", "wrong")
    assert cli.main(argv) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_serve_cli_refuses_bad_settings_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVE_TEST_UNSET", raising=False)
    with pytest.raises(SystemExit, match="SERVE_TEST_UNSET.*not set"):
        cli.main(["serve", str(tmp_path), "--api-key-env", "SERVE_TEST_UNSET"])
    with pytest.raises(SystemExit, match="not a directory"):
        cli.main(["serve", str(tmp_path), "--allowed-media-dir", str(tmp_path / "nope")])


def test_serve_cli_runs_a_server_process(env):
    """`trafficvlm serve` as the demo starts it: a process, a key from the environment, smoke-tested."""
    import subprocess
    import sys
    import time

    from serve_helpers import dead_port

    from trafficvlm.smoke import smoke_test

    port = dead_port()
    cmd = [sys.executable, "-m", "trafficvlm", "serve", str(env["root"] / "tiny-bundle"), "--port", str(port),
           "--api-key-env", "SERVE_TEST_KEY", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "SERVE_TEST_KEY": KEY, "TRAFFICVLM_CACHE": str(env["root"] / "fc")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        result = smoke_test(url, env["video"], QUESTION, OPTIONS, api_key=KEY, spec=TINY_SPEC)
        assert result.ok and result.model == "tiny-bundle", result.error
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert KEY not in out  # the key never reaches the log
