"""Root fixtures shared by every test folder; sub-folders add their own conftest."""

import json
from pathlib import Path

import pytest

from tests.kernel_report import KERNEL_PATHS, summary_lines
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama folder (tokenizer included), built once per test run."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_dir_hd32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with head_dim 32, the smallest that vLLM's CPU attention takes (test_engines.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model_hd32"), head_dim=32)


# ---- which native-kernel paths ran (tests/kernel_report.py), also from pytest-xdist's workers ----
_worker_kernel_paths: dict[str, str] = {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the table to the controller
        workeroutput["kernel_paths"] = json.dumps(KERNEL_PATHS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    _worker_kernel_paths.update(json.loads(getattr(node, "workeroutput", {}).get("kernel_paths", "{}")))


def pytest_terminal_summary(terminalreporter) -> None:
    paths = {**_worker_kernel_paths, **KERNEL_PATHS}
    for line in summary_lines(paths):
        terminalreporter.write_line(line)
