"""The OpenAI routes over a fake engine: SSE framing, error shapes and statuses, errors after the 200."""

import json

import httpx
import pytest

from tests.deployments.fake_engine import FAKE_MODELS, MAX_MODEL_LEN
from tests.deployments.test_ingress import wait_idle

COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 3}
CHAT = {"model": FAKE_MODELS[1], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def client(fake_app_url: str):
    with httpx.Client(base_url=fake_app_url, timeout=30) as client:
        yield client


def events_of(response: httpx.Response) -> list[dict | str]:
    """Parse an SSE body, checking the framing: only `data: ...\\n\\n` events, the last `[DONE]`."""
    body = response.text
    assert body.endswith("\n\n")
    frames = [frame.removeprefix("data: ") for frame in body[:-2].split("\n\n")]
    assert frames[-1] == "[DONE]" and frames.count("[DONE]") == 1, body
    return [json.loads(frame) for frame in frames[:-1]]


def test_completion_stream_with_usage(client):
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 1}
    response = client.post("v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, usage = events_of(response)
    assert [c["choices"][0]["text"] for c in chunks] == ["w0 ", "w1 ", "w2 "]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [3], [6]]
    assert len({c["id"] for c in [*chunks, usage]}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 2 + 3


def test_chat_uses_the_whole_conversation(client):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    response = client.post("v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 200
    payload = response.json()
    assert payload["usage"]["prompt_tokens"] == len("<system>s<user>hi<assistant>")
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2 "}


def test_completions_prompt_is_raw_even_for_chat_models(client):
    response = client.post("v1/completions", json={**COMPLETION, "model": FAKE_MODELS[1]})
    assert response.json()["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("is_stream", [False, True])
@pytest.mark.parametrize(
    ("route", "changes", "status", "error_type", "message"),
    [
        ("completions", {"model": "nope"}, 404, "not_found_error", "model 'nope' is not served here"),
        ("completions", {"n": 2}, 400, "invalid_request_error", "n: only n=1 is supported"),
        ("completions", {"prompt": "x" * MAX_MODEL_LEN}, 400, "invalid_request_error", "model's context"),
        ("completions", {"prompt": "[overload]"}, 429, "rate_limit_error", "queue is full"),
        ("completions", {"prompt": "[crash]"}, 500, "server_error", "internal error: RuntimeError"),
        (
            "chat/completions",
            {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "invalid_request_error",
            "role",
        ),
        (
            "chat/completions",
            {"response_format": {"type": "json_schema"}},
            400,
            "invalid_request_error",
            "needs a json_schema object",
        ),
    ],
)
def test_errors_before_streaming_are_openai_errors(
    client, route, changes, status, error_type, message, is_stream
):
    body = {**(COMPLETION if route == "completions" else CHAT), **changes, "stream": is_stream}
    response = client.post(f"v1/{route}", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (error_type, status)
    assert message in error["message"]


def test_malformed_json_is_an_openai_400(client):
    response = client.post(
        "v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]["message"]


def test_stream_error_after_200_is_an_error_event_then_done(client):
    body = {**COMPLETION, "prompt": "[fail-after-2]", "max_tokens": 5, "stream": True}
    response = client.post("v1/completions", json=body)
    assert response.status_code == 200
    *chunks, error = events_of(response)
    assert [c["choices"][0]["text"] for c in chunks] == ["w0 ", "w1 "]
    assert error == {
        "error": {
            "message": "fake request failed mid-stream",
            "type": "server_error",
            "param": None,
            "code": 500,
        }
    }


def test_sync_error_mid_generation_is_an_openai_500(client):
    response = client.post(
        "v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "[fail-after-2]"}]}
    )
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "fake request failed mid-stream"


def test_models_and_v2_aliases(client):
    listing = client.get("v1/models").json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == sorted(FAKE_MODELS)
    assert client.post("v2/completions", json=COMPLETION).json()["object"] == "text_completion"
    assert client.post("v2/chat/completions", json=CHAT).json()["object"] == "chat.completion"
    assert client.post("v2/completions", json={**COMPLETION, "model": "nope"}).json()["error"]["code"] == 404


def test_stream_disconnect_aborts_the_engine_request(client):
    body = {**COMPLETION, "prompt": "[slow]", "max_tokens": 240, "stream": True}  # 48 s if not stopped
    with client.stream("POST", "v1/completions", json=body) as response:
        lines = response.iter_lines()  # keep a reference: a dropped line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "w0 "
    assert wait_idle(), "the engine request kept running after the client left"
