"""The official `openai` client, unchanged, against the real app on the tiny model."""

import json

import httpx
import openai
import pytest

from tests.integration.tiny_app import TINY_MODEL

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def client(tiny_app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_app_url}v1", api_key="x", max_retries=0, timeout=60)


def test_completion_sync_and_stream_agree(client):
    sync = client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert sync.object == "text_completion" and sync.id.startswith("cmpl-") and sync.model == TINY_MODEL
    choice = sync.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert sync.usage.prompt_tokens > 0 and 1 <= sync.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_prompt_is_raw(client):
    """No chat template on /v1/completions: the prompt's tokens are exactly the text's."""
    templated = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=1
    )
    raw = client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=1)
    assert raw.usage.prompt_tokens < templated.usage.prompt_tokens


def test_chat_sync_and_stream_agree(client):
    sync = client.chat.completions.create(model=TINY_MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert sync.object == "chat.completion" and sync.id.startswith("chatcmpl-")
    message = sync.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == sync.choices[0].finish_reason


def test_stream_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=CHAT,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.usage is None for c in chunks[:-1])


def test_log_probs(client):
    completion = client.completions.create(
        model=TINY_MODEL, prompt="Hello", max_tokens=4, logprobs=2, temperature=0
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == completion.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert len(logprobs.top_logprobs) == len(logprobs.tokens)
    for chosen, chosen_lp, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(top) <= 2 and all(lp <= 0 for lp in top.values())
        assert abs(max(top.values()) - chosen_lp) < 1e-4 and chosen in top  # greedy: the best is chosen
    chat = client.chat.completions.create(
        model=TINY_MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        alternatives = [t.logprob for t in token.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert token.logprob <= 0 and abs(alternatives[0] - token.logprob) < 1e-4


def test_stop(client):
    text = client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=12, temperature=0)
    text = text.choices[0].text
    assert len(text) >= 6, text  # the tiny model does not end this early under greedy
    stop = text[4:6]
    stopped = client.completions.create(
        model=TINY_MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    def sample(seed: int) -> str:
        response = client.completions.create(
            model=TINY_MODEL, prompt="Hello", max_tokens=10, temperature=1.5, seed=seed
        )
        return response.choices[0].text

    assert sample(7) == sample(7)


def test_errors(client):
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model=TINY_MODEL, messages=CHAT, max_tokens=2, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "robot", "content": "hi"}], max_tokens=2
        )


def test_models(client):
    assert [m.id for m in client.models.list()] == [TINY_MODEL]


def test_v2_aliases(tiny_app_url: str):
    completion = httpx.post(
        f"{tiny_app_url}v2/completions",
        json={"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 2},
        timeout=60,
    )
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    chat = httpx.post(
        f"{tiny_app_url}v2/chat/completions",
        json={"model": TINY_MODEL, "messages": CHAT, "max_tokens": 2},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_structured_output(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    schema["additionalProperties"] = False
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    chat = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=30,
        temperature=1, seed=3, response_format=response_format,
    )  # fmt: skip
    content = chat.choices[0].message.content
    assert json.loads(content)["answer"] in ("yes", "no"), (content, chat.choices[0].finish_reason)
    extra = {"guided_choice": ["alpha", "beta"]}
    completion = client.completions.create(model=TINY_MODEL, prompt="Pick", max_tokens=10, extra_body=extra)
    assert completion.choices[0].text in ("alpha", "beta")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=TINY_MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(bad"}
        )
