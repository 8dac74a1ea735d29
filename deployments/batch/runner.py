"""One job's driver: reads the input, runs it through Ray Data's engine workers, writes parts as they come.

`JobRunner` is a Ray actor (one per job, owned by the registry). The rows run in rounds of the Ray Data
pipeline `from_blocks(blocks).map_batches(EngineWorker, concurrency=data_parallelism)` inside the job's
placement group, in a thread of the runner: each finished batch is written as a part file and reported
as progress. A worker that dies is restarted, but its batch is not retried: the batch comes back
missing, and one more round runs each of its rows alone; a row whose worker dies again, alone, is the
one that kills it and fails (an error record) while the others complete. Alone at once rather than
in halves (the engine's bisect): every round starts a new pool of workers (their models loaded
again), so two rounds cost less than the log2(batch_size) + 1 that halves take.
`batch.max_worker_crashes` bounds the batches a job may lose that way.

`run` waits for the rounds, a cancel or the deadline, whichever comes first, and returns the outcome
at once with the parts written so far assembled; the registry then kills the runner, and the workers
still running die with it.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import Any

import ray

from deployments.batch.config import BatchSettings
from deployments.batch.inputs import Rows, load_rows
from deployments.batch.outputs import finalize, parts_folder, write_part
from deployments.batch.rows import render_error
from deployments.batch.storage import BatchPath
from deployments.batch.types import JobKind, JobOutcome, JobSpec, JobStatus, Progress
from deployments.batch.worker import EngineWorker
from engine.errors import RequestFailedError, ServingError

logger = logging.getLogger("ray.data")
WORKER_START_TIMEOUT_S = 600


def _records(batch: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "index": int(i),
            "output": json.loads(o) if o else None,
            "error": json.loads(e) if e else None,
            "worker": str(w),
        }
        for i, o, e, w in zip(batch["index"], batch["output"], batch["error"], batch["worker"], strict=True)
    ]


class JobRunner:
    """Runs one job; `cancel` may be called while `run` is in progress (the actor has two threads)."""

    def __init__(self) -> None:
        self._wake = threading.Event()  # the rounds ended, or a cancel came
        self._is_cancelled = False
        self._lock = threading.Lock()  # a part is written whole, and none after the end
        self._is_closed = False
        self._result: tuple[JobStatus, str | None] | None = None
        self._progress = Progress(0, 0, 0, ())
        self._workers: set[str] = set()

    def cancel(self) -> None:
        self._is_cancelled = True
        self._wake.set()

    def run(self, spec: JobSpec, registry: Any, group: Any = None, is_cancelled: bool = False) -> JobOutcome:
        deadline = time.monotonic() + spec.max_runtime_s
        if is_cancelled:
            self.cancel()
        try:
            kind, rows, v1_content_json = load_rows(spec)
        except ServingError as exc:
            return JobOutcome(JobStatus.FAILED, error=str(exc))
        self._progress = Progress(len(rows), 0, 0, ())
        registry.report.remote(spec.job_id, self._progress)
        job = _Job(spec, kind, v1_content_json, group, registry)
        threading.Thread(target=self._work, args=(job, rows), daemon=True, name="batch-rounds").start()
        self._wake.wait(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._is_closed = True
            result = self._result
        is_late = time.monotonic() >= deadline  # a worker start cut short by the deadline fails for it
        if (result is None or result[0] == JobStatus.FAILED) and is_late:
            result = (JobStatus.FAILED, f"the job ran past max_runtime_sec ({spec.max_runtime_s:g} s)")
        elif result is None:
            result = (JobStatus.CANCELLED, None)
        try:
            output_id, error_id = finalize(spec, len(rows))
        except OSError as exc:
            error = f"cannot write the output: {exc}"
            return JobOutcome(JobStatus.FAILED, error=error, progress=self._progress)
        return JobOutcome(result[0], result[1], output_id, error_id, self._progress)

    def _work(self, job: _Job, rows: Rows) -> None:
        try:
            result = self._rounds(job, rows)
        except Exception as exc:  # a worker that cannot start (model load), or crashes past the budget
            logger.exception("batch job %s failed", job.spec.job_id)
            result = (JobStatus.FAILED, _failure(exc, job.settings))
        with self._lock:
            self._result = result
        self._wake.set()

    def _rounds(self, job: _Job, rows: Rows) -> tuple[JobStatus, str | None]:
        """Every row through the workers; the rows of batches lost to a dead worker again, each alone."""
        size = job.settings.batch_size
        blocks = [rows[i : i + size] for i in range(0, len(rows), size)]
        num_lost = 0
        while blocks:
            budget = job.settings.max_worker_crashes - num_lost
            returned: set[int] = set()
            for batch in _pipeline(job, blocks, budget):
                records = _records(batch)
                if not self._write(job, records):
                    return JobStatus.CANCELLED, None  # closed: run() has answered already
                returned.update(r["index"] for r in records)
            lost = [[row for row in block if row[0] not in returned] for block in blocks]
            lost = [block for block in lost if block]
            num_lost += len(lost)
            blocks = [[row] for block in lost if len(block) > 1 for row in block]
            crashed = [_crashed(job.kind, *block[0]) for block in lost if len(block) == 1]
            if crashed and not self._write(job, crashed):
                return JobStatus.CANCELLED, None
        return JobStatus.COMPLETED, None

    def _write(self, job: _Job, records: list[dict[str, Any]]) -> bool:
        """Write one part and report the progress; False once `run` has ended the job."""
        with self._lock:
            if self._is_closed:
                return False
            write_part(job.folder, next(job.part_numbers), records)
            self._workers.update(r["worker"] for r in records if r["worker"])
            done = self._progress.num_done + len(records)
            failed = self._progress.num_failed + sum(r["error"] is not None for r in records)
            self._progress = Progress(self._progress.num_total, done, failed, tuple(sorted(self._workers)))
            progress = self._progress
        job.registry.report.remote(job.spec.job_id, progress)
        return True


class _Job:
    """What the rounds of one job share."""

    def __init__(self, spec: JobSpec, kind: JobKind, v1_content_json: str | None, group, registry) -> None:
        self.spec, self.kind, self.v1_content_json = spec, kind, v1_content_json
        self.group, self.registry = group, registry
        self.settings = BatchSettings.model_validate_json(spec.batch_settings_json)
        self.folder: BatchPath = parts_folder(spec)
        self.part_numbers = itertools.count()


def _crashed(kind: JobKind, index: int, payload: str) -> dict[str, Any]:
    error = RequestFailedError(
        f"row {index} crashed its engine worker: the worker process died running its batch, then again "
        "running this row alone; the other rows are unaffected"
    )
    return {"index": index, "output": None, "error": render_error(kind, index, payload, error), "worker": ""}


def _failure(exc: Exception, settings: BatchSettings) -> str:
    if isinstance(exc, ray.exceptions.RayActorError):
        return (
            f"the job's engine workers died on more than batch.max_worker_crashes="
            f"{settings.max_worker_crashes} batches; the last: {type(exc).__name__}: {exc}"
        )[:2000]
    return f"the job's workers failed: {type(exc).__name__}: {exc}"[:2000]


def _pipeline(job: _Job, blocks: list[Rows], max_lost: int):
    """The Ray Data pipeline's output batches, one per block, as they finish (not in input order)."""
    import pyarrow as pa
    import ray.data
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    spec, settings = job.spec, job.settings
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = max_lost  # a batch whose worker died is skipped (0: none may be)
    # Start every worker (model loaded) before the first batch, so rows spread over all of them; a
    # worker that cannot start fails the job after this wait instead of hanging.
    context.wait_for_min_actors_s = max(1, int(min(spec.max_runtime_s, WORKER_START_TIMEOUT_S)))
    tables = [pa.table({"index": [i for i, _ in b], "payload": [p for _, p in b]}) for b in blocks]
    placement = {}
    if job.group is not None:
        placement = {"scheduling_strategy": PlacementGroupSchedulingStrategy(job.group)}
    results = ray.data.from_blocks(tables).map_batches(
        EngineWorker,
        batch_size=None,  # one block, one call
        compute=ray.data.ActorPoolStrategy(
            size=min(spec.data_parallelism, len(blocks)), max_tasks_in_flight_per_actor=1
        ),
        num_cpus=settings.worker_num_cpus,
        **({"num_gpus": settings.worker_num_gpus} if settings.worker_num_gpus else {}),
        max_restarts=-1,  # a crashed worker comes back ...
        max_task_retries=0,  # ... but its batch is not retried: the next round splits it
        **placement,
        fn_constructor_kwargs={
            "kind": str(job.kind),
            "model_config_json": spec.model_config_json,
            "v1_content_json": job.v1_content_json,
            "nice": settings.worker_nice,
            "num_threads": settings.worker_num_threads,
            "limits_json": spec.limits_json,
            "is_idle": settings.worker_idle_priority,
            "engine_factory": spec.engine_factory,
        },
    )
    yield from results.iter_batches(batch_size=None, prefetch_batches=0)
