"""The official `llmengine` client, unchanged, against the real app on the tiny model."""

import json
import os

import pytest

# conftest.py disabled the client's PyPI version check before this import.
from llmengine import Completion, Model
from llmengine.errors import BadRequestError, NotFoundError

from tests.integration.tiny_app import TINY_MAX_MODEL_LEN, TINY_MODEL


@pytest.fixture(scope="module", autouse=True)
def base_path(tiny_app_url: str):
    """The client reads LLM_ENGINE_BASE_PATH at every call."""
    previous = os.environ.get("LLM_ENGINE_BASE_PATH")
    os.environ["LLM_ENGINE_BASE_PATH"] = tiny_app_url
    yield
    if previous is None:
        del os.environ["LLM_ENGINE_BASE_PATH"]
    else:
        os.environ["LLM_ENGINE_BASE_PATH"] = previous


def test_create():
    response = Completion.create(model=TINY_MODEL, prompt="Hello", max_new_tokens=6, temperature=0)
    assert response.request_id
    assert response.output.num_prompt_tokens > 0
    assert 1 <= response.output.num_completion_tokens <= 6
    assert response.output.tokens is None


def test_create_with_log_probs():
    response = Completion.create(
        model=TINY_MODEL,
        prompt="Hello",
        max_new_tokens=4,
        temperature=0.5,
        top_p=0.9,
        return_token_log_probs=True,
    )
    assert len(response.output.tokens) == response.output.num_completion_tokens


def test_stream_matches_sync():
    sync = Completion.create(model=TINY_MODEL, prompt="Hi there", max_new_tokens=8, temperature=0)
    chunks = list(
        Completion.create(model=TINY_MODEL, prompt="Hi there", max_new_tokens=8, temperature=0, stream=True)
    )
    assert all(chunk.error is None for chunk in chunks)
    assert chunks[-1].output.finished and not any(c.output.finished for c in chunks[:-1])
    assert "".join(c.output.text for c in chunks) == sync.output.text
    assert chunks[-1].output.num_completion_tokens == sync.output.num_completion_tokens
    # one event per token, even when the replica sends several tokens in one message
    assert [c.output.num_completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))


async def test_acreate_and_async_stream():
    response = await Completion.acreate(model=TINY_MODEL, prompt="Hello", max_new_tokens=5, temperature=0)
    chunks = [
        chunk
        async for chunk in await Completion.acreate(
            model=TINY_MODEL, prompt="Hello", max_new_tokens=5, temperature=0, stream=True
        )
    ]
    assert "".join(c.output.text for c in chunks) == response.output.text
    assert chunks[-1].output.finished


def test_unknown_model_is_not_found():
    with pytest.raises(NotFoundError):
        Completion.create(model="no-such-model", prompt="Hello", max_new_tokens=2)
    with pytest.raises(NotFoundError):
        list(Completion.create(model="no-such-model", prompt="Hello", max_new_tokens=2, stream=True))


def test_context_too_long_is_bad_request():
    with pytest.raises(BadRequestError):
        Completion.create(model=TINY_MODEL, prompt="Hello", max_new_tokens=TINY_MAX_MODEL_LEN + 1)


def test_model_list_and_get():
    listing = Model.list()
    assert [e.name for e in listing.model_endpoints] == [TINY_MODEL]
    endpoint = Model.get(TINY_MODEL)
    assert endpoint.name == TINY_MODEL and endpoint.status == "READY"


def test_guided_fields_are_honoured():
    choices = ["red", "green", "blue"]
    for temperature in (0, 1):
        response = Completion.create(
            model=TINY_MODEL,
            prompt="Pick a colour",
            max_new_tokens=10,
            temperature=temperature,
            guided_choice=choices,
        )
        assert response.output.text in choices
    dated = Completion.create(
        model=TINY_MODEL, prompt="Date:", max_new_tokens=20, temperature=1, guided_regex=r"\d{4}-\d{2}-\d{2}"
    )
    assert len(dated.output.text) == 10 and dated.output.text[4] == "-"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    as_json = Completion.create(
        model=TINY_MODEL, prompt="JSON:", max_new_tokens=30, temperature=0, guided_json=schema
    )
    assert json.loads(as_json.output.text)["ok"] in (True, False)
    with pytest.raises(BadRequestError):
        Completion.create(
            model=TINY_MODEL, prompt="x", max_new_tokens=5, temperature=0, guided_regex="(unclosed"
        )
