"""Two engine configurations in one process, level by level in turn (A, B, A, B, ...): an A/B that a
shared machine's drift hits alike on both sides.

    python benchmarks/engine_ab.py --b=--int8-weights --levels 1:8 16:64 64:128 --rounds 3
    python benchmarks/engine_ab.py --a="--max-num-seqs 32" --b="--max-num-seqs 64" --levels 64:128

`--a` and `--b` take engine_switches.py's flags (`--no-native-linear`, `--int8-weights`, ...) and
`--max-num-seqs N`. Both engines load the model (each its own copy, its own thread); each level runs
on fresh unique prompts (engine_bench's load: ~30 tokens, `--new-tokens` greedy tokens, EOS ignored),
on A then on B with the same prompts, `--rounds` times. Prints every round and each level's median
output tokens/s, TTFT and TPOT p50 for both, and the median of the B / A ratios with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import uuid

import torch
from engine_bench import bench_engine, run_in_thread
from engine_switches import add_switch_flags, switches
from prompts import unique_prompt_texts

from engine.async_engine import AsyncEngine
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.types import EngineConfig
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model


def side_config(flags: str, threads: int, kv_bytes: int) -> EngineConfig:
    parser = argparse.ArgumentParser(prog="side")
    add_switch_flags(parser)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    args = parser.parse_args(shlex.split(flags))
    return EngineConfig(
        max_num_seqs=args.max_num_seqs, num_threads=threads, kv_cache_bytes=kv_bytes, **switches(args)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--a", default="", help="engine flags of side A")
    parser.add_argument("--b", default="", help="engine flags of side B")
    parser.add_argument("--levels", nargs="+", default=["1:8", "16:64", "32:64"], help="concurrency:requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words in each prompt")
    parser.add_argument("--kv-cache-mib", type=int, default=384, help="each engine's KV cache")
    args = parser.parse_args()
    levels = [tuple(int(x) for x in level.split(":")) for level in args.levels]
    device = resolve_device("cpu")
    dtype, spec, threads = resolve_dtype(args.dtype, device), resolve(args.model), default_num_threads()

    def load():
        loaded = load_model(spec, dtype=dtype, device=device)
        return loaded.model, loaded.tokenizer

    tokenizer = run_in_thread(load)[1]
    kv_bytes = args.kv_cache_mib * 2**20
    engines = {
        side: AsyncEngine.from_loader(load, side_config(flags, threads, kv_bytes), device)
        for side, flags in (("A", args.a), ("B", args.b))
    }
    print(f"model {args.model}, {dtype}, {threads} threads, torch {torch.__version__}")
    print(f"A: {args.a or '(defaults)'}\nB: {args.b or '(defaults)'}")
    print(f"load average {os.getloadavg()[0]:.2f} at the start\n")
    print(
        "| level, round | A tok/s | B tok/s | B / A | TTFT p50 ms A / B | TPOT p50 ms A / B |\n"
        + "|---" * 6
        + "|"
    )
    run_id = uuid.uuid4().hex[:6]
    ratios: dict[int, list[float]] = {}
    rates: dict[tuple[int, str], list[float]] = {}

    async def run() -> None:
        for engine in engines.values():
            await bench_engine(engine, [tokenizer("warm up").input_ids] * 2, 2, 4)
        for (concurrency, num_requests), round_no in [(lv, r) for lv in levels for r in range(args.rounds)]:
            texts = unique_prompt_texts(num_requests, f"{run_id}.{concurrency}.{round_no}", args.prompt_words)
            prompts = [tokenizer(t).input_ids for t in texts]
            got = {}
            for side, engine in engines.items():
                got[side] = await bench_engine(engine, prompts, concurrency, args.new_tokens)
                rates.setdefault((concurrency, side), []).append(got[side].tok_per_s)
            a, b = got["A"], got["B"]
            ratios.setdefault(concurrency, []).append(b.tok_per_s / a.tok_per_s)
            ttft = " / ".join(f"{statistics.median(r.ttft_s) * 1e3:.0f}" for r in (a, b))
            tpot = " / ".join(f"{statistics.median(r.tpot_s) * 1e3:.1f}" for r in (a, b))
            print(
                f"| c={concurrency}, {round_no + 1} | {a.tok_per_s:.1f} | {b.tok_per_s:.1f} "
                f"| {b.tok_per_s / a.tok_per_s:.2f}x | {ttft} | {tpot} |",
                flush=True,
            )

    try:
        asyncio.run(run())
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; medians over {args.rounds} rounds:")
    for concurrency, values in ratios.items():
        a, b = (statistics.median(rates[(concurrency, side)]) for side in "AB")
        print(
            f"c={concurrency}: A {a:.1f} tok/s, B {b:.1f} tok/s, B / A {statistics.median(values):.2f}x "
            f"({min(values):.2f}-{max(values):.2f})"
        )


if __name__ == "__main__":
    main()
