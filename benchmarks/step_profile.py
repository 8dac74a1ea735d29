"""Where one decode step's time goes: torch.profiler over N steps of a full batch, grouped by kind.

    python benchmarks/step_profile.py [--batch 16] [--steps 20] [--model smollm2-135m-instruct]
    python benchmarks/step_profile.py --prefill-tokens 240   # each step also prefills a 240-token prompt
    python benchmarks/step_profile.py --prompt-words 250     # the batch decodes at ~330-token contexts

Loads the model as the server does (EngineCore, fused/packed projections, paged attention), admits
`--batch` requests, steps until every one is decoding, then profiles `--steps` decode steps. Each
module kind runs inside a `record_function` range, so the table gives wall time per step by kind:
projections (q/k/v/o, gate/up/down, lm head), attention (cache write + kernel), norms, rotary,
embedding, activations, sampling and the rest; "Python and dispatch" is the step's wall time that
no torch operator accounts for. With `--prefill-tokens P`, each profiled step also carries one new
request's whole prompt of P tokens (admitted before the step, aborted after it), the shape of a step
under prefill-heavy load. The numbers belong in docs/performance.md beside the change they
motivate.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages

from engine_switches import add_switch_flags, switches
from prompts import unique_prompt_texts

from engine import attention, fast_forward
from engine.core import EngineCore
from engine.device import default_num_threads, resolve_device, resolve_dtype
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model

KINDS = {  # module class name -> kind
    "PackedLinear": "projections",
    "FusedProjection": "projections",
    "Linear": "projections",
    "LlamaRMSNorm": "norms",
    "Gemma3RMSNorm": "norms",
    "LlamaRotaryEmbedding": "rotary",
    "Gemma3RotaryEmbedding": "rotary",
    "Embedding": "embedding",
    "Gemma3TextScaledWordEmbedding": "embedding",
    "SiLUActivation": "activation",
    "GELUTanh": "activation",
    "PytorchGELUTanh": "activation",
}


SAMPLING_OPS = ("aten::multinomial", "aten::argmax", "aten::topk", "aten::softmax", "aten::sort")


def label_modules(model: torch.nn.Module) -> None:
    """Wrap each module of a known kind in a record_function range named after its kind."""

    def wrap(module: torch.nn.Module, kind: str) -> None:
        forward = module.forward

        def labelled(*args, **kwargs):
            with record_function(f"kind::{kind}"):
                return forward(*args, **kwargs)

        module.forward = labelled

    for module in model.modules():
        kind = KINDS.get(type(module).__name__)
        if kind is not None:
            wrap(module, kind)
    # Called by name (from paged_attention and the fast forward, where norms and rotary are no
    # modules): label them where they are defined.
    for owner, name, kind in (
        (attention, "attend_paged", "attention"),
        (fast_forward, "rms_norm", "norms"),
        (fast_forward, "gemma_rms_norm", "norms"),
        (fast_forward, "apply_rotary", "rotary"),
    ):
        setattr(owner, name, _labelled(getattr(owner, name), kind))


def _labelled(function, kind: str):
    def labelled(*args, **kwargs):
        with record_function(f"kind::{kind}"):
            return function(*args, **kwargs)

    return labelled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16")
    add_switch_flags(parser)
    parser.add_argument(
        "--prefill-tokens", type=int, default=0, help="a new prompt of this many tokens in every step"
    )
    parser.add_argument(
        "--prompt-words", type=int, default=0, help="filler words in each prompt: decode at a longer context"
    )
    args = parser.parse_args()

    torch.set_num_threads(default_num_threads())
    device = resolve_device("auto")
    dtype = resolve_dtype(args.dtype, device)
    spec = resolve(args.model)
    loaded = load_model(spec, dtype=dtype, device=device)
    config = EngineConfig(
        max_num_seqs=max(32, args.batch + 1),
        max_model_len=2048,
        max_num_batched_tokens=max(256, args.batch + args.prefill_tokens),
        **switches(args),
    )
    with torch.inference_mode():
        core = EngineCore(loaded.model, loaded.tokenizer, config, device)
        for text in unique_prompt_texts(args.batch, uuid.uuid4().hex[:6], args.prompt_words):
            ids = tuple(loaded.tokenizer(text).input_ids)
            params = SamplingParams(max_new_tokens=args.steps + 40, temperature=0.0, ignore_eos=True)
            core.add_request(GenerationRequest(uuid.uuid4().hex, ids, params))
        while core.scheduler.waiting or any(
            s.num_computed < s.num_tokens - 1 for s in core.scheduler.running
        ):
            core.step()  # prefill until every sequence decodes
        for _ in range(5):
            core.step()  # warm
        label_modules(core.runner.model)
        vocab = core.vocab_size
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall_s = 0.0
            for step in range(args.steps):
                request_id = None
                if args.prefill_tokens:  # distinct ids, so the prefix cache never shortens it
                    ids = tuple(
                        (step * 7919 + i * 104729) % (vocab - 1) + 1 for i in range(args.prefill_tokens)
                    )
                    request_id = uuid.uuid4().hex
                    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
                    core.add_request(GenerationRequest(request_id, ids, params))
                start = time.perf_counter()
                with record_function("step"):
                    core.step()
                wall_s += (time.perf_counter() - start) / args.steps
                if request_id is not None:
                    core.abort(request_id)
    tokens = args.batch + args.prefill_tokens
    contexts = [seq.num_tokens for seq in core.scheduler.running]
    print(
        f"model {args.model}, {dtype}, {torch.get_num_threads()} threads, batch {args.batch} decoding "
        f"(contexts {min(contexts)}-{max(contexts)} at the end)"
        f"{f' + a {args.prefill_tokens}-token prefill' if args.prefill_tokens else ''}, {args.steps} steps: "
        f"{wall_s * 1e3:.1f} ms per step ({args.batch / wall_s:.0f} decode tok/s, "
        f"{tokens / wall_s:.0f} tokens/s through the model)\n"
    )
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("kind::"):
            by_kind[event.key.removeprefix("kind::")] += event.cpu_time_total
        elif event.key in SAMPLING_OPS:
            by_kind["sampling (ops)"] += event.self_cpu_time_total
    step_us = wall_s * 1e6
    rows = sorted(((us / args.steps, kind) for kind, us in by_kind.items()), reverse=True)
    print("| kind | ms per step | share |\n|---|---|---|")
    for us, kind in rows:
        print(f"| {kind} | {us / 1e3:.2f} | {us / step_us:.0%} |")
    rest = step_us - sum(us for us, _ in rows)
    print(
        f"| the rest (Python and dispatch outside these modules, other ops) | {rest / 1e3:.2f} | "
        f"{rest / step_us:.0%} |"
    )
    print(f"| whole step | {step_us / 1e3:.2f} | 100% |")
    print("\ntop operators by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
