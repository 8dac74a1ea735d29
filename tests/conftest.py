"""Root fixtures shared by every test folder; sub-folders add their own conftest."""

import os

# OpenMP's idle threads sleep instead of spinning (set before torch loads libgomp; Ray's processes inherit
# it). Two test processes and a Ray share 2 cores: spinning torch threads took the cores from the rest
# (tests/engine + tests/model_zoo on two workers: 148-178 s and 275-335 CPU-s spinning, 68 s and 108 CPU-s
# sleeping). Set OMP_WAIT_POLICY to run it another way (empty: libgomp's default, with its warning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


# ---- order: the longest modules first, so that two xdist workers end together ----
# Wall seconds of each module alone on a worker (xdist, 2 cores, 2026-12-05; `--durations` prints them
# again each run). Modules not listed follow in collection order; the order changes no test's outcome.
LONGEST_FIRST = (
    "tests/integration/test_schema_fuzz.py",
    "tests/integration/test_multi_model.py",
    "tests/integration/test_batch.py",
    "tests/integration/test_engines.py",
    "tests/deployments/test_batch_jobs.py",
    "tests/integration/test_restart.py",
    "tests/deployments/test_endpoint_races.py",
    "tests/integration/test_model_endpoints.py",
    "tests/integration/test_reliability.py",
    "tests/integration/test_two_nodes.py",
    "tests/integration/test_bad_input.py",
    "tests/engine/test_gemma3.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: modules stay whole
