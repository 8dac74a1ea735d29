"""The ingress's event-loop lag (how late a 10 ms timer fires on the loop that runs every route) while it
answers requests for unknown models and `/v1/models`, while it takes uploads, and both at once.

Every request waits that long extra, streams included, so serving must never block the loop. It starts
a private Ray instance with the fake engine (nothing here runs a model) and ten runtime endpoints whose
create failed (records that the model list and every 404 used to read one by one), on a free port:

    python benchmarks/loop_lag_bench.py [--seconds 6] [--upload-mib 32] [--upload-concurrency 4]

The lag is sampled inside the ingress replica (`Ingress.loop_lag`, through a Serve handle).
"""

from __future__ import annotations

import argparse
import asyncio
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


def start_server(data_root: str) -> str:
    import ray
    from ray import serve

    from deployments.app import build_app_from_configs
    from deployments.batch.config import BatchSettings
    from deployments.config import DeploymentSettings, ModelConfig
    from tests.deployments.fake_engine import fake_factory
    from tests.serve_fixtures import free_port, run_app

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


async def lookups(client: httpx.AsyncClient, until_s: float) -> int:
    """Completions for unknown models (404) and `/v1/models`, LOOKUP_CONCURRENCY at a time."""
    count = 0

    async def worker(index: int) -> None:
        nonlocal count
        while time.monotonic() < until_s:
            if index % 4 == 0:
                response = await client.get("v1/models")
                assert response.status_code == 200, response.text
            else:
                body = {"model": f"unknown-{count}", "prompt": "hi", "max_tokens": 1}
                response = await client.post("v1/completions", json=body)
                assert response.status_code == 404, response.text
            count += 1

    await asyncio.gather(*(worker(i) for i in range(LOOKUP_CONCURRENCY)))
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
            count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


async def phase(url: str, seconds: float, loads: list) -> tuple[list[float], list[int]]:
    """Lag samples over `seconds` while each of `loads` (client, until) -> count runs."""
    from ray import serve

    handle = serve.get_app_handle(APP)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        sampling = handle.loop_lag.remote(seconds, INTERVAL_S)
        until_s = time.monotonic() + seconds
        counts = await asyncio.gather(*(load(client, until_s) for load in loads))
        return await sampling, list(counts)


def ms(values: list[float], q: int) -> float:
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--upload-mib", type=int, default=32)
    parser.add_argument("--upload-concurrency", type=int, default=4)
    args = parser.parse_args()
    upload_bytes = args.upload_mib * 1024**2

    def upload_load(client, until_s):
        return uploads(client, until_s, upload_bytes, args.upload_concurrency)

    with tempfile.TemporaryDirectory() as data_root:
        url = start_server(data_root)

        async def run() -> list[tuple[str, list[float], list[int]]]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                await failed_endpoints(client)
            results = [("idle", *await phase(url, args.seconds, []))]
            results.append(("unknown models + /v1/models", *await phase(url, args.seconds, [lookups])))
            results.append(
                (
                    f"uploads {args.upload_mib} MiB x{args.upload_concurrency}",
                    *await phase(url, args.seconds, [upload_load]),
                )
            )
            results.append(("both", *await phase(url, args.seconds, [lookups, upload_load])))
            return results

        results = asyncio.run(run())
    print(
        f"\ningress loop lag, {INTERVAL_S * 1000:g} ms timer, {args.seconds:g} s per phase, fake engine, "
        f"{NUM_FAILED_ENDPOINTS} runtime endpoint records"
    )
    print("| load | requests | lag p50 ms | lag p99 ms | lag max ms |\n|---|---|---|---|---|")
    for name, lags, counts in results:
        requests = " + ".join(str(c) for c in counts) or "0"
        print(f"| {name} | {requests} | {ms(lags, 50):.1f} | {ms(lags, 99):.1f} | {1000 * max(lags):.1f} |")


if __name__ == "__main__":
    main()
