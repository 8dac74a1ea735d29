"""OpenAI wire types: validation, conversion to engine types, and response shapes."""

import json

import pytest
from pydantic import ValidationError

from deployments.errors import http_error, validation_message
from deployments.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from deployments.protocol.openai_responses import ChatChunks, ChatCompletion, Completion, CompletionChunks
from deployments.sse import sse_event
from deployments.wire import ChatMessage, CompletionResult
from engine.errors import InvalidRequestError
from engine.types import FinishReason, SamplingParams, TokenDelta, TokenLogProb

MESSAGES = [{"role": "user", "content": "Hi"}]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": "Hi", **fields}))


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(
        json.dumps({"model": "m", "messages": MESSAGES, **fields})
    )


def error_text(parse, **fields) -> str:
    with pytest.raises(ValidationError) as info:
        parse(**fields)
    return str(info.value)


def test_completion_defaults_are_openai_defaults():
    request = completion()
    assert request.to_sampling_params() == SamplingParams(max_new_tokens=16, temperature=1.0)
    assert not request.stream and not request.is_usage_streamed


def test_completion_fields_convert():
    params = completion(
        max_tokens=7,
        temperature=1.5,
        top_p=0.9,
        stop="\n",
        seed=3,
        logprobs=2,
        presence_penalty=-1.0,
        frequency_penalty=2.0,
        top_k=5,
        ignore_eos=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        user="u1",
        unknown_extra=1,
    ).to_sampling_params()
    assert params == SamplingParams(
        max_new_tokens=7,
        temperature=1.5,
        top_k=5,
        top_p=0.9,
        presence_penalty=-1.0,
        frequency_penalty=2.0,
        stop_sequences=("\n",),
        include_stop_str_in_output=True,
        return_log_probs=True,
        num_top_logprobs=2,
        skip_special_tokens=False,
        seed=3,
        ignore_eos=True,
    )


def test_explicit_nulls_mean_defaults():
    nulls = dict.fromkeys(["temperature", "top_p", "stop", "seed", "n", "max_tokens", "logprobs", "top_k"])
    assert completion(**nulls).to_sampling_params() == SamplingParams(max_new_tokens=16, temperature=1.0)


def test_greedy_ignores_top_p_and_top_k():
    params = completion(temperature=0, top_p=0.5, top_k=3).to_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 1.0, -1)


def test_prompt_list_with_one_string():
    assert completion(prompt=["Hello"]).prompt == "Hello"
    assert "exactly one prompt per request" in error_text(completion, prompt=["a", "b"])
    assert "exactly one prompt per request" in error_text(completion, prompt=[])
    assert "token id prompts are not supported" in error_text(completion, prompt=[[1, 2]])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 2}, "only n=1 is supported"),
        ({"best_of": 3}, "only best_of=1 is supported"),
        ({"echo": True}, "echo is not supported"),
        ({"suffix": "x"}, "suffix is not supported"),
        ({"logit_bias": {"1": 5}}, "logit_bias is not supported"),
        ({"temperature": 2.5}, "less than or equal to 2"),
        ({"presence_penalty": -3}, "greater than or equal to -2"),
        ({"top_p": 0}, "greater than 0"),
        ({"logprobs": 6}, "less than or equal to 5"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
        ({"model": ""}, "at least 1 character"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"temperature": float("nan")}, "finite number"),
    ],
)
def test_completion_rejections(fields, message):
    assert message in error_text(completion, **fields)


def test_include_usage():
    assert completion(stream=True, stream_options={"include_usage": True}).is_usage_streamed
    assert not completion(stream=True, stream_options={"include_usage": False}).is_usage_streamed


def test_chat_messages_convert():
    request = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "ok", "name": "bot"},
        ]
    )
    assert request.to_messages() == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "a\nb"),
        ChatMessage("assistant", "ok"),
    )


def test_chat_max_tokens():
    assert chat().max_new_tokens is None  # up to the context: the model server fills it in
    assert chat(max_tokens=5).to_sampling_params().max_new_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=9).to_sampling_params().max_new_tokens == 9


def test_chat_log_probs():
    params = chat(logprobs=True, top_logprobs=3).to_sampling_params()
    assert params.return_log_probs and params.num_top_logprobs == 3
    assert chat(logprobs=True, top_logprobs=20).to_sampling_params().num_top_logprobs == 20
    assert "less than or equal to 20" in error_text(chat, logprobs=True, top_logprobs=21)
    assert not chat().to_sampling_params().return_log_probs
    assert completion(logprobs=0).to_sampling_params().num_top_logprobs == 0
    assert "top_logprobs needs logprobs" in error_text(chat, top_logprobs=2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "Input should be 'system'"),
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'image_url' are not"),
        ({"messages": [{"role": "user"}]}, "Field required"),
        ({"n": 2}, "only n=1 is supported"),
        ({"tools": [{"type": "function"}]}, "tools are not supported"),
        ({"response_format": {"type": "xml"}}, "Input should be 'text'"),
    ],
)
def test_chat_rejections(fields, message):
    assert message in error_text(chat, **fields)


def test_json_response_formats_become_guided_specs():
    assert (
        chat(response_format={"type": "json_object"}).to_sampling_params().guided.value == '{"type":"object"}'
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert chat(response_format=fmt).to_sampling_params().guided.kind.value == "json"
    assert chat(response_format={"type": "text"}).to_sampling_params().guided is None
    assert chat(guided_regex="a+").to_sampling_params().guided.kind.value == "regex"


TOKENS = (TokenLogProb(5, "Hel", -0.5), TokenLogProb(6, "lo", -1.0))
RESULT = CompletionResult("r", "Hello", 3, 2, TOKENS, FinishReason.LENGTH)


def test_completion_response_shape():
    body = Completion.from_result("cmpl-1", 100, "m", RESULT).model_dump()
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 100,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": "Hello",
                "logprobs": {
                    "tokens": ["Hel", "lo"],
                    "token_logprobs": [-0.5, -1.0],
                    "top_logprobs": None,
                    "text_offset": [0, 3],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_chat_response_shape():
    body = ChatCompletion.from_result("chatcmpl-1", 100, "m", RESULT).model_dump()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"]["content"][0] == {
        "token": "Hel",
        "logprob": -0.5,
        "bytes": list(b"Hel"),
        "top_logprobs": [],
    }
    no_log_probs = CompletionResult("r", "x", 3, 1, None, FinishReason.STOP)
    body = ChatCompletion.from_result("c", 1, "m", no_log_probs).model_dump()
    assert body["choices"][0]["logprobs"] is None and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 4


def deltas() -> list[TokenDelta]:
    return [
        TokenDelta("r", "Hel", 3, 1, TOKENS[0]),
        TokenDelta("r", "lo", 3, 2, TOKENS[1], FinishReason.STOP),
    ]


def test_completion_chunks():
    chunks = CompletionChunks("cmpl-1", 100, "m")
    first, last = (chunks.content(d).model_dump() for d in deltas())
    assert first["object"] == "text_completion" and first["usage"] is None
    assert first["choices"][0]["text"] == "Hel" and first["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["logprobs"]["text_offset"] == [3]
    assert last["choices"][0]["finish_reason"] == "stop"
    usage = chunks.usage(deltas()[-1]).model_dump()
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }


def test_chat_chunks_send_the_role_once():
    chunks = ChatChunks("chatcmpl-1", 100, "m")
    first, last = (chunks.content(d).model_dump() for d in deltas())
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert last["choices"][0]["delta"] == {"role": None, "content": "lo"}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["choices"][0]["logprobs"]["content"][0]["token"] == "lo"
    assert chunks.usage(deltas()[-1]).choices == []
    assert sse_event(chunks.content(deltas()[0])).startswith(b'data: {"id":"chatcmpl-1"')


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
    ],
)
def test_error_shape(status, error_type):
    assert ErrorResponse.of(status, "boom").model_dump() == {
        "error": {"message": "boom", "type": error_type, "param": None, "code": status}
    }


def test_model_list_shape():
    assert ModelList(data=[ModelCard(id="m", created=1)]).model_dump() == {
        "object": "list",
        "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "llmserve"}],
    }


ALTERNATIVES = (TokenLogProb(5, "Hel", -0.5), TokenLogProb(9, "He", -1.5), TokenLogProb(10, "He", -2.0))
TOKENS_WITH_TOP = (TokenLogProb(5, "Hel", -0.5, top=ALTERNATIVES), TokenLogProb(6, "lo", -1.0, top=TOKENS))


def test_top_logprobs_are_rendered():
    result = CompletionResult("r", "Hello", 3, 2, TOKENS_WITH_TOP, FinishReason.LENGTH)
    logprobs = Completion.from_result("c", 1, "m", result).model_dump()["choices"][0]["logprobs"]
    # By text, best first; a second token with the same text keeps the likelier log prob.
    assert logprobs["top_logprobs"] == [{"Hel": -0.5, "He": -1.5}, {"Hel": -0.5, "lo": -1.0}]
    content = ChatCompletion.from_result("c", 1, "m", result).model_dump()["choices"][0]["logprobs"][
        "content"
    ]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["Hel", "He", "He"]
    assert content[1]["top_logprobs"][1] == {"token": "lo", "logprob": -1.0, "bytes": list(b"lo")}
    chunk = ChatChunks("c", 1, "m").content(TokenDelta("r", "Hel", 3, 1, TOKENS_WITH_TOP[0]))
    assert len(chunk.model_dump()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    chunk = CompletionChunks("c", 1, "m").content(TokenDelta("r", "Hel", 3, 1, TOKENS_WITH_TOP[0]))
    assert chunk.model_dump()["choices"][0]["logprobs"]["top_logprobs"] == [{"Hel": -0.5, "He": -1.5}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": 2**64}, "seed: Input should be less than or equal to 9223372036854775807"),
        ({"seed": -(2**63) - 1}, "seed: Input should be greater than or equal to -9223372036854775808"),
        ({"top_k": 2**63}, "top_k: Input should be less than or equal to 2147483647"),
        ({"max_tokens": 2**20 + 1}, "max_tokens: Input should be less than or equal to 1048576"),
        ({"stop": ["s"] * 1025}, "stop: List should have at most 1024 items"),
        ({"prompt": "\ud800 hi"}, "prompt: is not valid Unicode"),
        ({"stop": ["ok", "\udc00"]}, "stop.1: is not valid Unicode"),
        ({"guided_regex": "a\ud800"}, "guided_regex: is not valid Unicode"),
        ({"guided_json": {"properties": {"\ud800": {}}}}, "guided_json: is not valid Unicode"),
        ({"guided_json": '{"const": "\\ud800"}'}, "guided_json: is not valid Unicode"),  # a JSON escape
    ],
)
def test_static_bounds_name_the_field_and_the_limit(fields, message):
    try:  # as FastAPI parses bodies: json.loads (which keeps lone surrogates), then the model
        CompletionRequest.model_validate({"model": "m", "prompt": "Hi", **fields})
    except ValidationError as exc:
        assert message in validation_message(exc.errors())
    else:
        raise AssertionError(f"{fields} was accepted")


def test_chat_content_must_be_valid_unicode():
    with pytest.raises(ValidationError) as info:
        content = [{"type": "text", "text": "\udfff"}]
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": content}]}
        )
    assert "messages.0.content.0.text: is not valid Unicode" in validation_message(info.value.errors())


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 9.9e-6])
def test_temperatures_below_the_epsilon_are_greedy(temperature):
    params = completion(temperature=temperature, top_k=5, top_p=0.5).to_sampling_params()
    assert (params.temperature, params.top_k, params.top_p) == (0.0, -1, 1.0)
    assert completion(temperature=1e-5).to_sampling_params().temperature == 1e-5


def test_seed_at_the_int64_limits_is_accepted():
    assert completion(seed=2**63 - 1).to_sampling_params().seed == 2**63 - 1
    assert completion(seed=-(2**63)).to_sampling_params().seed == -(2**63)


def test_error_messages_always_encode_to_utf8():
    """A message quoting a request's lone surrogate is escaped, or encoding the 400 would be a 500."""
    status_code, message = http_error(InvalidRequestError("invalid guided_json: bad '\ud800'"))
    assert status_code == 400 and message.encode("utf-8") and "\\ud800" in message
