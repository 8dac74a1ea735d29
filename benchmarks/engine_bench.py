"""Engine benchmark: our continuous-batching engine against Hugging Face `generate`, in one run.

Workload (as in shared/reference/measurements.md): prompts of ~32 tokens, 64 new tokens forced
(EOS ignored), greedy. Prints one table and the ratios the targets are stated in.

    python benchmarks/engine_bench.py [--model smollm2-135m-instruct] [--dtype bfloat16]

The default prompts repeat (16 topics), so from the 17th request on the prefix cache serves whole
prompts. `--unique-prompts --levels 1:8 16:64 32:64 --skip-baselines` runs serve_bench.py's load
instead (unique prompts, its levels): the quiet engine-alone figure to hold a server run against;
`--prompt-words 250` pads those prompts to ~310 tokens, as serve_bench.py's prefill-heavy load.
`--client-gap-ms 5` makes each closed-loop client wait that long between a request's end and its next,
as a remote client's round trip does (the in-process default sends the next one at once);
`--refill-wait-ms 40` turns the engine's refill hold on (docs/engine.md).
`--max-num-seqs 64` runs the batch size SmolLM2's served config has (the default here is 32).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from engine_switches import add_switch_flags, switches  # benchmarks/ is on sys.path when run as a script
from prompts import prompt_texts, unique_prompt_texts

from engine.async_engine import AsyncEngine
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.guided_spec import GuidedSpec
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model


@dataclass
class Result:
    name: str
    num_tokens: int
    wall_s: float
    ttft_s: list[float]
    tpot_s: list[float]

    @property
    def tok_per_s(self) -> float:
        return self.num_tokens / self.wall_s

    def row(self) -> str:
        ttft = f"{statistics.median(self.ttft_s) * 1e3:11.0f}" if self.ttft_s else f"{'-':>11}"
        tpot = f"{statistics.median(self.tpot_s) * 1e3:11.1f}" if self.tpot_s else f"{'-':>11}"
        return f"| {self.name:<44} | {self.tok_per_s:8.1f} | {ttft} | {tpot} |"


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in prompt_texts(n)]


def bench_sequential_generate(model, prompts, new_tokens: int) -> Result:
    start, num = time.perf_counter(), 0
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        num += out.shape[1] - x.shape[1]
    wall = time.perf_counter() - start
    return Result(f"HF generate, sequential ({len(prompts)} req)", num, wall, [], [wall / num])


def bench_static_batch(model, tokenizer, prompts, new_tokens: int) -> Result:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    wall = time.perf_counter() - start
    num = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return Result(f"HF generate, static batch of {len(prompts)}", num, wall, [], [])


STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "characters": {"type": "array", "items": {"type": "string"}},
                   "story": {"type": "string"}},
    "required": ["title", "characters", "story"],
}  # fmt: skip


async def bench_engine(
    engine: AsyncEngine,
    prompts,
    concurrency: int,
    new_tokens: int,
    params: SamplingParams | None = None,
    label="",
    gap_s: float = 0.0,
) -> Result:
    """Closed loop: `concurrency` clients, each sending its next request `gap_s` after its last one ended
    (0: at once, in the same event-loop turn; a remote client's round trip is more)."""
    params = params or SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ttft, tpot, counts = [], [], []
    work = list(prompts)

    async def client() -> None:
        while work:
            ids = work.pop()
            t0 = time.perf_counter()
            first = last = None
            n = 0
            async for delta in engine.add_request(GenerationRequest(str(uuid.uuid4()), tuple(ids), params)):
                last = time.perf_counter()
                first = first or last
                n = delta.num_completion_tokens
            ttft.append(first - t0)
            tpot.append((last - first) / max(n - 1, 1))
            counts.append(n)
            if gap_s and work:
                await asyncio.sleep(gap_s)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    name = f"engine{label}, concurrency {concurrency} ({len(prompts)} req)"
    return Result(name, sum(counts), wall, ttft, tpot)


async def greedy_text(engine: AsyncEngine, ids: list[int], new_tokens: int) -> str:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stream = engine.add_request(GenerationRequest(str(uuid.uuid4()), tuple(ids), params))
    return "".join([delta.text async for delta in stream])


async def batch_invariance(engine: AsyncEngine, prompts, new_tokens: int, num_checked: int = 4) -> str:
    """Greedy text of a prompt run alone vs the same prompt amid 15 others."""
    alone = [await greedy_text(engine, ids, new_tokens) for ids in prompts[:num_checked]]
    crowd = await asyncio.gather(*(greedy_text(engine, ids, new_tokens) for ids in prompts))
    same = sum(a == c for a, c in zip(alone, crowd, strict=False))
    others = len(prompts) - 1
    return f"batch invariance: {same}/{num_checked} prompts: same greedy text alone and amid {others} others"


def run_in_thread(fn):
    """Run torch work on a thread that then exits: the main thread must not keep an OpenMP team
    alive beside the engine's (see engine/async_engine.py)."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", fn()))
    thread.start()
    thread.join()
    return box["out"]


def baselines(load, args, results: dict, threads: int):
    """Hugging Face generate on its own copy of the model; returns the tokenizer."""
    torch.set_num_threads(threads)
    model, tokenizer = load()
    if args.skip_baselines:
        return tokenizer
    prompts16 = make_prompts(tokenizer, 16)
    with torch.inference_mode():
        bench_static_batch(model, tokenizer, prompts16[:2], 4)  # warm-up
        results["seq"] = bench_sequential_generate(
            model, prompts16[: args.sequential_requests], args.new_tokens
        )
        results["static"] = bench_static_batch(model, tokenizer, prompts16, args.new_tokens)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or local folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--max-num-seqs", type=int, default=32, help="the engine's batch size (SmolLM2's served config: 64)"
    )
    parser.add_argument("--sequential-requests", type=int, default=4)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--guided", action="store_true", help="also compare JSON-guided with free requests")
    add_switch_flags(parser)
    parser.add_argument(
        "--unique-prompts",
        action="store_true",
        help="a tag first in every prompt, as serve_bench.py sends: no prefix-cache hits between requests",
    )
    parser.add_argument(
        "--prompt-words",
        type=int,
        default=0,
        help="with --unique-prompts: filler words in each prompt, as serve_bench.py's (a prefill-heavy load)",
    )
    parser.add_argument(
        "--client-gap-ms",
        type=float,
        default=0.0,
        help="each closed-loop client waits this long between a request's end and its next (a remote "
        "client's round trip; 0: the next request arrives at once)",
    )
    parser.add_argument(
        "--refill-wait-ms",
        type=float,
        default=0.0,
        help="the engine's refill hold (EngineConfig.refill_wait_ms; 0 = off, the default)",
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        default=["1:4", "4:16", "16:32"],
        help="concurrency:requests per level (serve_bench.py's load: 1:8 16:64 32:64)",
    )
    args = parser.parse_args()
    if args.prompt_words and not args.unique_prompts:
        parser.error("--prompt-words pads the --unique-prompts load")
    levels = [tuple(int(x) for x in level.split(":")) for level in args.levels]
    run_id = uuid.uuid4().hex[:6]

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec = resolve(args.model)
    threads = default_num_threads()

    def load():
        loaded = load_model(spec, dtype=dtype, device=device)
        return loaded.model, loaded.tokenizer

    results: dict[str, Result] = {}
    tokenizer = run_in_thread(lambda: baselines(load, args, results, threads))
    print(f"model {args.model}, {dtype}, {device}, {threads} threads, torch {torch.__version__}")
    engine = AsyncEngine.from_loader(
        load,
        EngineConfig(
            max_num_seqs=args.max_num_seqs,
            num_threads=threads,
            refill_wait_ms=args.refill_wait_ms,
            **switches(args),
        ),
        device,
    )
    prompts16 = make_prompts(tokenizer, 16)
    print(
        f"prompt tokens: {min(map(len, prompts16))}-{max(map(len, prompts16))}, new tokens {args.new_tokens}"
    )

    notes: list[str] = []

    async def run_engine() -> None:
        await bench_engine(engine, prompts16[:2], 2, 4)  # warm-up
        for concurrency, num_requests in levels:
            if args.unique_prompts:
                texts = unique_prompt_texts(num_requests, f"{run_id}.{concurrency}", args.prompt_words)
                prompts = [tokenizer(t).input_ids for t in texts]
            else:  # 16 topics repeat: from the 17th request on, the prefix cache serves whole prompts
                prompts = make_prompts(tokenizer, num_requests)
            results[f"c{concurrency}"] = await bench_engine(
                engine, prompts, concurrency, args.new_tokens, gap_s=args.client_gap_ms / 1000
            )
        notes.append(await batch_invariance(engine, prompts16, args.new_tokens))
        if args.guided:  # same load, every request guided by a JSON schema vs none
            prompts = make_prompts(tokenizer, 32)
            # Unguided requests run their full length (EOS ignored), so the batch never thins out;
            # guided ones end when the document is complete (at most new_tokens).
            free = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
            guided = SamplingParams(
                max_new_tokens=args.new_tokens, temperature=0.0, guided=GuidedSpec.json_schema(STORY_SCHEMA)
            )
            results["free"] = await bench_engine(engine, prompts, 16, args.new_tokens, free, " free")
            results["guided"] = await bench_engine(
                engine, prompts, 16, args.new_tokens, guided, " JSON-guided"
            )
            ratio = results["guided"].tok_per_s / results["free"].tok_per_s
            mean_tokens = results["guided"].num_tokens / len(prompts)
            notes.append(
                f"guided / unguided throughput at concurrency 16: {ratio:.2f} (target >= 0.8); "
                f"guided requests averaged {mean_tokens:.1f} tokens"
            )

    asyncio.run(run_engine())
    engine.shutdown()

    print(f"| {'mode':<44} |  tok/s   | TTFT p50 ms | TPOT p50 ms |")
    print(f"|{'-' * 46}|----------|-------------|-------------|")
    for r in results.values():
        print(r.row())
    print("\n" + "\n".join(notes))
    if "seq" in results and {"c1", "c16"} <= results.keys():
        c1, c16 = results["c1"], results["c16"]
        seq, static = results["seq"], results["static"]
        print(f"\nconcurrency 16 vs sequential generate: {c16.tok_per_s / seq.tok_per_s:.1f}x (target >= 8x)")
        print(
            f"concurrency 16 vs static batch of 16:  {c16.tok_per_s / static.tok_per_s:.2f}x (target >= 1.5x)"
        )
        ratio = statistics.median(c1.tpot_s) / seq.tpot_s[0]
        print(f"concurrency 1 time per output token vs sequential generate: {ratio:.2f}x (target <= 1.0x)")


if __name__ == "__main__":
    main()
