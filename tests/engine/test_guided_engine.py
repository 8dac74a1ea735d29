"""Guided decoding through the engine: compiled off the engine thread, masks per request in a batch."""

import asyncio
import json
import threading

import jsonschema
import pytest

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError, ServingError
from engine.guided_spec import GuidedSpec
from engine.types import EngineConfig, FinishReason
from tests.engine.conftest import request, text_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"enum": ["small", "large"]},
        "tags": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2},
    },
    "required": ["name", "size", "tags"],
    "additionalProperties": False,
}


@pytest.fixture
def engine(tiny):
    model, tokenizer = tiny
    eng = AsyncEngine(
        model, tokenizer, EngineConfig(max_model_len=256, kv_cache_bytes=8 * 2**20, num_threads=1)
    )
    yield eng
    eng.shutdown()


async def run(engine, tokenizer, prompt, request_id, **params):
    return [d async for d in engine.add_request(request(tokenizer, prompt, request_id, **params))]


async def test_guided_and_free_requests_share_a_batch(engine, tiny):
    _, tokenizer = tiny
    choices = ["apple pie", "banana split", "cherry tart"]
    free_alone = text_of(
        await run(engine, tokenizer, "Hello, world!", "alone", max_new_tokens=12, ignore_eos=True)
    )
    results = await asyncio.gather(
        run(
            engine,
            tokenizer,
            "The quick brown fox",
            "choice",
            max_new_tokens=20,
            guided=GuidedSpec.choice(choices),
        ),
        run(
            engine,
            tokenizer,
            "Numbers: 0 1 2",
            "json",
            max_new_tokens=80,
            guided=GuidedSpec.json_schema(SCHEMA),
        ),
        run(
            engine,
            tokenizer,
            "Once upon a time",
            "date",
            max_new_tokens=20,
            guided=GuidedSpec.regex(r"\d{4}-\d{2}-\d{2}"),
        ),
        run(engine, tokenizer, "Hello, world!", "free", max_new_tokens=12, ignore_eos=True),
    )
    choice, as_json, date, free = results
    assert text_of(choice) in choices and choice[-1].finish_reason is FinishReason.STOP
    assert as_json[-1].finish_reason is FinishReason.STOP, text_of(as_json)
    jsonschema.validate(json.loads(text_of(as_json)), SCHEMA)
    assert len(text_of(date)) == 10 and text_of(date)[4] == "-"
    assert text_of(free) == free_alone  # the unguided row in the same batch is untouched


async def test_bad_constraints_and_combinations_are_refused(engine, tiny):
    _, tokenizer = tiny
    with pytest.raises(InvalidRequestError, match="guided_regex"):
        await run(engine, tokenizer, "Hi", "bad", max_new_tokens=5, guided=GuidedSpec.regex("(unclosed"))
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        await run(
            engine, tokenizer, "Hi", "eos", max_new_tokens=5, ignore_eos=True, guided=GuidedSpec.regex("a+")
        )
    ok = await run(engine, tokenizer, "Hi", "after", max_new_tokens=3)
    assert ok[-1].is_finished


async def test_length_can_cut_a_structure_short(engine, tiny):
    _, tokenizer = tiny
    deltas = await run(
        engine, tokenizer, "Hi", "short", max_new_tokens=3, guided=GuidedSpec.json_schema(SCHEMA)
    )
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert text_of(deltas).startswith("{")


async def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_the_compiler_is_built_at_start_not_on_the_first_request(engine):
    await wait_until(lambda: engine._compiler is not None)  # no guided request was sent


async def test_a_failing_compiler_ends_the_request_with_an_error(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer not supported")

    monkeypatch.setattr("engine.async_engine.GuidedCompiler", broken)
    model, tokenizer = tiny
    eng = AsyncEngine(model, tokenizer, EngineConfig(max_model_len=256, kv_cache_bytes=8 * 2**20))
    try:
        stream = eng.add_request(request(tokenizer, "hi", "g", guided=GuidedSpec.choice(["a", "b"])))
        with pytest.raises(ServingError, match="tokenizer not supported") as caught:
            await asyncio.wait_for(anext(stream), 30)
        assert caught.value.status_code == 500
        assert [d.text async for d in eng.add_request(request(tokenizer, "hi", "free"))]  # still serves
    finally:
        eng.shutdown()


async def test_compiles_past_their_limit_are_400_and_a_pool_they_fill_answers_503(tiny, monkeypatch):
    """Two constraints whose compiles never end (until released) each get their 400 at the limit and
    keep their worker; the next guided request is refused at once with 503 naming why, not queued
    behind them and blamed with a 400; once they end, guided requests are served again."""
    model, tokenizer = tiny
    config = EngineConfig(max_model_len=256, kv_cache_bytes=8 * 2**20, guided_compile_timeout_s=0.05)
    eng = AsyncEngine(model, tokenizer, config)
    release = threading.Event()
    real_compile = eng._compile

    def compile_blocking_on_slow_regexes(spec):
        if spec.value.startswith("slow"):
            release.wait()  # a compile that runs on until the test lets it end
        return real_compile(spec)

    monkeypatch.setattr(eng, "_compile", compile_blocking_on_slow_regexes)
    eng._guides._compile = compile_blocking_on_slow_regexes
    try:
        await wait_until(lambda: eng._compiler is not None)
        for i in range(2):
            slow = request(tokenizer, "hi", f"slow{i}", guided=GuidedSpec.regex(f"slow{i}[a-z]+"))
            with pytest.raises(InvalidRequestError, match=r"took over 0\.05 s"):
                await asyncio.wait_for(anext(eng.add_request(slow)), 30)
        refused = request(tokenizer, "hi", "refused", guided=GuidedSpec.choice(["a", "b"]))
        with pytest.raises(ServingError, match="compile workers are busy") as caught:
            await asyncio.wait_for(anext(eng.add_request(refused)), 30)
        assert caught.value.status_code == 503
        release.set()
        await wait_until(lambda: eng._guides.num_abandoned == 0)
        eng._guides._timeout_s = 30.0  # the served request below is not a race against the clock
        served = request(tokenizer, "hi", "served", max_new_tokens=4, guided=GuidedSpec.choice(["ab", "cd"]))
        assert text_of([d async for d in eng.add_request(served)]) in ("ab", "cd")
    finally:
        release.set()
        eng.shutdown()
