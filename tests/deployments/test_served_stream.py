"""ServedStream: the replica's one stream object (chunks, coalescing at step boundaries, deadline, abort,
metrics). Time is a ManualClock and the engine's steps are delivered by hand, so no verdict depends on
the machine's speed."""

import asyncio

import pytest

from deployments.served_stream import ServedStream
from engine.errors import RequestFailedError, RequestTimeoutError
from tests.stream_helpers import ManualClock, RecordingTimer, StepSource, delta, settle


def served(source, *, timer=None, timeout_s=10.0, interval_s=0.0, clock=None):
    aborted = []
    stream = ServedStream(
        source,
        abort=lambda: aborted.append(True),
        timer=timer or RecordingTimer(),
        timeout_s=timeout_s,
        interval_s=lambda: interval_s,
        clock=clock or ManualClock(),
    )
    return stream, aborted


async def start(coro) -> asyncio.Future:
    """Run `coro` until it waits (for a step or the clock), at the clock's present time."""
    future = asyncio.ensure_future(coro)
    await settle()
    return future


def numbers(chunk) -> list[int]:
    return [d.num_completion_tokens for d in chunk]


async def test_the_first_chunk_never_waits_and_later_ones_wait_out_the_interval():
    clock, source = ManualClock(), StepSource()
    stream, aborted = served(source, interval_s=0.2, clock=clock)
    source.step(delta(1))
    first = await start(stream.next_chunk())
    assert first.done() and numbers(first.result()) == [1]  # at t=0, without waiting for more
    pending = await start(stream.next_chunk())
    for n, at in ((2, 0.05), (3, 0.1)):  # within 0.2 s of the first chunk: they wait
        await clock.advance_to(at)
        source.step(delta(n))
        await settle()
        assert not pending.done()
    await clock.advance_to(0.25)
    source.step(delta(4, is_last=True))  # the first step after the interval takes them all out
    await settle()
    assert pending.done() and numbers(pending.result()) == [2, 3, 4]
    assert await stream.next_chunk() == []
    await stream.aclose()
    assert not aborted and source.is_closed


async def test_a_consumer_slower_than_the_interval_is_never_held_back():
    clock, source = ManualClock(), StepSource()
    stream, _ = served(source, interval_s=0.05, clock=clock)
    for n in (1, 2, 3):
        source.step(delta(n, is_last=n == 3))
        chunk = await start(stream.next_chunk())
        assert chunk.done() and numbers(chunk.result()) == [n]  # no wait for another step
        await clock.advance_to(clock.now + 0.1)  # the consumer comes back after the interval


async def test_a_lingering_chunk_leaves_with_the_first_step_after_its_linger_not_on_a_timer():
    clock, source = ManualClock(), StepSource()
    stream, aborted = served(source, clock=clock)
    source.step(delta(1))
    chunk = await start(stream.next_chunk(linger_s=0.15))
    await clock.advance_to(0.1)
    source.step(delta(2))
    await settle()
    await clock.advance_to(0.16)  # the linger ran out between two steps: no message on a timer
    assert not chunk.done()
    await clock.advance_to(0.2)
    source.step(delta(3))  # the first step after the linger ends the chunk
    await settle()
    assert numbers(chunk.result()) == [1, 2, 3]
    # nothing ready: it waits for the next step (at 0.45 s), which is past the linger, so it goes at once
    chunk = await start(stream.next_chunk(linger_s=0.1))
    await clock.advance_to(0.45)
    source.step(delta(4))
    await settle()
    assert numbers(chunk.result()) == [4]
    source.step(delta(5, is_last=True))
    assert numbers(await stream.next_chunk(linger_s=0.1)) == [5]  # the last delta ends a linger at once
    assert await stream.next_chunk() == []
    await stream.aclose()
    assert not aborted


async def test_a_lingering_chunk_goes_out_after_twice_its_linger_when_no_step_comes():
    clock, source = ManualClock(), StepSource()
    stream, _ = served(source, clock=clock)
    source.step(delta(1))  # ready; nothing else comes (the request waits for KV blocks, say)
    chunk = await start(stream.next_chunk(linger_s=0.1))
    await clock.advance_to(0.19)
    assert not chunk.done()
    await clock.advance_to(0.2)
    assert numbers(chunk.result()) == [1]
    source.step(delta(2, is_last=True))
    chunk = await start(stream.next_chunk(linger_s=5.0))  # no time passes: the last delta ends it
    assert numbers(chunk.result()) == [2]
    assert await stream.next_chunk() == []


async def test_an_error_comes_after_the_deltas_before_it_and_ends_a_linger():
    timer, source = RecordingTimer(), StepSource()
    stream, aborted = served(source, timer=timer)
    source.step(delta(1))
    source.step(delta(2), RequestFailedError("boom"))
    chunk = await start(stream.next_chunk(linger_s=1.0))  # no time passes: the error ends the linger
    assert numbers(chunk.result()) == [1, 2]
    with pytest.raises(RequestFailedError, match="boom"):
        await stream.next_chunk()
    assert await stream.next_chunk() == []
    assert timer.errors == [500]
    await stream.aclose()
    assert aborted == [True] and timer.ends == 1  # errors before its end: the abort is sent once


async def test_closing_early_aborts_once_and_records_the_end_once():
    timer, source = RecordingTimer(), StepSource()
    stream, aborted = served(source, timer=timer)
    source.step(delta(1))
    source.step(delta(2))
    assert numbers(await stream.next_chunk()) == [1, 2]
    await stream.aclose()
    await stream.aclose()
    assert aborted == [True] and timer.ends == 1 and numbers(timer.deltas) == [1, 2]
    assert source.is_closed
    assert await stream.next_chunk() == []


async def test_the_deadline_raises_a_timeout_naming_the_setting():
    clock, timer, source = ManualClock(), RecordingTimer(), StepSource()
    stream, aborted = served(source, timer=timer, timeout_s=10.0, clock=clock)
    chunk = await start(stream.next_chunk())
    await clock.advance_to(9.9)
    assert not chunk.done()
    await clock.advance_to(10.0)
    with pytest.raises(RequestTimeoutError, match="request_timeout_s"):
        chunk.result()
    await stream.aclose()
    assert timer.errors == [504] and aborted == [True]
