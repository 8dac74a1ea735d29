"""API keys and request limits without a cluster: key parsing, comparison, settings, limit messages."""

import base64

import pytest
from pydantic import SecretStr

from deployments.guard import GuardSettings, presented_keys
from deployments.limits import API_KEYS_ENV, AuthSettings, LimitSettings
from engine.errors import InvalidRequestError


def test_keys_as_each_client_sends_them():
    basic = base64.b64encode(b"k1:").decode()
    headers = [(b"x-api-key", b"k0"), (b"authorization", f"Basic {basic}".encode())]
    assert presented_keys(headers) == ["k0", "k1"]
    assert presented_keys([(b"authorization", b"Bearer k2")]) == ["k2"]
    assert presented_keys([(b"authorization", b"Basic !!!")]) == []


def test_key_comparison():
    guard = GuardSettings(api_keys=(SecretStr("a"), SecretStr("b")))
    assert guard.is_key_valid("b") and not guard.is_key_valid("c") and not guard.is_key_valid("")
    assert not GuardSettings().is_key_valid("a")  # no keys configured: the middleware lets all in


def test_keys_from_config_and_environment():
    auth = AuthSettings(api_keys=["x", "y"])
    keys = auth.resolve_keys({API_KEYS_ENV: " y, z ,,"})
    assert [k.get_secret_value() for k in keys] == ["x", "y", "z"]
    assert "x" not in repr(auth)  # SecretStr: never printed by accident
    assert AuthSettings().resolve_keys({}) == ()


@pytest.mark.parametrize(
    ("prompts", "stops", "setting"),
    [
        (["x" * 11], None, "limits.max_prompt_chars"),
        (["x" * 6, "y" * 5], None, "limits.max_prompt_chars"),
        (["x"], ["a", "b", "c"], "limits.max_stop_sequences"),
        (["x"], "abcdef", "limits.max_stop_sequence_chars"),
    ],
)
def test_limits(prompts, stops, setting):
    limits = LimitSettings(max_prompt_chars=10, max_stop_sequences=2, max_stop_sequence_chars=5)
    with pytest.raises(InvalidRequestError, match=setting):
        limits.check(prompts, stops)
    limits.check(["x" * 10], ["a", "abcde"])  # at the limits: fine
