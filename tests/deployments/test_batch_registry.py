"""The batch job registry and runner, without Ray: counts, records on disk, recovery, crash isolation."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from deployments.batch import registry as registry_module
from deployments.batch import runner as runner_module
from deployments.batch.config import BatchSettings
from deployments.batch.registry import RESTART_REASON, JobRegistry
from deployments.batch.runner import JobRunner, _Job
from deployments.batch.types import JobKind, JobOutcome, JobRecord, JobSpec, JobStatus, Progress


def spec(job_id: str, root: Path, **settings: Any) -> JobSpec:
    output = str(root / "out" / f"{job_id}.json")
    batch = BatchSettings(data_root=str(root), **settings).model_dump_json()
    return JobSpec(job_id, JobKind.V1, "m", "{}", "", output, str(root), 1, 60.0, batch, "{}")


def record(job_id: str, root: Path) -> JobRecord:
    return JobRecord(spec=spec(job_id, root), created_at=time.time())


@pytest.fixture
def registry(tmp_path: Path) -> JobRegistry:
    return JobRegistry(str(tmp_path))


def test_the_outcome_carries_the_final_counts_when_the_last_report_comes_after_it(registry, tmp_path):
    """The runner's last `report` is a separate actor call; it may reach the registry after `run`
    returned, when the record is terminal and takes no more reports (seen once in a full test run:
    3 rows, status completed, 0 completed and 0 failed)."""
    registry._jobs["j"] = record("j", tmp_path)
    asyncio.run(registry.report("j", Progress(3, 0, 0, ())))
    final = Progress(3, 3, 1, ("w1",))
    registry._finish("j", JobOutcome(JobStatus.COMPLETED, progress=final))
    asyncio.run(registry.report("j", final))  # late: ignored, and not needed
    asyncio.run(registry.report("j", Progress(3, 1, 0, ())))  # an older one, later still: ignored
    job = registry._jobs["j"]
    assert (job.status, job.num_total, job.num_done, job.num_failed) == (JobStatus.COMPLETED, 3, 3, 1)
    assert job.worker_ids == ["w1"]


def test_an_outcome_without_counts_keeps_the_reported_ones(registry, tmp_path):
    registry._jobs["j"] = record("j", tmp_path)
    asyncio.run(registry.report("j", Progress(4, 2, 0, ("w",))))
    registry._finish("j", JobOutcome(JobStatus.CANCELLED))
    job = registry._jobs["j"]
    assert (job.status, job.num_total, job.num_done, job.num_failed) == (JobStatus.CANCELLED, 4, 2, 0)


def test_a_new_registry_reads_the_records_back_and_ends_what_was_running(tmp_path, monkeypatch):
    """Records are one JSON file per job under <data_root>/state/jobs/. A registry started later (a
    crash, a Ray restart) keeps finished jobs as they were, fails the running one with the reason (its
    finished rows assembled), queues the queued one again, and skips a file it cannot read."""
    released: list[str] = []
    monkeypatch.setattr(registry_module.capacity, "release", released.append)
    first = JobRegistry(str(tmp_path))
    for job_id, status in (("done", JobStatus.COMPLETED), ("running", JobStatus.RUNNING), ("queued", None)):
        first._jobs[job_id] = record(job_id, tmp_path)
        if status is not None:
            first._jobs[job_id].status = status
        first._save(first._jobs[job_id]).result()
    asyncio.run(first.report("running", Progress(2, 1, 0, ("w",))))
    parts = Path(first._jobs["running"].spec.output_path + ".parts")
    parts.mkdir(parents=True)
    (parts / "part-00000.jsonl").write_text(json.dumps({"index": 0, "output": {"text": "x"}, "error": None}))
    first._writes.shutdown(wait=True)
    (tmp_path / "state" / "jobs" / "broken.json").write_text("{not json")

    started: list[str] = []

    async def run(self, record, settings):  # no Ray here: note what would run
        started.append(record.spec.job_id)

    monkeypatch.setattr(JobRegistry, "_place_and_run", run)
    second = JobRegistry(str(tmp_path))

    async def recover() -> list[JobRecord]:
        await second.ready()
        await asyncio.sleep(0)  # the queued job's task takes its turn
        return await second.list()

    jobs = {r.spec.job_id: r for r in asyncio.run(recover())}
    assert set(jobs) == {"done", "running", "queued"}
    assert jobs["done"].status == JobStatus.COMPLETED
    assert (jobs["running"].status, jobs["running"].error) == (JobStatus.FAILED, RESTART_REASON)
    assert json.loads(Path(jobs["running"].spec.output_path).read_text()) == [{"text": "x"}, None]
    assert started == ["queued"] and set(released) == {"queued", "running"}


class FakeRegistry:
    def __init__(self) -> None:
        self.reports: list[Progress] = []
        self.report = self

    def remote(self, job_id: str, progress: Progress) -> None:
        self.reports.append(progress)


def fake_pipeline(killers: set[int], rounds: list[list[list[int]]]):
    """Ray Data as the runner uses it: each block is one call; a block holding a row of `killers`
    loses its worker and is skipped; past `max_lost` skipped blocks the execution raises."""

    def pipeline(job: _Job, blocks, max_lost: int):
        rounds.append([[i for i, _ in block] for block in blocks])
        lost = 0
        for block in blocks:
            indexes = [i for i, _ in block]
            if killers & set(indexes):
                lost += 1
                if lost > max_lost:
                    raise ray.exceptions.ActorDiedError()
                continue
            yield {
                "index": indexes,
                "output": [json.dumps({"text": f"out {i}"}) for i in indexes],
                "error": [""] * len(indexes),
                "worker": ["w"] * len(indexes),
            }

    return pipeline


def run_rows(tmp_path: Path, monkeypatch, killers: set[int], num_rows: int, **settings: Any):
    rounds: list[list[list[int]]] = []
    monkeypatch.setattr(runner_module, "_pipeline", fake_pipeline(killers, rounds))
    job = _Job(spec("j", tmp_path, batch_size=4, **settings), JobKind.V1, None, None, FakeRegistry())
    runner = JobRunner()
    runner._progress = Progress(num_rows, 0, 0, ())
    result = runner._rounds(job, [(i, json.dumps(f"p{i}")) for i in range(num_rows)])
    return result, runner._progress, rounds


def test_the_rows_of_a_lost_batch_run_again_each_alone(tmp_path, monkeypatch):
    """Rows 5 and 9 kill their workers: their batches come back missing, their rows run again one by
    one, and only those two rows fail; the job completes."""
    result, progress, rounds = run_rows(tmp_path, monkeypatch, {5, 9}, 10, max_worker_crashes=4)
    assert result == (JobStatus.COMPLETED, None)
    assert rounds == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], [[4], [5], [6], [7], [8], [9]]]
    assert (progress.num_done, progress.num_failed) == (10, 2)


def test_past_the_crash_budget_the_job_fails_with_the_reason(tmp_path, monkeypatch):
    with pytest.raises(ray.exceptions.ActorDiedError):  # _work turns it into the job's failure
        run_rows(tmp_path, monkeypatch, {5, 9}, 10, max_worker_crashes=3)
    failure = runner_module._failure(ray.exceptions.ActorDiedError(), BatchSettings(max_worker_crashes=3))
    assert "batch.max_worker_crashes=3" in failure
