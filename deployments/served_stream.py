"""One request's deltas as a model replica serves them: the one object between an engine and the
ingress that owns the request's deadline, its metrics, the coalescing of its deltas into chunks and
its abort (sent from here only, once).

A chunk is one message on the replica-to-ingress stream (one Ray stream item, one HTTP write). Under
load each message costs CPU that the engine's threads need on a small machine (docs/performance.md),
so `ModelConfig.stream_coalesce_ms` spaces one request's messages at least that far apart (scaled by
how full the batch is): a token that arrives later than that goes out at once, earlier ones wait and
share a message, which leaves with the first engine step after the spacing (at a step boundary, with
the other streams of that step, not on a timer in the middle of the next step). The first chunk never
waits (time to first token is unchanged), and a lone stream (one token per step, steps longer than
its interval) never waits at all.

Time comes from a `Clock` (the event loop's by default) so that tests drive it themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from deployments.metrics import RequestTimer
from engine.errors import RequestTimeoutError, ServingError
from engine.types import TokenDelta

Item = TokenDelta | BaseException  # what an engine step hands a request: a delta, or the error ending it


class DeltaSource(Protocol):
    """What an engine's `add_request` returns: one request's items, step by step (the engine's
    `RequestStream`, the vLLM adapter's stream, or a test fake). Waiting on it must be cancel-safe."""

    async def next_items(self) -> list[Item]: ...  # the next step's items, waiting for that step
    def ready_items(self) -> list[Item]: ...  # every item already delivered, without waiting
    def close(self) -> None: ...  # stop listening; never aborts


class Clock(Protocol):
    """Time for the stream's rules: now, and a timeout that fires at a time of the same clock."""

    def time(self) -> float: ...
    def timeout_at(self, when: float) -> contextlib.AbstractAsyncContextManager[object]: ...


class LoopClock:
    """The running event loop's clock (asyncio.timeout_at)."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    def timeout_at(self, when: float) -> asyncio.Timeout:
        return asyncio.timeout_at(when)


def status_code_of(exc: BaseException) -> int:
    return exc.status_code if isinstance(exc, ServingError) else 500


def _is_end(item: Item) -> bool:
    return not isinstance(item, TokenDelta) or item.error is not None or item.is_finished


class ServedStream:
    """Chunks of one request's deltas until its last one; raises the request's error, or
    RequestTimeoutError past its deadline. `aclose` (always call it) aborts an unfinished request."""

    def __init__(
        self,
        source: DeltaSource,
        *,
        abort: Callable[[], None],
        timer: RequestTimer,
        timeout_s: float,
        interval_s: Callable[[], float] = lambda: 0.0,
        clock: Clock | None = None,
    ) -> None:
        self._source, self._abort, self._timer = source, abort, timer
        self._clock = clock or LoopClock()
        self._timeout_s = timeout_s
        self._deadline = self._clock.time() + timeout_s
        self._interval_s = interval_s
        self._pending: deque[Item] = deque()
        self._last_sent_s: float | None = None  # when the previous chunk was handed out
        self.is_finished = False  # its last delta (the one with a finish reason) was handed out
        self._is_ended = self._is_closed = False

    def __aiter__(self) -> AsyncIterator[list[TokenDelta]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[list[TokenDelta]]:
        while chunk := await self.next_chunk():
            yield chunk

    async def next_chunk(self, linger_s: float | None = None) -> list[TokenDelta]:
        """The next chunk (`[]` at the end). `linger_s` overrides the coalescing policy's wait."""
        if self.is_finished or self._is_ended or self._is_closed:
            return []
        if linger_s is None:
            linger_s = self._policy_linger_s()
        try:
            try:
                async with self._clock.timeout_at(self._deadline):
                    await self._collect(linger_s)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the generation took longer than the limit of {self._timeout_s:g} s and was stopped "
                    "(request_timeout_s of the model's config)"
                ) from None
            chunk = self._take_chunk()
        except Exception as exc:  # the request's end: its error, counted once
            self._is_ended = True
            self._timer.on_error(status_code_of(exc))
            raise
        self._last_sent_s = self._clock.time()
        for delta in chunk:
            self._timer.on_delta(delta)
        if chunk and chunk[-1].is_finished:
            self.is_finished = True
        return chunk

    def _policy_linger_s(self) -> float:
        """The first chunk never waits; later ones wait out the rest of the interval since the last."""
        if self._last_sent_s is None:
            return 0.0
        return max(0.0, self._last_sent_s + self._interval_s() - self._clock.time())

    async def _collect(self, linger_s: float) -> None:
        """Gather items: at least one, then (lingering) every step's until the first step that comes
        `linger_s` or more after the start, or the request's end; if no step comes for `linger_s`
        more (it waits for KV blocks, say), what it has goes out then."""
        clock = self._clock
        until = clock.time() + linger_s
        if not self._pending:
            self._pending.extend(await self._source.next_items())
        is_end = not self._pending or any(map(_is_end, self._pending))  # [] only when the source ended
        if clock.time() < until and not is_end:
            with contextlib.suppress(TimeoutError):
                async with clock.timeout_at(until + linger_s):
                    # look at the new items only: a long sync stream stays linear
                    while not is_end and clock.time() < until:
                        items = await self._source.next_items()
                        self._pending.extend(items)
                        is_end = not items or any(map(_is_end, items))
        self._pending.extend(self._source.ready_items())

    def _take_chunk(self) -> list[TokenDelta]:
        """The pending deltas up to the first end; an error comes alone (raised), after the deltas
        before it."""
        chunk: list[TokenDelta] = []
        while self._pending:
            item = self._pending[0]
            error = item.error if isinstance(item, TokenDelta) else item
            if error is not None:
                if chunk:
                    break  # the error comes with the next call
                self._pending.popleft()
                raise error
            chunk.append(self._pending.popleft())
            if item.is_finished:
                break
        if not chunk:
            self._is_ended = True  # the source ended without a last delta
        return chunk

    async def aclose(self) -> None:
        """Idempotent: records the request's end, aborts it in the engine unless it finished, and
        stops listening to the engine."""
        if self._is_closed:
            return
        self._is_closed = True
        if not self.is_finished:
            self._abort()
        self._timer.on_end()
        self._source.close()
