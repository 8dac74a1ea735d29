"""ModelServer without Ray: tokenization, aggregation, and aborting the engine when the caller leaves."""

import asyncio
import os

import jinja2
import pytest

from deployments.config import ModelConfig
from deployments.model_server import ModelServer, ServingModel
from deployments.wire import ChatMessage, ModelRequest
from engine.errors import ContextLengthError, InvalidRequestError
from engine.types import FinishReason, SamplingParams
from tests.deployments.fake_engine import MAX_MODEL_LEN, FakeEngine, FakeTokenizer, fake_factory


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
    assert [d.num_completion_tokens for d in await anext(stream)] == [1]
    await stream.aclose()
    assert server._engine.aborted == ["r1"]
    assert (await server.stats()).num_running == 0


async def test_cancelling_generate_aborts(server):
    task = asyncio.create_task(server.generate(request("[slow]", max_new_tokens=50)))
    async with asyncio.timeout(10):  # wait until the engine is generating it
        while (await server.stats()).num_running == 0:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server._engine.aborted == ["r1"]
    assert (await server.stats()).num_running == 0


CONVERSATION = (ChatMessage("system", "s"), ChatMessage("user", "hi"))


async def test_chat_and_raw_prompts():
    chat = ModelServer(ModelConfig(name="c", model="c", use_chat_template=True), engine_factory=fake_factory)
    assert chat.encode("hi", is_raw=True) == list(b"hi")  # OpenAI /v1/completions: never templated
    assert chat.encode_chat(CONVERSATION) == list(b"<system>s<user>hi<assistant>")
    result = await chat.generate(ModelRequest("r1", CONVERSATION, SamplingParams(max_new_tokens=2)))
    assert result.num_prompt_tokens == len("<system>s<user>hi<assistant>")
    raw = await chat.generate(ModelRequest("r2", "hi", SamplingParams(max_new_tokens=2), is_raw_prompt=True))
    assert raw.num_prompt_tokens == 2


class NoTemplateTokenizer(FakeTokenizer):
    chat_template = None


async def test_chat_without_template_is_400():
    serving = ServingModel(engine=FakeEngine(), tokenizer=NoTemplateTokenizer(), use_chat_template=False)
    server = ModelServer(ModelConfig(name="base", model="base"), engine_factory=lambda _config: serving)
    with pytest.raises(InvalidRequestError, match="model base has no chat template; use /v1/completions"):
        await server.generate(ModelRequest("r1", CONVERSATION, SamplingParams()))


async def test_max_tokens_auto_fills_the_context(server):
    request = ModelRequest("r1", "hi", SamplingParams(max_new_tokens=1), is_max_tokens_auto=True)
    assert (await server.generate(request)).num_completion_tokens == MAX_MODEL_LEN - 2
    too_long = ModelRequest("r2", "x" * MAX_MODEL_LEN, SamplingParams(), is_max_tokens_auto=True)
    with pytest.raises(ContextLengthError):
        await server.generate(too_long)


class RefusingTemplateTokenizer(FakeTokenizer):
    """A chat template that raises, as Gemma's does for a system turn (`raise_exception`)."""

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> dict:
        if any(m["role"] == "system" for m in messages):
            raise jinja2.TemplateError("System role not supported")
        return super().apply_chat_template(messages, add_generation_prompt, tokenize)


def test_a_template_error_is_a_400_naming_the_reason():
    serving = fake_factory(ModelConfig(name="g", model="g"))
    serving.tokenizer = RefusingTemplateTokenizer()
    server = ModelServer(ModelConfig(name="g", model="g"), engine_factory=lambda _: serving)
    with pytest.raises(
        InvalidRequestError, match=r"chat template of model g refused.*System role not supported"
    ):
        server.encode_chat([ChatMessage("system", "be brief"), ChatMessage("user", "hi")])
    assert server.encode_chat([ChatMessage("user", "hi")])  # the same server goes on


@pytest.mark.parametrize("is_raw", [True, False])
def test_lone_surrogates_are_a_400_naming_the_field(server, is_raw: bool):
    chat = ModelServer(ModelConfig(name="c", model="c", use_chat_template=True), engine_factory=fake_factory)
    for target in (server, chat):
        with pytest.raises(InvalidRequestError, match="prompt: is not valid Unicode"):
            target.encode("\ud800 hi", is_raw=is_raw)
    with pytest.raises(InvalidRequestError, match=r"messages\.1\.content: is not valid Unicode"):
        chat.encode_chat([ChatMessage("user", "ok"), ChatMessage("user", "x\udfff")])


async def test_the_replica_reports_its_pid(server):
    assert await server.pid() == os.getpid()


async def test_a_dead_engine_is_not_ready_and_fails_the_health_check(server, monkeypatch):
    from deployments.health import UNAVAILABLE, model_state, readiness
    from engine.errors import EngineDeadError

    assert await server.ready() is True
    dead = EngineDeadError("the model's engine has stopped (a test); the replica is being replaced")

    def check_health() -> None:
        raise dead

    monkeypatch.setattr(server._engine, "check_health", check_health)
    for probe in (server.ready, server.check_health):
        with pytest.raises(EngineDeadError):
            await probe()
    try:
        await server.ready()
    except EngineDeadError as exc:
        state = model_state(exc)
    assert state == UNAVAILABLE and readiness({"fake": state})[0] == 503
