"""AsyncEngine: concurrency through asyncio, aborts on close, refusals, and surviving a failed step."""

import asyncio

import pytest

from engine.async_engine import RequestStream
from engine.errors import ContextLengthError, OverloadedError, RequestFailedError
from engine.types import FinishReason, TokenDelta
from tests.engine.conftest import make_async_engine, request, text_of


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


async def test_chunks_carry_the_same_deltas_as_single_iteration(engine, tiny):
    _, tokenizer = tiny
    alone = await collect(engine.add_request(request(tokenizer, "Count:", "one", max_new_tokens=12)))
    stream = engine.add_request(request(tokenizer, "Count:", "chunked", max_new_tokens=12))
    chunks = []
    while chunk := await stream.next_chunk(linger_s=0.05):
        chunks.append(chunk)
    deltas = [d for c in chunks for d in c]
    assert [(d.text, d.num_completion_tokens) for d in deltas] == [
        (d.text, d.num_completion_tokens) for d in alone
    ]
    assert deltas[-1].is_finished and all(not d.is_finished for d in deltas[:-1])
    assert len(chunks) < len(deltas)  # lingering 50 ms put several steps' tokens in one chunk
    assert await stream.next_chunk() == []
    assert not engine._streams


class _Steps:
    """Stands in for the engine behind one RequestStream: the test delivers each 'step' by hand."""

    def __init__(self) -> None:
        self.out: asyncio.Queue = asyncio.Queue()
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _forget(self, request_id: str) -> None:
        pass

    def step(self, n: int, *, last: bool = False) -> None:
        self.out.put_nowait(
            [TokenDelta("r", str(n), 3, n, finish_reason=FinishReason.LENGTH if last else None)]
        )


async def test_a_lingering_chunk_leaves_with_the_first_step_after_its_linger_not_on_a_timer():
    steps = _Steps()
    stream = RequestStream(steps, "r", steps.out)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()

    async def deliver(at_s: list[float]) -> None:
        start = loop.time()
        for n, at in enumerate(at_s, 1):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            steps.step(n, last=n == len(at_s))

    feeder = asyncio.create_task(deliver([0.0, 0.1, 0.2, 0.45, 0.5]))
    start = loop.time()
    chunk = await stream.next_chunk(linger_s=0.15)
    # the step at 0.1 s came before the linger ran out, the one at 0.2 s after: it ends the chunk
    assert [d.num_completion_tokens for d in chunk] == [1, 2, 3]
    assert loop.time() - start >= 0.19
    # nothing ready: it waits for the next step (at 0.45 s), which is past the linger, so it goes at once
    assert [d.num_completion_tokens for d in await stream.next_chunk(linger_s=0.1)] == [4]
    assert [d.num_completion_tokens for d in await stream.next_chunk(linger_s=0.1)] == [5]  # the last
    assert await stream.next_chunk() == []
    await feeder
    assert not steps.aborted


async def test_a_lingering_chunk_goes_out_after_twice_its_linger_when_no_step_comes():
    steps = _Steps()
    stream = RequestStream(steps, "r", steps.out)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    steps.step(1)
    start = loop.time()
    chunk = await stream.next_chunk(linger_s=0.1)  # step 1 is ready; nothing else comes
    assert [d.num_completion_tokens for d in chunk] == [1]
    assert 0.19 <= loop.time() - start < 0.5
    steps.step(2, last=True)  # the last delta ends a linger at once
    start = loop.time()
    assert [d.num_completion_tokens for d in await stream.next_chunk(linger_s=5.0)] == [2]
    assert loop.time() - start < 0.1
    assert await stream.next_chunk() == []
    assert not steps.aborted


async def test_a_chunk_without_linger_is_what_is_ready_and_never_waits_for_more(engine, tiny):
    _, tokenizer = tiny
    stream = engine.add_request(request(tokenizer, "Hello", max_new_tokens=50, ignore_eos=True))
    first = await stream.next_chunk()
    # Whatever was ready when the loop woke: usually one token, more on a loaded machine.
    assert [d.num_completion_tokens for d in first] == list(range(1, 1 + len(first)))
    await asyncio.sleep(0.3)  # several steps pile up meanwhile
    piled = await stream.next_chunk()
    assert len(piled) > 1
    start = 1 + len(first)
    assert [d.num_completion_tokens for d in piled] == list(range(start, start + len(piled)))
    await stream.aclose()


async def test_an_error_comes_after_the_deltas_before_it(engine, tiny):
    _, tokenizer = tiny
    stream = engine.add_request(request(tokenizer, "Hello", max_new_tokens=200, ignore_eos=True))
    await stream.next_chunk()
    await asyncio.sleep(0.05)
    engine._send_out({stream.request_id: [RequestFailedError("boom")]})  # as a failed step delivers it
    await asyncio.sleep(0.05)
    chunk = await stream.next_chunk(linger_s=1.0)  # the error ends the wait at once
    assert chunk and not chunk[-1].is_finished
    with pytest.raises(RequestFailedError, match="boom"):
        await stream.next_chunk()
    assert await stream.next_chunk() == []
