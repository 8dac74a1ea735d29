"""The attention kernel's builds against each other: the kernel alone, then whole decode steps.

    python benchmarks/attention_bench.py [--variants native avx2] [--rounds 7] [--steps-batch 32 16:250]
    git show REV:engine/csrc/decode_attention.c > /tmp/before.c
    python benchmarks/attention_bench.py --baseline /tmp/before.c    # this source against another one

Each build is one of engine/native_build.py's variants of csrc/decode_attention.c that this CPU runs
(`native` is the server's), and with `--baseline FILE` another source of the kernel built as `native` is
(for a change's before and after; it is built with engine/csrc on its include path). Part
one calls the kernel on SmolLM2-135M's shape (9 query heads, 3 kv heads, head_dim 64, bf16, 16-token
pages placed at random) for decode batches and one 256-token prefill, builds alternated each round.
Part two loads SmolLM2 as the server does and times whole decode steps (no profiler) with each build's
kernel swapped into the same engine, alternated: `B` or `B:WORDS` (a batch of B prompts, each with
WORDS filler words for longer contexts). Medians, and each build against the first one.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages

from bench_setup import cpu_kind, kernel_builds
from prompts import unique_prompt_texts

from engine import native_attention, native_build
from engine.device import default_num_threads

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16  # SmolLM2-135M
SHAPES = (
    ("decode", 32, 67),
    ("decode", 64, 67),
    ("decode", 16, 300),
    ("decode", 32, 300),
    ("prefill", 1, 256),
)


def kernel_case(kind: str, rows: int, ctx: int) -> Callable[[native_attention.AttentionKernel], None]:
    """A call of the kernel on one shape: `rows` sequences at context `ctx`, or one prefill of `ctx` rows."""
    gen = torch.Generator().manual_seed(0)
    num_seqs = rows if kind == "decode" else 1
    width = -(-ctx // PAGE)
    num_blocks = num_seqs * width + 8
    k_cache = torch.randn(num_blocks * PAGE, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks * PAGE, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * width].view(num_seqs, width)
    if kind == "decode":
        lens = torch.full((rows,), ctx, dtype=torch.int64)
    else:  # a prefill: row r of the prompt attends to positions [0, r]
        tables, lens = tables.expand(ctx, -1).contiguous(), torch.arange(1, ctx + 1)
    query = torch.randn(lens.numel(), HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(query)

    def call(kernel: native_attention.AttentionKernel) -> None:
        kernel(query, k_cache, v_cache, tables, lens, PAGE, HEAD_DIM**-0.5, None, None, out)

    return call


def timed(run: Callable[[], None], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - start) / repeat


def kernels_alone(kernels: dict[str, native_attention.AttentionKernel], rounds: int) -> None:
    names = list(kernels)
    columns = [f"{n} us" for n in names] + [f"{n} / {names[0]}" for n in names[1:]]
    print(f"\n| shape | {' | '.join(columns)} |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for kind, rows, ctx in SHAPES:
        call = kernel_case(kind, rows, ctx)
        times: dict[str, list[float]] = {n: [] for n in names}
        for name in names:
            call(kernels[name])  # warm
        for _ in range(rounds):
            for name in names:
                times[name].append(timed(lambda c=call, k=kernels[name]: c(k), 20) * 1e6)
        med = {n: statistics.median(v) for n, v in times.items()}
        label = f"decode {rows} x context {ctx}" if kind == "decode" else f"prefill of {ctx} tokens"
        ratios = " | ".join(f"{med[n] / med[names[0]]:.2f}" for n in names[1:])
        print(f"| {label} | {' | '.join(f'{med[n]:.0f}' for n in names)} | {ratios} |")


def decode_steps(kernels: dict[str, native_attention.AttentionKernel], spec: str, rounds: int) -> None:
    from engine.core import EngineCore
    from engine.types import EngineConfig, GenerationRequest, SamplingParams
    from model_zoo.catalogue import resolve
    from model_zoo.loader import load_model

    batch, _, words = spec.partition(":")
    batch, words = int(batch), int(words or 0)
    loaded = load_model(resolve("smollm2-135m-instruct"), dtype=torch.bfloat16, device=torch.device("cpu"))
    config = EngineConfig(max_num_seqs=max(32, batch), max_model_len=2048)
    names = list(kernels)
    with torch.inference_mode():
        core = EngineCore(loaded.model, loaded.tokenizer, config, torch.device("cpu"))
        steps = rounds * len(names) * 10 + 20
        params = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
        for text in unique_prompt_texts(batch, uuid.uuid4().hex[:6], words):
            ids = tuple(loaded.tokenizer(text).input_ids)
            core.add_request(GenerationRequest(uuid.uuid4().hex, ids, params))
        running = core.scheduler.running
        while core.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in running):
            core.step()  # prefill until every sequence decodes
        start_ctx = min(s.num_tokens for s in core.scheduler.running)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for name in names:
                core.runner.attention_kernel = kernels[name]
                core.step()  # the first step after a swap is not timed
                times[name].append(timed(core.step, 8) * 1e3)
        end_ctx = max(s.num_tokens for s in core.scheduler.running)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratios = ", ".join(f"{n} / {names[0]} {med[n] / med[names[0]]:.3f}" for n in names[1:])
    steps = ", ".join(f"{n} {med[n]:.1f} ms" for n in names)
    print(f"| batch {batch}, contexts {start_ctx}-{end_ctx} | {steps} | {ratios} |")


def baseline_kernel(source: Path) -> native_attention.AttentionKernel:
    """`source` compiled with the flags of the server's build (and engine/csrc for its headers)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    target = Path(tempfile.mkdtemp()) / "decode_attention_baseline.so"
    flags = [*native_build.KERNEL_FLAGS["decode_attention"], f"-I{native_build.SOURCE_DIR}"]
    native_build._compile(compiler, source.resolve(), flags, target)
    return native_attention.AttentionKernel(ctypes.CDLL(str(target)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["native", "avx2"])
    parser.add_argument("--baseline", type=Path, help="another decode_attention.c, built as `native` is")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-batch", nargs="*", default=["32", "16:250"], help="B or B:WORDS; none: skip")
    args = parser.parse_args()
    torch.set_num_threads(default_num_threads())
    kernels = kernel_builds(native_attention.load, args.variants)
    if args.baseline is not None:
        base = baseline_kernel(args.baseline)
        kernels = {f"baseline ({base.isa})": base, **kernels}
    print(f"CPU: {cpu_kind()}; {torch.get_num_threads()} threads; bf16 caches and queries")
    kernels_alone(kernels, args.rounds)
    if args.steps_batch:
        print("\nwhole decode steps of SmolLM2-135M-Instruct (bf16), each build in the same engine:\n")
        print("| load | step, median | against the first |\n|---|---|---|")
        for spec in args.steps_batch:
            decode_steps(kernels, spec, args.rounds)


if __name__ == "__main__":
    main()
