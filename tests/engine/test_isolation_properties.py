"""Property: whatever settings and prompt one request brings, the other requests in its batch finish with
the same tokens as alone, and the engine is left with nothing half-added."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.types import GenerationRequest, SamplingParams
from tests.engine.conftest import make_core, request, run_to_completion

REFERENCE_PROMPTS = ["The quick brown fox", "def add(a, b):"]
BIG = 2**70

any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)
sampling_params = st.builds(
    SamplingParams,
    max_new_tokens=st.integers(1, 12),
    temperature=st.one_of(any_float, st.floats(0, 2)),
    top_k=st.integers(-BIG, BIG),
    top_p=st.one_of(any_float, st.floats(0, 1)),
    presence_penalty=st.one_of(any_float, st.floats(-2, 2)),
    frequency_penalty=st.one_of(any_float, st.floats(-2, 2)),
    stop_sequences=st.lists(st.text(max_size=6), max_size=4).map(tuple),
    include_stop_str_in_output=st.booleans(),
    return_log_probs=st.booleans(),
    num_top_logprobs=st.integers(0, 25),
    skip_special_tokens=st.booleans(),
    seed=st.one_of(st.none(), st.integers(-BIG, BIG)),
    ignore_eos=st.booleans(),
)
# ids past the vocabulary (400 entries) included: they must be refused, not crash the forward
prompt_ids = st.lists(st.integers(0, 450), min_size=0, max_size=40).map(tuple)


@pytest.fixture(scope="module")
def alone(tiny) -> dict[str, list[str]]:
    core = make_core(tiny)
    for p in REFERENCE_PROMPTS:
        core.add_request(request(tiny[1], p, max_new_tokens=10, ignore_eos=True, return_log_probs=True))
    return {p: [d.token.text for d in deltas] for p, deltas in run_to_completion(core).items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=sampling_params, ids=prompt_ids)
def test_one_request_never_changes_its_neighbours_tokens(tiny, alone, params, ids):
    core = make_core(tiny)
    for p in REFERENCE_PROMPTS:
        core.add_request(request(tiny[1], p, max_new_tokens=10, ignore_eos=True, return_log_probs=True))
    try:
        core.add_request(GenerationRequest("random", ids, params))
    except InvalidRequestError:
        assert "random" not in core._requests  # refused whole: nothing half-added
    out = run_to_completion(core, max_steps=200)
    for p in REFERENCE_PROMPTS:
        assert [d.token.text for d in out[p]] == alone[p]
    if "random" in out:
        last = out["random"][-1]
        assert last.is_finished and last.num_completion_tokens <= params.max_new_tokens
        assert all(math.isfinite(d.token.log_prob) for d in out["random"] if d.token is not None)
    assert core.scheduler.allocator.num_free == core.scheduler.allocator.num_blocks
    assert not torch.is_inference_mode_enabled()
