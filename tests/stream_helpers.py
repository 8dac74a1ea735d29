"""Helpers for tests of the serving stream: a clock that tests move by hand (so timing rules are checked
without the wall clock, and the machine's speed cannot change a verdict), a source whose engine steps
the test delivers, and a timer that records what the stream reported."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from engine.types import FinishReason, TokenDelta


class ManualClock:
    """`time()` is what the test set; a `timeout_at(t)` fires once the test moves the clock to `t`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._timeouts: list[tuple[float, asyncio.Timeout]] = []

    def time(self) -> float:
        return self.now

    @contextlib.asynccontextmanager
    async def timeout_at(self, when: float) -> AsyncIterator[None]:
        async with asyncio.timeout(None) as timeout:  # asyncio's own expiry: TimeoutError, nesting
            entry = (when, timeout)
            self._timeouts.append(entry)
            try:
                if when <= self.now:
                    timeout.reschedule(asyncio.get_running_loop().time())
                yield
            finally:
                self._timeouts.remove(entry)

    async def advance_to(self, now: float) -> None:
        """Move the clock, fire the timeouts that are due, and let the woken tasks run."""
        self.now = now
        for when, timeout in list(self._timeouts):
            if when <= now and not timeout.expired():
                timeout.reschedule(asyncio.get_running_loop().time())
        await settle()


async def settle(rounds: int = 10) -> None:
    """Let every ready task run until it waits again (a few loop iterations, no real time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def delta(n: int, *, is_last: bool = False, request_id: str = "r") -> TokenDelta:
    """The n-th token's delta of a request (the last one finishes it with LENGTH)."""
    return TokenDelta(request_id, f"t{n} ", 3, n, None, FinishReason.LENGTH if is_last else None)


class StepSource:
    """A DeltaSource whose engine steps the test delivers by hand (`step`), as the engine's stream does."""

    def __init__(self) -> None:
        self._out: asyncio.Queue[list] = asyncio.Queue()
        self.is_closed = False
        self.num_waits = 0  # calls of next_items: each one waits for a step

    def step(self, *items) -> None:
        self._out.put_nowait(list(items))

    async def next_items(self) -> list:
        self.num_waits += 1
        return await self._out.get()

    def ready_items(self) -> list:
        items: list = []
        while not self._out.empty():
            items.extend(self._out.get_nowait())
        return items

    def close(self) -> None:
        self.is_closed = True


class RecordingTimer:
    """Stands in for deployments.metrics.RequestTimer: records what the stream reported."""

    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []
        self.errors: list[int] = []
        self.ends = 0

    def on_delta(self, d: TokenDelta) -> None:
        self.deltas.append(d)

    def on_error(self, status_code: int) -> None:
        self.errors.append(status_code)

    def on_end(self) -> None:
        self.ends += 1
