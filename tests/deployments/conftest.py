"""Serve fixtures of the HTTP-layer tests: the real Ingress and ModelServer over a fake engine."""

from collections.abc import Iterator

import pytest

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, ModelConfig
from tests.deployments.endpoint_fakes import serve_fake  # noqa: F401 (a fixture of the endpoint tests)
from tests.deployments.fake_engine import FAKE_MODELS, fake_factory
from tests.serve_fixtures import delete_app, run_app, serve_session


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    yield from serve_session()


@pytest.fixture(scope="session")
def fake_app_url(serve_port: int) -> Iterator[str]:
    """Base URL (ending in "/") of an app serving two fake-engine models under /fake."""
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    models = [
        ModelConfig(name=FAKE_MODELS[0], model="fake", deployment=light),
        ModelConfig(name=FAKE_MODELS[1], model="fake", use_chat_template=True, deployment=light),
    ]
    app = build_app_from_configs(models, engine_factory=fake_factory)
    yield run_app(app, name="fake", route_prefix="/fake", port=serve_port)
    delete_app("fake")
