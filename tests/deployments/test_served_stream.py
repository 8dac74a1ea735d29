"""ServedStream: the replica's one stream object (chunks, coalescing interval, deadline, abort, metrics)."""

import asyncio

import pytest

from deployments.served_stream import ServedStream
from engine.errors import RequestFailedError, RequestTimeoutError
from engine.types import FinishReason, TokenDelta


def delta(n: int, is_last: bool = False) -> TokenDelta:
    return TokenDelta("r", f"t{n} ", 3, n, None, FinishReason.LENGTH if is_last else None)


class ScriptedSource:
    """Hands out the scripted chunks (an exception is raised), recording each call's linger."""

    def __init__(self, *chunks, delay_s: float = 0.0) -> None:
        self.chunks, self.delay_s = list(chunks), delay_s
        self.lingers: list[float] = []
        self.is_closed = False

    async def next_chunk(self, linger_s: float = 0.0) -> list[TokenDelta]:
        self.lingers.append(linger_s)
        await asyncio.sleep(self.delay_s)
        if not self.chunks:
            return []
        item = self.chunks.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.is_closed = True


class Timer:
    def __init__(self) -> None:
        self.deltas, self.errors, self.ends = [], [], 0

    def on_delta(self, d):
        self.deltas.append(d)

    def on_error(self, status_code):
        self.errors.append(status_code)

    def on_end(self):
        self.ends += 1


def served(source, timer=None, timeout_s=10.0, interval_s=0.0):
    aborted = []
    stream = ServedStream(
        source,
        abort=lambda: aborted.append(True),
        timer=timer or Timer(),
        timeout_s=timeout_s,
        interval_s=lambda: interval_s,
    )
    return stream, aborted


async def test_the_first_chunk_never_waits_and_later_ones_wait_out_the_interval():
    source = ScriptedSource([delta(1)], [delta(2), delta(3)], [delta(4, is_last=True)])
    stream, aborted = served(source, interval_s=0.2)
    chunks = [c async for c in stream]
    assert [len(c) for c in chunks] == [1, 2, 1]
    assert source.lingers[0] == 0.0
    assert all(0.15 < linger <= 0.2 for linger in source.lingers[1:])  # the rest of 0.2 s since the last
    await stream.aclose()
    assert not aborted and source.is_closed


async def test_a_consumer_slower_than_the_interval_is_never_held_back():
    source = ScriptedSource([delta(1)], [delta(2)], [delta(3, is_last=True)])
    stream, _ = served(source, interval_s=0.05)
    while await stream.next_chunk():
        await asyncio.sleep(0.1)  # the previous chunk went out 0.1 s ago: past its 0.05 s interval
    assert source.lingers == [0.0, 0.0, 0.0]


async def test_closing_early_aborts_and_records_the_end_once():
    timer = Timer()
    stream, aborted = served(ScriptedSource([delta(1)], [delta(2)]), timer=timer)
    assert await stream.next_chunk() == [delta(1)]
    await stream.aclose()
    await stream.aclose()
    assert aborted == [True] and timer.ends == 1 and timer.deltas == [delta(1)]
    assert await stream.next_chunk() == []


async def test_the_deadline_raises_a_timeout_naming_the_setting():
    timer = Timer()
    stream, aborted = served(ScriptedSource([delta(1)], delay_s=5.0), timer=timer, timeout_s=0.1)
    with pytest.raises(RequestTimeoutError, match="request_timeout_s"):
        await stream.next_chunk()
    await stream.aclose()
    assert timer.errors == [504] and aborted == [True]


async def test_an_engine_error_is_counted_with_its_status():
    timer = Timer()
    stream, _ = served(ScriptedSource([delta(1)], RequestFailedError("boom")), timer=timer)
    await stream.next_chunk()
    with pytest.raises(RequestFailedError):
        await stream.next_chunk()
    assert timer.errors == [500]
