"""The batch job registry's bookkeeping, without Ray: a job's final counts whatever order messages come in."""

import asyncio
import time

from deployments.batch.registry import JobRegistry
from deployments.batch.types import JobKind, JobOutcome, JobRecord, JobSpec, JobStatus, Progress


def record(job_id: str) -> JobRecord:
    spec = JobSpec(job_id, JobKind.OPENAI, "m", "{}", "in", "out", "/data", 1, 60.0, "{}", "{}")
    return JobRecord(spec=spec, created_at=time.time())


def test_the_outcome_carries_the_final_counts_when_the_last_report_comes_after_it():
    """The runner's last `report` is a separate actor call; it may reach the registry after `run`
    returned, when the record is terminal and takes no more reports (seen once in a full test run:
    3 rows, status completed, 0 completed and 0 failed)."""
    registry = JobRegistry()
    registry._jobs["j"] = record("j")
    asyncio.run(registry.report("j", Progress(3, 0, 0, ())))
    assert registry._jobs["j"].status == JobStatus.RUNNING
    final = Progress(3, 3, 1, ("w1",))
    registry._finish("j", JobOutcome(JobStatus.COMPLETED, progress=final))
    asyncio.run(registry.report("j", final))  # late: ignored, and not needed
    asyncio.run(registry.report("j", Progress(3, 1, 0, ())))  # an older one, later still: ignored
    job = registry._jobs["j"]
    assert (job.status, job.num_total, job.num_done, job.num_failed) == (JobStatus.COMPLETED, 3, 3, 1)
    assert job.worker_ids == ["w1"]


def test_an_outcome_without_counts_keeps_the_reported_ones():
    registry = JobRegistry()
    registry._jobs["j"] = record("j")
    asyncio.run(registry.report("j", Progress(4, 2, 0, ("w",))))
    registry._finish("j", JobOutcome(JobStatus.CANCELLED))
    job = registry._jobs["j"]
    assert (job.status, job.num_total, job.num_done, job.num_failed) == (JobStatus.CANCELLED, 4, 2, 0)
