"""The HTTP layer over a fake engine: routes, SSE framing, error mapping, cancellation."""

import json
import time
import uuid

import httpx
import pytest
from ray import serve

from tests.deployments.fake_engine import FAKE_MODELS, MAX_MODEL_LEN

BODY = {
    "prompt": "hi",
    "max_new_tokens": 3,
    "temperature": 0.2,
    "stop_sequences": None,
    "return_token_log_probs": False,
    "presence_penalty": None,
    "frequency_penalty": None,
    "top_k": None,
    "top_p": None,
    "include_stop_str_in_output": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "skip_special_tokens": True,
}


@pytest.fixture(scope="module")
def client(fake_app_url: str):
    with httpx.Client(base_url=fake_app_url, timeout=30, auth=("root", "")) as client:
        yield client


def post(client: httpx.Client, route: str, model: str | None = "fake", **changes) -> httpx.Response:
    params = {"model_endpoint_name": model} if model is not None else {}
    return client.post(f"v1/llm/completions-{route}", params=params, json={**BODY, **changes})


def events_of(response: httpx.Response) -> list[dict]:
    """Parse an SSE body, checking the exact framing: only `data: <json>\\n\\n` events."""
    body = response.text
    assert body.endswith("\n\n")
    frames = body[:-2].split("\n\n")
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), body
    return [json.loads(frame.removeprefix("data: ")) for frame in frames]


def test_sync_completion(client):
    response = post(client, "sync", max_new_tokens=4, headers=None)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    uuid.UUID(payload["request_id"])
    assert payload["output"] == {
        "text": "w0 w1 w2 w3 ",
        "num_prompt_tokens": 2,
        "num_completion_tokens": 4,
        "tokens": None,
    }


def test_sync_with_log_probs_and_api_key_header(client):
    response = client.post(
        "v1/llm/completions-sync",
        params={"model_endpoint_name": "fake"},
        json={**BODY, "max_new_tokens": 2, "return_token_log_probs": True},
        headers={"x-api-key": "secret"},
    )
    assert response.json()["output"]["tokens"] == [
        {"token": "w0 ", "log_prob": -0.5},
        {"token": "w1 ", "log_prob": -0.5},
    ]


def test_chat_template_model_counts_templated_prompt(client):
    response = post(client, "sync", model=FAKE_MODELS[1], prompt="hi")
    assert response.status_code == 200
    assert response.json()["output"]["num_prompt_tokens"] == len("<user>hi<assistant>")


def test_stream_framing(client):
    response = post(client, "stream", max_new_tokens=3, return_token_log_probs=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = events_of(response)
    assert [e["output"]["text"] for e in events] == ["w0 ", "w1 ", "w2 "]
    assert [e["output"]["finished"] for e in events] == [False, False, True]
    assert [e["output"]["num_completion_tokens"] for e in events] == [1, 2, 3]
    assert [e["output"]["num_prompt_tokens"] for e in events] == [None, None, 2]
    assert events[0]["output"]["token"] == {"token": "w0 ", "log_prob": -0.5}
    assert all(e["error"] is None and e["request_id"] == events[0]["request_id"] for e in events)
    assert list(events[0]) == ["request_id", "output", "error"]


def test_stream_without_log_probs_has_null_token(client):
    events = events_of(post(client, "stream", prompt="[stop]", max_new_tokens=10))
    assert len(events) == 3 and events[-1]["output"]["finished"]
    assert all(e["output"]["token"] is None for e in events)


def test_stream_events_leave_one_by_one(client, tmp_path):
    """Each token after the first is made only once the client has read the one before (the fake
    engine's step gate: the test writes file i after reading event i - 1): a stream that held its
    events back, to send them together, would never end (the read times out instead)."""
    events = []
    with client.stream(
        "POST",
        "v1/llm/completions-stream",
        params={"model_endpoint_name": "fake"},
        json={**BODY, "prompt": f"[step-gate:{tmp_path}]", "max_new_tokens": 4},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                (tmp_path / str(len(events))).touch()  # lets the next token be made
    assert [e["output"]["num_completion_tokens"] for e in events] == [1, 2, 3, 4]


@pytest.mark.parametrize("route", ["sync", "stream"])
@pytest.mark.parametrize(
    ("changes", "status", "detail"),
    [
        ({"model": "nope"}, 404, "model 'nope' is not served here; served models: fake, fake-chat"),
        ({"model": None}, 400, "model_endpoint_name: Field required"),
        ({"model": ""}, 400, "model_endpoint_name: String should have at least 1 character"),
        ({"max_new_tokens": 0}, 400, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"temperature": 2}, 400, "temperature: Input should be less than or equal to 1"),
        ({"top_k": 0}, 400, "top_k: "),
        ({"temperature": 0, "top_p": 0.5}, 400, "top_p must be null or 1 when temperature is 0"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, 400, "Only one of guided_json, guided_choice"),
        ({"prompt": "x" * MAX_MODEL_LEN}, 400, "exceeds this model's context"),
        ({"prompt": "[overload]"}, 429, "queue is full"),
        ({"prompt": "[crash]"}, 500, "internal error: RuntimeError: fake engine crashed"),
    ],
)
def test_errors_before_streaming_are_plain_http_errors(client, route, changes, status, detail):
    response = post(client, route, **changes)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]


@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": "x", "max_new_tokens": 1,'])
def test_malformed_json_is_400(client, body):
    response = client.post(
        "v1/llm/completions-sync",
        params={"model_endpoint_name": "fake"},
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["detail"]


def test_missing_fields_are_400_not_422(client):
    response = client.post("v1/llm/completions-sync", params={"model_endpoint_name": "fake"}, json={})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "prompt: Field required" in detail and "max_new_tokens: Field required" in detail


def test_sync_error_mid_generation_is_500(client):
    response = post(client, "sync", prompt="[fail-after-2]", max_new_tokens=5)
    assert response.status_code == 500
    assert response.json() == {"detail": "fake request failed mid-stream"}


def test_stream_error_after_200_is_a_final_error_event(client):
    response = post(client, "stream", prompt="[fail-after-2]", max_new_tokens=5)
    assert response.status_code == 200
    events = events_of(response)
    assert [e["output"]["text"] for e in events[:2]] == ["w0 ", "w1 "]
    error_event = events[2]
    assert len(events) == 3 and error_event["output"] is None
    assert error_event["request_id"] == events[0]["request_id"]
    assert error_event["error"]["status_code"] == 500
    assert error_event["error"]["content"]["error"] == "fake request failed mid-stream"
    assert error_event["error"]["content"]["timestamp"]


def model_stats(name: str = "fake"):
    handle = serve.get_deployment_handle(f"ModelServer:{name}", app_name="fake")
    return handle.stats.remote().result()


def wait_idle(timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if model_stats().num_running == 0:
            return True
        time.sleep(0.1)
    return False


def test_stream_disconnect_aborts_the_engine_request(client):
    body = {**BODY, "prompt": "[slow]", "max_new_tokens": 240}  # 48 s if nothing stopped it
    with client.stream(
        "POST", "v1/llm/completions-stream", params={"model_endpoint_name": "fake"}, json=body
    ) as r:
        lines = r.iter_lines()  # keep a reference: a dropped line iterator closes the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["output"]["num_completion_tokens"] == 1
        assert model_stats().num_running == 1
    assert wait_idle(), "the engine request kept running after the client left"


def test_sync_disconnect_aborts_the_engine_request(client):
    body = {**BODY, "prompt": "[slow]", "max_new_tokens": 240}
    with pytest.raises(httpx.ReadTimeout):
        client.post("v1/llm/completions-sync", params={"model_endpoint_name": "fake"}, json=body, timeout=1.0)
    assert wait_idle(), "the engine request kept running after the client left"


def test_model_endpoints(client):
    listing = client.get("v1/llm/model-endpoints").json()
    assert [e["name"] for e in listing["model_endpoints"]] == sorted(FAKE_MODELS)
    endpoint = client.get(f"v1/llm/model-endpoints/{FAKE_MODELS[1]}").json()
    assert endpoint["name"] == FAKE_MODELS[1]
    assert (endpoint["source"], endpoint["status"], endpoint["inference_framework"]) == (
        "hugging_face",
        "READY",
        "vllm",
    )
    missing = client.get("v1/llm/model-endpoints/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


@pytest.mark.parametrize("path", ["healthz", "healthcheck", "readyz"])
def test_health_routes(client, path):
    assert client.get(path).status_code == 200
