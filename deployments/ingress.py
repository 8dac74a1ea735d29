"""The HTTP face: LLM Engine v1 routes, routing by model name, and the one exception → HTTP mapping."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.model_server import CompletionResult, ModelRequest
from deployments.protocol.llm_engine import (
    CompletionOutput,
    CompletionRequest,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionSyncResponse,
    ListModelEndpointsResponse,
    ModelEndpoint,
    TokenOutput,
)
from deployments.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event
from engine.errors import InvalidRequestError, ModelNotFoundError, ServingError
from engine.types import TokenDelta

logger = logging.getLogger("ray.serve")

READY_TIMEOUT_S = 5.0
# Serve's own errors, by the status they mean to a client.
_SERVE_ERROR_STATUS: dict[type[Exception], int] = {
    BackPressureError: 429,  # max_queued_requests of the model's deployment reached
    DeploymentUnavailableError: 503,
}
_CANCELLED = (TaskCancelledError, RequestCancelledError)


def unwrap(exc: BaseException) -> BaseException:
    """The exception raised in a replica, out of Ray's RayTaskError wrapping(s)."""
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def validation_message(errors: list[dict]) -> str:
    """Pydantic errors as one line: "max_new_tokens: Input should be greater than or equal to 1"."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            message, loc = f"malformed JSON body: {error.get('ctx', {}).get('error', message)}", []
        elif error.get("type") == "model_attributes_type" and not loc:
            message = "the body must be a JSON object"
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts)


def http_error(exc: BaseException) -> tuple[int, str]:
    """The one mapping from an exception to (HTTP status, message)."""
    exc = unwrap(exc)
    if isinstance(exc, ServingError):
        return exc.status_code, str(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return 400, validation_message(list(exc.errors()))
    for error_class, status_code in _SERVE_ERROR_STATUS.items():
        if isinstance(exc, error_class):
            return status_code, str(exc)
    logger.error("internal error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


async def error_response(_request, exc: Exception) -> JSONResponse:
    status_code, message = http_error(exc)
    return JSONResponse({"detail": message}, status_code=status_code)


async def _sse_events(
    request_id: str, first: TokenDelta | None, stream: DeploymentResponseGenerator
) -> AsyncIterator[bytes]:
    """One event per delta, sent as it arrives; an error after the 200 becomes one last error event."""
    delta, is_finished = first, False
    try:
        while delta is not None:
            output = CompletionStreamOutput.from_delta(delta)
            yield sse_event(CompletionStreamResponse(request_id=request_id, output=output, error=None))
            if delta.is_finished:
                is_finished = True
                return
            delta = await anext(stream, None)
    except _CANCELLED:
        return  # the client went away and Serve cancelled the replica's stream: nobody to tell
    except Exception as exc:
        status_code, message = http_error(exc)
        yield sse_event(CompletionStreamResponse.from_error(request_id, status_code, message))
    finally:
        if not is_finished:  # client gone or error: stop the replica's generation
            stream.cancel()


app = FastAPI(title="llmserve", description="LLM Engine v1 compatible completions on Ray Serve.")
for _exc_class in (RequestValidationError, ValidationError, ServingError, RayTaskError, RayServeException):
    app.add_exception_handler(_exc_class, error_response)
app.add_exception_handler(Exception, error_response)  # the rest: 500 (Starlette re-raises it to the logs)


@serve.ingress(app)
class Ingress:
    """Routes each request to its model's deployment by `model_endpoint_name`."""

    def __init__(
        self, model_handles: dict[str, DeploymentHandle], model_names: dict[str, str] | None = None
    ) -> None:
        self._handles = dict(model_handles)
        self._stream_handles = {name: h.options(stream=True) for name, h in self._handles.items()}
        self._model_names = dict(model_names or {})

    def _check_model(self, name: str | None) -> str:
        if not name:
            raise InvalidRequestError("the query parameter model_endpoint_name is required")
        if name not in self._handles:
            served = ", ".join(sorted(self._handles))
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}")
        return name

    @app.post("/v1/llm/completions-sync", response_model=CompletionSyncResponse)
    async def completions_sync(
        self, body: CompletionRequest, model_endpoint_name: str | None = Query(None)
    ) -> Response:
        name = self._check_model(model_endpoint_name)
        request = ModelRequest(str(uuid.uuid4()), body.prompt, body.to_sampling_params())
        result: CompletionResult = await self._handles[name].generate.remote(request)
        tokens = [TokenOutput.from_engine(t) for t in result.tokens] if result.tokens is not None else None
        output = CompletionOutput(
            text=result.text,
            num_prompt_tokens=result.num_prompt_tokens,
            num_completion_tokens=result.num_completion_tokens,
            tokens=tokens,
        )
        payload = CompletionSyncResponse(request_id=request.request_id, output=output)
        return Response(payload.model_dump_json(), media_type="application/json")

    @app.post("/v1/llm/completions-stream", response_class=StreamingResponse)
    async def completions_stream(
        self, body: CompletionRequest, model_endpoint_name: str | None = Query(None)
    ) -> StreamingResponse:
        name = self._check_model(model_endpoint_name)
        request = ModelRequest(str(uuid.uuid4()), body.prompt, body.to_sampling_params())
        stream: DeploymentResponseGenerator = self._stream_handles[name].generate_stream.remote(request)
        # Pull the first delta before answering: errors known up front (context too long, overload)
        # become plain HTTP errors. The first delta is sent as soon as it exists, so TTFT is unchanged.
        try:
            first = await anext(stream, None)
        except BaseException:
            stream.cancel()
            raise
        events = _sse_events(request.request_id, first, stream)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    @app.get("/v1/llm/model-endpoints", response_model=ListModelEndpointsResponse)
    async def list_model_endpoints(self) -> ListModelEndpointsResponse:
        return ListModelEndpointsResponse(model_endpoints=[self._endpoint(n) for n in sorted(self._handles)])

    @app.get("/v1/llm/model-endpoints/{name}", response_model=ModelEndpoint)
    async def get_model_endpoint(self, name: str) -> ModelEndpoint:
        return self._endpoint(self._check_model(name))

    def _endpoint(self, name: str) -> ModelEndpoint:
        return ModelEndpoint(id=name, name=name, model_name=self._model_names.get(name, name))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/healthcheck")
    async def healthcheck(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 when every model answers within READY_TIMEOUT_S, else 503 naming the ones that did not."""
        names = sorted(self._handles)
        probes = [asyncio.wait_for(self._handles[n].ready.remote(), READY_TIMEOUT_S) for n in names]
        results = await asyncio.gather(*probes, return_exceptions=True)
        not_ready = [n for n, r in zip(names, results, strict=True) if r is not True]
        if not_ready:
            return JSONResponse({"detail": f"models not ready: {', '.join(not_ready)}"}, status_code=503)
        return JSONResponse({"status": "ok", "models": names})
