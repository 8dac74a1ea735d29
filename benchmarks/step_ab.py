"""Two engine configurations in one process, decode step against decode step: the A/B for a change to one
step's arithmetic, without the scheduling and prefill noise of a served load.

    python benchmarks/step_ab.py --a=--no-native-rotary --b= --batches 1 16 32 64 --rounds 7

`--a` and `--b` take engine_ab.py's flags (engine_switches.py's and `--max-num-seqs N`). Both engines
load the model (each its own copy) and admit the same `B` unique prompts (engine_bench's, ~30 tokens;
`--prompt-words` for longer contexts); once every sequence decodes, each round times `--steps` decode
steps on A, then on B (the first step after a switch untimed). Prints each batch's median step time
on both sides and B / A with its range; the contexts grow by the steps taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import uuid
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


def decoding(core: EngineCore, prompts: list[tuple[int, ...]], max_new_tokens: int) -> EngineCore:
    """`core` with `prompts` admitted and stepped until every sequence decodes."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    for ids in prompts:
        core.add_request(GenerationRequest(uuid.uuid4().hex, ids, params))
    running = core.scheduler.running
    while core.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in running):
        core.step()
    return core


def finish(core: EngineCore) -> None:
    while core.scheduler.waiting or core.scheduler.running:
        core.step()


def timed_steps(core: EngineCore, steps: int) -> float:
    core.step()  # not timed: the first step after the other side's
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--a", default="", help="engine flags of side A")
    parser.add_argument("--b", default="", help="engine flags of side B")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps a round and side")
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words in each prompt")
    parser.add_argument("--kv-cache-mib", type=int, default=384, help="each engine's KV cache")
    args = parser.parse_args()
    device = resolve_device("cpu")
    dtype, threads = resolve_dtype(args.dtype, device), default_num_threads()
    torch.set_num_threads(threads)
    loaded = {side: load_model(resolve(args.model), dtype=dtype, device=device) for side in "AB"}
    tokenizer = loaded["A"].tokenizer
    kv_bytes = args.kv_cache_mib * 2**20
    flags = {"A": args.a, "B": args.b}
    print(f"CPU: {cpu_kind()}")
    print(f"model {args.model}, {dtype}, {threads} threads, torch {torch.__version__}")
    print(f"A: {args.a or '(defaults)'}\nB: {args.b or '(defaults)'}")
    print(f"load average {os.getloadavg()[0]:.2f} at the start\n")
    print("| batch | contexts | A ms a step | B ms a step | B / A (range) |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            texts = unique_prompt_texts(batch, uuid.uuid4().hex[:6], args.prompt_words)
            prompts = [tuple(tokenizer(text).input_ids) for text in texts]
            new_tokens = args.rounds * (args.steps + 1) + 8
            cores = {}
            for side in "AB":
                config = side_config(flags[side], threads, kv_bytes)
                config = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, batch))
                core = EngineCore(loaded[side].model, tokenizer, config, device)
                cores[side] = decoding(core, prompts, new_tokens)
            first = min(s.num_tokens for s in cores["A"].scheduler.running)
            times: dict[str, list[float]] = {"A": [], "B": []}
            for _ in range(args.rounds):
                for side in "AB":
                    times[side].append(timed_steps(cores[side], args.steps) * 1e3)
            last = max(s.num_tokens for s in cores["A"].scheduler.running)
            ratios = [b / a for a, b in zip(times["A"], times["B"], strict=True)]
            a, b = statistics.median(times["A"]), statistics.median(times["B"])
            print(
                f"| {batch} | {first}-{last} | {a:.1f} | {b:.1f} | {statistics.median(ratios):.3f} "
                f"({min(ratios):.3f}-{max(ratios):.3f}) |",
                flush=True,
            )
            for core in cores.values():
                finish(core)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
