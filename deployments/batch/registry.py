"""The job registry: a detached, named Ray actor that owns every batch job's state and its runner.

It outlives ingress replicas (a restarted ingress finds it by name), starts one `JobRunner` per job,
records progress, and turns a runner's end (or death) into the job's final status. A runner that does
not stop within `STOP_GRACE_S` of a cancel or of its deadline is killed (its Ray Data workers die with
it) and the registry assembles the parts it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import ray

from deployments.batch.config import BatchSettings
from deployments.batch.outputs import finalize
from deployments.batch.runner import JobRunner
from deployments.batch.types import BatchNotFoundError, JobOutcome, JobRecord, JobSpec, JobStatus, Progress

REGISTRY_NAME = "llmserve-batch-registry"
REGISTRY_NAMESPACE = "llmserve"
STOP_GRACE_S = 20.0
logger = logging.getLogger("ray")


class JobRegistry:
    """Async actor: every method runs on one event loop, so the records need no lock."""

    def __init__(self, max_jobs_kept: int = 1000) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._runners: dict[str, ray.actor.ActorHandle] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._max_jobs_kept = max_jobs_kept
        self._queue: deque[str] = deque()  # queued job ids, oldest first
        self._num_running = 0
        self._changed: asyncio.Condition | None = None  # made on the actor's loop, at first use

    async def create(self, spec: JobSpec, request_json: str, metadata: dict[str, str]) -> JobRecord:
        record = JobRecord(spec=spec, created_at=time.time(), request_json=request_json, metadata=metadata)
        self._jobs[spec.job_id] = record
        self._forget_oldest()
        self._queue.append(spec.job_id)
        self._tasks[spec.job_id] = asyncio.get_running_loop().create_task(self._queue_and_run(spec))
        return record

    async def _queue_and_run(self, spec: JobSpec) -> None:
        """Jobs start in creation order while fewer than the job's batch.max_running_jobs run."""
        limit = BatchSettings.model_validate_json(spec.batch_settings_json).max_running_jobs
        self._changed = self._changed or asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    spec.job_id not in self._queue
                    or (self._queue[0] == spec.job_id and self._num_running < limit)
                )
            )
            if spec.job_id not in self._queue:  # cancelled while queued
                return
            self._queue.popleft()
            self._num_running += 1
            self._changed.notify_all()
        try:
            runner = ray.remote(JobRunner).options(num_cpus=0, max_concurrency=2).remote()
            self._runners[spec.job_id] = runner
            await self._supervise(spec, runner)
        finally:
            async with self._changed:
                self._num_running -= 1
                self._changed.notify_all()

    async def get(self, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None:
            raise BatchNotFoundError(f"no batch job with id {job_id!r}")
        return record

    async def list(self) -> list[JobRecord]:
        return sorted(self._jobs.values(), key=lambda r: r.created_at, reverse=True)

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record.status.is_terminal:
            return record
        if record.cancel_requested_at is None:
            record.cancel_requested_at = time.time()
            runner = self._runners.get(job_id)
            if runner is not None:
                runner.cancel.remote()
            elif job_id in self._queue:  # not started: nothing to stop
                self._queue.remove(job_id)
                self._finish(job_id, JobOutcome(JobStatus.CANCELLED))
                if self._changed is not None:
                    async with self._changed:
                        self._changed.notify_all()
        return record

    async def report(self, job_id: str, progress: Progress) -> None:
        record = self._jobs.get(job_id)
        if record is None or record.status.is_terminal:
            return
        if record.status == JobStatus.QUEUED:
            record.status, record.started_at = JobStatus.RUNNING, time.time()
        _apply(record, progress)

    async def _supervise(self, spec: JobSpec, runner) -> None:
        """Wait for the runner; past a cancel or the deadline (+ grace) kill it and assemble its parts."""
        run = runner.run.remote(spec, ray.get_runtime_context().current_actor)
        deadline = time.monotonic() + spec.max_runtime_s + STOP_GRACE_S
        waiting = asyncio.ensure_future(_await(run))
        outcome: JobOutcome | None = None
        while outcome is None:
            done, _ = await asyncio.wait([waiting], timeout=1.0)
            if done and isinstance(waiting.result(), JobOutcome):
                outcome = waiting.result()
            elif done:  # the runner died: assemble what its workers finished
                outcome = await asyncio.to_thread(self._stopped_outcome, spec, waiting.result())
            elif self._is_past(spec.job_id, deadline):
                ray.kill(runner)
                outcome = await asyncio.to_thread(self._stopped_outcome, spec, None)
        self._finish(spec.job_id, outcome)

    def _is_past(self, job_id: str, deadline: float) -> bool:
        record = self._jobs.get(job_id)
        cancelled_at = record.cancel_requested_at if record else None
        is_cancel_due = cancelled_at is not None and time.time() > cancelled_at + STOP_GRACE_S
        return is_cancel_due or time.monotonic() > deadline

    def _stopped_outcome(self, spec: JobSpec, death: str | None) -> JobOutcome:
        """The outcome of a runner that was stopped (cancel, deadline) or died, with its parts assembled."""
        record = self._jobs[spec.job_id]
        is_cancel = record.cancel_requested_at is not None
        status = JobStatus.CANCELLED if is_cancel else JobStatus.FAILED
        error = death or f"the job ran past max_runtime_sec ({spec.max_runtime_s:g} s)"
        error = None if is_cancel else error
        try:
            output_id, error_id = finalize(spec, record.num_total)
        except OSError as exc:
            return JobOutcome(JobStatus.FAILED, error=f"cannot write the output: {exc}")
        return JobOutcome(status, error, output_id, error_id)

    def _finish(self, job_id: str, outcome: JobOutcome) -> None:
        record = self._jobs.get(job_id)
        self._runners.pop(job_id, None)
        self._tasks.pop(job_id, None)
        if record is None:
            return
        if outcome.progress is not None:  # the final counts, whatever order the last report arrives in
            _apply(record, outcome.progress)
        status = outcome.status  # a job that completed before its cancel took effect stays completed
        record.status, record.error, record.finished_at = status, outcome.error, time.time()
        record.output_file_id, record.error_file_id = outcome.output_file_id, outcome.error_file_id
        logger.info("batch job %s: %s %s", job_id, status, outcome.error or "")

    def _forget_oldest(self) -> None:
        finished = [r for r in self._jobs.values() if r.status.is_terminal]
        for record in sorted(finished, key=lambda r: r.created_at)[
            : max(0, len(self._jobs) - self._max_jobs_kept)
        ]:
            self._jobs.pop(record.spec.job_id, None)


def _apply(record: JobRecord, progress: Progress) -> None:
    record.num_total, record.num_done, record.num_failed = (
        progress.num_total,
        progress.num_done,
        progress.num_failed,
    )
    record.worker_ids = list(progress.worker_ids)


async def _await(ref) -> JobOutcome | str:
    """The runner's outcome, or why it died (killed, node lost, out of memory)."""
    try:
        return await ref
    except Exception as exc:
        return f"the job's runner stopped: {type(exc).__name__}: {exc}"[:2000]


def get_registry(max_jobs_kept: int = 1000):
    """The registry actor, started on first use (detached: it outlives the ingress that started it)."""
    return (
        ray.remote(JobRegistry)
        .options(
            name=REGISTRY_NAME,
            namespace=REGISTRY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
        )
        .remote(max_jobs_kept)
    )
