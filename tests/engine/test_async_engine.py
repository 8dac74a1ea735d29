"""AsyncEngine: concurrency through asyncio, aborts on close, refusals, and surviving a failed step."""

import asyncio

import pytest

from deployments.served_stream import ServedStream
from engine.errors import ContextLengthError, OverloadedError, RequestFailedError
from engine.types import FinishReason
from tests.engine.conftest import gated_steps, make_async_engine, request, text_of
from tests.stream_helpers import ManualClock, RecordingTimer


@pytest.fixture
def engine(tiny):
    eng = make_async_engine(tiny, max_waiting=4)
    yield eng
    eng.shutdown()


async def collect(stream):
    return [d async for d in stream]


async def wait_until(condition, timeout_s: float = 10.0):
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_concurrent_requests_each_get_their_own_stream(engine, tiny):
    _, tokenizer = tiny
    prompts = ["The quick brown fox", "Hello, world!", "def add(a, b):", "Numbers: 0 1 2"]
    streams = [engine.add_request(request(tokenizer, p, max_new_tokens=10, ignore_eos=True)) for p in prompts]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for p, deltas in zip(prompts, results, strict=True):
        assert {d.request_id for d in deltas} == {p}
        assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].num_completion_tokens == 10
    # a second run of one prompt alone gives the same text (greedy, float32)
    again = await collect(
        engine.add_request(request(tokenizer, prompts[0], "again", max_new_tokens=10, ignore_eos=True))
    )
    assert text_of(again) == text_of(results[0])


async def test_closing_the_stream_aborts_and_frees_the_slot(engine, tiny):
    _, tokenizer = tiny
    free = engine.core.scheduler.allocator.num_free
    stream = engine.add_request(request(tokenizer, "Once upon a time", max_new_tokens=200, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    await wait_until(lambda: engine.stats().num_running == 0)
    assert engine.core.scheduler.allocator.num_free == free
    assert not engine._streams


async def test_refusals_raise_before_iteration(engine, tiny):
    _, tokenizer = tiny
    with pytest.raises(ContextLengthError):
        engine.add_request(request(tokenizer, "Hello", max_new_tokens=1000))
    streams = [
        engine.add_request(request(tokenizer, "Hello", f"r{i}", max_new_tokens=100, ignore_eos=True))
        for i in range(8)
    ]
    with pytest.raises(OverloadedError, match="overloaded"):
        engine.add_request(request(tokenizer, "Hello", "one-too-many", max_new_tokens=5))
    for s in streams:
        await s.aclose()
    await wait_until(lambda: not engine._streams)
    # capacity is back
    assert len(await collect(engine.add_request(request(tokenizer, "Hello", "after", max_new_tokens=3)))) >= 1


async def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(engine, tiny, monkeypatch):
    _, tokenizer = tiny
    real_step = engine.core.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(engine.core, "step", flaky_step)
    with pytest.raises(RequestFailedError, match="simulated kernel failure"):
        await collect(
            engine.add_request(request(tokenizer, "Hello", "doomed", max_new_tokens=20, ignore_eos=True))
        )
    ok = await collect(
        engine.add_request(request(tokenizer, "Hello", "fine", max_new_tokens=5, ignore_eos=True))
    )
    assert ok[-1].num_completion_tokens == 5
    assert engine.stats().num_running == 0


def served(engine, stream, clock=None) -> ServedStream:
    """The serving stream over the engine's stream, on a clock that moves only when the test says."""
    return ServedStream(
        stream,
        abort=lambda: engine.abort(stream.request_id),
        timer=RecordingTimer(),
        timeout_s=60.0,
        clock=clock or ManualClock(),
    )


async def test_chunks_carry_the_same_deltas_as_single_iteration(engine, tiny):
    _, tokenizer = tiny
    alone = await collect(engine.add_request(request(tokenizer, "Count:", "one", max_new_tokens=12)))
    stream = served(engine, engine.add_request(request(tokenizer, "Count:", "chunked", max_new_tokens=12)))
    chunks = []
    while chunk := await stream.next_chunk(linger_s=0.05):  # the clock stands still: never past it
        chunks.append(chunk)
    deltas = [d for c in chunks for d in c]
    assert [(d.text, d.num_completion_tokens) for d in deltas] == [
        (d.text, d.num_completion_tokens) for d in alone
    ]
    assert deltas[-1].is_finished and all(not d.is_finished for d in deltas[:-1])
    assert len(chunks) == 1 < len(deltas)  # lingering put every step's tokens in one chunk
    assert await stream.next_chunk() == []
    await stream.aclose()
    assert not engine._streams


async def test_a_chunk_without_linger_is_what_is_ready_and_never_waits_for_more(engine, tiny):
    """The engine steps only when the test lets it: the first chunk is the one token ready, and after
    three more steps the next chunk is those three, not more."""
    _, tokenizer = tiny
    with gated_steps(engine) as gate:
        source = engine.add_request(request(tokenizer, "Hello", max_new_tokens=50, ignore_eos=True))
        stream = served(engine, source)
        gate.release()  # the prefill: token 1
        first = await asyncio.wait_for(stream.next_chunk(), 30)  # a chunk that waited for more: never
        assert [d.num_completion_tokens for d in first] == [1]
        gate.release(3)
        await wait_until(lambda: source._out.qsize() >= 3)  # three more steps delivered meanwhile
        piled = await asyncio.wait_for(stream.next_chunk(), 30)
        assert [d.num_completion_tokens for d in piled] == [2, 3, 4]
    await stream.aclose()
    await wait_until(lambda: engine.stats().num_running == 0)  # the one abort freed its slot
    assert not engine._streams


async def test_an_error_comes_after_the_deltas_before_it(engine, tiny):
    _, tokenizer = tiny
    with gated_steps(engine) as gate:  # two steps: the request is still running when the error comes
        source = engine.add_request(request(tokenizer, "Hello", max_new_tokens=200, ignore_eos=True))
        stream = served(engine, source)
        gate.release()
        await stream.next_chunk()
        gate.release()
        await wait_until(lambda: source._out.qsize() >= 1)
        engine._send_out({source.request_id: [RequestFailedError("boom")]})  # as a failed step delivers it
    await wait_until(lambda: any(isinstance(i, Exception) for items in source._out._queue for i in items))
    async with asyncio.timeout(30):  # the clock stands still: only the error can end this linger
        chunk = await stream.next_chunk(linger_s=1.0)
    assert chunk and not chunk[-1].is_finished
    with pytest.raises(RequestFailedError, match="boom"):
        await stream.next_chunk()
    assert await stream.next_chunk() == []
    await stream.aclose()
