"""API keys and request limits without a cluster: key parsing, comparison, settings, limit messages."""

import base64

import pytest
from pydantic import SecretStr

from deployments.guard import GuardSettings, RequestGuard, presented_keys, route_path
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


class _State:
    """Stands in for the FastAPI app whose `state.guard` the Ingress sets."""

    def __init__(self, guard: GuardSettings | None) -> None:
        self.state = type("S", (), {})()
        if guard is not None:
            self.state.guard = guard


async def _status(path: str, guard: GuardSettings | None, headers=(), root_path: str = "") -> int:
    """The status the guard answers for a GET of `path`; 200 when it lets the request through."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": root_path + path,
        "root_path": root_path,
        "headers": list(headers),
        "app": _State(guard),
    }
    await RequestGuard(app)(scope, receive, send)
    return sent[0]["status"]


KEYED = GuardSettings(api_keys=(SecretStr("k"),))


@pytest.mark.parametrize("root_path", ["", "/auth"])
async def test_open_paths_match_exactly(root_path: str):
    for path in ("/healthz", "/healthcheck", "/readyz"):
        assert await _status(path, KEYED, root_path=root_path) == 200, path
    # Paths that merely end like a health route need a key (they used to match by suffix).
    for path in ("/v1/llm/model-endpoints/healthz", "/v1/models/readyz", "/xhealthz", "/healthz/x"):
        assert await _status(path, KEYED, root_path=root_path) == 401, path
    assert await _status("/v1/llm/model-endpoints/healthz", KEYED, [(b"x-api-key", b"k")], root_path) == 200


async def test_without_keys_everything_is_open():
    assert await _status("/v1/models", GuardSettings()) == 200


async def test_missing_guard_settings_refuse_rather_than_pass():
    assert await _status("/v1/models", None) == 503
    assert await _status("/v1/llm/completions-sync", None, [(b"x-api-key", b"k")]) == 503
    assert await _status("/healthz", None) == 200  # health stays answerable


def test_route_path_strips_only_the_mount_prefix():
    assert route_path({"path": "/auth/healthz", "root_path": "/auth"}) == "/healthz"
    assert route_path({"path": "/authx/healthz", "root_path": "/auth"}) == "/authx/healthz"
    assert route_path({"path": "/healthz", "root_path": ""}) == "/healthz"
