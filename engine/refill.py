"""When to hold the next step for the requests that replace the ones that just finished.

A closed-loop client (a chat's next turn, an agent's next call, a benchmark's next request) sends its
next request when the last one ends. In the engine's own process that request is queued before the
next step starts; from a remote client it comes later (HTTP and Serve's hops, measured at the engine:
1-7 ms on an idle Ice Lake, 10-57 ms on a busy 2-core Zen 3; docs/performance.md), after the next step
started, and waits all of that step out before its prefill. At c=16 that moved TTFT p50 from ~380 to
~530 ms with a 5 ms round trip.

So after a step that finished requests, with others still running and nobody waiting but those
replacements, the engine may wait up to `window_s` for as many new requests as finished, and steps as
soon as they are all in (the first ones to come wait beside the rest rather than end the hold). It holds
only while recent finishes were followed by a new request within the window (a closed loop): with open
arrivals or at the end of a burst nobody comes, the history says so, and steps go on at once. What a
hold costs is the wait itself, on the running streams' next token.

Off unless a model's config sets `refill_wait_ms` (the served SmolLM2 config sets 80 ms): with clients
30 ms away it halved the engine's TTFT p50 at c=16 at the same throughput (docs/engine.md).

Times are passed in (no clock is read here), so tests drive the policy directly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

HISTORY = 8  # finishing steps remembered
MIN_HITS = 4  # of the last HISTORY finishing steps, followed by an arrival within the window, to hold


@dataclass(slots=True)
class RefillPolicy:
    window_s: float  # 0: never hold
    history: deque[bool] = field(default_factory=lambda: deque(maxlen=HISTORY))
    _finish_s: float | None = None  # end of the last step that finished requests, while its window is open
    _expected: int = 0  # requests that step finished
    _sent: list[float] = field(default_factory=list)  # when the requests that arrived since were sent

    def on_arrival(self, sent_s: float) -> None:
        """A request sent (queued by its caller) at `sent_s` reached the engine thread."""
        self._sent.append(sent_s)

    def on_step(self, end_s: float, num_finished: int) -> None:
        """The step that ended at `end_s` finished `num_finished` requests. The open window is settled
        once a request was sent within it (a hit), once it is over, or when this step opens the next."""
        if self._finish_s is not None:
            until = self._finish_s + self.window_s
            is_hit = any(self._finish_s <= sent_s <= until for sent_s in self._sent)
            if is_hit or end_s > until or num_finished:
                self.history.append(is_hit)
                self._finish_s = None
        if num_finished and self.window_s > 0:
            self._finish_s, self._expected = end_s, num_finished
            # requests sent after this step ended (already here) count as its refills
            self._sent = [sent_s for sent_s in self._sent if sent_s >= end_s]
        elif self._finish_s is None:
            self._sent.clear()

    def hold_until(self, *, num_running: int, num_waiting: int) -> float | None:
        """The time until which the next step should wait for arrivals, or None to step now.
        `num_running`, `num_waiting`: the engine's requests running and waiting. Holding pays only while
        others run and every waiting request is one of the refills (a request waiting from before, say
        for KV space, is better served by the next step at once)."""
        if not num_running or num_waiting > len(self._sent):
            return None
        if self._finish_s is None or len(self._sent) >= self._expected:
            return None
        if sum(self.history) < MIN_HITS:
            return None  # not a closed loop lately
        return self._finish_s + self.window_s
