"""One layer's rotary embedding and KV-cache write: the C kernel's builds against torch's operations.

    python benchmarks/rotary_bench.py [--variants native generic] [--rounds 7] [--tokens 1 32 64 256]

SmolLM2-135M's shape (9 query heads, 3 kv heads, head_dim 64), bf16, real rotation angles. Each call
starts from a fresh copy of the same fused q/k/v rows (the kernel rotates in place; the copy, a few
microseconds, is in every column): the kernel's builds (engine/native_build.py's variants this CPU
runs), then transformers' apply_rotary on q and k and two `index_copy_` into the cache, as the fast
forward runs without the kernel. Medians over the rounds, alternated, microseconds a call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages

from bench_setup import cpu_kind, kernel_builds

from engine import native_rotary
from engine.device import default_num_threads
from engine.fast_forward import apply_rotary

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def calls(tokens: int, kernels: dict[str, native_rotary.RotaryKernel]) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(tokens)
    heads = Q_HEADS + 2 * KV_HEADS
    source = torch.randn(tokens, heads * HEAD_DIM, generator=gen).bfloat16()
    angles = torch.rand(tokens, HEAD_DIM, generator=gen) * 100
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    qkv, slots = source.clone(), torch.randperm(4 * tokens, generator=gen)[:tokens]
    k_cache = torch.zeros(4 * tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_end = (Q_HEADS + KV_HEADS) * HEAD_DIM

    def kernel_call(kernel: native_rotary.RotaryKernel) -> Callable[[], None]:
        def run() -> None:
            qkv.copy_(source)
            kernel(qkv, cos, sin, slots, k_cache, v_cache, Q_HEADS)

        return run

    def torch_call() -> None:
        qkv.copy_(source)
        qk = apply_rotary(qkv[:, :k_end].view(tokens, -1, HEAD_DIM), cos[:, None], sin[:, None])
        k_cache.index_copy_(0, slots, qk[:, Q_HEADS:])
        v_cache.index_copy_(0, slots, qkv[:, k_end:].view(tokens, KV_HEADS, HEAD_DIM))

    return {name: kernel_call(kernel) for name, kernel in kernels.items()} | {"torch": torch_call}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["native", "generic"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 64, 256])
    args = parser.parse_args()
    torch.set_num_threads(default_num_threads())
    kernels = kernel_builds(native_rotary.load, args.variants)
    print(f"CPU: {cpu_kind()}; {torch.get_num_threads()} threads; bf16, SmolLM2-135M's heads\n")
    names = [*kernels, "torch"]
    print(f"| tokens | {' | '.join(f'{n} us' for n in names)} |\n|---|" + "---|" * len(names))
    for tokens in args.tokens:
        runs = calls(tokens, kernels)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                for _ in range(200):
                    runs[name]()
                times[name].append((time.perf_counter() - start) / 200 * 1e6)
        print(f"| {tokens} | {' | '.join(f'{statistics.median(times[n]):.0f}' for n in names)} |")


if __name__ == "__main__":
    main()
