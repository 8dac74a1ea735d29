"""KV-cache benchmark: prefix caching on vs off, preemption under pressure, 32 chats without max_tokens.

Engine level (AsyncEngine, no Ray), one model load per engine, every comparison in the same run:

- shared: a ~1,300-token shared document + short distinct questions (chat template). At concurrency 1,
  cold TTFT (caching off) vs warm TTFT (caching on, after one request filled the cache); at
  concurrency 16, throughput on vs off; greedy agreement on vs off (in this dtype).
- pressure: a KV cache far too small for the load (float32): preemptions, every request completes,
  greedy and seeded outputs compared with a roomy cache.
- capacity: 32 concurrent chats with the whole remaining context as their budget (what an OpenAI
  request without max_tokens asks for): time until all 32 have started, and throughput at 32 vs 16.

    python benchmarks/prefix_bench.py [--sections shared,pressure,capacity] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import torch
from prompts import TOPICS  # benchmarks/ is on sys.path when run as a script

from engine.async_engine import AsyncEngine
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.kv_cache import KVCacheShape
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model

QUESTIONS = [f"In one sentence: what does the report say about {t}?" for t in TOPICS]


def document(num_sections: int = 24) -> str:
    lines = []
    for i in range(num_sections):
        topic, other = TOPICS[i % len(TOPICS)], TOPICS[(i * 7 + 3) % len(TOPICS)]
        lines.append(
            f"Section {i + 1}. In {1901 + 4 * i} the survey of {topic} counted {37 * i + 12} visitors, "
            f"{i % 5 + 2} new buildings and a budget of {113 * i + 250} crowns; the committee compared it "
            f"with {other} and asked for a second report before the winter."
        )
    return "Read the report, then answer the question.\n\n" + "\n".join(lines)


def chat_ids(tokenizer, text: str) -> tuple[int, ...]:
    messages = [{"role": "user", "content": text}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.spec = resolve(args.model)
        self.threads = default_num_threads()
        self.model_config = None  # set once loaded

    def engine(self, dtype: str, **config) -> AsyncEngine:
        torch_dtype = resolve_dtype(dtype, self.device)

        def load():
            loaded = load_model(self.spec, dtype=torch_dtype, device=self.device)
            return loaded.model, loaded.tokenizer

        config = {"max_num_seqs": 32, "num_threads": self.threads, "dtype": dtype, **config}
        return AsyncEngine.from_loader(load, EngineConfig(**config), self.device)


async def stream(engine: AsyncEngine, ids, params: SamplingParams) -> tuple[float, float, list[str], int]:
    """(ttft, end, text pieces, completion tokens) of one request, times from its submission."""
    t0 = time.perf_counter()
    first, texts, n = None, [], 0
    async for delta in engine.add_request(GenerationRequest(str(uuid.uuid4()), tuple(ids), params)):
        first = first or time.perf_counter() - t0
        texts.append(delta.text)
        n = delta.num_completion_tokens
    return first, time.perf_counter() - t0, texts, n


async def run_clients(engine, prompts, params, concurrency: int):
    """Results in prompt order, tokens per second over the whole run."""
    results: list = [None] * len(prompts)
    queue = list(enumerate(prompts))

    async def client() -> None:
        while queue:
            i, ids = queue.pop(0)
            results[i] = await stream(engine, ids, params)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return results, sum(r[3] for r in results) / wall


def stats_line(engine: AsyncEngine) -> str:
    s = engine.stats()
    rate = s.prefix_cache_hits / max(s.prefix_cache_queries, 1)
    return f"prefix-cache hits {s.prefix_cache_hits}/{s.prefix_cache_queries} tokens ({rate:.0%}), " + (
        f"preemptions {s.num_preemptions}"
    )


def shared_prefix(bench: Bench, tokenizer) -> None:
    doc = document(bench.args.doc_sections)
    prompts = [chat_ids(tokenizer, f"{doc}\n\nQuestion: {q}") for q in QUESTIONS * 2]
    print(
        f"\n## shared prefix: {len(prompts[0])}-token prompts sharing {len(chat_ids(tokenizer, doc))} tokens"
    )
    params = SamplingParams(max_new_tokens=bench.args.new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    for caching in (False, True):
        engine = bench.engine(bench.args.dtype, enable_prefix_caching=caching)
        try:

            async def both(engine=engine):
                return await run_clients(engine, prompts[:5], params, 1), await run_clients(
                    engine, prompts, params, 16
                )

            (c1, _), (c16, tput) = asyncio.run(both())
            out[caching] = (c1, c16, tput)
            print(f"caching {'on ' if caching else 'off'}: {stats_line(engine)}")
        finally:
            engine.shutdown()
    cold = statistics.median(r[0] for r in out[False][0])
    warm = statistics.median(r[0] for r in out[True][0][1:])  # the first request filled the cache
    print(
        f"c=1  TTFT cold (caching off) {cold * 1e3:.0f} ms, warm (on) {warm * 1e3:.0f} ms: "
        f"{cold / warm:.1f}x lower"
    )
    print(
        f"c=16 throughput off {out[False][2]:.1f} tok/s, on {out[True][2]:.1f} tok/s: "
        f"{out[True][2] / out[False][2]:.2f}x"
    )
    ttft_off = statistics.median(r[0] for r in out[False][1])
    ttft_on = statistics.median(r[0] for r in out[True][1])
    print(f"c=16 TTFT p50 off {ttft_off * 1e3:.0f} ms, on {ttft_on * 1e3:.0f} ms")
    same = sum("".join(a[2]) == "".join(b[2]) for a, b in zip(out[False][1], out[True][1], strict=True))
    print(f"greedy text equal with and without caching ({bench.args.dtype}): {same}/{len(prompts)}")


def pressure(bench: Bench, tokenizer) -> None:
    prompts = [chat_ids(tokenizer, f"Write a long story about {t}.") for t in TOPICS]
    greedy = SamplingParams(max_new_tokens=160, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=160, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    block_bytes = 16 * KVCacheShape.from_model_config(bench.model_config).bytes_per_token(torch.float32)
    runs = {}
    for name, kv_bytes in (("roomy", 512 * 2**20), ("tight", 40 * block_bytes)):
        engine = bench.engine("float32", max_model_len=512, kv_cache_bytes=kv_bytes)
        try:
            t0 = time.perf_counter()

            async def both(engine=engine):
                return await run_clients(engine, prompts, greedy, 16), await run_clients(
                    engine, prompts, sampled, 16
                )

            (g, _), (s, _) = asyncio.run(both())
            runs[name] = (g, s, time.perf_counter() - t0, engine.stats())
        finally:
            engine.shutdown()
    print(
        f"\n## under pressure: 16 requests x (~{len(prompts[0])} + 160 tokens), float32, "
        "twice (greedy, seeded)"
    )
    for name, (g, s, wall, stats) in runs.items():
        done = sum(r[3] == 160 for r in g + s)
        print(f"{name}: {done}/{len(g) + len(s)} complete, {stats.num_preemptions} preemptions, {wall:.1f} s")
    for kind, index in (("greedy", 0), ("seeded sampled", 1)):
        same = sum(
            "".join(a[2]) == "".join(b[2])
            for a, b in zip(runs["roomy"][index], runs["tight"][index], strict=True)
        )
        print(f"{kind} text equal to the unpressured run: {same}/{len(prompts)}")


def capacity(bench: Bench, tokenizer) -> None:
    """Chats whose budget is the rest of the context (no max_tokens); measured for a fixed window.

    EOS is ignored so that the concurrency stays what it says for the whole window."""
    engine = bench.engine(bench.args.dtype)  # the default config: 512 MiB cache, 32 sequences
    prompts = [chat_ids(tokenizer, f"Tell me about {t}.") for t in TOPICS * 2]
    window = bench.args.window_s
    print(f"\n## capacity: chats without max_tokens, {bench.args.dtype}, measured over {window:.0f} s each")

    async def both():
        return [await chats(engine, prompts[:concurrency], window) for concurrency in (16, 32)]

    try:
        for concurrency, (started, tokens) in zip((16, 32), asyncio.run(both()), strict=True):
            last = max(started) if len(started) == concurrency else float("nan")
            print(
                f"c={concurrency}: {len(started)}/{concurrency} started, the last after {last:.2f} s; "
                f"{tokens / window:.1f} tok/s over the window"
            )
        print(stats_line(engine))
    finally:
        engine.shutdown()


async def chats(engine: AsyncEngine, prompts, window: float) -> tuple[list[float], int]:
    started, counts = [], [0] * len(prompts)
    t0 = time.perf_counter()

    ids_of = [str(uuid.uuid4()) for _ in prompts]

    async def one(i: int, ids) -> None:
        budget = engine.max_model_len - len(ids)  # what the OpenAI routes ask for without max_tokens
        params = SamplingParams(max_new_tokens=budget, temperature=0.7, seed=i, ignore_eos=True)
        async for delta in engine.add_request(GenerationRequest(ids_of[i], ids, params)):
            if counts[i] == 0:
                started.append(time.perf_counter() - t0)
            counts[i] = delta.num_completion_tokens

    tasks = [asyncio.create_task(one(i, ids)) for i, ids in enumerate(prompts)]
    await asyncio.sleep(window)
    total = sum(counts)
    for request_id, task in zip(ids_of, tasks, strict=True):
        engine.abort(request_id)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.5)
    return started, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--doc-sections", type=int, default=24, help="24 = ~1,300 tokens with SmolLM2")
    parser.add_argument("--sections", default="shared,pressure,capacity")
    args = parser.parse_args()
    bench = Bench(args)
    loaded = load_model(bench.spec, dtype=torch.float32, device=torch.device("cpu"))
    tokenizer, bench.model_config = loaded.tokenizer, loaded.model.config
    del loaded
    print(f"model {args.model}, {bench.device}, {bench.threads} threads, torch {torch.__version__}")
    sections = {"shared": shared_prefix, "pressure": pressure, "capacity": capacity}
    for name in args.sections.split(","):
        sections[name](bench, tokenizer)


if __name__ == "__main__":
    main()
