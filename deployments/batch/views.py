"""Job records as each API shows them: LLM Engine's BatchCompletionsJob and OpenAI's Batch object."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from deployments.batch.files import StoredFile
from deployments.batch.protocol import BatchJob, FileObject, openai_status
from deployments.batch.types import JobRecord


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


def progress_of(record: JobRecord) -> dict[str, int]:
    return {
        "num_total": record.num_total,
        "num_done": record.num_done,
        "num_completed": record.num_done - record.num_failed,
        "num_failed": record.num_failed,
        "num_workers": len(record.worker_ids),
    }


def batch_job(record: JobRecord) -> BatchJob:
    spec, request = record.spec, json.loads(record.request_json)
    return BatchJob(
        job_id=spec.job_id,
        input_data_path=request.get("input_data_path"),
        output_data_path=spec.output_path,
        model_config=request.get("model_config") or {"model": spec.model},
        priority=request.get("priority"),
        status=record.status.value,
        created_at=_iso(record.created_at),
        expires_at=_iso(record.created_at + spec.max_runtime_s),
        completed_at=_iso(record.finished_at),
        metadata={**record.metadata, "workers": ",".join(record.worker_ids)},
        progress=progress_of(record),
        error=record.error,
        queue_reason=record.queue_reason,
    )


def openai_batch(record: JobRecord) -> dict[str, Any]:
    """OpenAI's Batch object (`client.batches.retrieve` parses it)."""
    spec, request = record.spec, json.loads(record.request_json)
    is_expired = record.error is not None and "max_runtime" in record.error
    status = openai_status(record.status, record.cancel_requested_at is not None, is_expired)
    failed_at = record.finished_at if status == "failed" else None
    errors = None
    if status == "failed" and record.error:
        errors = {"object": "list", "data": [{"code": "batch_failed", "message": record.error, "line": None}]}
    return {
        "id": spec.job_id,
        "object": "batch",
        "endpoint": request.get("endpoint"),
        "model": spec.model,
        "errors": errors,
        "input_file_id": request.get("input_file_id"),
        "completion_window": request.get("completion_window", "24h"),
        "status": status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": int(record.created_at),
        "in_progress_at": int(record.started_at) if record.started_at else None,
        "expires_at": int(record.created_at + spec.max_runtime_s),
        "finalizing_at": None,
        "completed_at": int(record.finished_at) if status == "completed" else None,
        "failed_at": int(failed_at) if failed_at else None,
        "expired_at": int(record.finished_at) if status == "expired" else None,
        "cancelling_at": int(record.cancel_requested_at) if record.cancel_requested_at else None,
        "cancelled_at": int(record.finished_at) if status == "cancelled" else None,
        "request_counts": {
            "total": record.num_total,
            "completed": record.num_done - record.num_failed,
            "failed": record.num_failed,
        },
        "metadata": request.get("metadata"),
    }


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id,
        bytes=stored.bytes,
        size=stored.bytes,
        created_at=stored.created_at,
        filename=stored.filename,
        purpose=stored.purpose,
    )
