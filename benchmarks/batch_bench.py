"""Batch benchmark: the same prompts through a Ray Data batch job and through the online route at c=16,
in one run, then the online route's latency while a batch job runs (against its latency when idle).

It starts a private Ray instance with one model (SmolLM2 by default) and the batch routes on a free
port, so nothing else on the machine is touched:

    python benchmarks/batch_bench.py [--model-config configs/smollm2-135m-instruct.yaml] \
        [--num-prompts 64] [--max-tokens 32] [--data-parallelism 1]

Every request is a /v1/completions body with `ignore_eos`, so both paths generate exactly the same
number of tokens. Batch prompts/s is shown twice: over the whole job (worker start and model load
included) and from the first finished Ray Data batch to the end (steady state).
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
from prompts import prompt_texts  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NUM_LATENCY_PROBES = 12
BATCH_SIZE = 8  # rows per Ray Data batch: small, so progress (and the steady-state rate) is fine-grained


def bodies(model: str, num: int, max_tokens: int) -> list[dict]:
    return [
        {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        for p in prompt_texts(num)
    ]


async def online_throughput(url: str, requests: list[dict], concurrency: int) -> float:
    """Prompts/s through POST /v1/completions with `concurrency` requests in flight."""
    queue = list(requests)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker() -> None:
            while queue:
                response = await client.post("v1/completions", json=queue.pop())
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(requests) / (time.perf_counter() - start)


def latencies_ms(url: str, model: str, num: int) -> list[float]:
    """Sequential online requests (16 tokens each), the latency of each in ms."""
    body = {
        "model": model,
        "prompt": "Tell me a story",
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
    }
    values = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(num):
            start = time.perf_counter()
            client.post("v1/completions", json=body).raise_for_status()
            values.append((time.perf_counter() - start) * 1000)
    return values


def start_batch(url: str, model: str, requests: list[dict], output: str, data_parallelism: int) -> str:
    body = {
        "output_data_path": output,
        "model_config": {"model": model},
        "content": requests,
        "data_parallelism": data_parallelism,
    }
    response = httpx.post(f"{url}v2/batch-completions", json=body, timeout=60)
    response.raise_for_status()
    return response.json()["job_id"]


def job_state(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}v2/batch-completions/{job_id}", timeout=60).json()["job"]


def run_batch(url: str, model: str, requests: list[dict], data_parallelism: int) -> tuple[float, float]:
    """(prompts/s over the whole job, prompts/s from the first finished batch to the end)."""
    start = time.perf_counter()
    job_id = start_batch(url, model, requests, f"bench/out-{int(time.time())}.json", data_parallelism)
    first_done: tuple[float, int] | None = None
    while True:
        job = job_state(url, job_id)
        num_done = job["progress"]["num_done"]
        if first_done is None and num_done > 0:
            first_done = (time.perf_counter(), num_done)
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    end = time.perf_counter()
    if job["status"] != "completed":
        raise RuntimeError(f"batch job {job_id} ended {job['status']}: {job.get('error')}")
    is_measurable = first_done is not None and first_done[1] < len(requests)
    steady = (len(requests) - first_done[1]) / (end - first_done[0]) if is_measurable else float("nan")
    return len(requests) / (end - start), steady


def latency_under_batch(url: str, model: str, requests: list[dict], data_parallelism: int) -> list[float]:
    """Online latencies measured while a batch job's workers are generating; the job is then cancelled."""
    job_id = start_batch(url, model, requests, f"bench/load-{int(time.time())}.json", data_parallelism)
    while job_state(url, job_id)["progress"]["num_done"] == 0:  # its workers are up and generating
        time.sleep(0.2)
    values = latencies_ms(url, model, NUM_LATENCY_PROBES)
    is_running = job_state(url, job_id)["status"] == "running"
    httpx.post(f"{url}v2/batch-completions/{job_id}/actions/cancel", timeout=60)
    if not is_running:
        print("warning: the batch job ended before the latency probes did; make it longer (--num-prompts)")
    return values


def start_server(model_config: str, data_root: str, is_idle: bool) -> tuple[str, str]:
    import ray
    from ray import serve

    from deployments.app import build_app_from_configs
    from deployments.batch.config import BatchSettings
    from deployments.config import load_model_config
    from tests.serve_fixtures import free_port, run_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = load_model_config(model_config)
    settings = BatchSettings(data_root=data_root, batch_size=BATCH_SIZE, worker_idle_priority=is_idle)
    app = build_app_from_configs([config], batch=settings)
    return run_app(app, name="batch-bench", route_prefix="/", port=port), config.name


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-config", default="configs/smollm2-135m-instruct.yaml")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--data-parallelism", type=int, default=1)
    parser.add_argument(
        "--idle-priority", action="store_true", help="batch.worker_idle_priority (SCHED_IDLE)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_root:
        url, model = start_server(args.model_config, data_root, args.idle_priority)
        requests = bodies(model, args.num_prompts, args.max_tokens)
        latencies_ms(url, model, 2)  # warm-up
        idle = latencies_ms(url, model, NUM_LATENCY_PROBES)
        online = asyncio.run(online_throughput(url, requests, 16))
        batch_total, batch_steady = run_batch(url, model, requests, args.data_parallelism)
        loaded = latency_under_batch(url, model, requests * 4, args.data_parallelism)
    print(
        f"\n{args.num_prompts} prompts x {args.max_tokens} tokens, model {model}; online replica: the model "
        f"config's threads; batch: {args.data_parallelism} worker(s) x 1 thread, nice +10"
        f"{' and SCHED_IDLE' if args.idle_priority else ''}, "
        f"batch_size {BATCH_SIZE}"
    )
    print("| path | prompts/s |\n|---|---|")
    print(f"| online /v1/completions, c=16 | {online:.2f} |")
    print(f"| batch job, whole job (worker start included), dp={args.data_parallelism} | {batch_total:.2f} |")
    print(f"| batch job, first batch to end | {batch_steady:.2f} |")
    print("\n| online latency, 16 tokens, sequential | p50 ms | p90 ms |\n|---|---|---|")
    print(f"| idle | {p(idle, 50):.0f} | {p(idle, 90):.0f} |")
    print(f"| while a batch job runs | {p(loaded, 50):.0f} | {p(loaded, 90):.0f} |")
    print(f"\nlatency ratio (p50 under batch / idle): {p(loaded, 50) / p(idle, 50):.2f}")


if __name__ == "__main__":
    main()
