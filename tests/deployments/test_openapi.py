"""The published schema (`/openapi.json`) without a cluster: real error answers, no 422, bounds, SSE."""

import json

import pytest

from deployments.ingress import app
from deployments.openapi_responses import ERROR_MEANINGS

SCHEMA = app.openapi()
GENERATE_ROUTES = {
    "/v1/llm/completions-sync": "DetailError",
    "/v1/llm/completions-stream": "DetailError",
    "/v1/completions": "ErrorResponse",
    "/v2/completions": "ErrorResponse",
    "/v1/chat/completions": "ErrorResponse",
    "/v2/chat/completions": "ErrorResponse",
}
STREAM_ROUTES = set(GENERATE_ROUTES) - {"/v1/llm/completions-sync"}


def refs(node) -> set[str]:
    text = json.dumps(node)
    return {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}


def test_no_route_publishes_fastapi_422():
    for path, item in SCHEMA["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in SCHEMA["components"]["schemas"]


def test_every_reference_resolves():
    assert refs(SCHEMA) <= set(SCHEMA["components"]["schemas"])


@pytest.mark.parametrize(("path", "error_model"), GENERATE_ROUTES.items())
def test_generate_routes_publish_their_real_errors(path: str, error_model: str):
    responses = SCHEMA["paths"][path]["post"]["responses"]
    for status in (400, 401, 404, 413, 429, 500, 503, 504):
        answer = responses[str(status)]
        assert answer["description"] == ERROR_MEANINGS[status]
        assert refs(answer) == {error_model}, (path, status)


@pytest.mark.parametrize("path", sorted(STREAM_ROUTES))
def test_streaming_routes_declare_event_streams(path: str):
    content = SCHEMA["paths"][path]["post"]["responses"]["200"]["content"]
    event = content["text/event-stream"]["schema"]
    assert event["required"] == ["data"]
    expected = {"CompletionStreamResponse"} if "llm" in path else {"ErrorResponse"}
    assert expected <= refs(event)
    assert ("application/json" in content) == ("llm" not in path)  # OpenAI routes: stream is optional


def test_static_bounds_are_published():
    schemas = SCHEMA["components"]["schemas"]
    llm = schemas["deployments__protocol__llm_engine__CompletionRequest"]["properties"]
    seed = llm["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert llm["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1 and llm["top_k"]["not"] == {"const": 0}
    assert llm["max_new_tokens"]["maximum"] == 2**20 and "context" in llm["max_new_tokens"]["description"]
    assert llm["stop_sequences"]["anyOf"][0]["maxItems"] == 1024
    assert "limits.max_stop_sequences" in llm["stop_sequences"]["description"]
    assert "greedy" in llm["temperature"]["description"] and "1e-05" in llm["temperature"]["description"]
    assert "vocabulary" in llm["top_k"]["description"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert chat["n"]["enum"] == [1, None] and chat["tools"]["maxItems"] == 0
    completions = schemas["deployments__protocol__openai__CompletionRequest"]["properties"]
    assert completions["logprobs"]["anyOf"][0]["maximum"] == 5
    query = SCHEMA["paths"]["/v1/llm/completions-sync"]["post"]["parameters"][0]
    assert query["name"] == "model_endpoint_name" and query["required"] and query["schema"]["minLength"] == 1
