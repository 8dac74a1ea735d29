"""Property tests of the protocol types: any JSON body is either a request the engine can honour or a
400 naming a field, never another exception (hypothesis; no cluster)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from deployments.errors import http_error
from deployments.limits import LimitSettings
from deployments.protocol import llm_engine, openai
from deployments.protocol.bounds import GREEDY_TEMPERATURE, SEED_MAX, SEED_MIN, TOP_K_MAX, check_unicode
from engine.errors import InvalidRequestError
from engine.params import normalize_params
from engine.types import SamplingParams
from tests.suite_profile import sized

VOCAB_SIZE = 400  # the tiny test model's
LIMITS = LimitSettings()

# Values a client can send in JSON (json.loads keeps lone surrogates), weighted towards the edges.
EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30]
EDGE_FLOATS = [0.0, 1e-46, 1e-40, 1e-5, 9.99e-6, 0.5, 1.0, 2.0, 2.5, -0.5, 1e308, -1e308]
TEXT = st.text(max_size=12) | st.sampled_from(["", "\ud800 hi", "ok\udfff", "stop", "\n"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.sampled_from(EDGE_INTS)
    | st.integers()
    | st.sampled_from(EDGE_FLOATS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3)
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", 3]), "content": TEXT | JSON}
)


def bodies(
    model: type[BaseModel], base: dict[str, Any], extra: dict[str, st.SearchStrategy]
) -> st.SearchStrategy:
    """A valid base body with some of the model's fields replaced by arbitrary JSON values."""
    fields = sorted(model.model_fields)
    values = {name: extra.get(name, JSON) for name in fields}
    chosen = st.lists(st.sampled_from(fields), unique=True, max_size=6)
    return chosen.flatmap(lambda names: st.fixed_dictionaries({n: values[n] for n in names})).map(
        lambda changes: {**base, **changes}
    )


def check(model: type[BaseModel], body: dict[str, Any]) -> SamplingParams | None:
    """The property: a SamplingParams the engine accepts (or clamps), or a 400; nothing else."""
    try:
        request = model.model_validate(body)
        params = request.to_sampling_params()
        prompts = (
            [m.content for m in request.to_messages()]
            if hasattr(request, "to_messages")
            else [request.prompt]
        )
        LIMITS.check(prompts, getattr(request, "stop", None) or getattr(request, "stop_sequences", None))
        for text in prompts:
            check_unicode(text, "prompt")
        normalized = normalize_params(params, VOCAB_SIZE)
    except (ValidationError, InvalidRequestError) as exc:
        status_code, message = http_error(exc)
        assert status_code == 400 and message, (status_code, message)
        return None
    assert normalized.temperature == 0.0 or normalized.temperature >= GREEDY_TEMPERATURE
    assert normalized.top_k == -1 or 1 <= normalized.top_k < VOCAB_SIZE <= TOP_K_MAX
    assert params.seed is None or SEED_MIN <= params.seed <= SEED_MAX
    assert normalized.max_new_tokens >= 1
    "".join(normalized.stop_sequences).encode("utf-8")  # stop strings are valid Unicode
    return normalized


# 400 examples a property in the full profile, 150 in the default one (~12 -> ~5 CPU-s for the four)
PROPERTY_SETTINGS = settings(
    max_examples=int(sized(quick=150, full=400)), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
NUMBERS = st.sampled_from(EDGE_INTS) | st.sampled_from(EDGE_FLOATS) | JSON


@PROPERTY_SETTINGS
@given(
    bodies(
        llm_engine.CompletionRequest,
        {"prompt": "Hi", "max_new_tokens": 4, "temperature": 0.5},
        {"prompt": TEXT, "stop_sequences": st.lists(TEXT, max_size=20) | JSON, "seed": NUMBERS},
    )
)
def test_llm_engine_bodies(body: dict[str, Any]):
    check(llm_engine.CompletionRequest, body)


@PROPERTY_SETTINGS
@given(
    bodies(
        openai.CompletionRequest,
        {"model": "m", "prompt": "Hi"},
        {"prompt": TEXT | st.lists(TEXT, max_size=2), "stop": TEXT | st.lists(TEXT, max_size=20) | JSON},
    )
)
def test_openai_completion_bodies(body: dict[str, Any]):
    check(openai.CompletionRequest, body)


@PROPERTY_SETTINGS
@given(
    bodies(
        openai.ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
        {"messages": st.lists(MESSAGE, max_size=3) | JSON, "top_logprobs": NUMBERS, "logprobs": JSON},
    )
)
def test_openai_chat_bodies(body: dict[str, Any]):
    check(openai.ChatCompletionRequest, body)


def test_the_property_sees_both_outcomes():
    """The check can fail: a body from the issue is refused, a good one goes through."""
    good = {"prompt": "Hi", "max_new_tokens": 4, "temperature": 1e-46, "top_k": 500, "seed": 2**63 - 1}
    params = check(llm_engine.CompletionRequest, good)
    assert params is not None and params.temperature == 0.0 and params.top_k == -1
    assert check(llm_engine.CompletionRequest, {**good, "seed": 2**64}) is None
    assert check(openai.CompletionRequest, {"model": "m", "prompt": "\ud800 hi"}) is None
