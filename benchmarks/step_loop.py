"""The engine's ceiling: `EngineCore.step` in a plain loop, a closed loop of requests refilled at once.

    python benchmarks/step_loop.py [--levels 16 32 64] [--seconds 20] [--flags "--no-huge-pages"]

No asyncio front, no HTTP, no clients in other processes: each finished request is replaced by a new
one (serve_bench.py's unique prompts, so no prefix-cache hits; 64 greedy tokens, EOS ignored) before
the next step, and the level is timed over `--seconds` after `--warmup-steps` steps. What it prints
per concurrency (tok/s, the mean step, the share of steps that carried prompt tokens) is what any
serving path divides: `engine_bench.py` gives the same load behind the engine's asyncio front and
`serve_bench.py` through HTTP, so the ratios of the three say what each layer costs on this machine
(docs/performance.md). `--flags` takes engine_ab.py's engine flags (engine_switches.py's and
`--max-num-seqs N`; the default here is the served SmolLM2 config's 64).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages

from bench_setup import cpu_kind
from engine_ab import side_config
from prompts import unique_prompt_texts

from engine.core import EngineCore
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.types import GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model


@dataclass(frozen=True, slots=True)
class LoopResult:
    concurrency: int
    num_tokens: int  # completion tokens generated within the timed window
    num_steps: int
    num_prefill_steps: int  # steps in which some request was fed prompt tokens (EngineCore.step_totals)
    wall_s: float

    @property
    def tok_per_s(self) -> float:
        return self.num_tokens / self.wall_s

    @property
    def step_ms(self) -> float:
        return self.wall_s / max(self.num_steps, 1) * 1e3

    def row(self) -> str:
        share = self.num_prefill_steps / max(self.num_steps, 1)
        return (
            f"| {self.concurrency} | {self.tok_per_s:.1f} | {self.step_ms:.1f} | {self.num_steps} | "
            f"{share:.0%} |"
        )


def closed_loop(
    core: EngineCore,
    prompts: Iterator[tuple[int, ...]],
    concurrency: int,
    new_tokens: int,
    *,
    warmup_steps: int,
    seconds: float | None = None,
    max_steps: int | None = None,
) -> LoopResult:
    """`concurrency` requests kept in `core` (each one that ends replaced before the next step): admitted
    one a step, then `warmup_steps` steps untimed, then timed for `seconds` of wall time or `max_steps`
    steps, whichever comes first."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    scheduler = core.scheduler
    seen: dict[str, int] = {}  # completion tokens each request had at its last delta

    def refill(limit: int) -> None:
        while len(scheduler.running) + len(scheduler.waiting) < limit:
            core.add_request(GenerationRequest(uuid.uuid4().hex, next(prompts), params))

    def new_tokens_of(deltas) -> int:
        count = 0
        for delta in deltas:
            count += delta.num_completion_tokens - seen.get(delta.request_id, 0)
            if delta.is_finished:
                seen.pop(delta.request_id, None)
            else:
                seen[delta.request_id] = delta.num_completion_tokens
        return count

    # one request more a step until `concurrency`, so that they do not all start (and end) together
    for step in range(concurrency + warmup_steps):
        refill(min(step + 1, concurrency))
        new_tokens_of(core.step())
    num_tokens = num_steps = 0
    prefill_steps_before = core.step_totals.num_prefill_steps  # the engine's own count, by kind
    start = time.perf_counter()
    while (seconds is None or time.perf_counter() - start < seconds) and (
        max_steps is None or num_steps < max_steps
    ):
        refill(concurrency)
        num_tokens += new_tokens_of(core.step())
        num_steps += 1
    wall_s = time.perf_counter() - start
    num_prefill_steps = core.step_totals.num_prefill_steps - prefill_steps_before
    return LoopResult(concurrency, num_tokens, num_steps, num_prefill_steps, wall_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--levels", nargs="+", type=int, default=[16, 32, 64], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed wall time a level")
    parser.add_argument("--warmup-steps", type=int, default=200, help="untimed steps a level starts with")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--flags", default="--max-num-seqs 64", help="engine flags (engine_ab.py's)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="the engine's KV cache")
    args = parser.parse_args()
    device = resolve_device("cpu")
    dtype, threads = resolve_dtype(args.dtype, device), default_num_threads()
    torch.set_num_threads(threads)
    loaded = load_model(resolve(args.model), dtype=dtype, device=device)
    tokenizer = loaded.tokenizer
    config = side_config(args.flags, threads, args.kv_cache_mib * 2**20)
    print(f"CPU: {cpu_kind()}")
    print(
        f"model {args.model}, {dtype}, {threads} threads, torch {torch.__version__}; "
        f"engine flags: {args.flags}"
    )
    print(f"load average {os.getloadavg()[0]:.2f} at the start\n")
    print(
        "| concurrency | tok/s | step ms (mean) | steps | steps with prompt tokens |\n|---|---|---|---|---|"
    )
    with torch.inference_mode():
        for concurrency in args.levels:
            level_config = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, concurrency))
            core = EngineCore(loaded.model, tokenizer, level_config, device)
            texts = unique_prompt_texts(100_000, uuid.uuid4().hex[:6])
            prompts = (tuple(tokenizer(text).input_ids) for text in texts)
            result = closed_loop(
                core,
                prompts,
                concurrency,
                args.new_tokens,
                warmup_steps=args.warmup_steps,
                seconds=args.seconds,
            )
            print(result.row(), flush=True)
            core.abort_all()
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
