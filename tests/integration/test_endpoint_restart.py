"""The README's server stopped and started again: every runtime endpoint comes back with its status.

`llmserve serve CONFIG` (its `serve run`, Serve's throughput mode; Serve's Python proxy instead of
HAProxy, whose ports other Serves on this machine use) twice: two Ray clusters, each started by `serve
run` and stopped on Ctrl-C; only the state root, a folder, is shared. The fake engine keeps it cheap.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_fixtures import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = "v1/llm/model-endpoints"
START_TIMEOUT_S = 180.0


@contextmanager
def llmserve_serve(config: Path, log: Path) -> Iterator[None]:
    """`llmserve serve config` until the block ends, then Ctrl-C (as a user would; twice more, which it
    turns into SIGTERM and SIGKILL of `serve run`, if it does not stop)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, never the tests'
    env |= {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "deployments.cli", "serve", str(config)]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield
    finally:
        stop_s = time.monotonic()
        for _ in range(3):
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
                break
        print(f"llmserve serve stopped in {time.monotonic() - stop_s:.1f} s")


def wait_for(call, what: str, timeout_s: float = START_TIMEOUT_S):
    """`call()`'s first truthy result; TransportErrors count as not yet."""
    start_s = time.monotonic()
    deadline = start_s + timeout_s
    while True:
        try:
            if result := call():
                print(f"{what}: {time.monotonic() - start_s:.1f} s")
                return result
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)


def status_of(client: httpx.Client, name: str) -> str:
    return client.get(f"{ENDPOINTS}/{name}").json()["status"]


def completes(client: httpx.Client, name: str) -> bool:
    body = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
    response = client.post("v1/llm/completions-sync", params={"model_endpoint_name": name}, json=body)
    assert response.status_code in (200, 404, 503), response.text
    return response.status_code == 200


@pytest.mark.timeout(600)
def test_runtime_endpoints_come_back_after_the_server_stops_and_starts_again(tmp_path: Path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    app = {"name": "llm", "route_prefix": "/", "import_path": "tests.integration.restart_app:build"}
    app["args"] = {"state_root": str(tmp_path / "state"), "data_root": str(tmp_path / "batch")}
    config.write_text(
        yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]})
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=60)
    kept = {"name": "kept", "model_name": "smollm2-135m-instruct", "min_workers": 1, "max_workers": 1}
    failed = {"name": "failed", "model_name": "smollm2-135m-instruct", "gpus": 1}  # no node has a GPU

    with llmserve_serve(config, tmp_path / "serve-1.log"):
        wait_for(lambda: client.get("healthz").status_code == 200, "the first run answering")
        for body in (kept, failed):
            assert client.post(ENDPOINTS, json=body).status_code == 200
        wait_for(lambda: status_of(client, "kept") == "READY", "kept READY")
        assert status_of(client, "failed") == "UPDATE_FAILED"
        assert completes(client, "kept")

    with llmserve_serve(config, tmp_path / "serve-2.log"):
        wait_for(lambda: client.get("healthz").status_code == 200, "the second run answering")
        wait_for(lambda: completes(client, "kept"), "kept serving again")  # deployed again, nobody asked
        wait_for(lambda: status_of(client, "kept") == "READY", "kept READY again")
        assert status_of(client, "failed") == "UPDATE_FAILED"  # a failed create stays failed, not deployed
        names = {e["name"] for e in client.get(ENDPOINTS).json()["model_endpoints"]}
        assert names == {"fake", "kept", "failed"}
