"""Batch job lifecycle on the real Serve app and Ray Data, over the fake engine: queue, capacity, crashes,
cancel, deadline, the store's own folders, and a registry that dies or is replaced.

Rows steer the fake engine (tests/deployments/fake_engine.py): "[kill-worker]" ends the worker's process,
"[wait-for:<path>]" holds a row until the test creates <path>. Every wait below is for an event (a job's
state, a file); no verdict depends on how fast the machine is.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import ray

from deployments import serve_status
from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.batch.registry import RESTART_REASON, JobRegistry, registry_name
from deployments.config import DeploymentSettings, ModelConfig
from deployments.state import owner as owner_module
from deployments.state.owner import NAMESPACE, owner
from tests.deployments.fake_engine import FAKE_MODELS, fake_factory
from tests.serve_fixtures import delete_app, run_app

APP, MODEL = "batchfake", FAKE_MODELS[0]
WORKER_CPUS = 1.0  # whole CPUs, so that a test can fill the cluster around a job
MAX_WORKER_CRASHES = 2
TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch_fake_root")


@pytest.fixture(scope="module")
def url(serve_port: int, data_root: Path) -> Iterator[str]:
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    settings = BatchSettings(
        data_root=str(data_root),
        max_data_parallelism=8,
        worker_num_cpus=WORKER_CPUS,
        batch_size=4,
        max_running_jobs=1,
        max_worker_crashes=MAX_WORKER_CRASHES,
    )
    models = [ModelConfig(name=MODEL, model="fake", deployment=light)]
    app = build_app_from_configs(models, engine_factory=fake_factory, batch=settings)
    yield run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    delete_app(APP)


@pytest.fixture
def gate(tmp_path: Path, url: str) -> Iterator[Path]:
    """A file the held rows wait for; opened after the test so nothing stays running."""
    path = tmp_path / "gate"
    yield path
    path.touch()
    for job in httpx.get(f"{url}v2/batch-completions", timeout=30).json()["jobs"]:
        if job["status"] not in TERMINAL:
            httpx.post(f"{url}v2/batch-completions/{job['job_id']}/actions/cancel", timeout=30)
            wait_for(url, job["job_id"], lambda j: j["status"] in TERMINAL)


def create(url: str, prompts: list[str], status: int = 200, **fields) -> dict:
    body = {
        "output_data_path": f"out/{uuid.uuid4().hex}.json",
        "model_config": {"model": MODEL},
        "content": {"prompts": prompts, "max_new_tokens": 3, "temperature": 0},
        **fields,
    }
    answer = httpx.post(f"{url}v2/batch-completions", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    return answer.json()


def instant(url: str, data_root: Path) -> dict:
    """A job that ends as soon as its runner reads its input (malformed): it starts no worker."""
    (data_root / "in").mkdir(exist_ok=True)
    (data_root / "in" / "broken.json").write_text("{not json")
    return create(url, [], input_data_path="in/broken.json", content=None)


def ended_at_once(job: dict) -> bool:
    return job["status"] == "failed" and "not valid JSON" in job["error"]


def get(url: str, job_id: str) -> dict:
    answer = httpx.get(f"{url}v2/batch-completions/{job_id}", timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["job"]


def wait_for(url: str, job_id: str, is_done: Callable[[dict], bool], timeout_s: float = 120) -> dict:
    """Poll the job until `is_done` (a bounded wait for an event, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not is_done(job := get(url, job_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return job


def finished(url: str, job_id: str) -> dict:
    return wait_for(url, job_id, lambda j: j["status"] in TERMINAL)


def outputs(data_root: Path, job: dict) -> list:
    return json.loads(Path(job["output_data_path"]).read_text())


def test_a_row_that_kills_its_worker_fails_alone(url: str, data_root: Path, gate: Path):
    """Batches of 4: row 5 kills its worker every time. Its batch comes back missing (no retry), then
    each of its rows runs alone: row 5 fails with the reason, the other five complete. (Row 5 comes
    last, so no worker has to start again for rows after it: the test stays cheap.)"""
    prompts = [f"row {i}" for i in range(5)] + ["row 5 [kill-worker]"]
    job = finished(url, create(url, prompts)["job_id"])
    assert job["status"] == "completed", job
    assert (job["progress"]["num_done"], job["progress"]["num_failed"]) == (6, 1), job
    result = outputs(data_root, job)
    assert [i for i, o in enumerate(result) if o is None] == [5] and result[4]["text"] == "w0 w1 w2 "
    errors = Path(job["output_data_path"] + ".errors.jsonl").read_text().splitlines()
    (error,) = [json.loads(line) for line in errors]
    assert error["index"] == 5 and error["status_code"] == 500, error
    assert "crashed its engine worker" in error["error"], error


def test_an_input_file_shared_by_two_workers(url: str, data_root: Path, gate: Path):
    """data_parallelism 2: two engine workers share the batches of an input file; the output keeps the
    prompts' order (prompt i has i + 1 bytes, the fake engine's prompt tokens)."""
    prompts = ["x" * (i + 1) for i in range(12)]  # 3 batches of 4
    (data_root / "in").mkdir(exist_ok=True)
    content = {"prompts": prompts, "max_new_tokens": 2, "temperature": 0}
    (data_root / "in" / "two.json").write_text(json.dumps(content))
    path = f"file://{data_root}/in/two.json"
    job = finished(url, create(url, [], input_data_path=path, content=None, data_parallelism=2)["job_id"])
    assert job["status"] == "completed" and job["progress"]["num_workers"] == 2, job
    assert len(set(job["metadata"]["workers"].split(","))) == 2
    assert [o["num_prompt_tokens"] for o in outputs(data_root, job)] == list(range(1, 13))


def test_a_job_waits_for_room_then_runs(url: str, gate: Path):
    """The cluster's free CPUs are taken (a stand-in for online replicas): the job is queued, saying what
    it waits for, and runs once room frees up. A job no node set could hold is refused at once."""
    hogs = fill_the_cluster(leave_cpus=WORKER_CPUS / 2)
    try:
        job_id = create(url, ["a", "b"])["job_id"]
        waiting = wait_for(url, job_id, lambda j: "free room" in (j["queue_reason"] or ""))
        assert waiting["status"] == "queued" and "1 CPU" in waiting["queue_reason"], waiting
    finally:
        for hog in hogs:
            ray.kill(hog)
    job = finished(url, job_id)
    assert job["status"] == "completed" and job["queue_reason"] is None, job
    never = create(url, ["a"], status=400, data_parallelism=8)  # 8 workers of 1 CPU; the node has 4
    assert "data_parallelism" in never["detail"] and "can never run" in never["detail"], never
    too_many = create(url, ["a"], status=400, data_parallelism=9)
    assert "batch.max_data_parallelism=8" in too_many["detail"], too_many


@ray.remote(num_cpus=0)
class Hog:
    def ready(self) -> bool:
        return True


def fill_the_cluster(leave_cpus: float) -> list:
    """Actors holding all free CPUs but `leave_cpus`, once no app of an earlier test is still being
    deleted (their replicas' CPUs come back then, not later)."""
    deadline = time.monotonic() + 120
    while any(app.status == "DELETING" for app in serve_status.applications().values()):
        assert time.monotonic() < deadline, "an app is still being deleted"
        time.sleep(0.2)
    hogs = []
    while (free := ray.available_resources().get("CPU", 0.0)) > leave_cpus + 0.01:
        hogs.append(Hog.options(num_cpus=free - leave_cpus).remote())
        ray.get(hogs[-1].ready.remote())
    return hogs


def test_cancel_ends_a_running_job_at_once_and_keeps_what_was_written(url: str, gate: Path):
    """The first batch completes, the next ones are held: a cancel ends the job without waiting for
    them, with the finished rows in the output. A job queued behind it is cancelled at once."""
    prompts = [f"done {i}" for i in range(4)] + [f"held [wait-for:{gate}]"] * 8
    job_id = create(url, prompts)["job_id"]
    wait_for(url, job_id, lambda j: j["progress"]["num_done"] == 4)
    queued = create(url, ["later"])  # batch.max_running_jobs=1: it waits its turn
    assert queued["status"] == "queued" and "its turn" in queued["queue_reason"], queued
    cancel = httpx.post(f"{url}v2/batch-completions/{queued['job_id']}/actions/cancel", timeout=30)
    assert cancel.json() == {"success": True} and get(url, queued["job_id"])["status"] == "cancelled"
    assert httpx.post(f"{url}v2/batch-completions/{job_id}/actions/cancel", timeout=30).json()["success"]
    job = finished(url, job_id)
    assert job["status"] == "cancelled" and job["progress"]["num_done"] == 4, job
    result = json.loads(Path(job["output_data_path"]).read_text())
    assert len(result) == 12 and [o is not None for o in result] == [True] * 4 + [False] * 8


def test_max_runtime_ends_a_job_whose_rows_never_finish(url: str, gate: Path):
    job = finished(url, create(url, [f"held [wait-for:{gate}]"] * 2, max_runtime_sec=1)["job_id"])
    assert job["status"] == "failed" and "max_runtime_sec (1 s)" in job["error"], job


def test_paths_in_the_stores_own_folders_are_refused(url: str, data_root: Path, gate: Path):
    """A job's input or output in files/, jobs/ or state/ would read or overwrite what the server keeps
    there (an uploaded file became a job's output): 400 naming the field; the file stays as it was."""
    uploaded = httpx.post(f"{url}v1/files", files={"file": ("in.jsonl", b"{}\n")}, timeout=30).json()
    stored = data_root / "files" / uploaded["id"]
    for fields in (
        {"output_data_path": f"files/{uploaded['id']}"},
        {"output_data_path": str(stored)},
        {"output_data_path": f"file://{data_root}/jobs/x.json"},
        {"output_data_path": "state/jobs/x.json"},
        {"output_data_path": "files"},
        {"input_data_path": f"files/{uploaded['id']}", "content": None},
    ):
        field = next(iter(fields))
        answer = create(url, ["a"], status=400, **fields)
        assert answer["detail"].startswith(f"{field}:") and "keeps for itself" in answer["detail"], answer
    assert stored.read_bytes() == b"{}\n"
    assert httpx.get(f"{url}v1/files", timeout=30).status_code == 200


def test_jobs_survive_their_registry_dying(url: str, data_root: Path, gate: Path):
    """The registry's process dies: Ray restarts it, it reads the records back; the finished job is
    as it was, the running one (its runner died with the registry) failed with the reason and its
    finished rows kept, and new jobs run."""
    done = finished(url, instant(url, data_root)["job_id"])
    running_id = create(url, ["ok"] * 4 + [f"held [wait-for:{gate}]"] * 4)["job_id"]
    wait_for(url, running_id, lambda j: j["progress"]["num_done"] == 4)
    registry = ray.get_actor(registry_name(str(data_root)), namespace=NAMESPACE)
    ray.kill(registry, no_restart=False)
    failed = finished(url, running_id)
    assert failed["status"] == "failed" and failed["error"] == RESTART_REASON, failed
    assert failed["progress"]["num_done"] == 4
    assert [o is not None for o in outputs(data_root, failed)] == [True] * 4 + [False] * 4
    assert ended_at_once(done) and get(url, done["job_id"]) == done
    assert ended_at_once(finished(url, instant(url, data_root)["job_id"]))  # the registry runs jobs again
    records = sorted(p.name for p in (data_root / "state" / "jobs").iterdir())
    assert f"{done['job_id']}.json" in records and f"{running_id}.json" in records


def test_a_code_upgrade_replaces_the_registry_and_keeps_the_jobs(url: str, data_root: Path, monkeypatch):
    job = finished(url, instant(url, data_root)["job_id"])
    name = registry_name(str(data_root))
    before = ray.get_actor(name, namespace=NAMESPACE)._actor_id
    monkeypatch.setattr(owner_module, "code_version", lambda: "a-later-release")
    replaced = owner(JobRegistry, name, str(data_root))  # the running one reports other code: replaced
    assert replaced._actor_id != before
    assert get(url, job["job_id"]) == job  # the ingress's old handle is dead: it finds the new one
