"""LLM Engine wire types: validation, conversion to engine types, and the JSON the client parses."""

import json

import pytest
from pydantic import ValidationError

from deployments.protocol.llm_engine import (
    ONE_GUIDED_MESSAGE,
    CompletionOutput,
    CompletionRequest,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionSyncResponse,
    ListModelEndpointsResponse,
    ModelEndpoint,
    TokenOutput,
)
from deployments.sse import sse_event
from engine.types import FinishReason, SamplingParams, TokenDelta, TokenLogProb

# Exactly what `llmengine.Completion.create(model, prompt)` sends: all 15 keys, explicit nulls.
CLIENT_BODY = {
    "prompt": "Hello, my name is",
    "max_new_tokens": 20,
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


def parse(**changes) -> CompletionRequest:
    return CompletionRequest.model_validate_json(json.dumps({**CLIENT_BODY, **changes}))


def error_text(**changes) -> str:
    with pytest.raises(ValidationError) as info:
        parse(**changes)
    return str(info.value)


def test_client_body_with_nulls_gives_engine_defaults():
    params = parse().to_sampling_params()
    assert params == SamplingParams(max_new_tokens=20, temperature=0.2)


def test_all_fields_convert():
    request = parse(
        temperature=0.7,
        stop_sequences=["\n", "", "END"],
        return_token_log_probs=True,
        presence_penalty=0.5,
        frequency_penalty=1.5,
        top_k=40,
        top_p=0.9,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        seed=7,
    )
    assert request.to_sampling_params() == SamplingParams(
        max_new_tokens=20,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=1.5,
        stop_sequences=("\n", "END"),  # the empty stop string means nothing
        include_stop_str_in_output=True,
        return_log_probs=True,
        skip_special_tokens=False,
        seed=7,
    )


def test_minimal_body_and_unknown_keys_are_ignored():
    request = CompletionRequest.model_validate(
        {"prompt": "x", "max_new_tokens": 1, "temperature": 0, "foo": 1}
    )
    params = request.to_sampling_params()
    assert params.is_greedy and params.skip_special_tokens and not params.return_log_probs


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1.01}, "temperature"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"prompt": None}, "prompt"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_bounds(changes, field):
    assert field in error_text(**changes)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_are_rejected(value):
    body = json.dumps(
        {**CLIENT_BODY, "temperature": value, "presence_penalty": value}
    )  # NaN/Infinity literals
    with pytest.raises(ValidationError, match="finite"):
        CompletionRequest.model_validate_json(body)


def test_missing_required_fields():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "x"})
    assert {e["loc"][0] for e in info.value.errors()} == {"max_new_tokens", "temperature"}


def test_at_most_one_guided_field():
    assert ONE_GUIDED_MESSAGE in error_text(guided_regex="a+", guided_choice=["a", "b"])


@pytest.mark.parametrize(
    "changes",
    [
        {"guided_json": {"type": "object"}},
        {"guided_regex": "a+"},
        {"guided_choice": ["a"]},
        {"guided_grammar": "g"},
    ],
)
def test_guided_fields_become_a_guided_spec(changes):
    (field,) = changes
    guided = parse(**changes).to_sampling_params().guided
    assert guided is not None and guided.kind.value == field.removeprefix("guided_")


@pytest.mark.parametrize(("changes", "ok"), [
    ({"top_k": -1, "top_p": 1.0}, True),
    ({"top_k": None, "top_p": None}, True),
    ({"top_k": 5}, False),
    ({"top_p": 0.9}, False),
])  # fmt: skip
def test_greedy_rejects_sampling_filters(changes, ok):
    if ok:
        assert parse(temperature=0, **changes).to_sampling_params().is_greedy
    else:
        assert "temperature is 0" in error_text(temperature=0, **changes)


def test_sync_response_json():
    output = CompletionOutput(
        text=" Sean.",
        num_prompt_tokens=6,
        num_completion_tokens=2,
        tokens=[TokenOutput(token=" Sean", log_prob=-0.12), TokenOutput(token=".", log_prob=-0.5)],
    )
    response = CompletionSyncResponse(request_id="r1", output=output)
    assert response.model_dump_json() == (
        '{"request_id":"r1","output":{"text":" Sean.","num_prompt_tokens":6,"num_completion_tokens":2,'
        '"tokens":[{"token":" Sean","log_prob":-0.12},{"token":".","log_prob":-0.5}]}}'
    )
    no_tokens = CompletionSyncResponse(request_id="r1", output=output.model_copy(update={"tokens": None}))
    assert json.loads(no_tokens.model_dump_json())["output"]["tokens"] is None


def test_stream_events_from_deltas():
    middle = TokenDelta("r1", " the", 6, 4, TokenLogProb(5, " the", -0.3))
    last = TokenDelta("r1", "", 6, 5, None, FinishReason.STOP)
    events = [
        CompletionStreamResponse(request_id="r1", output=CompletionStreamOutput.from_delta(d), error=None)
        for d in (middle, last)
    ]
    assert sse_event(events[0]) == (
        b'data: {"request_id":"r1","output":{"text":" the","finished":false,"num_prompt_tokens":null,'
        b'"num_completion_tokens":4,"token":{"token":" the","log_prob":-0.3}},"error":null}\n\n'
    )
    assert json.loads(sse_event(events[1])[len(b"data: ") :]) == {
        "request_id": "r1",
        "output": {
            "text": "",
            "finished": True,
            "num_prompt_tokens": 6,
            "num_completion_tokens": 5,
            "token": None,
        },
        "error": None,
    }


def test_stream_error_event():
    event = CompletionStreamResponse.from_error("r1", 500, "engine died\nbadly")
    frame = sse_event(event)
    assert frame.startswith(b"data: {") and frame.endswith(b"}\n\n") and frame.count(b"\n") == 2
    payload = json.loads(frame[len(b"data: ") :])
    assert payload["output"] is None
    assert payload["error"]["status_code"] == 500
    assert payload["error"]["content"]["error"] == "engine died\nbadly"
    assert payload["error"]["content"]["timestamp"].endswith("+00:00")


def test_model_endpoint_defaults_are_what_the_client_accepts():
    listing = ListModelEndpointsResponse(model_endpoints=[ModelEndpoint(name="m", model_name="base")])
    endpoint = json.loads(listing.model_dump_json())["model_endpoints"][0]
    assert endpoint["source"] == "hugging_face"
    assert endpoint["status"] == "READY"
    assert endpoint["inference_framework"] == "vllm"
    assert endpoint["num_shards"] == 1
    with pytest.raises(ValidationError):
        ModelEndpoint(name="m", inference_framework="llmserve")
