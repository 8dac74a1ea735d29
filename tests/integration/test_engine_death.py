"""The engine survives its own death too: a real replica whose device breaks mid-stream ends every open
stream with an error event, answers new requests 503 at once, and Serve replaces it with one that answers.

The "broken device" is the real engine with its forward made to fail while a marker file exists (a test
engine factory; the production code has no such hook). The engine sees one lone-sequence failure after
another, declares itself dead, and its health check fails."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from tests.integration.faults import BreakableFactory
from tests.integration.tiny_app import TINY_MODEL, build_tiny_app
from tests.serve_fixtures import delete_app, replica_pid, run_app

APP = "enginedeath"
SYNC, STREAM = "v1/llm/completions-sync", "v1/llm/completions-stream"
QUERY = {"model_endpoint_name": TINY_MODEL}
STREAMS = 4  # opened at once; the engine holds their decoding at 4 until the device breaks


def body(prompt: str, max_new_tokens: int) -> dict:
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": 1}


async def _streams_end_with_errors_when_the_device_breaks(url: str, marker: Path) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = asyncio.Semaphore(0)

        async def stream(i: int) -> list[dict]:
            events = []
            request = body(f"Story {i}:", 200)
            async with client.stream("POST", STREAM, params=QUERY, json=request) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line.removeprefix("data: ")))
                        if len(events) == 1:
                            started.release()
            return events

        tasks = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
        for _ in tasks:
            await asyncio.wait_for(started.acquire(), 60)
        marker.touch()  # the device breaks while all four stream
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return [events[-1] for events in results]


def test_a_dead_engine_fails_its_streams_answers_503_and_serve_replaces_it(
    serve_port: int, tiny_model_dir: Path, tmp_path: Path
):
    marker = tmp_path / "device-broken"
    app = build_tiny_app(tiny_model_dir, engine_factory=BreakableFactory(marker, hold_at=STREAMS))
    url = run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    try:
        dead_pid = replica_pid(APP, TINY_MODEL)
        lasts = asyncio.run(_streams_end_with_errors_when_the_device_breaks(url, marker))
        for last in lasts:
            assert last["output"] is None and last["error"]["status_code"] == 503, last
            assert "device looks broken" in last["error"]["content"]["error"]
        start = time.monotonic()
        refused = httpx.post(url + SYNC, params=QUERY, json=body("Hi", 4), timeout=60)
        assert refused.status_code == 503 and "engine" in refused.json()["detail"], refused.text
        print(f"a new request on the dead engine got 503 in {time.monotonic() - start:.3f} s")
        marker.unlink()  # the replacement replica gets a working device
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            response = httpx.post(url + SYNC, params=QUERY, json=body("Hi", 4), timeout=60)
            if response.status_code == 200:
                break
            assert response.status_code == 503, response.text
            time.sleep(1)
        assert response.status_code == 200, response.text
        assert replica_pid(APP, TINY_MODEL) != dead_pid  # Serve replaced it
    finally:
        delete_app(APP)
