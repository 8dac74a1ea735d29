"""The machine's roofline, and where the engine's steps sit on it.

    python benchmarks/roofline.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--repeat 5]

1. The machine: its peak from large compute-bound products (float32 through oneDNN, bf16 through
   torch and through the engine's own kernel at many rows) and from instruction throughput (float32
   fused multiply-adds alone on every core, fma_peak.c: the ceiling no product reaches), the highest
   of them taken as the peak; and its memory bandwidth (a read of a buffer far larger than the caches;
   a copy).
2. The model as the server loads it (EngineCore: fused and packed products, paged attention): for a
   decode step at 1, 16 and 64 sequences and for a prefill chunk, the FLOPs (every product, and the
   attention's q.k and p.v) and the bytes a step must read at least (every weight once, the KV cache
   it attends to, the KV it writes). From those, the time the roofline allows (the larger of FLOPs /
   peak and bytes / bandwidth) and whether the step is compute- or bandwidth-bound there.
3. Measured at those shapes: the products alone (every packed linear of a step called on rows of the
   step's size, in the step's order) and the whole step (EngineCore.step, the sampling included), as
   milliseconds and as a fraction of the roofline's time.
4. The step's floor: the same step on a copy of the architecture with its widths cut to the least (one
   head of the model's head size, 128 hidden, 256 MLP, a 512-token vocabulary; every layer kept, with
   random weights), loaded the same way, so it makes every kernel call, Python line and scheduling
   decision of the real step with almost no arithmetic: what a step costs beyond its arithmetic, the
   most that a compiled forward or fewer calls a step could take away.

Every timing is the median of `--repeat` runs after a warm-up. On a shared machine the load average
is printed with the figures: only ratios measured in one run are comparable.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages

import fma_peak
from engine_switches import add_switch_flags, switches
from prompts import unique_prompt_texts

from engine.core import EngineCore
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.fusion import PackedLinear
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import LoadedModel, load_model

KV_BYTES = 256 * 2**20  # each EngineCore's cache: room for 64 sequences of a few hundred tokens
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def timed(fn, repeat: int, warm: int = 2) -> float:
    """Median seconds of fn() over `repeat` runs after `warm` unmeasured ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS_OF_INTEREST if f in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable; {' '.join(have) or 'no vector flags read'}"


@dataclass(frozen=True, slots=True)
class Machine:
    peak_flops: float  # FLOP/s: the best large product measured
    bandwidth: float  # bytes/s read from memory


def measure_machine(repeat: int, dtype: torch.dtype) -> Machine:
    """Print the machine's products and bandwidth; return the roofline's two numbers."""
    print("| measurement | result |\n|---|---|")
    m, k, n = 1024, 2048, 2048
    rates = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        seconds = timed(lambda a=a, b=b: torch.mm(a, b), repeat)
        rates[name] = 2 * m * k * n / seconds
        print(f"| torch.mm {name} {m}x{k}x{n} | {rates[name] / 1e9:.0f} GFLOP/s |")
    from engine import native_linear

    kernel = native_linear.load()
    if kernel is not None:
        weight = torch.randn(n, k, dtype=torch.bfloat16)
        packed, x = kernel.pack(weight), torch.randn(512, k, dtype=torch.bfloat16)
        seconds = timed(lambda: kernel(x, packed, n, None), repeat)
        rates["engine"] = 2 * 512 * k * n / seconds
        print(
            f"| the engine's bf16 kernel ({kernel.isa}), 512x{k}x{n} | {rates['engine'] / 1e9:.0f} GFLOP/s |"
        )
    fma = fma_throughput(repeat)
    if fma is not None:
        isa, threads, rates["fma"] = fma
        print(
            f"| float32 FMA instruction throughput ({isa}, {threads} threads, no loads) "
            f"| {rates['fma'] / 1e9:.0f} GFLOP/s |"
        )
    big = torch.ones(256 * 2**20 // 4, dtype=torch.float32)  # 256 MiB, far beyond the caches
    read = big.numel() * 4 / timed(lambda: big.sum(), repeat)
    out = torch.empty_like(big)
    copy = 2 * big.numel() * 4 / timed(lambda: out.copy_(big), repeat)
    print(f"| read 256 MiB (sum) | {read / 1e9:.1f} GB/s |")
    print(f"| copy 256 MiB (read + write) | {copy / 1e9:.1f} GB/s |")
    peak = max(
        rates["float32"], rates.get("fma", 0.0), rates.get("engine", 0.0) if dtype == torch.bfloat16 else 0.0
    )
    return Machine(peak_flops=peak, bandwidth=max(read, copy))


def fma_throughput(repeat: int) -> tuple[str, int, float] | None:
    """(instruction set, threads, FLOP/s) of fused multiply-adds alone on every usable core (fma_peak.c):
    the ceiling the products work under, which no product reaches (theirs also load and convert)."""
    library = fma_peak.load()
    if library is None:
        return None
    threads, iterations = torch.get_num_threads(), 50_000_000
    seconds = timed(lambda: library.fma_peak_run(threads, iterations), repeat)
    flops = threads * iterations * library.fma_peak_flops_per_iteration()
    return library.fma_peak_isa().decode(), threads, flops / seconds


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    num_seqs: int  # sequences in the step
    tokens: int  # tokens through the layers
    context: int  # positions each new token attends to (mean)
    logits_rows: int  # rows through the lm head


def model_costs(model: torch.nn.Module, lm_head: torch.nn.Module, shape: Shape, kv_bytes_per_pos: int,
                config) -> tuple[float, float]:  # fmt: skip
    """(FLOPs, bytes at least) of one step of `shape`."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m is not lm_head]
    layer_params = sum(m.in_features * m.out_features for m in layers)
    head_params = lm_head.in_features * lm_head.out_features
    weight_bytes = sum(_weight_bytes(m) for m in [*layers, lm_head])
    flops = 2 * layer_params * shape.tokens + 2 * head_params * shape.logits_rows
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention_flops = 4 * shape.context * num_heads * head_dim * config.num_hidden_layers
    flops += attention_flops * shape.tokens
    # KV read: each sequence's cached positions once a layer (the query heads of a kv head share it);
    # a prefill's rows share one sequence's cache, so it is read once per kv head group as well.
    kv_read = kv_bytes_per_pos * shape.context * shape.num_seqs
    kv_write = kv_bytes_per_pos * shape.tokens
    return flops, weight_bytes + kv_read + kv_write


def _weight_bytes(linear: PackedLinear) -> int:
    """Bytes of the weight as the step reads it: 1 a weight for int8, else its dtype's size."""
    size = 1 if linear.is_int8 else linear.weight.element_size()
    return linear.in_features * linear.out_features * size


def decode_core(loaded, num_seqs: int, prompt_words: int, engine_switches: dict) -> EngineCore:
    """An EngineCore with `num_seqs` sequences all decoding (their prompts prefilled)."""
    config = EngineConfig(
        max_num_seqs=max(num_seqs, 1), max_model_len=2048, max_num_batched_tokens=256,
        kv_cache_bytes=KV_BYTES, **engine_switches,
    )  # fmt: skip
    core = EngineCore(loaded.model, loaded.tokenizer, config, torch.device("cpu"))
    for text in unique_prompt_texts(num_seqs, uuid.uuid4().hex[:6], prompt_words):
        ids = tuple(t % core.vocab_size for t in loaded.tokenizer(text).input_ids)  # the floor's small vocab
        params = SamplingParams(max_new_tokens=1000, temperature=0.0, ignore_eos=True)
        core.add_request(GenerationRequest(uuid.uuid4().hex, ids, params))
    while core.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in core.scheduler.running):
        core.step()
    return core


def products_time(
    modules: list[PackedLinear], lm_head: PackedLinear, shape: Shape, dtype, repeat: int
) -> float:
    """Seconds for every product of one step: each layer linear on `tokens` rows, the head on its rows."""
    inputs = {m.in_features: torch.randn(shape.tokens, m.in_features, dtype=dtype) for m in modules}
    head_in = torch.randn(shape.logits_rows, lm_head.in_features, dtype=dtype)

    def run() -> None:
        for module in modules:
            module(inputs[module.in_features])
        lm_head(head_in)

    return timed(run, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--decode", type=int, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the prefill chunk")
    parser.add_argument("--skip-machine", action="store_true", help="only the model's steps")
    add_switch_flags(parser)
    args = parser.parse_args()

    torch.set_num_threads(default_num_threads())
    dtype = resolve_dtype(args.dtype, resolve_device("cpu"))
    print(f"{cpu_description()}\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")  # fmt: skip
    with torch.inference_mode():
        machine = measure_machine(args.repeat, dtype) if not args.skip_machine else None
        loaded = load_model(resolve(args.model), dtype=dtype, device=torch.device("cpu"))
        rows = step_rows(loaded, args, dtype, machine)
    print(f"\nmodel {args.model}, {dtype}")
    if machine is not None:
        ridge = machine.peak_flops / machine.bandwidth
        peak, bandwidth = machine.peak_flops / 1e9, machine.bandwidth / 1e9
        print(f"roofline: peak {peak:.0f} GFLOP/s, {bandwidth:.1f} GB/s, ridge {ridge:.1f} FLOP/byte\n")
    print(
        "| step | GFLOP | MB read at least | FLOP/byte | bound | roofline ms | products ms (GFLOP/s) "
        "| whole step ms | step / roofline | floor ms (share of the step) |\n" + "|---" * 10 + "|"
    )
    for row in rows:
        print(row)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


def step_rows(loaded, args, dtype, machine: Machine | None) -> list[str]:
    rows = []
    cfg = loaded.model.config
    core = decode_core(loaded, 1, 0, switches(args))  # optimizes the model in place (once)
    model = core.runner.model
    lm_head = model.lm_head
    modules = [m for m in model.modules() if isinstance(m, PackedLinear) and m is not lm_head]
    num_kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_pos = 2 * num_kv_heads * head_dim * cfg.num_hidden_layers * dtype.itemsize
    shapes = [Shape(f"decode c={c}", c, c, 64, c) for c in args.decode]
    shapes.append(Shape(f"prefill {args.prefill} tokens", 1, args.prefill, args.prefill // 2, 1))
    floor = narrow_copy(loaded, dtype)
    for shape in shapes:
        flops, nbytes = model_costs(model, lm_head, shape, kv_per_pos, cfg)
        products_s = products_time(modules, lm_head, shape, dtype, args.repeat)
        step_s = whole_step(loaded, shape, args, dtype)
        cells = [shape.name, f"{flops / 1e9:.2f}", f"{nbytes / 1e6:.0f}", f"{flops / nbytes:.1f}"]
        if machine is not None:
            bound_s = max(flops / machine.peak_flops, nbytes / machine.bandwidth)
            kind = "compute" if flops / machine.peak_flops > nbytes / machine.bandwidth else "bandwidth"
            cells += [kind, f"{bound_s * 1e3:.1f}"]
        else:
            bound_s, cells = None, [*cells, "-", "-"]
        cells.append(f"{products_s * 1e3:.1f} ({flops / products_s / 1e9:.0f})")
        cells.append(f"{step_s * 1e3:.1f}")
        cells.append(f"{step_s / bound_s:.2f}x" if bound_s else "-")
        floor_s = whole_step(floor, shape, args, dtype)
        cells.append(f"{floor_s * 1e3:.1f} ({floor_s / step_s:.0%})")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def narrow_copy(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """The model's architecture (its class, layer count and layer kinds) at the least widths: one head of
    the model's head size, 128 hidden, 256 MLP, 512 tokens; random weights, the real tokenizer."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.model.config)
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    narrow = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 1, "vocab_size": 512}
    for name, value in {**narrow, "num_key_value_heads": 1, "head_dim": head_dim}.items():
        setattr(text, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    return dataclasses.replace(loaded, model=model)


def whole_step(loaded, shape: Shape, args, dtype) -> float:
    """Median seconds of EngineCore.step at this shape: decode steps of `num_seqs` sequences (prompts of
    ~30 tokens, contexts ~64), or one prompt of `tokens` tokens prefilled in one step."""
    if shape.name.startswith("decode"):
        core = decode_core(loaded, shape.num_seqs, 0, switches(args))
        for _ in range(32):  # to contexts of ~64
            core.step()
        return timed(core.step, args.repeat)
    config = EngineConfig(max_num_seqs=4, max_model_len=2048, max_num_batched_tokens=shape.tokens,
                          kv_cache_bytes=KV_BYTES, enable_prefix_caching=False, **switches(args))  # fmt: skip
    core = EngineCore(loaded.model, loaded.tokenizer, config, torch.device("cpu"))
    vocab = core.vocab_size
    times = []
    for i in range(args.repeat + 2):
        ids = tuple((i * 7919 + j * 104729) % (vocab - 1) + 1 for j in range(shape.tokens))
        request_id = uuid.uuid4().hex
        core.add_request(
            GenerationRequest(request_id, ids, SamplingParams(max_new_tokens=4, temperature=0.0))
        )
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
        core.abort(request_id)
    return statistics.median(times[2:])


if __name__ == "__main__":
    main()
