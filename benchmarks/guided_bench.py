"""Guided decoding cost: compile time (first and cached) and the per-step mask cost at batch 16.

Each of the 16 rows walks the tokens of a different valid JSON document for a typical schema (nested
objects, arrays, enums), so rows sit in different states, as in a real batch. Logits are random.

    python benchmarks/guided_bench.py [--tokenizer FOLDER] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import time

import torch
from transformers import AutoTokenizer

from engine.guided import GuidedCompiler, GuidedSpec, apply_guides

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
WORDS = ["Alice", "Bob", "Main Street", "Springfield", "north", "blue", "x", "Ångström", "data", "42nd Ave"]


def document(rng: random.Random) -> str:
    """A valid instance in the layout the guide enforces (json.dumps defaults)."""
    doc = {
        "name": " ".join(rng.choices(WORDS, k=rng.randint(1, 3))),
        "age": rng.randint(0, 120),
        "role": rng.choice(["admin", "user", "guest"]),
        "address": {
            "street": rng.choice(WORDS),
            "city": rng.choice(WORDS),
            "zip": f"{rng.randint(0, 99999):05d}",
        },
        "tags": rng.choices(WORDS, k=rng.randint(0, 5)),
        "scores": [round(rng.uniform(0, 100), 2) for _ in range(rng.randint(0, 3))],
        "active": rng.random() < 0.5,
    }
    return json.dumps(doc, ensure_ascii=False)  # the guide writes non-ASCII characters as they are


def main() -> None:
    parser = argparse.ArgumentParser()
    default_folder = next(iter(glob.glob("/root/.cache/llmserve/converted/smollm2*")), None)
    parser.add_argument("--tokenizer", default=default_folder)
    parser.add_argument("--vocab-size", type=int, default=49152, help="the model's logits width")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    start = time.perf_counter()
    compiler = GuidedCompiler(tokenizer, args.vocab_size, {tokenizer.eos_token_id})
    print(f"compiler (tokenizer wrap, once per model): {(time.perf_counter() - start) * 1e3:8.1f} ms")
    start = time.perf_counter()
    compiled = compiler.compile(GuidedSpec.json_schema(SCHEMA))
    print(f"JSON schema compile, first:                 {(time.perf_counter() - start) * 1e3:8.2f} ms")
    start = time.perf_counter()
    assert compiler.compile(GuidedSpec.json_schema(json.dumps(SCHEMA))) is compiled
    print(f"JSON schema compile, cached:                {(time.perf_counter() - start) * 1e3:8.3f} ms")

    rng = random.Random(0)
    docs = [[*tokenizer(document(rng)).input_ids, tokenizer.eos_token_id] for _ in range(args.batch_size)]
    states = [compiled.new_state() for _ in docs]
    logits = torch.randn(args.batch_size, args.vocab_size)
    step_ms, fill_ms = [], []
    for step in range(min(len(d) for d in docs)):
        start = time.perf_counter()
        masked = apply_guides(logits, states)
        step_ms.append((time.perf_counter() - start) * 1e3)
        bitmask = torch.empty((len(states), compiler.num_mask_words), dtype=torch.int32)
        start = time.perf_counter()
        for row, state in enumerate(states):
            state.fill_bitmask(bitmask, row)
        fill_ms.append((time.perf_counter() - start) * 1e3)
        for row, state in enumerate(states):
            token_id = docs[row][step]
            assert torch.isfinite(masked[row, token_id]), (row, step)
            assert state.accept(token_id), state.error
    mean, median = statistics.fmean(step_ms), statistics.median(step_ms)
    print(f"steps measured: {len(step_ms)}, batch {args.batch_size}, every row guided")
    print(f"apply_guides per step: mean {mean:.2f} ms, median {median:.2f} ms, max {max(step_ms):.2f} ms")
    print(f"  of which filling the bitmasks: mean {statistics.fmean(fill_ms):.2f} ms")
    for decode_ms in (40.0, 20.0):
        ratio = decode_ms / (decode_ms + mean)
        print(f"predicted guided/unguided throughput at a {decode_ms:.0f} ms step: {ratio:.3f}")


if __name__ == "__main__":
    main()
