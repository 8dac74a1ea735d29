"""No request can harm another: one request's failure (settings, forward, sampling, output) ends that
request only; a forward that keeps failing for lone sequences kills the engine, and a dead engine ends
every stream at once and refuses new work with 503 (docs/reliability.md, "Failure model")."""

import asyncio
import math

import pytest
import torch

from engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from engine.types import FinishReason
from tests.engine.conftest import gated_steps, make_async_engine, make_core, request, run_to_completion

PROMPTS = ["The quick brown fox", "Hello, world!", "def add(a, b):", "Numbers: 0 1 2"]


def tokens_alone(tiny, prompt: str, **params) -> list[str]:
    core = make_core(tiny)
    core.add_request(request(tiny[1], prompt, "alone", return_log_probs=True, **params))
    return [d.token.text for d in run_to_completion(core)["alone"]]


def fail_forward_when(core, is_bad) -> dict[str, int]:
    """Make the runner raise whenever the batch holds a sequence for which `is_bad(seq)` is true."""
    real_execute, calls = core.runner.execute, {"failed": 0}

    def execute(batch):
        if any(is_bad(seq) for seq, _ in batch.items):
            calls["failed"] += 1
            raise RuntimeError("simulated device fault")
        return real_execute(batch)

    core.runner.execute = execute
    return calls


def test_a_forward_that_fails_with_one_request_fails_only_that_request(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    for p in PROMPTS:
        core.add_request(request(tokenizer, p, max_new_tokens=8, ignore_eos=True, return_log_probs=True))
    calls = fail_forward_when(core, lambda seq: seq.request_id == PROMPTS[2] and seq.output_ids)
    out = run_to_completion(core)
    bad = out[PROMPTS[2]]
    assert bad[-1].finish_reason is FinishReason.ERROR and isinstance(bad[-1].error, RequestFailedError)
    assert "simulated device fault" in str(bad[-1].error) and calls["failed"] >= 2  # bisected
    for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3]):
        assert [d.token.text for d in out[p]] == tokens_alone(tiny, p, max_new_tokens=8, ignore_eos=True)
    assert (
        not core.has_unfinished and core.scheduler.allocator.num_free == core.scheduler.allocator.num_blocks
    )


def test_a_forward_failing_for_every_lone_sequence_means_a_dead_engine(tiny):
    _, tokenizer = tiny
    core = make_core(tiny, max_consecutive_failures=3)
    for p in PROMPTS:
        core.add_request(request(tokenizer, p, max_new_tokens=4))
    fail_forward_when(core, lambda seq: True)
    with torch.inference_mode(), pytest.raises(EngineDeadError, match="device looks broken"):
        for _ in range(10):
            core.step()


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"seed": 2**64, "temperature": 0.5}, {"seed": 0}),
        ({"seed": -1, "temperature": 0.5}, {"seed": 2**64 - 1}),
        ({"top_k": 2**63, "temperature": 0.5}, {"top_k": -1}),
        ({"top_k": 400, "temperature": 0.5}, {"top_k": -1}),  # the tiny vocabulary has 400 entries
    ],
)
def test_out_of_range_numbers_are_clamped_as_documented(tiny, params, expected):
    core = make_core(tiny)
    core.add_request(request(tiny[1], "Hello", "r", max_new_tokens=3, **params))
    state = core._requests["r"]
    for name, value in expected.items():
        assert getattr(state.seq.params, name) == value
    assert len(run_to_completion(core)["r"]) >= 1


def test_seed_reduced_modulo_2_64_samples_like_the_reduced_seed(tiny):
    big = tokens_alone(tiny, "Hello", max_new_tokens=6, temperature=0.9, seed=2**64 + 7)
    assert big == tokens_alone(tiny, "Hello", max_new_tokens=6, temperature=0.9, seed=7)


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 1e-6, 0.0, -0.0])
def test_tiny_temperatures_are_greedy(tiny, temperature):
    greedy = tokens_alone(tiny, "Hello", max_new_tokens=6, temperature=0.0)
    assert tokens_alone(tiny, "Hello", max_new_tokens=6, temperature=temperature) == greedy


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": math.inf}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"num_top_logprobs": 21, "return_log_probs": True}, "top_logprobs"),
    ],
)
def test_settings_the_sampler_cannot_honour_are_refused_before_anything_changes(tiny, params, field):
    core = make_core(tiny)
    with pytest.raises(InvalidRequestError, match=field):
        core.add_request(request(tiny[1], "Hello", "r", **params))
    assert not core.has_unfinished and not core.scheduler.waiting


def test_a_failure_while_setting_up_a_request_leaves_nothing_behind(tiny, monkeypatch):
    core = make_core(tiny)
    monkeypatch.setattr("engine.core.make_generator", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RequestFailedError, match="boom"):
        core.add_request(request(tiny[1], "Hello", "r", temperature=0.5, seed=1))
    assert not core.has_unfinished and not core.scheduler.waiting


def test_output_processing_that_fails_fails_only_its_request(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    for p in PROMPTS[:2]:
        core.add_request(request(tokenizer, p, max_new_tokens=5, ignore_eos=True, return_log_probs=True))

    def broken(*args):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated detokenizer bug")

    core._requests[PROMPTS[0]].output.on_token = broken
    out = run_to_completion(core)
    assert out[PROMPTS[0]][-1].finish_reason is FinishReason.ERROR
    assert "simulated detokenizer bug" in str(out[PROMPTS[0]][-1].error)
    want = tokens_alone(tiny, PROMPTS[1], max_new_tokens=5, ignore_eos=True)
    assert [d.token.text for d in out[PROMPTS[1]]] == want


def test_sampling_that_fails_for_one_row_fails_only_that_row(tiny, monkeypatch):
    _, tokenizer = tiny
    core = make_core(tiny)
    core.add_request(request(tokenizer, PROMPTS[0], "bad", max_new_tokens=4, temperature=0.7, seed=3))
    core.add_request(request(tokenizer, PROMPTS[1], "good", max_new_tokens=4, ignore_eos=True))
    core._requests["bad"].generator = "not a generator"  # the batched draw and the row's own draw fail
    out = run_to_completion(core)
    assert out["bad"][-1].finish_reason is FinishReason.ERROR and "sampling failed" in str(
        out["bad"][-1].error
    )
    assert out["good"][-1].num_completion_tokens == 4


def test_top_logprobs_are_the_best_alternatives_in_order(tiny):
    _, tokenizer = tiny
    core = make_core(tiny)
    core.add_request(
        request(tokenizer, "Hello", "r", max_new_tokens=4, return_log_probs=True, num_top_logprobs=5)
    )
    for delta in run_to_completion(core)["r"]:
        top = delta.token.top
        assert len(top) == 5 and [t.log_prob for t in top] == sorted((t.log_prob for t in top), reverse=True)
        assert top[0].token_id == delta.token.token_id  # greedy: the chosen token is the best one
        assert math.isclose(top[0].log_prob, delta.token.log_prob, abs_tol=1e-5)
        assert sum(math.exp(t.log_prob) for t in top) <= 1.0 + 1e-5


# ---- the asyncio face: a dead engine never hangs anyone


@pytest.fixture
def engine(tiny):
    eng = make_async_engine(tiny, max_consecutive_failures=2)
    yield eng
    eng.shutdown()


async def test_a_dead_engine_ends_every_open_stream_and_refuses_new_requests_at_once(engine, tiny):
    _, tokenizer = tiny
    with gated_steps(engine) as gate:  # two steps at most: both have a token, both still running
        stream_a = engine.add_request(request(tokenizer, "Hello", "a", max_new_tokens=200, ignore_eos=True))
        stream_b = engine.add_request(request(tokenizer, "World", "b", max_new_tokens=200, ignore_eos=True))
        gate.release()
        await anext(stream_a)
        gate.release()  # b, if the first step came before b was queued
        await anext(stream_b)
        fail_forward_when(engine.core, lambda seq: True)  # the device breaks mid-stream
    for stream in (stream_a, stream_b):
        with pytest.raises(EngineDeadError, match="device looks broken"):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
    with pytest.raises(EngineDeadError) as refused:
        engine.add_request(request(tokenizer, "Again", "c", max_new_tokens=3))
    assert refused.value.status_code == 503
    with pytest.raises(EngineDeadError):
        engine.check_health()


async def test_whatever_ends_the_loop_is_recorded_and_ends_queued_requests_too(engine, tiny, monkeypatch):
    _, tokenizer = tiny

    def exit_step():
        raise SystemExit("simulated interpreter exit")

    monkeypatch.setattr(engine.core, "step", exit_step)
    stream = engine.add_request(request(tokenizer, "Hello", "a", max_new_tokens=5))
    with pytest.raises(EngineDeadError, match="simulated interpreter exit"):
        async with asyncio.timeout(30):
            await anext(stream)
    with pytest.raises(EngineDeadError, match="simulated interpreter exit"):
        engine.check_health()


def fail_sync_when(monkeypatch, is_bad) -> dict[str, int]:
    """A device error that surfaces at synchronization, after the forward's work was queued (a CUDA
    kernel's error does): `engine.core.synchronize` raises when `is_bad()` says so."""
    calls = {"failed": 0}

    def synchronize(device):
        if is_bad():
            calls["failed"] += 1
            raise RuntimeError("simulated asynchronous device fault")

    monkeypatch.setattr("engine.core.synchronize", synchronize)
    return calls


def test_an_error_at_synchronization_reruns_the_step_from_the_same_positions(tiny, monkeypatch):
    """The forward's work is done, its error comes after: the step is retried in halves from the
    positions it started at, so every request still gets exactly its greedy tokens."""
    _, tokenizer = tiny
    alone = {p: tokens_alone(tiny, p, max_new_tokens=6, ignore_eos=True) for p in PROMPTS}
    core = make_core(tiny, max_num_batched_tokens=16)  # prompts in chunks: positions matter mid-prompt
    for p in PROMPTS:
        core.add_request(request(tokenizer, p, max_new_tokens=6, ignore_eos=True, return_log_probs=True))
    real_execute, batch_sizes = core.runner.execute, []

    def execute(batch):
        batch_sizes.append(len(batch.items))
        return real_execute(batch)

    core.runner.execute = execute
    # every other forward of several sequences fails at synchronization; its halves then succeed
    calls = fail_sync_when(monkeypatch, lambda: batch_sizes[-1] > 1 and len(batch_sizes) % 2 == 1)
    out = run_to_completion(core)
    assert calls["failed"] >= 3
    for p in PROMPTS:
        assert out[p][-1].error is None
        assert [d.token.text for d in out[p]] == alone[p]


def test_errors_at_every_synchronization_mean_a_dead_engine(tiny, monkeypatch):
    _, tokenizer = tiny
    core = make_core(tiny, max_consecutive_failures=3)
    for p in PROMPTS:
        core.add_request(request(tokenizer, p, max_new_tokens=4))
    fail_sync_when(monkeypatch, lambda: True)
    with torch.inference_mode(), pytest.raises(EngineDeadError, match="device looks broken"):
        for _ in range(10):
            core.step()
