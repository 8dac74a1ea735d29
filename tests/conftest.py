"""Root fixtures shared by every test folder; sub-folders add their own conftest."""

from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama folder (tokenizer included), built once per test run."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_dir_hd32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with head_dim 32, the smallest that vLLM's CPU attention takes (test_engines.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model_hd32"), head_dim=32)
