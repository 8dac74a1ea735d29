"""benchmarks/direct_http.py, the serving ladder's lower rungs: the model replica's own OpenAI stream
carries every token once, the usage last and `[DONE]` at the end, as the ingress's does (fake engine)."""

import json

import httpx
import pytest

from benchmarks.direct_http import DirectServer, asgi_app
from tests.deployments.fake_engine import fake_factory


@pytest.fixture
def client(tmp_path):
    config = tmp_path / "fake.yaml"
    config.write_text("name: fake\nmodel: fake\n")
    server = DirectServer(str(config), engine_factory=fake_factory)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app(server)), base_url="http://t")


async def test_the_stream_carries_each_token_then_the_usage_then_done(client):
    body = {"model": "fake", "prompt": "hi", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert texts == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 "]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * 4 + ["length"]


async def test_it_answers_readyz_as_serve_bench_waits_for_it(client):
    async with client:
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/readyz")).status_code == 404


async def test_other_paths_and_sync_requests_are_refused(client):
    async with client:
        assert (await client.post("/v1/chat/completions", json={})).status_code == 404
        sync = await client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert sync.status_code == 400
