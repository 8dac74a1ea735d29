"""The batch routes, included by the ingress app: LLM Engine batch completions, OpenAI Batch and Files.

API keys and body limits are the guard's (deployments/guard.py): every route here needs a key when
keys are configured, and `/v1/files` uploads have their own size limit (batch.max_upload_bytes),
counted as the body streams. Nothing here blocks the ingress's event loop: file I/O runs in threads
(`asyncio.to_thread`), the registry is called with `await` (deployments/batch/service.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deployments.batch import views
from deployments.batch.config import BatchSettings
from deployments.batch.protocol import (
    CancelJobResponse,
    CreateV1Request,
    CreateV1Response,
    CreateV2Request,
    FileContent,
    FileDeleted,
    FileList,
    FileObject,
    GetJobResponse,
    OpenAIBatchCreate,
)
from deployments.batch.service import BatchContext
from deployments.batch.types import BatchNotFoundError, JobKind, JobRecord, JobStatus
from deployments.batch.uploads import PURPOSES, receive_upload, upload_description
from deployments.protocol.openai import ErrorResponse
from engine.errors import ModelUnavailableError

OPENAI_TAG = "openai"  # deployments.ingress.OPENAI_TAG: errors in OpenAI's shape
RAW_CONTENT_TYPES = ("application/binary", "application/octet-stream")
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The file's bytes."},
                        "purpose": {"type": "string", "enum": list(PURPOSES), "default": "batch"},
                    },
                }
            }
        },
    }
}
UPLOAD_RESPONSES = {
    400: {"model": ErrorResponse, "description": "No `file` part, a malformed body, or an unknown purpose."},
    401: {"model": ErrorResponse, "description": "API keys are configured and the request has no valid one."},
    413: {"model": ErrorResponse, "description": "The body is larger than batch.max_upload_bytes."},
    429: {
        "model": ErrorResponse,
        "description": "batch.max_concurrent_uploads uploads are in progress in this ingress replica.",
    },
    503: {"model": ErrorResponse, "description": "Batch jobs are not enabled on this server."},
}

router = APIRouter()


def _context(request: Request) -> BatchContext:
    context = getattr(request.app.state, "batch", None)
    if context is None:
        raise ModelUnavailableError("batch jobs are not enabled on this server")
    return context


def _labels(body) -> dict[str, str]:
    return {**body.model_cfg.labels, **(body.labels or {})}


async def _llm_engine_record(request: Request, job_id: str) -> JobRecord:
    record = await _context(request).ask(lambda registry: registry.get.remote(job_id))
    if record.spec.kind == JobKind.OPENAI:
        raise BatchNotFoundError(f"no batch completions job with id {job_id!r}")
    return record


@router.post("/v1/llm/batch-completions", response_model=CreateV1Response)
async def create_v1(request: Request, body: CreateV1Request) -> CreateV1Response:
    context = _context(request)
    spec = await asyncio.to_thread(context.llm_engine_spec, body, JobKind.V1)
    record = await context.create(spec, body.model_dump(mode="json", by_alias=True), _labels(body))
    return CreateV1Response(job_id=record.spec.job_id)


@router.get("/v1/llm/batch-completions/{job_id}", response_model=GetJobResponse)
async def get_v1(request: Request, job_id: str) -> GetJobResponse:
    return GetJobResponse(job=views.batch_job(await _llm_engine_record(request, job_id)))


@router.post("/v2/batch-completions")
async def create_v2(request: Request, body: CreateV2Request) -> Response:
    context = _context(request)
    spec = await asyncio.to_thread(context.llm_engine_spec, body, JobKind.V2)
    record = await context.create(spec, body.model_dump(mode="json", by_alias=True), _labels(body))
    return _json(views.batch_job(record).model_dump(mode="json", by_alias=True))


@router.get("/v2/batch-completions")
async def list_v2(request: Request) -> Response:
    records = await _context(request).ask(lambda registry: registry.list.remote())
    jobs = [
        views.batch_job(r).model_dump(mode="json", by_alias=True)
        for r in records
        if r.spec.kind != JobKind.OPENAI
    ]
    return _json({"jobs": jobs})


@router.get("/v2/batch-completions/{job_id}")
async def get_v2(request: Request, job_id: str) -> Response:
    record = await _llm_engine_record(request, job_id)
    return _json({"job": views.batch_job(record).model_dump(mode="json", by_alias=True)})


@router.post("/v2/batch-completions/{job_id}/actions/cancel", response_model=CancelJobResponse)
async def cancel_v2(request: Request, job_id: str) -> CancelJobResponse:
    await _llm_engine_record(request, job_id)
    record = await _context(request).ask(lambda registry: registry.cancel.remote(job_id))
    # Accepted while the job runs (it stops within seconds); a finished job cannot be cancelled.
    return CancelJobResponse(success=not record.status.is_terminal or record.status == JobStatus.CANCELLED)


@router.post(
    "/v1/files",
    tags=[OPENAI_TAG],
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    responses=UPLOAD_RESPONSES,
    description=upload_description(BatchSettings()),  # the app's own settings: BatchContext.install
)
async def upload_file(request: Request) -> FileObject:
    context = _context(request)
    with context.uploads.take():  # 429 before a byte of the body is read
        content_type = request.headers.get("content-type", "")
        stored = await receive_upload(content_type, request.stream(), context.files)
    return views.file_object(stored)


@router.get("/v1/files", tags=[OPENAI_TAG], response_model=FileList)
async def list_files(request: Request, purpose: str | None = Query(None)) -> FileList:
    stored = await asyncio.to_thread(_context(request).files.list, purpose)
    objects = [views.file_object(f) for f in stored]
    return FileList(data=objects, files=objects)


@router.get("/v1/files/{file_id}", tags=[OPENAI_TAG], response_model=FileObject)
async def get_file(request: Request, file_id: str) -> FileObject:
    return views.file_object(await asyncio.to_thread(_context(request).files.get, file_id))


@router.delete("/v1/files/{file_id}", tags=[OPENAI_TAG], response_model=FileDeleted)
async def delete_file(request: Request, file_id: str) -> FileDeleted:
    await asyncio.to_thread(_context(request).files.delete, file_id)
    return FileDeleted(id=file_id, deleted=True)


@router.get("/v1/files/{file_id}/content", tags=[OPENAI_TAG])
async def file_content(request: Request, file_id: str) -> Response:
    """Raw bytes for OpenAI's client (it asks for `Accept: application/binary`), streamed in chunks;
    otherwise LLM Engine's JSON `{id, content}` (its `File.download` sends no such header)."""
    files = _context(request).files
    accept = request.headers.get("accept", "")
    if any(t in accept for t in RAW_CONTENT_TYPES):
        chunks = await asyncio.to_thread(_opened, files.chunks(file_id))
        return StreamingResponse(_in_threads(chunks), media_type="application/octet-stream")
    content = await asyncio.to_thread(files.content, file_id)
    text = content.decode("utf-8", errors="replace")
    return _json(FileContent(id=file_id, content=text).model_dump())


def _opened(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks` with its first chunk read, so a missing file is a 404 before the response starts."""
    first = next(chunks, b"")

    def all_chunks() -> Iterator[bytes]:
        yield first
        yield from chunks

    return all_chunks()


async def _in_threads(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        yield chunk


@router.post("/v1/batches", tags=[OPENAI_TAG])
async def create_batch(request: Request, body: OpenAIBatchCreate) -> Response:
    context = _context(request)
    spec = await asyncio.to_thread(context.openai_spec, body.input_file_id)
    record = await context.create(spec, body.model_dump(mode="json"), body.metadata or {})
    return _json(views.openai_batch(record))


@router.get("/v1/batches", tags=[OPENAI_TAG])
async def list_batches(
    request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = Query(None)
) -> Response:
    records = await _context(request).ask(lambda registry: registry.list.remote())
    records = [r for r in records if r.spec.kind == JobKind.OPENAI]
    if after is not None:
        ids = [r.spec.job_id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = [views.openai_batch(r) for r in records[:limit]]
    first_id, last_id = (page[0]["id"], page[-1]["id"]) if page else (None, None)
    body = {"object": "list", "data": page, "first_id": first_id, "last_id": last_id}
    return _json({**body, "has_more": len(records) > limit})


async def _openai_record(request: Request, batch_id: str) -> JobRecord:
    record = await _context(request).ask(lambda registry: registry.get.remote(batch_id))
    if record.spec.kind != JobKind.OPENAI:
        raise BatchNotFoundError(f"no batch with id {batch_id!r}")
    return record


@router.get("/v1/batches/{batch_id}", tags=[OPENAI_TAG])
async def get_batch(request: Request, batch_id: str) -> Response:
    return _json(views.openai_batch(await _openai_record(request, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel", tags=[OPENAI_TAG])
async def cancel_batch(request: Request, batch_id: str) -> Response:
    await _openai_record(request, batch_id)
    record = await _context(request).ask(lambda registry: registry.cancel.remote(batch_id))
    return _json(views.openai_batch(record))


def _json(payload) -> Response:
    return JSONResponse(payload)
