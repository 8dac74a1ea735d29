"""How late the running event loop fires a timer: the time every request on that loop may wait extra."""

import asyncio
import time

MAX_DURATION_S = 600.0
MIN_INTERVAL_S = 0.001


async def sample_loop_lag(duration_s: float, interval_s: float) -> list[float]:
    """One sample per `interval_s` for `duration_s`: seconds between a timer's due time and its firing."""
    duration_s = min(max(duration_s, 0.0), MAX_DURATION_S)
    interval_s = max(interval_s, MIN_INTERVAL_S)
    lags: list[float] = []
    end = time.perf_counter() + duration_s  # not loop.time(): uvloop's counts whole milliseconds
    while time.perf_counter() < end:
        due = time.perf_counter() + interval_s
        await asyncio.sleep(interval_s)
        lags.append(max(0.0, time.perf_counter() - due))
    return lags
