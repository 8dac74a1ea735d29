"""One job's driver: reads the input, runs it through Ray Data's engine workers, writes parts as they come.

`JobRunner` is a Ray actor (one per job, owned by the registry). Its `run` executes the Ray Data
pipeline `from_items(rows).map_batches(EngineWorker, concurrency=data_parallelism)` and consumes it
batch by batch: each finished batch is written as a part file and reported as progress. Between
batches it checks `cancel` and the deadline; leaving the loop shuts the pipeline down, which kills the
worker actors. If a batch takes too long to come back, the registry kills the runner itself (its
workers die with it) and assembles the parts that were written.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

from deployments.batch.config import BatchSettings
from deployments.batch.inputs import load_rows
from deployments.batch.outputs import finalize, parts_folder, write_part
from deployments.batch.types import JobOutcome, JobSpec, JobStatus, Progress
from deployments.batch.worker import EngineWorker
from engine.errors import ServingError

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
        self._cancelled = threading.Event()
        self._progress: Progress | None = None  # the latest counts, reported and returned at the end

    def cancel(self) -> None:
        self._cancelled.set()

    def run(self, spec: JobSpec, registry: Any) -> JobOutcome:
        deadline = time.monotonic() + spec.max_runtime_s
        try:
            kind, rows, v1_content_json = load_rows(spec)
        except ServingError as exc:
            return JobOutcome(JobStatus.FAILED, error=str(exc))
        self._progress = Progress(len(rows), 0, 0, ())
        registry.report.remote(spec.job_id, self._progress)
        status, error = self._execute(spec, kind, rows, v1_content_json, registry, deadline)
        try:
            output_id, error_id = finalize(spec, len(rows))
        except OSError as exc:
            error = f"cannot write the output: {exc}"
            return JobOutcome(JobStatus.FAILED, error=error, progress=self._progress)
        return JobOutcome(status, error, output_id, error_id, self._progress)

    def _execute(self, spec, kind, rows, v1_content_json, registry, deadline) -> tuple[JobStatus, str | None]:
        settings = BatchSettings.model_validate_json(spec.batch_settings_json)
        folder = parts_folder(spec)
        done, failed, workers = 0, 0, set()
        try:
            for seq, batch in enumerate(_pipeline(spec, kind, rows, v1_content_json, settings)):
                records = _records(batch)
                write_part(folder, seq, records)
                done += len(records)
                failed += sum(r["error"] is not None for r in records)
                workers.update(r["worker"] for r in records)
                self._progress = Progress(len(rows), done, failed, tuple(sorted(workers)))
                registry.report.remote(spec.job_id, self._progress)
                if self._cancelled.is_set():
                    return JobStatus.CANCELLED, None
                if time.monotonic() > deadline:
                    return JobStatus.FAILED, f"the job ran past max_runtime_sec ({spec.max_runtime_s:g} s)"
        except Exception as exc:  # a worker that cannot start (model load) or crashes for good
            if time.monotonic() > deadline:  # e.g. the workers' start wait was cut short by the deadline
                return JobStatus.FAILED, f"the job ran past max_runtime_sec ({spec.max_runtime_s:g} s)"
            logger.exception("batch job %s failed", spec.job_id)
            return JobStatus.FAILED, f"the job's workers failed: {type(exc).__name__}: {exc}"[:2000]
        return JobStatus.COMPLETED, None


def _pipeline(spec: JobSpec, kind, rows, v1_content_json: str | None, settings: BatchSettings):
    """The Ray Data pipeline's output batches, as they finish (not in input order)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Start every worker (model loaded) before the first batch, so rows spread over all of them; a
    # cluster that cannot place them fails the job after this wait instead of hanging.
    context.wait_for_min_actors_s = max(1, int(min(spec.max_runtime_s, WORKER_START_TIMEOUT_S)))
    num_blocks = max(1, math.ceil(len(rows) / settings.batch_size))
    dataset = ray.data.from_items(
        [{"index": i, "payload": p} for i, p in rows], override_num_blocks=num_blocks
    )
    results = dataset.map_batches(
        EngineWorker,
        batch_size=settings.batch_size,
        concurrency=spec.data_parallelism,
        num_cpus=settings.worker_num_cpus,
        **({"num_gpus": settings.worker_num_gpus} if settings.worker_num_gpus else {}),
        fn_constructor_kwargs={
            "kind": str(kind),
            "model_config_json": spec.model_config_json,
            "v1_content_json": v1_content_json,
            "nice": settings.worker_nice,
            "num_threads": settings.worker_num_threads,
            "limits_json": spec.limits_json,
            "is_idle": settings.worker_idle_priority,
        },
    )
    yield from results.iter_batches(batch_size=None, prefetch_batches=0)
