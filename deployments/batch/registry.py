"""The job registry: the one owner of every batch job's record, its place in the queue and its runner.

One detached, named, restartable actor per data root (deployments/state/owner.py): every ingress replica
finds it by name, Ray restarts it after a crash, and an actor of older code is replaced. Each job's
record is a JSON file under `<data_root>/state/jobs/` (a `RecordStore`), written from one thread in the
order of the changes; the registry is its only writer and serves reads from memory, each once the
writes before it are done, so that no client sees a state that is not on disk yet. On start it reads
the records back: a job that was running lost its runner (runners die with the registry process that
owns them) and ends `failed` with that reason, its finished rows assembled; a queued job waits its turn
again.

Jobs start in creation order while fewer than `batch.max_running_jobs` run, each once the cluster's
free resources place all its workers (capacity.py). A runner ends its own job on cancel and at
max_runtime; one that has not returned `STOP_GRACE_S` later is killed and the registry assembles the
parts it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import ray

from deployments.batch import capacity
from deployments.batch.config import BatchSettings
from deployments.batch.outputs import finalize
from deployments.batch.runner import JobRunner
from deployments.batch.storage import STATE_FOLDER, root_key
from deployments.batch.types import BatchNotFoundError, JobOutcome, JobRecord, JobSpec, JobStatus, Progress
from deployments.state.owner import VersionedOwner
from deployments.state.store import RecordStore

REGISTRY_PREFIX = "llmserve-batch-registry-"
SCHEMA_VERSION = 1
STOP_GRACE_S = 20.0
CANCEL_ACK_TIMEOUT_S = 10.0
RESTART_REASON = (
    "the job's runner stopped when the batch registry restarted (a Ray restart, a crash of the registry "
    "or a code upgrade); the rows finished before are in the output"
)
logger = logging.getLogger("ray")


def job_store(data_root: str) -> RecordStore[JobRecord]:
    """The job records of `data_root`: one JSON file per job under `state/jobs/`."""
    return RecordStore(data_root, f"{STATE_FOLDER}/jobs", JobRecord, SCHEMA_VERSION)


def registry_name(data_root: str) -> str:
    """The registry actor's name: one registry (one owner of the records) per data root."""
    return REGISTRY_PREFIX + hashlib.sha256(root_key(data_root).encode()).hexdigest()[:16]


class JobRegistry(VersionedOwner):
    """Async actor: every method runs on one event loop, so the records need no lock."""

    def __init__(self, data_root: str, max_jobs_kept: int = 1000) -> None:
        self._store = job_store(data_root)
        self._jobs: dict[str, JobRecord] = {r.spec.job_id: r for r in self._store.all()}
        self._max_jobs_kept = max_jobs_kept
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="job-records")  # in order of the changes
        self._last_write: Future | None = None
        self._runners: dict[str, ray.actor.ActorHandle] = {}
        self._queue: deque[str] = deque()  # job ids waiting for their turn, oldest first
        self._cancels: dict[str, asyncio.Event] = {}  # jobs waiting for room: set on cancel
        self._num_running = 0
        self._changed: asyncio.Condition | None = None  # made on the actor's loop, at first use
        self._recovery: asyncio.Future | None = None
        this = _this_actor()
        if this is not None:
            this.ready.remote()  # pick the queued jobs up now, not at the first request

    async def ready(self) -> bool:
        """True once the records read at start have been dealt with (runs once per process)."""
        if self._recovery is None:
            self._recovery = asyncio.ensure_future(self._recover())
        await asyncio.shield(self._recovery)
        return True

    async def _recover(self) -> None:
        unfinished = [r for r in self._jobs.values() if not r.status.is_terminal]
        for record in sorted(unfinished, key=lambda r: r.created_at):
            job_id = record.spec.job_id
            await asyncio.to_thread(capacity.release, job_id)  # what the previous process held
            if record.status == JobStatus.RUNNING:
                outcome = await asyncio.to_thread(self._stopped_outcome, record, RESTART_REASON)
                self._finish(job_id, outcome)
            elif record.cancel_requested_at is not None:
                self._finish(job_id, JobOutcome(JobStatus.CANCELLED))
            else:
                self._enqueue(record)
        logger.info("batch registry: %d jobs read back, %d unfinished", len(self._jobs), len(unfinished))

    async def create(self, spec: JobSpec, request_json: str, metadata: dict[str, str]) -> JobRecord:
        """Record and queue a job (idempotent by job id: a retried call returns the same job)."""
        await self.ready()
        if spec.job_id in self._jobs:
            return self._jobs[spec.job_id]
        settings = BatchSettings.model_validate_json(spec.batch_settings_json)
        await asyncio.to_thread(capacity.check_can_ever_run, spec.data_parallelism, settings)
        record = JobRecord(spec=spec, created_at=time.time(), request_json=request_json, metadata=metadata)
        self._jobs[spec.job_id] = record
        await asyncio.wrap_future(self._save(record))  # durable before the client hears of it
        self._forget_oldest()
        self._enqueue(record)
        return record

    def _enqueue(self, record: JobRecord) -> None:
        settings = BatchSettings.model_validate_json(record.spec.batch_settings_json)
        record.queue_reason = (
            f"waiting for its turn: batch.max_running_jobs={settings.max_running_jobs} jobs run at once, "
            "in creation order"
        )
        self._queue.append(record.spec.job_id)
        asyncio.get_running_loop().create_task(self._queue_and_run(record, settings))

    async def _queue_and_run(self, record: JobRecord, settings: BatchSettings) -> None:
        job_id, changed = record.spec.job_id, self._condition()
        async with changed:
            await changed.wait_for(
                lambda: (
                    job_id not in self._queue
                    or (self._queue[0] == job_id and self._num_running < settings.max_running_jobs)
                )
            )
            if job_id not in self._queue:  # cancelled while queued
                return
            self._queue.popleft()
            self._num_running += 1
            changed.notify_all()
        try:
            await self._place_and_run(record, settings)
        except Exception as exc:  # never leave a job unfinished
            logger.exception("batch job %s", job_id)
            self._finish(job_id, JobOutcome(JobStatus.FAILED, error=f"the job could not run: {exc}"[:2000]))
        finally:
            self._runners.pop(job_id, None)
            self._cancels.pop(job_id, None)
            await asyncio.to_thread(capacity.release, job_id)
            async with changed:
                self._num_running -= 1
                changed.notify_all()

    async def _place_and_run(self, record: JobRecord, settings: BatchSettings) -> None:
        """Wait until the cluster places the job's workers (or a cancel), then run it."""
        spec = record.spec
        cancelled = self._cancels.setdefault(spec.job_id, asyncio.Event())
        group = await asyncio.to_thread(capacity.reserve, spec.job_id, spec.data_parallelism, settings)
        bundle = ", ".join(f"{v:g} {k}" for k, v in capacity.worker_bundle(settings).items())
        record.queue_reason = (
            f"waiting for the cluster to free room for {spec.data_parallelism} workers of {bundle} each "
            "(batch.worker_num_cpus, batch.worker_num_gpus); online replicas and other jobs hold the rest"
        )
        self._save(record)
        placed = asyncio.ensure_future(_await_ref(group.ready()))
        on_cancel = asyncio.ensure_future(cancelled.wait())
        await asyncio.wait([placed, on_cancel], return_when=asyncio.FIRST_COMPLETED)
        on_cancel.cancel()
        if record.cancel_requested_at is not None:
            placed.cancel()
            self._finish(spec.job_id, JobOutcome(JobStatus.CANCELLED))
            return
        record.status, record.started_at, record.queue_reason = JobStatus.RUNNING, time.time(), None
        self._save(record)
        runner = ray.remote(JobRunner).options(num_cpus=0, max_concurrency=2).remote()
        self._runners[spec.job_id] = runner
        try:
            outcome = await self._supervise(record, runner, group)
        finally:
            ray.kill(runner)  # the Ray Data workers it started die with it
        self._finish(spec.job_id, outcome)

    async def _supervise(self, record: JobRecord, runner, group) -> JobOutcome:
        """The runner's outcome; a runner that dies or hangs past a cancel or the deadline (+ grace) is
        killed and the parts it wrote are assembled here."""
        spec = record.spec
        run = runner.run.remote(spec, _this_actor(), group, record.cancel_requested_at is not None)
        deadline = time.monotonic() + spec.max_runtime_s + STOP_GRACE_S
        waiting = asyncio.ensure_future(_await_ref(run))
        while True:
            done, _ = await asyncio.wait([waiting], timeout=1.0)
            if done:
                result = waiting.result()
                if isinstance(result, JobOutcome):
                    return result
                death = f"the job's runner stopped: {result}"[:2000]
                return await asyncio.to_thread(self._stopped_outcome, record, death)
            if self._is_past(record, deadline):
                ray.kill(runner)
                return await asyncio.to_thread(self._stopped_outcome, record, None)

    def _is_past(self, record: JobRecord, deadline: float) -> bool:
        cancelled_at = record.cancel_requested_at
        is_cancel_due = cancelled_at is not None and time.time() > cancelled_at + STOP_GRACE_S
        return is_cancel_due or time.monotonic() > deadline

    def _stopped_outcome(self, record: JobRecord, death: str | None) -> JobOutcome:
        """The outcome of a job whose runner was stopped (cancel, deadline) or died, parts assembled."""
        spec, is_cancel = record.spec, record.cancel_requested_at is not None
        status = JobStatus.CANCELLED if is_cancel else JobStatus.FAILED
        error = None if is_cancel else death or f"the job ran past max_runtime_sec ({spec.max_runtime_s:g} s)"
        try:
            output_id, error_id = finalize(spec, record.num_total)
        except OSError as exc:
            return JobOutcome(JobStatus.FAILED, error=f"cannot write the output: {exc}")
        return JobOutcome(status, error, output_id, error_id)

    async def get(self, job_id: str) -> JobRecord:
        await self.ready()
        record = self._get(job_id)
        await self._written()
        return record

    def _get(self, job_id: str) -> JobRecord:
        record = self._jobs.get(job_id)
        if record is None:
            raise BatchNotFoundError(f"no batch job with id {job_id!r}")
        return record

    async def list(self) -> list[JobRecord]:
        await self.ready()
        records = sorted(self._jobs.values(), key=lambda r: r.created_at, reverse=True)
        await self._written()
        return records

    async def cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop; answers once its runner (if any) has taken the request."""
        await self.ready()
        record = self._get(job_id)
        if record.status.is_terminal or record.cancel_requested_at is not None:
            await self._written()
            return record
        record.cancel_requested_at = time.time()
        self._save(record)
        if job_id in self._queue:  # not started: nothing to stop
            self._queue.remove(job_id)
            self._finish(job_id, JobOutcome(JobStatus.CANCELLED))
            async with self._condition():
                self._condition().notify_all()
        elif job_id in self._cancels:
            self._cancels[job_id].set()
        runner = self._runners.get(job_id)
        if runner is not None:
            try:
                await asyncio.wait_for(_await_ref(runner.cancel.remote()), CANCEL_ACK_TIMEOUT_S)
            except TimeoutError:
                logger.warning("batch job %s: its runner did not take the cancel in time", job_id)
        await self._written()
        return record

    async def report(self, job_id: str, progress: Progress) -> None:
        record = self._jobs.get(job_id)
        if record is None or record.status.is_terminal:
            return
        _apply(record, progress)
        self._save(record)

    def _finish(self, job_id: str, outcome: JobOutcome) -> None:
        record = self._jobs.get(job_id)
        if record is None:
            return
        if outcome.progress is not None:  # the final counts, whatever order the last report arrives in
            _apply(record, outcome.progress)
        record.status, record.error, record.finished_at = outcome.status, outcome.error, time.time()
        record.output_file_id, record.error_file_id = outcome.output_file_id, outcome.error_file_id
        record.queue_reason = None
        self._save(record)
        logger.info("batch job %s: %s %s", job_id, outcome.status, outcome.error or "")

    def _forget_oldest(self) -> None:
        finished = sorted((r for r in self._jobs.values() if r.status.is_terminal), key=_created)
        for record in finished[: max(0, len(self._jobs) - self._max_jobs_kept)]:
            del self._jobs[record.spec.job_id]
            self._writes.submit(self._store.delete, record.spec.job_id)

    def _save(self, record: JobRecord) -> Future:
        """Write the record (a copy of it now) after every earlier write; failures are logged."""
        future = self._writes.submit(self._store.put, record.spec.job_id, record.model_copy(deep=True))
        future.add_done_callback(_log_failure)
        self._last_write = future
        return future

    async def _written(self) -> None:
        """Wait until every change made so far is on disk (writes run in order: the last one will do)."""
        if self._last_write is not None and not self._last_write.done():
            await asyncio.wait([asyncio.wrap_future(self._last_write)])

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed


def _created(record: JobRecord) -> float:
    return record.created_at


def _apply(record: JobRecord, progress: Progress) -> None:
    record.num_total, record.num_done = progress.num_total, progress.num_done
    record.num_failed, record.worker_ids = progress.num_failed, list(progress.worker_ids)


async def _await_ref(ref) -> object:
    """The call's result, or why it failed (the runner was killed, its node lost, out of memory)."""
    try:
        return await ref
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        logger.error("batch registry: a job record could not be written", exc_info=future.exception())


def _this_actor():
    """This actor's own handle; None outside an actor (unit tests)."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None
