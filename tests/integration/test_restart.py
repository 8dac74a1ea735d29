"""The README's server stopped and started again: runtime endpoints and batch jobs come back.

`llmserve serve CONFIG` (its `serve run` in Serve's throughput mode, with Serve's Python proxy: HAProxy's
ports are other Serves' on this machine) twice, each run with a Ray cluster of its own, stopped with
Ctrl-C as a user stops it; only the state root and the batch data root, two folders, are shared. One
pair of runs checks both kinds of state (a start costs ~40 s on 2 cores); the fake engine keeps it cheap.

First run: a runtime endpoint that serves and one whose create failed; one batch job ended, one running
(its last rows held by a file that never comes), one queued behind it. Second run, nobody asking: the
endpoint that served is deployed again and serves, the failed one stays failed; the ended job is listed
as it was, the running one failed with the reason and its finished rows in its output, the queued one
runs (the ingress starts the registry when it finds unfinished jobs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.batch.registry import RESTART_REASON
from tests.deployments.fake_engine import FAKE_MODELS
from tests.serve_fixtures import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = "v1/llm/model-endpoints"
JOBS = "v2/batch-completions"
START_TIMEOUT_S = 180.0
TERMINAL = ("completed", "failed", "cancelled")


# Ray's own start gives its raylet a fixed 30 s to register (ray/_private/node.py); on 2 cores busy with
# the rest of the suite it can miss that, and `serve run` then exits before this test's code runs.
RAY_START_TIMED_OUT = "The current node timed out during startup"


@contextmanager
def llmserve_serve(config: Path, log: Path, client: httpx.Client, what: str) -> Iterator[None]:
    """`llmserve serve config`, answering `healthz`, until the block ends; then Ctrl-C (as a user would;
    twice more, which it turns into SIGTERM and SIGKILL of `serve run`, if it does not stop). A server
    that exits before it answers fails at once with its log; one whose Ray missed Ray's own start
    deadline is started once more (said in the output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray, not the tests'
    env |= {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PYTHONPATH": str(REPO_ROOT)}
    env |= {"LLM_ENGINE_DISABLE_VERSION_CHECK": "true"}
    command = [sys.executable, "-m", "deployments.cli", "serve", str(config)]
    for attempt in range(2):
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out, start_new_session=True
            )

        def answering(process: subprocess.Popen = process) -> bool:
            if process.poll() is not None:
                return True  # it exited: stop waiting, decided below
            return client.get("healthz").status_code == 200

        wait_for(answering, what)
        if process.poll() is None:
            break
        output = log.read_text(errors="replace")
        assert attempt == 0 and RAY_START_TIMED_OUT in output, f"{what}: exited\n{output[-6000:]}"
        print(f"{what}: Ray's start timed out (machine busy); starting it once more")
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
    """`call()`'s first truthy result (a bounded wait for an event); TransportErrors count as not yet."""
    start_s = time.monotonic()
    while True:
        try:
            if result := call():
                print(f"{what}: {time.monotonic() - start_s:.1f} s")
                return result
        except httpx.TransportError:
            pass
        assert time.monotonic() < start_s + timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.5)


def status_of(client: httpx.Client, name: str) -> str:
    return client.get(f"{ENDPOINTS}/{name}").json()["status"]


def completes(client: httpx.Client, name: str) -> bool:
    body = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
    response = client.post("v1/llm/completions-sync", params={"model_endpoint_name": name}, json=body)
    assert response.status_code in (200, 404, 503), response.text
    return response.status_code == 200


def create_job(client: httpx.Client, prompts: list[str] | None = None, input_path: str | None = None) -> str:
    body = {
        "output_data_path": f"out/{uuid.uuid4().hex}.json",
        "model_config": {"model": FAKE_MODELS[0]},
        "content": {"prompts": prompts, "max_new_tokens": 3, "temperature": 0} if prompts else None,
        "input_data_path": input_path,
    }
    answer = client.post(JOBS, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["job_id"]


def jobs(client: httpx.Client) -> dict[str, dict]:
    return {job["job_id"]: job for job in client.get(JOBS).json()["jobs"]}


def job_record(data_root: Path, job_id: str) -> dict:
    path = data_root / "state" / "jobs" / f"{job_id}.json"
    return json.loads(path.read_text())["record"] if path.exists() else {}


@pytest.mark.timeout(600)
def test_endpoints_and_jobs_come_back_after_the_server_stops_and_starts_again(tmp_path: Path):
    port, data_root, gate = free_port(), tmp_path / "batch", tmp_path / "never"
    batch = {"data_root": str(data_root), "worker_num_cpus": 0.25, "batch_size": 4, "max_running_jobs": 1}
    app = {"name": "llm", "route_prefix": "/", "import_path": "tests.deployments.fake_serve_app:build"}
    app["args"] = {"state_root": str(tmp_path / "state"), "batch": batch}
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]})
    )
    (data_root / "in").mkdir(parents=True)
    (data_root / "in" / "broken.json").write_text("{not json")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=60)
    kept = {"name": "kept", "model_name": "smollm2-135m-instruct", "min_workers": 1, "max_workers": 1}
    failed = {"name": "failed", "model_name": "smollm2-135m-instruct", "gpus": 1}  # no node has a GPU

    with llmserve_serve(config, tmp_path / "serve-1.log", client, "the first run answering"):
        for body in (kept, failed):
            assert client.post(ENDPOINTS, json=body).status_code == 200
        done = create_job(client, input_path="in/broken.json")
        wait_for(lambda: jobs(client)[done]["status"] in TERMINAL, "a job ended")
        running = create_job(client, ["ok"] * 4 + [f"held [wait-for:{gate}]"] * 4)
        wait_for(lambda: jobs(client)[running]["progress"]["num_done"] == 4, "a job running, half done")
        queued = create_job(client, input_path="in/broken.json")
        wait_for(lambda: status_of(client, "kept") == "READY", "kept READY")
        assert status_of(client, "failed") == "UPDATE_FAILED"
        assert completes(client, "kept")
        before = jobs(client)
        assert before[done]["status"] == "failed" and before[queued]["status"] == "queued", before

    with llmserve_serve(config, tmp_path / "serve-2.log", client, "the second run answering"):
        wait_for(lambda: completes(client, "kept"), "kept serving again")  # deployed again, nobody asked
        resumed = wait_for(
            lambda: job_record(data_root, queued).get("status") in TERMINAL and job_record(data_root, queued),
            "the queued job ran",
        )
        assert "not valid JSON" in resumed["error"], resumed  # it ran, and nobody asked
        wait_for(lambda: status_of(client, "kept") == "READY", "kept READY again")
        assert status_of(client, "failed") == "UPDATE_FAILED"  # a failed create stays failed, not deployed
        names = {e["name"] for e in client.get(ENDPOINTS).json()["model_endpoints"]}
        assert names == {FAKE_MODELS[0], "kept", "failed"}
        after = jobs(client)
        assert after[done] == before[done]
        assert after[running]["status"] == "failed" and after[running]["error"] == RESTART_REASON
        assert after[running]["progress"]["num_done"] == 4
        output = json.loads(Path(after[running]["output_data_path"]).read_text())
        assert [o is not None for o in output] == [True] * 4 + [False] * 4
