"""The post-rollout smoke test against the local server (tiny model), a dead port, and fake endpoints that
answer badly or slowly."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from serve_helpers import OPTIONS, QUESTION, TINY_SPEC, dead_port, make_video, running

from trafficvlm.model import build_tiny
from trafficvlm.serve.app import ServeSettings, create_app
from trafficvlm.serve.engine import ServeEngine
from trafficvlm.smoke import smoke_test
from trafficvlm.video import FrameCache


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("smoke-media") / "clip.mp4")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    engine = ServeEngine.load(build_tiny(root / "bundle", spec=TINY_SPEC), cache=FrameCache(root / "frames"))
    with running(create_app(engine, ServeSettings(api_key="k1", tmp_dir=str(root / "uploads")))) as url:
        yield url


def fake_endpoint(content: str, delay_s: float = 0.0) -> FastAPI:
    """An OpenAI-compatible endpoint that always replies `content` (after `delay_s`)."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat():
        time.sleep(delay_s)
        return {"id": "x", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}

    return app


def test_passes_against_the_local_server(served, video):
    r = smoke_test(served, video, QUESTION, OPTIONS, api_key="k1", timeout_s=60)
    assert r.ok, r.error
    assert r.letter in OPTIONS and r.content == r.letter.upper() and r.error is None
    assert r.latency_s > 0 and r.model == "bundle"
    assert "passed" in r.summary() and r.to_json()["ok"] is True


def test_wrong_key_fails_with_the_http_status(served, video):
    r = smoke_test(served, video, QUESTION, OPTIONS, api_key="k2")
    assert not r.ok and "HTTP 401" in r.error and "API key" in r.error


def test_dead_port_fails_with_a_clear_error(video):
    endpoint = f"http://127.0.0.1:{dead_port()}"
    r = smoke_test(endpoint, video, QUESTION, OPTIONS, timeout_s=5)
    assert not r.ok and r.letter is None
    assert r.error.startswith(endpoint) and "cannot reach" in r.error
    assert "FAILED" in r.summary()


def test_an_answer_that_names_no_option_fails(video):
    with running(fake_endpoint("I think it is sunny today")) as url:
        r = smoke_test(url, video, QUESTION, OPTIONS)
    assert not r.ok and r.content == "I think it is sunny today"
    assert "names none of the options (A, B, C)" in r.error
    with running(fake_endpoint("D")) as url:  # a letter, but not one of the options
        assert not smoke_test(url, video, QUESTION, OPTIONS).ok
    with running(fake_endpoint("<answer>C</answer>")) as url:  # parsed strictly, like eval
        assert smoke_test(url, video, QUESTION, OPTIONS).letter == "c"


def test_a_slow_endpoint_times_out(video):
    with running(fake_endpoint("A", delay_s=2.0)) as url:
        r = smoke_test(url, video, QUESTION, OPTIONS, timeout_s=0.5)
    assert not r.ok and "no answer within 0.5 s" in r.error


def test_missing_video_and_missing_options(tmp_path):
    r = smoke_test("http://127.0.0.1:1", tmp_path / "nope.mp4", QUESTION, OPTIONS)
    assert not r.ok and "video not found" in r.error
    with pytest.raises(ValueError, match="options"):
        smoke_test("http://127.0.0.1:1", tmp_path / "nope.mp4", QUESTION, {})
