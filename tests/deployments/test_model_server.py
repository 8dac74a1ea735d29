"""ModelServer without Ray: tokenization, aggregation, and aborting the engine when the caller leaves."""

import asyncio

import pytest

from deployments.config import ModelConfig
from deployments.model_server import ModelRequest, ModelServer
from engine.errors import ContextLengthError
from engine.types import FinishReason, SamplingParams
from tests.deployments.fake_engine import MAX_MODEL_LEN, fake_factory


@pytest.fixture
def server() -> ModelServer:
    return ModelServer(ModelConfig(name="fake", model="fake"), engine_factory=fake_factory)


def request(prompt: str = "hi", **params) -> ModelRequest:
    return ModelRequest("r1", prompt, SamplingParams(**{"max_new_tokens": 3, **params}))


def test_encode_raw_and_chat_template(server):
    assert server.encode("hi") == list(b"hi")
    chat = ModelServer(ModelConfig(name="c", model="c", use_chat_template=True), engine_factory=fake_factory)
    assert chat.encode("hi") == list(b"<user>hi<assistant>")


async def test_generate_aggregates_deltas(server):
    result = await server.generate(request(return_log_probs=True))
    assert server._engine.aborted == []  # a finished request is not aborted
    assert (result.text, result.num_prompt_tokens, result.num_completion_tokens) == ("w0 w1 w2 ", 2, 3)
    assert [t.text for t in result.tokens] == ["w0 ", "w1 ", "w2 "]
    assert result.finish_reason == FinishReason.LENGTH
    assert (await server.generate(request())).tokens is None


async def test_context_length_is_checked_before_queueing(server):
    with pytest.raises(ContextLengthError):
        await server.generate(request("x" * MAX_MODEL_LEN))
    with pytest.raises(ContextLengthError):
        await anext(server.generate_stream(request("x" * MAX_MODEL_LEN)))


async def test_closing_the_stream_aborts(server):
    stream = server.generate_stream(request("[slow]", max_new_tokens=50))
    assert (await anext(stream)).num_completion_tokens == 1
    await stream.aclose()
    assert server._engine.aborted == ["r1"]
    assert (await server.stats()).num_running == 0


async def test_cancelling_generate_aborts(server):
    task = asyncio.create_task(server.generate(request("[slow]", max_new_tokens=50)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server._engine.aborted == ["r1"]
    assert (await server.stats()).num_running == 0
