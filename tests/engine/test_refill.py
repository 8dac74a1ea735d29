"""The refill hold (engine/refill.py): after a step that finished requests, the next step waits for their
closed-loop replacements, only while recent finishes were followed by new requests within the window."""

import asyncio
import contextlib
import threading

from engine.refill import HISTORY, MIN_HITS, RefillPolicy
from tests.engine.conftest import make_async_engine, request

WINDOW_S = 0.04
RUNNING = {"num_running": 4, "num_waiting": 0}  # others running, nobody waiting


def closed_loop(policy: RefillPolicy, steps: int, start_s: float = 0.0) -> float:
    """`steps` finishing steps 0.1 s apart, each followed 5 ms later by one replacement; returns the time."""
    now = start_s
    for _ in range(steps):
        now += 0.1
        policy.on_step(now, 1)
        policy.on_arrival(now + 0.005)
    return now


def test_no_hold_before_the_history_shows_a_closed_loop():
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, MIN_HITS - 1)
    policy.on_step(now + 0.1, 1)  # closes the last window: MIN_HITS - 1 hits so far
    assert policy.hold_until(**RUNNING) is None
    policy.on_arrival(now + 0.105)
    policy.on_step(now + 0.2, 1)  # MIN_HITS hits: now it holds, until the window's end
    assert policy.hold_until(**RUNNING) == now + 0.2 + WINDOW_S


def test_the_hold_ends_when_as_many_arrived_as_finished():
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, HISTORY) + 0.1
    policy.on_step(now, 2)
    assert policy.hold_until(**RUNNING) == now + WINDOW_S
    policy.on_arrival(now + 0.002)
    assert policy.hold_until(**RUNNING) == now + WINDOW_S  # one of two
    policy.on_arrival(now + 0.004)
    assert policy.hold_until(**RUNNING) is None


def test_requests_sent_after_the_step_ended_and_already_here_count():
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, HISTORY) + 0.1
    policy.on_arrival(now - 0.01)  # sent during the step: not a refill of its finishes
    policy.on_arrival(now + 0.001)  # sent after it ended, drained before the step was closed
    policy.on_step(now, 1)
    assert policy.hold_until(**RUNNING) is None


def test_no_hold_when_nothing_else_runs_or_requests_wait():
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, HISTORY) + 0.1
    policy.on_step(now, 1)
    assert policy.hold_until(num_running=0, num_waiting=0) is None
    assert policy.hold_until(num_running=3, num_waiting=1) is None  # one waiting from before the finish
    assert policy.hold_until(**RUNNING) is not None


def test_the_refills_already_waiting_do_not_end_the_hold():
    """Three finished: the first two replacements are in (waiting for the next step), the hold goes on
    for the third; a request waiting besides them ends it."""
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, HISTORY) + 0.1
    policy.on_step(now, 3)
    policy.on_arrival(now + 0.002)
    policy.on_arrival(now + 0.004)
    assert policy.hold_until(num_running=5, num_waiting=2) == now + WINDOW_S
    assert policy.hold_until(num_running=5, num_waiting=3) is None


def test_late_or_missing_replacements_turn_the_hold_off():
    policy = RefillPolicy(WINDOW_S)
    now = closed_loop(policy, HISTORY)
    for _ in range(HISTORY - MIN_HITS + 1):  # open arrivals: the next request comes 0.5 s later
        now += 0.1
        policy.on_step(now, 1)
        policy.on_arrival(now + 0.5)
    policy.on_step(now + 0.1, 1)
    assert sum(policy.history) == MIN_HITS - 1
    assert policy.hold_until(**RUNNING) is None


def test_a_zero_window_never_holds():
    policy = RefillPolicy(0.0)
    now = closed_loop(policy, HISTORY) + 0.1
    policy.on_step(now, 1)
    assert policy.hold_until(**RUNNING) is None


NUM_ROUNDS = MIN_HITS + 4  # the first MIN_HITS finishes build the history


async def closed_loop_steps(tiny, gaps_s: dict[str, float], lockstep: bool = False):
    """Closed-loop clients (name -> the wait between a request's end and its next) sending NUM_ROUNDS
    short requests each ("name-i") beside a long one, on an engine whose refill window is 5 s (so the
    machine's speed does not matter). With `lockstep`, each step first waits (up to 30 s) until every
    client whose request the last step finished has sent its next one: a replacement that the engine
    does not hold for then joins the step after next, whatever the machine's speed. The clients' first
    requests then wait for the engine's first step (the long request's) and join the next one together:
    sent one after the other from the event loop, the engine thread could otherwise take the first
    alone (seen once under load, in the full profile). Returns the index of each request's first and
    of its last step, and the engine's total hold time."""
    _, tokenizer = tiny
    engine = make_async_engine(tiny, max_model_len=1024, refill_wait_ms=5000)
    steps: list[list] = []  # each engine step's deltas
    # clients whose request the last step finished, until they send the next (every client, at first)
    owed: set[str] = set(gaps_s) if lockstep else set()
    sent = threading.Condition()
    in_step = threading.Event()  # the engine thread is in a step, waiting for the clients (lockstep)
    real_step = engine.core.step

    def recorded_step():
        if lockstep:
            with sent:
                in_step.set()
                sent.wait_for(lambda: not owed, timeout=30)
        deltas = real_step()
        steps.append(deltas)
        with sent:
            for delta in deltas:
                name, _, index = delta.request_id.partition("-")
                if delta.is_finished and index and int(index) < NUM_ROUNDS - 1:
                    owed.add(name)
        return deltas

    async def client(name: str, gap_s: float) -> None:
        for i in range(NUM_ROUNDS):
            params = {"max_new_tokens": 3, "ignore_eos": True}
            stream = engine.add_request(request(tokenizer, f"Short {i}", f"{name}-{i}", **params))
            with sent:  # queued: the engine thread may take it from here
                owed.discard(name)
                sent.notify_all()
            async for _ in stream:
                pass
            await asyncio.sleep(gap_s)

    engine.core.step = recorded_step
    try:
        background = engine.add_request(
            request(tokenizer, "Keep going", "long", max_new_tokens=1000, ignore_eos=True)
        )
        reader = asyncio.ensure_future(_drain(background))
        if lockstep:  # the first requests are queued while the engine waits in its first step
            assert await asyncio.to_thread(in_step.wait, 30)
        await asyncio.gather(*(client(name, gap_s) for name, gap_s in gaps_s.items()))
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        held_s = engine.stats().refill_hold_time_s
    finally:
        engine.shutdown()
    first, last = {}, {}
    for index, deltas in enumerate(steps):
        for delta in deltas:
            first.setdefault(delta.request_id, index)
            if delta.is_finished:
                last[delta.request_id] = index
    return first, last, held_s


def held_gaps(first: dict, last: dict, name: str) -> list[int]:
    """Steps from each of a client's requests' last to its next one's first, once the history holds."""
    return [first[f"{name}-{i + 1}"] - last[f"{name}-{i}"] for i in range(MIN_HITS, NUM_ROUNDS - 1)]


async def test_a_late_replacement_joins_the_step_right_after_the_finish(tiny):
    """A closed loop whose client sends its next request 5 ms after the last one ended (a remote
    client's round trip): once the history shows the loop, each replacement is prefilled in the very
    step after its predecessor's last one."""
    first, last, held_s = await closed_loop_steps(tiny, {"short": 0.005})
    assert held_gaps(first, last, "short") == [1] * (NUM_ROUNDS - 1 - MIN_HITS)
    assert held_s > 0  # the engine's stats count the holds (the metrics' refill hold seconds)


async def test_an_engine_that_never_holds_reports_no_hold_time(tiny):
    _, tokenizer = tiny
    engine = make_async_engine(tiny, max_model_len=1024)
    try:
        for i in range(3):
            params = {"max_new_tokens": 3, "ignore_eos": True}
            async for _ in engine.add_request(request(tokenizer, f"Short {i}", f"r{i}", **params)):
                pass
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats.refill_hold_time_s == 0.0
    assert stats.num_prefill_steps == 3 and stats.num_decode_steps >= 1


async def test_replacements_of_one_step_join_the_next_step_together(tiny):
    """Two closed-loop clients whose requests finish in the same step, each sending its next one 5 and
    10 ms later: once the history shows the loop, the hold waits for both (the first one waiting for
    the next step does not end it), so each replacement is prefilled in the step right after its
    predecessor's last one. The steps go in lockstep with the clients (each waits until both sent their
    next request), so that until the history holds both replacements join the step after next and the
    two clients stay in step whatever the machine's speed."""
    first, last, _ = await closed_loop_steps(tiny, {"a": 0.005, "b": 0.010}, lockstep=True)
    for name in ("a", "b"):
        assert held_gaps(first, last, name) == [1] * (NUM_ROUNDS - 1 - MIN_HITS), name
    together = [last[f"a-{i}"] == last[f"b-{i}"] for i in range(MIN_HITS, NUM_ROUNDS)]
    assert all(together), together  # the case this checks: both finished in one step


async def _drain(stream) -> None:
    async for _ in stream:
        pass
