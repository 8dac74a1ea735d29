"""API keys: both official clients, with the right key, a wrong one and none; health stays open."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import openai
import pytest
from llmengine import Completion  # conftest.py disabled the client's PyPI version check
from llmengine.errors import UnauthorizedError

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, IngressSettings, ModelConfig
from deployments.limits import API_KEYS_ENV, AuthSettings
from tests.deployments.fake_engine import fake_factory
from tests.serve_fixtures import delete_app, run_app

APP, MODEL = "auth", "fake"
CONFIG_KEY, ENV_KEY = "key-from-config", "key-from-env"


@pytest.fixture(scope="module")
def app_url(serve_port: int) -> Iterator[str]:
    """A fake-engine app with one key in its config and one in the environment."""
    model = ModelConfig(
        name=MODEL, model="fake", deployment=DeploymentSettings(ray_actor_options={"num_cpus": 0.1})
    )
    previous = os.environ.get(API_KEYS_ENV)
    os.environ[API_KEYS_ENV] = f" {ENV_KEY} ,"
    try:
        app = build_app_from_configs(
            [model],
            engine_factory=fake_factory,
            ingress=IngressSettings(ray_actor_options={"num_cpus": 0.1}),
            auth=AuthSettings(api_keys=[CONFIG_KEY]),
        )
    finally:
        if previous is None:
            del os.environ[API_KEYS_ENV]
        else:
            os.environ[API_KEYS_ENV] = previous
    yield run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    delete_app(APP)


@pytest.fixture
def llmengine_env(app_url: str, monkeypatch: pytest.MonkeyPatch):
    """The client reads LLM_ENGINE_BASE_PATH and SCALE_API_KEY at every call."""
    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", app_url)
    return monkeypatch


@pytest.mark.parametrize("key", [CONFIG_KEY, ENV_KEY])
def test_llmengine_client_with_a_valid_key(llmengine_env, key: str):
    llmengine_env.setenv("SCALE_API_KEY", key)
    response = Completion.create(model=MODEL, prompt="Hello", max_new_tokens=3, temperature=0)
    assert response.output.text == "w0 w1 w2 "
    chunks = list(Completion.create(model=MODEL, prompt="Hi", max_new_tokens=2, temperature=0, stream=True))
    assert chunks[-1].output.finished


@pytest.mark.parametrize("key", ["wrong-key", "root", CONFIG_KEY + "x"])
def test_llmengine_client_with_a_wrong_key(llmengine_env, key: str):
    llmengine_env.setenv("SCALE_API_KEY", key)  # "root" is what the client sends when none is set
    with pytest.raises(UnauthorizedError):
        Completion.create(model=MODEL, prompt="Hello", max_new_tokens=3, temperature=0)


def test_openai_client(app_url: str):
    good = openai.OpenAI(base_url=app_url + "v1", api_key=ENV_KEY, max_retries=0)
    completion = good.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert completion.choices[0].text == "w0 w1 "
    chat = good.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content == "w0 w1 "
    assert [m.id for m in good.models.list()] == [MODEL]
    bad = openai.OpenAI(base_url=app_url + "v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "invalid_request_error"  # OpenAI's error shape
    assert "API key" in refused.value.body["message"]


def test_raw_http(app_url: str):
    params = {"model_endpoint_name": MODEL}
    body = {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0}
    sync = app_url + "v1/llm/completions-sync"
    for headers in ({}, {"x-api-key": ""}, {"authorization": "Bearer"}, {"authorization": "Basic !!"}):
        refused = httpx.post(sync, params=params, json=body, headers=headers)
        assert refused.status_code == 401 and "API key" in refused.json()["detail"], headers
    # Strangers get 401 before any parsing, even for a malformed body.
    assert httpx.post(sync, params=params, content=b"{", headers={}).status_code == 401
    assert httpx.get(app_url + "v1/llm/model-endpoints").status_code == 401
    for headers in ({"x-api-key": CONFIG_KEY}, {"authorization": f"Bearer {ENV_KEY}"}):
        assert httpx.post(sync, params=params, json=body, headers=headers).status_code == 200
    for route in ("healthz", "healthcheck", "readyz"):
        assert httpx.get(app_url + route).status_code == 200, route
    # Open paths match exactly: a path that only ends like a health route still needs a key.
    for route in ("v1/llm/model-endpoints/healthz", "v1/models/readyz"):
        assert httpx.get(app_url + route).status_code == 401, route
    assert (
        httpx.get(app_url + "v1/llm/model-endpoints/healthz", headers={"x-api-key": CONFIG_KEY}).status_code
        == 404
    )
