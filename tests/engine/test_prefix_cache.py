"""Automatic prefix caching through EngineCore (tiny model, float32): hits, and identical greedy output."""

import pytest

from engine.guided import GuidedCompiler
from engine.guided_spec import GuidedSpec
from tests.engine.conftest import make_core, request, run_to_completion

SHARED = "The quick brown fox jumps over the lazy dog. Once upon a time there was a little model. " * 3
QUESTIONS = ["What is the capital of France?", "Hello, world!", "def add(a, b):", "Numbers: 0 1 2"]


def record_outputs(core) -> dict[str, list[int]]:
    """The token ids of every request, captured as the scheduler lets it go."""
    done: dict[str, list[int]] = {}
    finish = core.scheduler.finish

    def recorded(seq):
        done[seq.request_id] = list(seq.output_ids)
        finish(seq)

    core.scheduler.finish = recorded
    return done


def generate(core, requests, guides=None) -> dict[str, list[int]]:
    """The first request alone (it fills the cache), then the rest together."""
    guides = guides or {}
    out = record_outputs(core)
    for wave in (requests[:1], requests[1:]):
        for req in wave:
            core.add_request(req, guides.get(req.request_id))
        run_to_completion(core)
    return out


@pytest.mark.parametrize("max_num_batched_tokens", [256, 7])  # whole prompts, and chunked prefill
def test_greedy_output_is_identical_with_and_without_the_cache(tiny, max_num_batched_tokens):
    _, tokenizer = tiny
    reqs = [
        request(tokenizer, SHARED + q, f"q{i}", max_new_tokens=16, ignore_eos=True)
        for i, q in enumerate(QUESTIONS)
    ]
    assert len(reqs[0].prompt_token_ids) > 3 * 16  # several full blocks to share
    results, stats = {}, {}
    for caching in (True, False):
        core = make_core(tiny, max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=caching)
        results[caching] = generate(core, reqs)
        blocks = core.scheduler.allocator
        stats[caching] = (blocks.num_queries, blocks.num_hits)
    assert results[True] == results[False]
    queries, hits = stats[True]
    assert hits >= 3 * 3 * 16  # each later request found the shared blocks
    assert queries == sum(len(r.prompt_token_ids) for r in reqs)
    assert stats[False] == (0, 0)


def test_a_repeated_prompt_hits_the_cache_and_still_samples(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    prompt = SHARED + QUESTIONS[0]
    reqs = [request(tokenizer, prompt, f"r{i}", max_new_tokens=8, ignore_eos=True) for i in range(3)]
    out = generate(core, reqs)
    assert out["r0"] == out["r1"] == out["r2"] and len(out["r0"]) == 8
    num_prompt = len(reqs[0].prompt_token_ids)
    assert core.scheduler.allocator.num_hits == 2 * ((num_prompt - 1) // 16 * 16)


def test_guided_decoding_with_the_cache(tiny):
    _, tokenizer = tiny
    spec = GuidedSpec.choice(["apple pie", "banana split", "cherry tart"])
    results, hits = {}, {}
    for caching in (True, False):
        core = make_core(tiny, enable_prefix_caching=caching)
        compiler = GuidedCompiler(tokenizer, core.vocab_size, core.eos_token_ids)
        reqs = [
            request(tokenizer, SHARED + q, f"g{i}", max_new_tokens=20, guided=spec)
            for i, q in enumerate(QUESTIONS)
        ]
        guides = {r.request_id: compiler.compile(spec) for r in reqs}
        results[caching] = generate(core, reqs, guides)
        hits[caching] = core.scheduler.allocator.num_hits
    assert results[True] == results[False]
    texts = {tokenizer.decode(ids, skip_special_tokens=True) for ids in results[True].values()}
    assert texts <= {"apple pie", "banana split", "cherry tart"}
    assert hits[True] > 0 and hits[False] == 0
