"""Preemption under KV-cache pressure (tiny model, float32): every request completes with the output it
would have had alone, greedy and seeded sampling alike, with and without the prefix cache."""

import pytest
import torch

from tests.engine.conftest import make_core, request, run_to_completion
from tests.engine.test_prefix_cache import record_outputs

PROMPTS = ["The quick brown fox", "Once upon a time there was", "def add(a, b):", "Numbers: 0 1 2 3"]
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # k and v x 2 layers x 2 heads x 16 dims x float32


def workload(tokenizer):
    reqs = []
    for i in range(8):
        prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
        sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i, "frequency_penalty": 0.3}
        params = sampled if i % 2 else {}
        reqs.append(request(tokenizer, prompt, f"r{i}", max_new_tokens=60, ignore_eos=True, **params))
    return reqs


def run(core, reqs) -> dict[str, list[int]]:
    out = record_outputs(core)
    for req in reqs:
        core.add_request(req)
    run_to_completion(core)
    return out


@pytest.mark.parametrize("caching", [True, False])
def test_preempted_requests_match_the_unpressured_run(tiny, caching):
    _, tokenizer = tiny
    reqs = workload(tokenizer)
    roomy = make_core(tiny, max_model_len=128, enable_prefix_caching=caching)
    expected = run(roomy, reqs)
    assert roomy.scheduler.num_preemptions == 0
    # 10 blocks of 16 tokens for 8 requests that each grow past 64 tokens
    tight = make_core(
        tiny, max_model_len=128, kv_cache_bytes=160 * TOKEN_BYTES, enable_prefix_caching=caching
    )
    assert tight.scheduler.allocator.num_blocks == 10
    got = run(tight, reqs)
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert all(len(ids) == 60 for ids in got.values())
    assert tight.scheduler.allocator.num_free == 10 and not tight.scheduler.running


def test_preempted_sequence_resumes_first_and_keeps_its_tokens(tiny):
    _, tokenizer = tiny
    core = make_core(tiny, max_model_len=64, kv_cache_bytes=64 * TOKEN_BYTES)  # 4 blocks
    for i in range(2):
        core.add_request(request(tokenizer, PROMPTS[0], f"r{i}", max_new_tokens=50, ignore_eos=True))
    sched = core.scheduler
    with torch.inference_mode():
        while sched.num_preemptions == 0:
            core.step()
    assert [s.request_id for s in sched.waiting] == ["r1"]  # the newest went back, to the front
    victim = sched.waiting[0]
    assert victim.num_computed == 0 and victim.block_table == [] and victim.output_ids
    assert victim.num_preemptions == 1
    kept = list(victim.output_ids)
    run_to_completion(core)
    assert victim.output_ids[: len(kept)] == kept
