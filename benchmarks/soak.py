"""Soak: a bounded mixed load against a running server on this machine, then a reliability report.

    python benchmarks/soak.py --minutes 10              # the default app (serve run serve_config.yaml)
    python benchmarks/soak.py --minutes 0.5 --url http://127.0.0.1:8000/ --model tiny

Workers loop until the time is up (or `--max-requests` is reached) over a fixed mix: sync and streamed
completions, OpenAI chat, streams dropped after their first token, and bad inputs (which must be 4xx).
Reports requests answered, unexpected outcomes by kind, p50/p99 latency, and the RSS growth of the
ModelServer replica processes (found by their process title `ray::ServeReplica:...ModelServer...`).
Only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx
import psutil

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
REPLICA_TITLE = "ServeReplica:"
MODEL_SERVER = "ModelServer"


@dataclass(frozen=True, slots=True)
class SoakConfig:
    url: str = "http://127.0.0.1:8000/"
    model: str = "smollm2-135m-instruct"
    duration_s: float = 600.0
    concurrency: int = 8
    max_requests: int = 100_000  # a second bound besides time
    max_new_tokens: int = 32
    request_timeout_s: float = 120.0
    app_name: str | None = None  # whose replicas' RSS to measure; None = every ModelServer replica here


@dataclass(slots=True)
class SoakReport:
    duration_s: float = 0.0
    num_requests: int = 0
    num_answered: int = 0  # a complete answer, or the expected 4xx for a bad input
    num_overloaded: int = 0  # 429: allowed under load, counted apart
    outcomes: Counter = field(default_factory=Counter)  # kind -> count
    errors: Counter = field(default_factory=Counter)  # "kind: what" -> count; unexpected only
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    num_replicas: int = 0
    # RSS growth of each replica (by title) from the run's half-way point to its end: warm-up (allocator
    # pools, compiled kernels, the first long prompts) is over by then, so growth here points to a leak
    second_half_growth_mib: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list, repr=False)
    rss_samples: list[tuple[float, dict[str, float]]] = field(default_factory=list, repr=False)

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_start_mib

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("latencies_s"), data.pop("rss_samples")
        data["rss_growth_mib"] = round(self.rss_growth_mib, 1)
        data["outcomes"], data["errors"] = dict(self.outcomes), dict(self.errors)
        return data


def replica_processes(app_name: str | None = None) -> list[psutil.Process]:
    """ModelServer replica processes on this machine (of one Serve app when `app_name` is given)."""
    wanted = f"{REPLICA_TITLE}{app_name}:" if app_name else REPLICA_TITLE
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info.get("cmdline") or ())
        if wanted in title and MODEL_SERVER in title:
            found.append(process)
    return found


def replicas_rss_mib(app_name: str | None = None, pids: set[int] | None = None) -> tuple[float, int]:
    """Total RSS (MiB) of the ModelServer replicas (only those in `pids` when given) and their count."""
    total = 0
    processes = [p for p in replica_processes(app_name) if pids is None or p.pid in pids]
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 1024**2, len(processes)


def rss_by_replica_mib(pids: set[int]) -> dict[str, float]:
    """RSS (MiB) of each replica process in `pids`, keyed by "pid title" (the deployment's name)."""
    rss = {}
    for process in replica_processes():
        if process.pid not in pids:
            continue
        try:
            # Ray rewrites a busy worker's title (the method it runs), so a replica's key keeps the
            # title it had when first sampled: the same process stays one key through the run.
            title = _titles.setdefault(process.pid, " ".join(process.cmdline()[:1]))
            rss[f"{process.pid} {title}"] = process.memory_info().rss / 1024**2
        except psutil.Error:
            continue
    return rss


_titles: dict[int, str] = {}  # pid -> its title when first sampled


def second_half_growth(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Each replica's RSS at the last sample minus its RSS at the first sample of the run's second half."""
    if len(samples) < 2:
        return {}
    half_s = samples[0][0] + (samples[-1][0] - samples[0][0]) / 2
    middle = next(rss for t, rss in samples if t >= half_s)
    end = samples[-1][1]
    return {name: round(end[name] - middle[name], 1) for name in end if name in middle}


class Soak:
    """The request mix; each `_do_*` returns the outcome's name or raises `Unexpected`."""

    def __init__(self, config: SoakConfig, client: httpx.AsyncClient) -> None:
        self.config, self.client, self.report = config, client, SoakReport()
        self._mix: list[tuple[str, Callable[[int], Awaitable[str]]]] = [
            ("sync", self._do_sync),
            ("stream", self._do_stream),
            ("chat", self._do_chat),
            ("disconnect", self._do_disconnect),
            ("sync", self._do_sync),
            ("stream", self._do_stream),
            ("bad_input", self._do_bad_input),
        ]

    def _llm_body(self, i: int) -> dict:
        return {"prompt": f"Tell me a story about soak {i}.", "max_new_tokens": self.config.max_new_tokens,
                "temperature": 0.7, "seed": i}  # fmt: skip

    @property
    def _params(self) -> dict[str, str]:
        return {"model_endpoint_name": self.config.model}

    async def _do_sync(self, i: int) -> str:
        response = await self.client.post(
            "v1/llm/completions-sync", params=self._params, json=self._llm_body(i)
        )
        _expect(response, 200)
        return "sync"

    async def _do_stream(self, i: int) -> str:
        body = self._llm_body(i)
        async with self.client.stream(
            "POST", "v1/llm/completions-stream", params=self._params, json=body
        ) as r:
            _expect(r, 200)
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    last = json.loads(line.removeprefix("data: "))
        if last is None or last.get("error") or not last["output"]["finished"]:
            raise Unexpected(f"stream ended without a finished event: {str(last)[:200]}")
        return "stream"

    async def _do_chat(self, i: int) -> str:
        body = {"model": self.config.model, "messages": [{"role": "user", "content": f"Hi {i}"}],
                "max_tokens": self.config.max_new_tokens, "seed": i}  # fmt: skip
        _expect(await self.client.post("v1/chat/completions", json=body), 200)
        return "chat"

    async def _do_disconnect(self, i: int) -> str:
        body = {**self._llm_body(i), "max_new_tokens": max(self.config.max_new_tokens * 4, 64)}
        async with self.client.stream(
            "POST", "v1/llm/completions-stream", params=self._params, json=body
        ) as r:
            _expect(r, 200)
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first token: the server must abort the generation
        return "disconnect"

    async def _do_bad_input(self, i: int) -> str:
        bad = [b'{"prompt": ', b'{"prompt": "x", "max_new_tokens": 0, "temperature": 0}',
               b'{"prompt": "x", "max_new_tokens": 4, "temperature": NaN}', b"[]"]  # fmt: skip
        headers = {"content-type": "application/json"}
        response = await self.client.post(
            "v1/llm/completions-sync", params=self._params, content=bad[i % len(bad)], headers=headers
        )
        _expect(response, 400)
        return "bad_input"

    async def worker(self, worker_id: int, deadline: float, counter: list[int]) -> None:
        i = worker_id
        while time.monotonic() < deadline and counter[0] < self.config.max_requests:
            counter[0] += 1
            kind, do = self._mix[i % len(self._mix)]
            start = time.monotonic()
            self.report.num_requests += 1
            try:
                outcome = await do(i)
            except Overloaded:
                self.report.num_overloaded += 1
            except Unexpected as exc:
                self.report.errors[f"{kind}: {exc}"[:160]] += 1
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
                self.report.errors[f"{kind}: {type(exc).__name__}"] += 1
            else:
                self.report.num_answered += 1
                self.report.outcomes[outcome] += 1
                if kind in ("sync", "stream", "chat"):
                    self.report.latencies_s.append(time.monotonic() - start)
            i += self.config.concurrency


class Unexpected(Exception):
    """An answer the server should not have given."""


class Overloaded(Exception):
    """A 429: allowed under load."""


def _expect(response: httpx.Response, status_code: int) -> None:
    if response.status_code == status_code:
        return
    if response.status_code == 429:
        raise Overloaded
    try:
        text = response.text[:160]
    except httpx.ResponseNotRead:  # a stream: its body is not read here
        text = ""
    raise Unexpected(f"HTTP {response.status_code} (expected {status_code}) {text}")


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_soak(config: SoakConfig) -> SoakReport:
    """Run the mix for `config.duration_s` (bounded by `max_requests`) and return the report."""
    host = urlparse(config.url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the soak only runs against this machine (127.0.0.1), not {host!r}")
    base_url = config.url if config.url.endswith("/") else config.url + "/"
    limits = httpx.Limits(max_connections=config.concurrency * 2)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=config.request_timeout_s, limits=limits
    ) as client:
        soak = Soak(config, client)
        report = soak.report
        pids = {p.pid for p in replica_processes(config.app_name)}  # growth of these very processes
        report.rss_start_mib, report.num_replicas = replicas_rss_mib(config.app_name, pids)
        start = time.monotonic()
        deadline, counter = start + config.duration_s, [0]
        workers = [asyncio.create_task(soak.worker(w, deadline, counter)) for w in range(config.concurrency)]
        sampler = asyncio.create_task(_sample_rss(report, deadline, config.app_name, pids))
        await asyncio.gather(*workers)
        sampler.cancel()
        report.duration_s = time.monotonic() - start
    report.rss_end_mib, report.num_replicas = replicas_rss_mib(config.app_name, pids)
    report.rss_peak_mib = max(report.rss_peak_mib, report.rss_end_mib)
    report.rss_samples.append((time.monotonic(), rss_by_replica_mib(pids)))
    report.second_half_growth_mib = second_half_growth(report.rss_samples)
    report.latency_p50_s = _percentile(report.latencies_s, 0.50)
    report.latency_p99_s = _percentile(report.latencies_s, 0.99)
    return report


async def _sample_rss(report: SoakReport, deadline: float, app_name: str | None, pids: set[int]) -> None:
    while time.monotonic() < deadline:
        rss, _ = await asyncio.to_thread(replicas_rss_mib, app_name, pids)
        report.rss_peak_mib = max(report.rss_peak_mib, rss)
        report.rss_samples.append((time.monotonic(), await asyncio.to_thread(rss_by_replica_mib, pids)))
        await asyncio.sleep(5)


def parse_config(argv: list[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = SoakConfig()  # a slots dataclass: its class attributes are descriptors, not the defaults
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    parser.add_argument("--url", default=defaults.url, help="server base URL (loopback only)")
    parser.add_argument("--model", default=defaults.model, help="model_endpoint_name / model")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="parallel clients")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests, help="request bound")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--app", default=None, help="Serve app whose replicas' RSS to watch (default: all)")
    args = parser.parse_args(argv)
    return SoakConfig(
        url=args.url, model=args.model, duration_s=args.minutes * 60, concurrency=args.concurrency,
        max_requests=args.max_requests, max_new_tokens=args.max_new_tokens, app_name=args.app,
    )  # fmt: skip


def main() -> None:
    config = parse_config()
    report = asyncio.run(run_soak(config))
    print(json.dumps(report.summary(), indent=2))
    print(
        f"\n{report.num_answered}/{report.num_requests} answered in {report.duration_s:.0f} s, "
        f"{report.num_overloaded} overloaded (429), {sum(report.errors.values())} unexpected; "
        f"p99 latency {report.latency_p99_s:.2f} s; replica RSS {report.rss_start_mib:.0f} -> "
        f"{report.rss_end_mib:.0f} MiB ({report.rss_growth_mib:+.1f}) over {report.num_replicas} replica(s)"
    )
    for name, growth in report.second_half_growth_mib.items():
        print(f"second half RSS growth {growth:+.1f} MiB: {name}")


if __name__ == "__main__":
    main()
