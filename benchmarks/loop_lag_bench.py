"""The ingress's event-loop lag (how late a 10 ms timer fires on the loop that runs every route) while it
answers requests for unknown models and `/v1/models`, while it takes uploads, and both at once.

Lookups come two ways: paced (`--lookups` spread evenly over the phase, each sent on time whatever the
answers do) and flooding (8 at a time, back to back: the loop is busy by construction,
so its lag there is queueing behind requests, a ceiling rather than a bar).

Every request waits that long extra, streams included, so serving must never block the loop. It starts
a private Ray instance with the fake engine (nothing here runs a model) and ten runtime endpoints whose
create failed (records that the model list and every 404 used to read one by one), on a free port:

    python benchmarks/loop_lag_bench.py [--seconds 10] [--upload-mib 32] [--upload-concurrency 4]
                                        [--lookups 300] [--proxy haproxy|python]

The lag is sampled inside the ingress replica (`Ingress.loop_lag`, through a Serve handle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

APP = "loop-lag"
NUM_FAILED_ENDPOINTS = 10
LOOKUP_CONCURRENCY = 8
INTERVAL_S = 0.01


def start_server(data_root: str, proxy: str) -> str:
    import ray
    from ray import serve

    from deployments.app import build_app_from_configs
    from deployments.batch.config import BatchSettings
    from deployments.config import DeploymentSettings, ModelConfig
    from tests.deployments.fake_engine import fake_factory
    from tests.serve_fixtures import free_port, run_app, use_readme_serve_env

    if proxy == "haproxy":  # the README's server: HAProxy in front, each ingress replica its own HTTP server
        use_readme_serve_env()
    else:  # Serve's Python proxy, which hands the body to the replica piece by piece through actor calls
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1})
    app = build_app_from_configs(
        [ModelConfig(name="fake", model="fake", deployment=light)],
        engine_factory=fake_factory,
        batch=BatchSettings(data_root=data_root),
    )
    return run_app(app, name=APP, route_prefix="/", port=port)


async def failed_endpoints(client: httpx.AsyncClient) -> None:
    """Runtime endpoints that no node can place: each is refused at once and its record stays."""
    for i in range(NUM_FAILED_ENDPOINTS):
        body = {"name": f"no-gpu-{i}", "model_name": "smollm2-135m-instruct", "gpus": 1}
        (await client.post("v1/llm/model-endpoints", json=body)).raise_for_status()


async def lookup(client: httpx.AsyncClient, index: int) -> None:
    """A `/v1/models` call (one in four) or a completion for an unknown model (404)."""
    if index % 4 == 0:
        response = await client.get("v1/models")
        assert response.status_code == 200, response.text
    else:
        body = {"model": f"unknown-{index}", "prompt": "hi", "max_tokens": 1}
        response = await client.post("v1/completions", json=body)
        assert response.status_code == 404, response.text


async def paced_lookups(client: httpx.AsyncClient, until_s: float, rate: float) -> int:
    """Lookups sent at `rate` per second, evenly spaced, each on its own (an open load: they do not wait
    for each other's answers), until `until_s`."""
    start, tasks = time.monotonic(), []
    while (due := start + len(tasks) / rate) < until_s:
        await asyncio.sleep(max(due - time.monotonic(), 0))
        tasks.append(asyncio.create_task(lookup(client, len(tasks))))
    await asyncio.gather(*tasks)
    return len(tasks)


async def flooding_lookups(client: httpx.AsyncClient, until_s: float) -> int:
    """Lookups LOOKUP_CONCURRENCY at a time, each sent as soon as the last answer came: the loop busy."""
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < until_s:
            count += 1
            await lookup(client, count)

    await asyncio.gather(*(worker() for _ in range(LOOKUP_CONCURRENCY)))
    return count


async def uploads(client: httpx.AsyncClient, until_s: float, num_bytes: int, concurrency: int) -> int:
    """`concurrency` uploads of `num_bytes` in flight at any time, until `until_s`."""
    content, count = b'{"prompt": "hi"}\n' * (num_bytes // 17), 0

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < until_s:
            files = {"file": ("rows.jsonl", content, "application/jsonl")}
            response = await client.post("v1/files", files=files, data={"purpose": "batch"})
            assert response.status_code in (200, 429), response.text
            if response.status_code == 200:  # keeps the disk's use (and its write-back) bounded
                (await client.delete(f"v1/files/{response.json()['id']}")).raise_for_status()
            count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


async def phase(url: str, seconds: float, loads: list) -> tuple[list[float], list[int]]:
    """Lag samples over `seconds` while each of `loads` (client, until) -> count runs, each load with a
    client (connection pool) of its own."""
    from ray import serve

    handle = serve.get_app_handle(APP)
    async with contextlib.AsyncExitStack() as stack:
        clients = [httpx.AsyncClient(base_url=url, timeout=300) for _ in loads]
        for client in clients:
            await stack.enter_async_context(client)
        sampling = handle.loop_lag.remote(seconds, INTERVAL_S)
        until_s = time.monotonic() + seconds
        running = [load(client, until_s) for load, client in zip(loads, clients, strict=True)]
        counts = await asyncio.gather(*running)
        return await sampling, list(counts)


def ms(values: list[float], q: int) -> float:
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--upload-mib", type=int, default=32)
    parser.add_argument("--upload-concurrency", type=int, default=4)
    parser.add_argument(
        "--lookups", type=int, default=300, help="lookups spread evenly over each paced phase"
    )
    parser.add_argument(
        "--proxy",
        choices=("haproxy", "python"),
        default="haproxy",
        help="Serve's HTTP front: HAProxy with direct ingress (the README's `llmserve serve`) or Serve's "
        "Python proxy",
    )
    args = parser.parse_args()
    upload_bytes = args.upload_mib * 1024**2

    def upload_load(client, until_s):
        return uploads(client, until_s, upload_bytes, args.upload_concurrency)

    def paced_load(client, until_s):
        return paced_lookups(client, until_s, args.lookups / args.seconds)

    with tempfile.TemporaryDirectory() as data_root:
        url = start_server(data_root, args.proxy)

        async def run() -> list[tuple[str, list[float], list[int]]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                await failed_endpoints(client)
            uploading = f"uploads {args.upload_mib} MiB x{args.upload_concurrency}"
            paced = f"{args.lookups} lookups"
            flooding = f"lookups {LOOKUP_CONCURRENCY} at a time, back to back"
            phases = [
                ("idle", []),
                (paced, [paced_load]),
                (uploading, [upload_load]),
                (f"{uploading} + {paced}", [upload_load, paced_load]),
                (flooding, [flooding_lookups]),
                (f"{uploading} + {flooding}", [upload_load, flooding_lookups]),
            ]
            return [(name, *await phase(url, args.seconds, loads)) for name, loads in phases]

        results = asyncio.run(run())
    print(
        f"\ningress loop lag, {INTERVAL_S * 1000:g} ms timer, {args.seconds:g} s per phase, fake engine, "
        f"{NUM_FAILED_ENDPOINTS} runtime endpoint records, Serve's {args.proxy} proxy"
    )
    print("| load | requests | lag p50 ms | lag p99 ms | lag max ms |\n|---|---|---|---|---|")
    for name, lags, counts in results:
        requests = " + ".join(str(c) for c in counts) or "0"
        print(f"| {name} | {requests} | {ms(lags, 50):.1f} | {ms(lags, 99):.1f} | {1000 * max(lags):.1f} |")


if __name__ == "__main__":
    main()
