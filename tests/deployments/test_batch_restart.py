"""Batch jobs outlive the whole server: `serve run` killed (its Ray with it) and started again.

The first run ends one job, leaves one running (its last rows held by a file that never comes) and
one queued behind it. Then every process of that server is killed at once (SIGKILL: no graceful
stop, nothing written at exit). The second run, on the same data root, lists them: the ended one as
it was, the running one failed with the reason and its finished rows in the output, and the queued
one runs without anyone asking (an ingress that finds unfinished jobs starts the registry). The
ended and the queued job fail at once when they run (a malformed input): only one job starts a worker.
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

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
TERMINAL = ("completed", "failed", "cancelled")


@contextmanager
def serve_run(config: Path, port: int) -> Iterator[str]:
    """`serve run config` in its own session (its own Ray), until it answers; then every process of
    that session is killed at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # not this session's Ray
    env.update(RAY_SERVE_ENABLE_HA_PROXY="0", PYTHONPATH=str(REPO), LLM_ENGINE_DISABLE_VERSION_CHECK="true")
    serve = Path(sys.executable).with_name("serve")
    process = subprocess.Popen(
        [str(serve), "run", str(config)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url + "healthz"):
            assert process.poll() is None, "serve run exited"
            assert time.monotonic() < deadline, "serve run did not answer"
            time.sleep(0.5)
        yield url
    finally:
        kill_session(process.pid)
        process.wait(timeout=60)


def kill_session(session_id: int) -> None:
    """SIGKILL every process of the session `serve run` leads: itself, its Ray and Ray's workers (each
    worker is in a process group of its own, but stays in the session)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)"
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == session_id:  # state, ppid, pgrp, session
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def create(url: str, prompts: list[str] | None = None, input_data_path: str | None = None) -> str:
    """A job of `prompts`, or of an input file."""
    body = {
        "output_data_path": f"out/{uuid.uuid4().hex}.json",
        "model_config": {"model": FAKE_MODELS[0]},
        "content": {"prompts": prompts, "max_new_tokens": 3, "temperature": 0} if prompts else None,
        "input_data_path": input_data_path,
    }
    answer = httpx.post(f"{url}v2/batch-completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["job_id"]


def jobs(url: str) -> dict[str, dict]:
    listed = httpx.get(f"{url}v2/batch-completions", timeout=60).json()["jobs"]
    return {job["job_id"]: job for job in listed}


def wait_until(check, timeout_s: float = 120):
    """Poll `check()` until it returns something true (a bounded wait for an event)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
    return result


def record(data_root: Path, job_id: str) -> dict:
    path = data_root / "state" / "jobs" / f"{job_id}.json"
    return json.loads(path.read_text())["record"] if path.exists() else {}


@pytest.mark.timeout(600)
def test_jobs_outlive_a_serve_run_restart(tmp_path: Path):
    data_root, port = tmp_path / "root", free_port()
    gate = tmp_path / "never"
    config = tmp_path / "config.yaml"
    batch = {"data_root": str(data_root), "worker_num_cpus": 0.25, "batch_size": 4, "max_running_jobs": 1}
    config.write_text(
        yaml.safe_dump(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [
                    {
                        "name": "restart",
                        "route_prefix": "/",
                        "import_path": "tests.deployments.fake_serve_app:build",
                        "args": {"batch": batch},
                    }
                ],
            }
        )
    )
    (data_root / "in").mkdir(parents=True)
    (data_root / "in" / "broken.json").write_text("{not json")
    with serve_run(config, port) as url:
        done = create(url, input_data_path="in/broken.json")
        wait_until(lambda: jobs(url)[done]["status"] in TERMINAL)
        running = create(url, ["ok"] * 4 + [f"held [wait-for:{gate}]"] * 4)
        wait_until(lambda: jobs(url)[running]["progress"]["num_done"] == 4)
        queued = create(url, input_data_path="in/broken.json")
        before = jobs(url)
        assert before[done]["status"] == "failed" and before[queued]["status"] == "queued", before
    with serve_run(config, port) as url:
        resumed = wait_until(
            lambda: record(data_root, queued).get("status") in TERMINAL and record(data_root, queued)
        )
        assert "not valid JSON" in resumed["error"], resumed  # it ran, and nobody asked
        after = jobs(url)
        assert after[done] == before[done]
        assert after[running]["status"] == "failed" and after[running]["error"] == RESTART_REASON
        assert after[running]["progress"]["num_done"] == 4
        output = json.loads(Path(after[running]["output_data_path"]).read_text())
        assert [o is not None for o in output] == [True] * 4 + [False] * 4
