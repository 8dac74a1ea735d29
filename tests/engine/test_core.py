"""EngineCore on the tiny model: greedy equals transformers, batching, limits, EOS, stops, log probs."""

import math

import pytest
import torch

from engine.errors import ContextLengthError
from engine.types import FinishReason
from tests.engine.conftest import make_core, request, run_to_completion, text_of

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was",
    "What is the capital of France?",
    "Hello, world! How are you",
    "A café serves crème brûlée to",
    "def add(a, b):",
    "Numbers: 0 1 2 3",
    "She sells sea shells by the",
]


def hf_greedy(model, tokenizer, prompt: str, num_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def generated_ids(core, tokenizer, deltas) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(d.token.text) for d in deltas]


def test_greedy_matches_transformers_generate(tiny, tiny_reference):
    _, tokenizer = tiny
    core = make_core(tiny, max_num_batched_tokens=7)  # small budget: prompts are prefilled in chunks
    for p in PROMPTS:
        core.add_request(request(tokenizer, p, max_new_tokens=16, ignore_eos=True))
    captured: dict[str, list[int]] = {}
    original = {rid: state.output for rid, state in core._requests.items()}
    for rid, out in original.items():
        captured[rid] = []
        out.on_token = _recorder(out.on_token, captured[rid])
    run_to_completion(core)
    for p in PROMPTS:
        assert captured[p] == hf_greedy(tiny_reference, tokenizer, p, 16), p


def _recorder(on_token, sink):
    def wrapped(token_id, log_prob, top=None):
        sink.append(token_id)
        return on_token(token_id, log_prob, top)

    return wrapped


def test_steps_are_counted_by_kind(tiny):
    """A prompt prefilled in chunks of 4 tokens, then decoded: a chunk of several tokens makes a prefill
    step; single tokens (decode, or a prompt's last lone token) a decode step; each step's time counts."""
    _, tokenizer = tiny
    core = make_core(tiny, max_num_batched_tokens=4)
    prompt = "Once upon a time there was a small village by the sea"
    num_prompt = len(tokenizer(prompt).input_ids)
    core.add_request(request(tokenizer, prompt, max_new_tokens=5, ignore_eos=True))
    run_to_completion(core)
    chunks = [min(4, num_prompt - start) for start in range(0, num_prompt, 4)]
    totals = core.step_totals
    assert totals.num_prefill_steps == sum(1 for n in chunks if n > 1)
    assert totals.num_decode_steps == sum(1 for n in chunks if n == 1) + 4  # tokens 2-5
    assert totals.prefill_step_time_s > 0 and totals.decode_step_time_s > 0


def test_greedy_is_deterministic_and_batch_invariant(tiny):
    _, tokenizer = tiny
    alone = make_core(tiny)
    alone.add_request(request(tokenizer, PROMPTS[0], max_new_tokens=20, ignore_eos=True))
    solo = text_of(run_to_completion(alone)[PROMPTS[0]])
    crowd = make_core(tiny)
    for i in range(16):
        crowd.add_request(
            request(tokenizer, PROMPTS[i % len(PROMPTS)], f"r{i}", max_new_tokens=20, ignore_eos=True)
        )
    out = run_to_completion(crowd)
    assert text_of(out["r0"]) == solo
    assert text_of(out["r8"]) == solo


def test_max_new_tokens_and_counts(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    req = request(tokenizer, PROMPTS[1], max_new_tokens=7, ignore_eos=True)
    deltas = run_to_completion_one(core, req)
    assert [d.num_completion_tokens for d in deltas] == list(range(1, 8))
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].num_prompt_tokens == len(req.prompt_token_ids)
    assert deltas[0].queue_time_s >= 0 and all(d.queue_time_s is None for d in deltas[1:])


def run_to_completion_one(core, req):
    core.add_request(req)
    return run_to_completion(core)[req.request_id]


def test_eos_ends_generation_early(tiny_eos):
    _, tokenizer = tiny_eos
    core = make_core(tiny_eos)
    deltas = run_to_completion_one(core, request(tokenizer, PROMPTS[2], max_new_tokens=40))
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert len(deltas) < 40
    # ignore_eos forces the full length on the same model
    forced = run_to_completion_one(
        make_core(tiny_eos), request(tokenizer, PROMPTS[2], max_new_tokens=40, ignore_eos=True)
    )
    assert len(forced) == 40


def test_context_length_is_refused_with_numbers(tiny):
    _, tokenizer = tiny
    core = make_core(tiny, max_model_len=64)
    req = request(tokenizer, PROMPTS[0], max_new_tokens=100)
    with pytest.raises(ContextLengthError, match=r"\+ max_new_tokens \(100\).*64"):
        core.add_request(req)


def test_requests_join_and_leave_mid_batch(tiny):
    _, tokenizer = tiny
    solo = {}
    for i, p in enumerate(PROMPTS[:4]):
        core = make_core(tiny)
        solo[p] = text_of(
            run_to_completion_one(core, request(tokenizer, p, max_new_tokens=6 + 4 * i, ignore_eos=True))
        )
    core = make_core(tiny)
    out: dict[str, list] = {}
    with torch.inference_mode():
        for step in range(200):
            if step % 3 == 0 and step // 3 < 4:  # a newcomer every third step
                i = step // 3
                core.add_request(request(tokenizer, PROMPTS[i], max_new_tokens=6 + 4 * i, ignore_eos=True))
            for d in core.step():
                out.setdefault(d.request_id, []).append(d)
            if step > 12 and not core.has_unfinished:
                break
    assert {p: text_of(out[p]) for p in PROMPTS[:4]} == solo


def test_abort_frees_slot_and_cache(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    free_before = core.scheduler.allocator.num_free
    core.add_request(request(tokenizer, PROMPTS[0], "a", max_new_tokens=50, ignore_eos=True))
    core.add_request(request(tokenizer, PROMPTS[1], "b", max_new_tokens=50, ignore_eos=True))
    with torch.inference_mode():
        core.step()
        core.step()
    assert len(core.scheduler.running) == 2
    delta = core.abort("a")
    assert delta.finish_reason is FinishReason.ABORT
    assert [s.request_id for s in core.scheduler.running] == ["b"]
    core.abort("b")
    assert core.scheduler.allocator.num_free == free_before
    assert not core.has_unfinished
    assert core.abort("unknown") is None


def test_requests_wait_when_cache_is_full(tiny):
    _, tokenizer = tiny
    # 64 tokens of cache (k,v x 2 layers x 2 heads x 16 dims x 4 bytes): one 45-token request at a time
    core = make_core(tiny, max_model_len=64, kv_cache_bytes=64 * 2 * 2 * 2 * 16 * 4, block_size=16)
    assert core.scheduler.allocator.num_blocks == 4
    for i in range(3):
        core.add_request(request(tokenizer, PROMPTS[0], f"r{i}", max_new_tokens=40, ignore_eos=True))
    with torch.inference_mode():
        first = core.step()
    # Blocks come on demand: all three start, and the newest are preempted as they grow.
    assert len(core.scheduler.running) == 3 and len(core.scheduler.waiting) == 0
    out = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    for delta in reversed(first):
        out[delta.request_id].insert(0, delta)
    assert all(len(out[f"r{i}"]) == 40 for i in range(3))
    assert len({text_of(out[f"r{i}"]) for i in range(3)}) == 1


def test_stop_sequence_cuts_output(tiny):
    _, tokenizer = tiny
    full = text_of(
        run_to_completion_one(
            make_core(tiny), request(tokenizer, PROMPTS[3], max_new_tokens=30, ignore_eos=True)
        )
    )
    stop = full[10:14]
    assert stop.strip(), "pick a visible stop string"
    cut = run_to_completion_one(
        make_core(tiny),
        request(tokenizer, PROMPTS[3], max_new_tokens=30, ignore_eos=True, stop_sequences=(stop,)),
    )
    assert text_of(cut) == full[: full.index(stop)]
    assert cut[-1].finish_reason is FinishReason.STOP
    kept = run_to_completion_one(
        make_core(tiny),
        request(
            tokenizer,
            PROMPTS[3],
            max_new_tokens=30,
            ignore_eos=True,
            stop_sequences=(stop,),
            include_stop_str_in_output=True,
        ),
    )
    assert text_of(kept) == full[: full.index(stop) + len(stop)]


def test_log_probs_are_sensible(tiny, tiny_reference):
    _, tokenizer = tiny
    deltas = run_to_completion_one(
        make_core(tiny),
        request(tokenizer, PROMPTS[0], max_new_tokens=8, ignore_eos=True, return_log_probs=True),
    )
    assert all(d.token is not None and d.token.log_prob <= 0 for d in deltas)
    # greedy picks the most likely token, so its log prob is the max of the distribution
    ids = tokenizer(PROMPTS[0]).input_ids
    with torch.inference_mode():
        logits = tiny_reference(torch.tensor([ids])).logits[0, -1].float()
    assert math.isclose(deltas[0].token.log_prob, logits.log_softmax(-1).max().item(), abs_tol=1e-4)
    assert deltas[0].token.token_id == int(logits.argmax())


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny):
    _, tokenizer = tiny
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    alone = text_of(run_to_completion_one(make_core(tiny), request(tokenizer, PROMPTS[0], "s", **params)))
    crowd = make_core(tiny)
    for i in range(6):
        crowd.add_request(
            request(tokenizer, PROMPTS[i], f"o{i}", max_new_tokens=16, temperature=0.8, ignore_eos=True)
        )
    crowd.add_request(request(tokenizer, PROMPTS[0], "s", **params))
    assert text_of(run_to_completion(crowd)["s"]) == alone
    other_seed = {**params, "seed": 99}
    assert (
        text_of(run_to_completion_one(make_core(tiny), request(tokenizer, PROMPTS[0], "s", **other_seed)))
        != alone
    )


def test_frequency_penalty_reduces_repetition(tiny):
    _, tokenizer = tiny
    plain = run_to_completion_one(
        make_core(tiny),
        request(tokenizer, PROMPTS[6], max_new_tokens=40, ignore_eos=True, return_log_probs=True),
    )
    penalised = run_to_completion_one(
        make_core(tiny),
        request(
            tokenizer,
            PROMPTS[6],
            max_new_tokens=40,
            ignore_eos=True,
            return_log_probs=True,
            frequency_penalty=2.0,
            presence_penalty=2.0,
        ),
    )
    distinct = lambda ds: len({d.token.token_id for d in ds})  # noqa: E731
    assert distinct(penalised) > distinct(plain)
