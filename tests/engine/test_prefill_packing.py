"""torch's attention path (no C kernel: GPUs, CPUs without a compiler): prefill spans attend as one
padded batch when their sizes are close, with the same tokens as one by one."""

import pytest
import torch

import engine.attention as attention
from engine.attention import PrefillSpan, pack_prefills
from tests.engine.conftest import make_core, request, run_to_completion, text_of

PROMPTS = [
    "The quick brown fox jumps over",
    "Hello",
    "def add(a, b): return a + b  # and more words to make it longer",
    "Numbers: 0 1 2 3",
]


def generate(tiny, prompts, **config):
    core = make_core(tiny, **({"native_attention": False} | config))
    _, tokenizer = tiny
    for prompt in prompts:
        core.add_request(request(tokenizer, prompt, max_new_tokens=10, ignore_eos=True))
    return {rid: text_of(deltas) for rid, deltas in run_to_completion(core).items()}


def test_packed_prefill_gives_the_tokens_of_prefilling_one_by_one(tiny, monkeypatch):
    calls = []

    def counting(spans):
        packed = pack_prefills(spans)
        calls.append(packed is not None)
        return packed

    monkeypatch.setattr("engine.model_runner.pack_prefills", counting)
    together = generate(tiny, PROMPTS)
    assert any(calls)  # the four prompts were prefilled as one packed batch
    alone = {}
    for prompt in PROMPTS:  # one sequence per step: never packed
        alone.update(generate(tiny, [prompt]))
    assert together == alone


@pytest.mark.parametrize("native_attention", [False, True])
def test_chunked_prefill_with_cached_context_packs_too(tiny, native_attention):
    """Prompts longer than the step's token budget continue over later steps with cached keys (torch's
    packed spans, or the C kernel's rows)."""
    long = ["word " * 60 + str(i) for i in range(3)]
    chunked = generate(tiny, long, max_num_batched_tokens=64, native_attention=native_attention)
    whole = {}
    for prompt in long:
        whole.update(generate(tiny, [prompt], native_attention=native_attention))
    assert chunked == whole


def test_spans_of_very_different_sizes_are_not_packed():
    def span(start, n, ctx):
        return PrefillSpan(start, n, torch.arange(ctx), torch.arange(ctx - n, ctx))

    assert pack_prefills([span(0, 4, 4)]) is None
    # 3 x 400 x 400 query-key pairs padded against 400 x 400 + 2 x 16 real ones
    assert pack_prefills([span(0, 400, 400), span(400, 4, 4), span(404, 4, 4)]) is None
    packed = pack_prefills([span(0, 30, 40), span(30, 28, 28), span(58, 3, 3)])  # small: packed
    assert packed is not None and packed.valid.sum() == 61
    assert packed.rows.tolist() == list(range(61))
    assert attention.MAX_PACKING_WASTE >= 1
