"""A soak against the tiny-model app: mixed load, nothing unexpected, nothing left running.

Bounded by a request count, not a clock, so that its outcome does not depend on the machine's speed:
150 requests in the default test profile (~2.5 s on 2 cores), 850 in the full one (~10 s;
tests/suite_profile.py). Select it with `-m soak`; the 10-minute run on the default app is
`python benchmarks/soak.py`.
"""

import asyncio
import time

import pytest
from ray import serve

from benchmarks.soak import SoakConfig, run_soak
from tests.integration.tiny_app import TINY_MODEL
from tests.suite_profile import sized

NUM_REQUESTS = int(sized(quick=150, full=850))
BOUND_S = 600.0  # a bound that a working server never reaches: the count ends the soak


@pytest.mark.soak
async def test_soak(tiny_app_url: str):
    config = SoakConfig(
        url=tiny_app_url,
        model=TINY_MODEL,
        duration_s=BOUND_S,
        max_requests=NUM_REQUESTS,
        concurrency=4,
        max_new_tokens=16,
        app_name="tiny",
    )
    report = await run_soak(config)
    print(report.summary())
    assert report.num_requests == NUM_REQUESTS, report.summary()
    assert report.num_answered + report.num_overloaded == NUM_REQUESTS and not report.errors, report.summary()
    assert set(report.outcomes) == {"sync", "stream", "chat", "disconnect", "bad_input"}
    handle = serve.get_deployment_handle(f"ModelServer:{TINY_MODEL}", app_name="tiny")
    deadline = time.monotonic() + 10
    while (
        stats := await handle.stats.remote()
    ).num_running + stats.num_waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_command_line_gives_the_documented_defaults():
    from benchmarks.soak import parse_config

    config = parse_config([])
    assert (config.url, config.model, config.duration_s) == (SoakConfig().url, SoakConfig().model, 600.0)
    custom = parse_config(["--minutes", "0.5", "--url", "http://localhost:9000/", "--app", "llm"])
    assert (custom.url, custom.duration_s, custom.app_name) == ("http://localhost:9000/", 30.0, "llm")


def test_second_half_growth_is_each_replicas_rss_from_the_half_way_sample_to_the_end():
    from benchmarks.soak import second_half_growth

    samples = [
        (0.0, {"a": 100.0, "b": 50.0}),
        (10.0, {"a": 180.0, "b": 50.0}),  # warm-up in the first half does not count
        (50.0, {"a": 200.0, "b": 60.0}),  # the first sample at or after the half-way point (t=50)
        (100.0, {"a": 205.0, "c": 1.0}),  # "b" is gone, "c" is new: neither has both ends
    ]
    assert second_half_growth(samples) == {"a": 5.0}
    assert second_half_growth(samples[:1]) == {}
