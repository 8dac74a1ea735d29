"""A decode step's products on the engine's bf16 kernel, build against build, alternated in one process.

    python benchmarks/linear_bench.py [--rows 1 16 32 64 256] [--rounds 5] [--variants native avx2]
    python benchmarks/linear_bench.py --define "ROWS=4 UNIT=4" --define "ROWS=8 UNIT=6"  # tile A/B
    python benchmarks/linear_bench.py --distinct-weights --huge-pages --define PREFETCH_AHEAD=0  # prefetching
    python benchmarks/linear_bench.py --int8 native avx2  # the int8 kernel (csrc/linear_int8.c) too
    python benchmarks/linear_bench.py --epilogues --define SILU_SCALAR  # the SiLU's AVX2 path A/B

Each build runs SmolLM2-135M's products of one step (30 layers' fused q/k/v, o, fused gate/up and down
on `rows` rows, the lm head on `rows` rows), random bf16 weights packed as the engine packs them: by
default one weight per shape, called once per layer, so the weights stay in cache (the kernels'
arithmetic); `--distinct-weights` gives every layer its own, as in the model, so that each step reads
all 270 MB from memory (what a served step pays: a tile shape or prefetch that wins cache-hot may lose
there, docs/performance-log.md); `--huge-pages` puts them on huge pages, as the engine does. The
builds are the instruction-set variants of engine/native_build.py and, with `--define`, the native
build compiled with extra -D macros (a tile shape to try). Rounds alternate the builds (A, B, A, B, ...)
so that a shared machine's drift hits each alike; the table gives each build's median ms a step and
GFLOP/s, and the load average. Also `--onednn`: torch's own products (oneDNN, float32 and bf16) on the
same shapes, for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_setup import kernel_builds

from engine import huge_pages, native_build, native_int8, native_linear

# (out_features, in_features, times a step) of SmolLM2-135M: 30 layers, then the lm head
SMOLLM2 = [(960, 576, 30), (576, 576, 30), (3072, 576, 30), (576, 1536, 30), (49152, 576, 1)]
SMOLLM2_HIDDEN, SMOLLM2_MLP = 576, 1536


def distinct_shapes(shapes):
    """The same products with every call on weights of its own (a layer each), as in the model."""
    return [(n, k, 1) for n, k, times in shapes for _ in range(times)]


def builds(args) -> dict[str, native_linear.LinearKernel]:
    found = kernel_builds(native_linear.load, args.variants)
    for define in args.define or []:
        flags = [f"-D{d}" for d in define.split()]
        library = native_build.build("linear_bf16", flags)
        if library is not None:
            found[define] = native_linear.LinearKernel(library)
    int8 = kernel_builds(native_int8.load, args.int8 or [])
    found |= {f"int8 {name}": kernel for name, kernel in int8.items()}
    for define in args.int8_define or []:
        flags = [*native_build.KERNEL_FLAGS["linear_int8"], *(f"-D{d}" for d in define.split())]
        library = native_build.build("linear_int8", flags)
        if library is not None:
            found[f"int8 {define}"] = native_int8.Int8Kernel(library)
    return found


def step_fn(kernel, rows: int, shapes, epilogues: bool = False, on_huge_pages: bool = False):
    """One step's products on `kernel` (the bf16 or the int8 one); with `epilogues`, the bf16 kernel's
    gate/up product also applies SiLU and the multiply, and o_proj and down add into a residual, as the
    engine's Llama layers run them; with `on_huge_pages`, the bf16 weights side by side on huge pages
    (engine/huge_pages.py), as the engine places them."""
    is_int8 = isinstance(kernel, native_int8.Int8Kernel)
    weights = [kernel.pack(torch.randn(n, k).bfloat16()) for n, k, _ in shapes]
    if on_huge_pages and not is_int8:
        weights = huge_pages.copies(weights)
    calls = []
    for (n, k, times), packed in zip(shapes, weights, strict=True):
        x = torch.randn(rows, k).bfloat16()
        if is_int8:
            calls.append((lambda x=x, w=packed: kernel(x, w, None), times))
        elif epilogues and n == 2 * SMOLLM2_MLP:  # the fused [gate; up]
            calls.append((lambda x=x, w=packed: kernel.silu_mul(x, w, SMOLLM2_MLP, None), times))
        elif epilogues and n == SMOLLM2_HIDDEN:  # o_proj, down: their residual adds
            residual = torch.randn(rows, n).bfloat16()
            calls.append(
                (lambda x=x, w=packed, r=residual: kernel.add_into(x, w, SMOLLM2_HIDDEN, None, r), times)
            )
        else:
            calls.append((lambda x=x, w=packed, n=n: kernel(x, w, n, None), times))

    def run() -> None:
        for call, times in calls:
            for _ in range(times):
                call()

    return run


def onednn_fn(rows: int, shapes, dtype):
    weights = [(torch.ops.mkldnn._reorder_linear_weight(w, rows), torch.randn(rows, k, dtype=dtype), t)
               for n, k, t in shapes for w in [torch.randn(n, k, dtype=dtype)]]  # fmt: skip

    def run() -> None:
        for packed, x, times in weights:
            for _ in range(times):
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=["native", "avx2"])
    parser.add_argument("--define", action="append", help="a native build with these -D macros")
    parser.add_argument("--int8", nargs="*", help="also the int8 kernel's builds of these variants")
    parser.add_argument("--int8-define", action="append", help="a native int8 build with these -D macros")
    parser.add_argument("--onednn", action="store_true", help="also torch's oneDNN products (fp32, bf16)")
    parser.add_argument("--distinct-weights", action="store_true", help="every layer its own weights")
    parser.add_argument(
        "--huge-pages", action="store_true", help="the bf16 weights on huge pages, as the engine places them"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads; 0 = every usable core")
    parser.add_argument(
        "--epilogues", action="store_true", help="SiLU in gate/up, residual adds in o/down, as in the engine"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    kernels = builds(args)
    shapes = distinct_shapes(SMOLLM2) if args.distinct_weights else SMOLLM2
    flops = {rows: sum(2 * rows * n * k * t for n, k, t in SMOLLM2) for rows in args.rows}
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the start\n")
    header = "| build | " + " | ".join(f"{r} rows ms (GFLOP/s)" for r in args.rows) + " |"
    print(header + "\n" + "|---" * (len(args.rows) + 1) + "|")
    with torch.inference_mode():
        for rows in args.rows:
            fns = {
                name: step_fn(kernel, rows, shapes, args.epilogues, args.huge_pages)
                for name, kernel in kernels.items()
            }
            if args.onednn and torch.backends.mkldnn.is_available():
                fns["oneDNN float32"] = onednn_fn(rows, shapes, torch.float32)
                if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                    fns["oneDNN bf16"] = onednn_fn(rows, shapes, torch.bfloat16)
            for fn in fns.values():
                fn()  # warm
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                results.setdefault(name, {})[rows] = statistics.median(ts)
    for name, by_rows in results.items():
        cells = [f"{by_rows[r] * 1e3:.1f} ({flops[r] / by_rows[r] / 1e9:.0f})" for r in args.rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


results: dict[str, dict[int, float]] = {}

if __name__ == "__main__":
    main()
