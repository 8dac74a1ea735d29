"""One request's deltas as a model replica serves them: the one object that owns the request's
deadline, its metrics and its abort, and hands its deltas out in chunks.

A chunk is one message on the replica-to-ingress stream (one Ray stream item, one HTTP write). Under
load each message costs CPU that the engine's threads need on a small machine (docs/performance.md),
so `ModelConfig.stream_coalesce_ms` spaces one request's messages at least that far apart (scaled by
how full the batch is): a token that arrives later than that goes out at once, earlier ones wait and
share a message, which leaves with the first engine step after the spacing (at a step boundary, with
the other streams of that step, not on a timer in the middle of the next step). The first chunk never
waits (time to first token is unchanged), and a lone stream (one token per step, steps longer than
its interval) never waits at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from deployments.metrics import RequestTimer
from engine.errors import RequestTimeoutError, ServingError
from engine.types import TokenDelta


class DeltaSource(Protocol):
    """What an engine's `add_request` returns (engine.async_engine.RequestStream or a test fake)."""

    async def next_chunk(self, linger_s: float = 0.0) -> list[TokenDelta]: ...
    async def aclose(self) -> None: ...


def status_code_of(exc: BaseException) -> int:
    return exc.status_code if isinstance(exc, ServingError) else 500


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
    ) -> None:
        self._source, self._abort, self._timer = source, abort, timer
        self._timeout_s = timeout_s
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._interval_s = interval_s
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
        loop = asyncio.get_running_loop()
        if linger_s is None:
            is_first = self._last_sent_s is None
            linger_s = 0.0 if is_first else max(0.0, self._last_sent_s + self._interval_s() - loop.time())
        try:
            async with asyncio.timeout_at(self._deadline):
                chunk = await self._source.next_chunk(linger_s)
        except TimeoutError:
            error = RequestTimeoutError(
                f"the generation took longer than the limit of {self._timeout_s:g} s and was stopped "
                "(request_timeout_s of the model's config)"
            )
            self._timer.on_error(error.status_code)
            raise error from None
        except Exception as exc:
            self._timer.on_error(status_code_of(exc))
            raise
        self._last_sent_s = loop.time()
        for delta in chunk:
            self._timer.on_delta(delta)
        if chunk and chunk[-1].is_finished:
            self.is_finished = True
        elif not chunk:
            self._is_ended = True
        return chunk

    async def aclose(self) -> None:
        """Idempotent: records the request's end and aborts it in the engine unless it finished."""
        if self._is_closed:
            return
        self._is_closed = True
        if not self.is_finished:
            self._abort()
        self._timer.on_end()
        with contextlib.suppress(RuntimeError):  # "already running": closed from elsewhere
            await self._source.aclose()
