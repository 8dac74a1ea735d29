"""Serve fixtures of the integration tests: the real app and engine on the tiny random-weight model."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.tiny_app import build_tiny_app
from tests.serve_fixtures import delete_app, run_app, serve_session

# The official client asks PyPI for its newest version at import unless this is set (no internet here).
os.environ.setdefault("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    yield from serve_session()


@pytest.fixture(scope="session")
def tiny_app_url(serve_port: int, tiny_model_dir: Path) -> Iterator[str]:
    """Base URL (ending in "/") of the real app serving the tiny model at the root route."""
    yield run_app(build_tiny_app(tiny_model_dir), name="tiny", route_prefix="/", port=serve_port)
    delete_app("tiny")
