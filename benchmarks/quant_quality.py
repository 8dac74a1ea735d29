"""What int8 products cost in accuracy: greedy agreement with bf16, and perplexity on a fixed text.

    python benchmarks/quant_quality.py [--model smollm2-135m-instruct] [--new-tokens 64]

Each configuration loads the model afresh as the server does (fused, packed products):
- `bf16`: the reference, bf16 products on the engine's bf16 kernel;
- `float32`: the same model in float32 (oneDNN): how far bf16 itself is from full precision, the
  yardstick for what a precision change does to greedy text;
- `int8`: int8 weights and rows (engine/native_int8.py) everywhere but the lm head (`int8_weights`),
  and `int8, lm head too` (`int8_lm_head` as well).

Greedy: 16 story prompts and 16 chat prompts (chat template), `--new-tokens` greedy tokens each, EOS
ignored, through EngineCore (batch-invariant, so all at once); per configuration, how many of the 32
completions are token for token the bf16 ones, and the mean number of tokens before the first
difference. Perplexity: `--text` (default: the GPL-3 text Debian ships, else this repository's
README) cut into windows of `--window` tokens, the first `--max-tokens` tokens, each window on its
own; the mean negative log-likelihood of every token but each window's first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prompts import prompt_texts

from engine.core import EngineCore
from engine.fusion import optimize_model
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import resolve
from model_zoo.loader import load_model

CHAT = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.", "How do I reverse a list in Python?",
    "Who wrote Hamlet, and when?", "Give me a recipe for pancakes.", "What is 17 times 23?",
    "Summarize the plot of Cinderella.", "Why is the sky blue?", "Write a limerick about a cat.",
    "What are the three states of matter?", "Translate 'good morning' into French and Spanish.",
    "Describe a healthy breakfast.", "What does a compiler do?", "Name five planets of the solar system.",
]  # fmt: skip
DEFAULT_TEXTS = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path(__file__).resolve().parent.parent / "README.md",
)
CONFIGS = {  # name -> (dtype, int8, int8_lm_head)
    "bf16": (torch.bfloat16, False, False),
    "float32": (torch.float32, False, False),
    "int8": (torch.bfloat16, True, False),
    "int8, lm head too": (torch.bfloat16, True, True),
}


def prompts(tokenizer) -> list[tuple[int, ...]]:
    texts = [tuple(tokenizer(t).input_ids) for t in prompt_texts(16)]
    for question in CHAT:
        turn = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)
        texts.append(tuple(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return texts


def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window][None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0].float()
        log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(1, chunk[0, 1:, None])
        nll -= log_probs.sum().item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def greedy(model, tokenizer, inputs, new_tokens: int) -> list[list[int]]:
    config = EngineConfig(max_num_seqs=len(inputs), max_model_len=1024, kv_cache_bytes=256 * 2**20,
                          optimize_model=False)  # fmt: skip  # already optimized
    core = EngineCore(model, tokenizer, config, torch.device("cpu"))
    ids = {}
    for ids_in in inputs:
        request_id = uuid.uuid4().hex
        ids[request_id] = []
        params = SamplingParams(
            max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, return_log_probs=True
        )
        core.add_request(GenerationRequest(request_id, ids_in, params))
    while core.has_unfinished:
        for delta in core.step():
            if delta.token is not None:
                ids[delta.request_id].append(delta.token.token_id)
    return list(ids.values())


def run(name: str, args, text: str) -> tuple[list[list[int]], float]:
    dtype, int8, lm_head = CONFIGS[name]
    loaded = load_model(resolve(args.model), dtype=dtype, device=torch.device("cpu"))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    optimize_model(model, native_linear=True, int8=int8, int8_lm_head=lm_head)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.max_tokens]
    ppl = perplexity(model, ids, args.window)
    return greedy(model, tokenizer, prompts(tokenizer), args.new_tokens), ppl


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text", default=None, help="the fixed text for perplexity")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = Path(args.text) if args.text else next(p for p in DEFAULT_TEXTS if p.exists())
    text = path.read_text()
    results = {}
    with torch.inference_mode():
        for name in dict.fromkeys(["bf16", *args.configs]):
            results[name] = run(name, args, text)
            print(f"{name}: perplexity {results[name][1]:.4f}", flush=True)
    reference, ref_ppl = results["bf16"]
    print(f"\n{args.model}; perplexity on {path} (first {args.max_tokens} tokens, windows of {args.window});")
    print(f"greedy: {len(reference)} prompts x {args.new_tokens} tokens against bf16\n")
    print(
        "| products | perplexity | vs bf16 | greedy identical to bf16 | mean tokens to the first difference |"
    )
    print("|---|---|---|---|---|")
    for name, (outputs, ppl) in results.items():
        same = sum(a == b for a, b in zip(outputs, reference, strict=True))
        first = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            for a, b in zip(outputs, reference, strict=True)
        ]
        print(
            f"| {name} | {ppl:.4f} | {(ppl / ref_ppl - 1) * 100:+.2f} % | {same}/{len(reference)} "
            f"| {sum(first) / len(first):.1f} |"
        )


if __name__ == "__main__":
    main()
