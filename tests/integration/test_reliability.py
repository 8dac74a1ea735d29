"""Every accepted request ends: overload is an immediate 429, dropped clients and time limits free the
engine, a killed replica ends its requests with errors and comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, IngressSettings, ModelConfig
from engine.types import EngineStats
from tests.deployments.fake_engine import fake_factory
from tests.integration.tiny_app import TINY_MODEL, build_tiny_app
from tests.serve_fixtures import delete_app, replica_pid, run_app

SYNC, STREAM = "v1/llm/completions-sync", "v1/llm/completions-stream"
APP = "reliability"
SLOW_LANE, SHORT_TIMEOUT = "slow-lane", "short-timeout"  # fake-engine models
TIMEOUT_S = 1.0
FAILOVER_APP = "failover"


def body(prompt: str = "Hello", max_new_tokens: int = 8, **changes) -> dict:
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, **changes}


def params(model: str) -> dict[str, str]:
    return {"model_endpoint_name": model}


def stats(model: str, app_name: str = APP) -> EngineStats:
    handle = serve.get_deployment_handle(f"ModelServer:{model}", app_name=app_name)
    return handle.stats.remote().result(timeout_s=10)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true after {timeout_s} s: {what}")
        time.sleep(0.05)


def is_idle(model: str, app_name: str = APP) -> bool:
    current = stats(model, app_name)
    return current.num_running == 0 and current.num_waiting == 0


def events_of(text: str) -> list[dict]:
    return [
        json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")
    ]


@pytest.fixture(scope="module")
def app_url(serve_port: int) -> Iterator[str]:
    """Two fake-engine models: one with a one-slot queue, one with a 1 s time limit."""
    light = {"ray_actor_options": {"num_cpus": 0.1}}
    models = [
        ModelConfig(
            name=SLOW_LANE,
            model="fake",
            deployment=DeploymentSettings(**light, max_ongoing_requests=1, max_queued_requests=1),
        ),
        ModelConfig(name=SHORT_TIMEOUT, model="fake", request_timeout_s=TIMEOUT_S, deployment=light),
    ]
    ingress = IngressSettings(ray_actor_options={"num_cpus": 0.1})
    app = build_app_from_configs(models, engine_factory=fake_factory, ingress=ingress)
    yield run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    delete_app(APP)


async def test_past_the_queue_bound_requests_get_an_immediate_429(app_url: str, tmp_path: Path):
    """One slot + one queued: of six requests held at their first token (a gate the test opens), at
    least four are refused at once: their 429s come back while the accepted ones are still held. (Five
    when the first one waits in the queue for the replica rather than in its slot.)"""
    gate = tmp_path / "gate"
    async with httpx.AsyncClient(base_url=app_url, timeout=60) as client:

        async def one(i: int) -> httpx.Response:
            route = SYNC if i % 2 else STREAM
            return await client.post(route, params=params(SLOW_LANE), json=body(f"[wait-for:{gate}] hi", 5))

        tasks = [asyncio.ensure_future(one(i)) for i in range(6)]
        refused: list[httpx.Response] = []
        deadline = time.monotonic() + 60
        while len(refused) < 4 and time.monotonic() < deadline:
            done, _ = await asyncio.wait(tasks, timeout=0.1)
            refused = [task.result() for task in done]
        answers = "\n".join(f"{r.url.path} {r.status_code} {r.text[:300]}" for r in refused)
        assert len(refused) >= 4, f"{len(refused)} of 6 answered before the gate opened:\n{answers}"
        assert all(r.status_code == 429 and "overloaded" in r.json()["detail"] for r in refused), answers
        gate.touch()
        results = await asyncio.gather(*tasks)
        openai = await client.post("v1/completions", json={"model": SLOW_LANE, "prompt": "hi"})
    statuses = sorted(r.status_code for r in results)
    assert statuses in ([200, 200, 429, 429, 429, 429], [200, 429, 429, 429, 429, 429]), statuses
    assert openai.status_code == 200  # the lane is free again afterwards


def test_a_sync_client_that_times_out_frees_its_slot(app_url: str):
    wait_for(lambda: is_idle(SLOW_LANE), 10, "slow lane idle before the test")
    # 240 tokens x 0.2 s = 48 s of generation if nobody stopped it.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app_url + SYNC, params=params(SLOW_LANE), json=body("[slow] x", 240), timeout=1.0)
    wait_for(lambda: is_idle(SLOW_LANE), 30, "generation aborted after the client left")


def test_a_generation_past_its_time_limit_is_stopped(app_url: str):
    """A 1 s limit on generations that would take 48 s (240 tokens x 0.2 s): both end with a 504 long
    before that."""
    start = time.monotonic()
    sync = httpx.post(app_url + SYNC, params=params(SHORT_TIMEOUT), json=body("[slow] x", 240), timeout=60)
    assert sync.status_code == 504, sync.text
    assert "request_timeout_s" in sync.json()["detail"] and time.monotonic() - start < 30
    slow = body("[slow] x", 240)
    stream = httpx.post(app_url + STREAM, params=params(SHORT_TIMEOUT), json=slow, timeout=60)
    events = events_of(stream.text)
    assert stream.status_code == 200 and events[0]["output"] is not None
    last = events[-1]
    assert last["output"] is None and last["error"]["status_code"] == 504, last
    assert "request_timeout_s" in last["error"]["content"]["error"]
    wait_for(lambda: is_idle(SHORT_TIMEOUT), 30, "timed-out generations aborted")


async def test_fifty_dropped_streams_leave_nothing_in_the_engine(tiny_app_url: str):
    """50 long streams, each dropped after its first token: the engine ends with nothing left."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=tiny_app_url, timeout=60, limits=limits) as client:

        async def drop_after_first_token(i: int) -> dict:
            request = body(f"Story {i}:", 200, temperature=1.0, seed=i)
            async with client.stream("POST", STREAM, params=params(TINY_MODEL), json=request) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        return json.loads(line.removeprefix("data: "))
            raise AssertionError("no event")

        firsts = await asyncio.gather(*(drop_after_first_token(i) for i in range(50)))
    assert all(f["output"] is not None and not f["output"]["finished"] for f in firsts)
    start = time.monotonic()
    await asyncio.to_thread(wait_for, lambda: is_idle(TINY_MODEL, "tiny"), 20, "tiny engine idle")
    print(f"engine idle {time.monotonic() - start:.2f} s after the last of 50 streams was dropped")


def test_a_killed_replica_ends_its_requests_and_comes_back(serve_port: int, tiny_model_dir: Path):
    url = run_app(
        build_tiny_app(tiny_model_dir), name=FAILOVER_APP, route_prefix=f"/{FAILOVER_APP}", port=serve_port
    )
    try:
        asyncio.run(_kill_during_load(url, replica_pid(FAILOVER_APP, TINY_MODEL)))
        _wait_until_ready(url, timeout_s=90)
        response = httpx.post(url + SYNC, params=params(TINY_MODEL), json=body(), timeout=60)
        assert response.status_code == 200, response.text
    finally:
        delete_app(FAILOVER_APP)


async def _kill_during_load(url: str, pid: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        first_events = asyncio.Event()
        num_started = 0

        async def stream(i: int) -> list[dict]:
            nonlocal num_started
            request = body(f"Story {i}:", 200, temperature=1.0, seed=i)
            events = []
            async with client.stream("POST", STREAM, params=params(TINY_MODEL), json=request) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))
                        if len(events) == 1:
                            num_started += 1
                            if num_started == 8:
                                first_events.set()
            return events

        async def sync(i: int) -> int:
            request = body(f"Tale {i}:", 200, temperature=1.0, seed=i)
            return (await client.post(SYNC, params=params(TINY_MODEL), json=request)).status_code

        streams = [asyncio.create_task(stream(i)) for i in range(8)]
        syncs = [asyncio.create_task(sync(i)) for i in range(24)]
        await asyncio.wait_for(first_events.wait(), 30)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        stream_results = await asyncio.wait_for(asyncio.gather(*streams), 30)
        sync_statuses = await asyncio.wait_for(asyncio.gather(*syncs), 30)
        print(f"all requests ended {time.monotonic() - killed_at:.2f} s after the kill: {sync_statuses}")
    errors = [events[-1]["error"] for events in stream_results if events[-1]["output"] is None]
    assert errors, "no stream was cut by the kill"
    assert all(
        e["status_code"] >= 500 and e["content"]["error"] and e["content"]["timestamp"] for e in errors
    )
    assert all(s == 200 or s >= 500 for s in sync_statuses) and any(s >= 500 for s in sync_statuses)


def _wait_until_ready(url: str, timeout_s: float) -> None:
    def is_ready() -> bool:
        try:
            return httpx.get(url + "readyz", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(is_ready, timeout_s, "the replaced replica is ready")
