"""The HTTP face: LLM Engine v1 and OpenAI routes, routing by model name, errors rendered per protocol."""

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, SecretStr, ValidationError
from ray import serve
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from deployments.batch.routes import router as batch_router
from deployments.batch.service import BatchContext
from deployments.config import DEFAULT_STATE_ROOT, EndpointSettings
from deployments.endpoints.client import ControllerClient
from deployments.endpoints.routes import router as endpoints_router
from deployments.endpoints.service import EndpointService
from deployments.endpoints.snapshot import Attachment
from deployments.errors import as_serving_error, http_error
from deployments.guard import GuardSettings, RequestGuard
from deployments.haproxy_launcher import serve_env_warning
from deployments.health import probe_models, readiness
from deployments.http_metrics import HttpErrorMetrics
from deployments.limits import LimitSettings
from deployments.loop_lag import sample_loop_lag
from deployments.model_server import EngineFactory
from deployments.openapi_responses import (
    LLM_ENGINE_STREAM,
    LLM_ENGINE_SYNC,
    MODEL_ENDPOINT_NAME,
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_LIST,
    READINESS,
    install_openapi,
)
from deployments.protocol import openai as openai_api
from deployments.protocol.llm_engine import (
    CompletionOutput,
    CompletionRequest,
    CompletionStreamOutput,
    CompletionStreamResponse,
    CompletionSyncResponse,
    TokenOutput,
)
from deployments.protocol.openai_responses import ChatChunks, ChatCompletion, Completion, CompletionChunks
from deployments.replica_logging import LOADING_LOGGER, forward_library_logs_in_replica
from deployments.sse import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event
from deployments.wire import CompletionResult, ModelRequest
from engine.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError, ServingError
from engine.types import TokenDelta

logger = logging.getLogger("ray.serve")

READY_TIMEOUT_S = 5.0
DEFAULT_REPLICA_WAIT_TIMEOUT_S = 300.0  # see ModelConfig.replica_wait_timeout_s
OPENAI_TAG = "openai"  # routes with this tag answer errors in OpenAI's shape
_CANCELLED = (TaskCancelledError, RequestCancelledError)


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """`{"detail": ...}` on the LLM Engine routes, `{"error": {...}}` on the OpenAI ones."""
    status_code, message = http_error(exc)
    if OPENAI_TAG in getattr(request.scope.get("route"), "tags", ()):
        body = openai_api.ErrorResponse.of(status_code, message).model_dump()
        return JSONResponse(body, status_code=status_code)
    return JSONResponse({"detail": message}, status_code=status_code)


async def _sse_events(
    request_id: str, first: list[TokenDelta] | None, stream: DeploymentResponseGenerator
) -> AsyncIterator[bytes]:
    """One event per delta (the `token` field is per token), one HTTP write per chunk of deltas; an
    error after the 200 becomes one last error event."""
    chunk, is_finished = first, False
    try:
        while chunk:
            events = []
            for delta in chunk:
                output = CompletionStreamOutput.from_delta(delta)
                event = CompletionStreamResponse(request_id=request_id, output=output, error=None)
                events.append(sse_event(event))
                is_finished = delta.is_finished
            yield b"".join(events)
            if is_finished:
                return
            chunk = await anext(stream, None)
    except _CANCELLED:
        return  # the client went away and Serve cancelled the replica's stream: nobody to tell
    except Exception as exc:
        status_code, message = http_error(exc)
        yield sse_event(CompletionStreamResponse.from_error(request_id, status_code, message))
    finally:
        if not is_finished:  # client gone or error: stop the replica's generation
            stream.cancel()


class ChunkBuilder(Protocol):
    """Builds one OpenAI stream's chunks: `CompletionChunks` or `ChatChunks`."""

    def content(self, delta: TokenDelta) -> BaseModel: ...
    def usage(self, delta: TokenDelta) -> BaseModel: ...


def openai_sse_chunk(chunk: list[TokenDelta], chunks: ChunkBuilder, is_usage_sent: bool) -> bytes:
    """One chunk of deltas as OpenAI events, for one HTTP write (b"" when all its text is held back):
    a content event per delta that carries something, then the usage event after the last if asked."""
    events = []
    for delta in chunk:
        if delta.text or delta.token is not None or delta.is_finished:  # skip held-back text
            events.append(sse_event(chunks.content(delta)))
        if delta.is_finished and is_usage_sent:
            events.append(sse_event(chunks.usage(delta)))
    return b"".join(events)


async def _openai_sse_events(
    first: list[TokenDelta] | None,
    stream: DeploymentResponseGenerator,
    chunks: ChunkBuilder,
    is_usage_sent: bool,
) -> AsyncIterator[bytes]:
    """OpenAI framing: content chunks, the usage chunk if asked, `[DONE]`; an error event before `[DONE]`.
    One HTTP write per chunk of deltas."""
    chunk, is_finished = first, False
    try:
        while chunk:
            if events := openai_sse_chunk(chunk, chunks, is_usage_sent):
                yield events
            if any(delta.is_finished for delta in chunk):
                is_finished = True
                break
            chunk = await anext(stream, None)
    except _CANCELLED:
        return  # the client went away and Serve cancelled the replica's stream: nobody to tell
    except Exception as exc:
        yield sse_event(openai_api.ErrorResponse.of(*http_error(exc)))
    finally:
        if not is_finished:  # client gone or error: stop the replica's generation
            stream.cancel()
    yield SSE_DONE


def _json_response(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


app = FastAPI(title="llmserve", description="LLM Engine v1 and OpenAI compatible completions on Ray Serve.")
# HTTPException: FastAPI's own 400 for a body it cannot decode, 404/405 for unknown paths and methods.
_HANDLED = (
    RequestValidationError,
    ValidationError,
    ServingError,
    RayTaskError,
    RayServeException,
    HTTPException,
)
for _exc_class in _HANDLED:
    app.add_exception_handler(_exc_class, error_response)
app.add_exception_handler(Exception, error_response)  # the rest: 500 (Starlette re-raises it to the logs)
install_openapi(app)  # the published schema: real error answers, no 422
app.add_middleware(RequestGuard)  # API keys (401) and the body-size limit (413), before any parsing
app.add_middleware(HttpErrorMetrics)  # outermost, so it counts the guard's 401/413 too
app.include_router(batch_router)  # batch jobs, OpenAI Batch and Files (deployments/batch/routes.py)
app.include_router(endpoints_router)  # /v1/llm/model-endpoints (deployments/endpoints/routes.py)


@serve.ingress(app)
class Ingress:
    """Routes each request to its model's deployment by `model_endpoint_name` or the body's `model`."""

    def __init__(
        self,
        model_handles: dict[str, DeploymentHandle],
        model_names: dict[str, str] | None = None,
        limits: LimitSettings | None = None,
        api_keys: tuple[SecretStr, ...] = (),
        replica_wait_timeouts_s: dict[str, float] | None = None,
        batch: BatchContext | None = None,
        endpoints: EndpointSettings | None = None,
        state_root: str | None = None,
        engine_factory: EngineFactory | None = None,
        framework_tags: dict[str, str] | None = None,
    ) -> None:
        forward_library_logs_in_replica()  # so that `serve run` shows the warning below
        if warning := serve_env_warning(os.environ):  # as `serve run` or `ray start` got it
            logging.getLogger(LOADING_LOGGER).warning(warning)
        self._replica_wait_timeouts_s = dict(replica_wait_timeouts_s or {})
        self._limits = limits or LimitSettings()
        # The middleware reads it from the app: one Ingress per replica process owns this app object.
        app.state.guard = GuardSettings(max_body_bytes=self._limits.max_body_bytes, api_keys=tuple(api_keys))
        if batch is not None:
            batch.install(app)  # the batch routes' context and the upload size limit
        self._handles = dict(model_handles)
        self._stream_handles = {name: h.options(stream=True) for name, h in self._handles.items()}
        self._model_names = dict(model_names or {})
        self._created_s = int(time.time())
        # Runtime endpoints (Model.create): records under the state root, owned by the endpoint
        # controller; this replica routes from its copy of them (docs/endpoints.md).
        configured = {n: self._model_names.get(n, n) for n in self._handles}
        app_name = serve.get_replica_context().app_name
        attachment = Attachment(
            app_name, state_root or DEFAULT_STATE_ROOT, endpoints or EndpointSettings(), engine_factory
        )
        self._endpoints = EndpointService(configured, ControllerClient(attachment), framework_tags)
        self._endpoints.attach_blocking()  # before the first request: routes known from the start
        app.state.endpoints = self._endpoints

    def _check_model(self, name: str | None) -> str:
        if not name:
            raise InvalidRequestError("the query parameter model_endpoint_name is required")
        if name not in self._handles or self._endpoints.is_runtime(name):
            self._route_runtime_endpoint(name)
        return name

    def _route_runtime_endpoint(self, name: str) -> None:
        """Cache (or drop) the handles of an endpoint created at runtime; 404 if there is none."""
        route = self._endpoints.route(name)  # 503 while it is starting or after it failed
        if route is None:
            for routes in (self._handles, self._stream_handles, self._replica_wait_timeouts_s):
                routes.pop(name, None)
            served = ", ".join(self._endpoints.served_names())
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}")
        self._handles[name], self._stream_handles[name] = route.handle, route.stream_handle
        self._replica_wait_timeouts_s[name] = route.replica_wait_timeout_s

    @app.post("/v1/llm/completions-sync", response_model=CompletionSyncResponse, responses=LLM_ENGINE_SYNC)
    async def completions_sync(
        self, body: CompletionRequest, model_endpoint_name: str = MODEL_ENDPOINT_NAME
    ) -> Response:
        name = self._check_model(model_endpoint_name)
        self._limits.check([body.prompt], body.stop_sequences)
        request = ModelRequest(str(uuid.uuid4()), body.prompt, body.to_sampling_params())
        result = await self._generate(name, request)
        tokens = [TokenOutput.from_engine(t) for t in result.tokens] if result.tokens is not None else None
        output = CompletionOutput(
            text=result.text,
            num_prompt_tokens=result.num_prompt_tokens,
            num_completion_tokens=result.num_completion_tokens,
            tokens=tokens,
        )
        return _json_response(CompletionSyncResponse(request_id=request.request_id, output=output))

    @app.post("/v1/llm/completions-stream", response_class=StreamingResponse, responses=LLM_ENGINE_STREAM)
    async def completions_stream(
        self, body: CompletionRequest, model_endpoint_name: str = MODEL_ENDPOINT_NAME
    ) -> StreamingResponse:
        name = self._check_model(model_endpoint_name)
        self._limits.check([body.prompt], body.stop_sequences)
        request = ModelRequest(str(uuid.uuid4()), body.prompt, body.to_sampling_params())
        first, stream = await self._open_stream(name, request)
        events = _sse_events(request.request_id, first, stream)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    async def _generate(self, name: str, request: ModelRequest) -> CompletionResult:
        response: DeploymentResponse = self._handles[name].generate.remote(request)
        await self._wait_for_replica(name, response)
        return await response

    async def _wait_for_replica(self, name: str, response: DeploymentResponse | DeploymentResponseGenerator):
        """Wait until Serve hands `response` to a replica (a cold model starts one first); after the
        model's replica_wait_timeout_s, cancel it and answer 503. The generation itself is not timed here."""
        timeout_s = self._replica_wait_timeouts_s.get(name, DEFAULT_REPLICA_WAIT_TIMEOUT_S)
        try:
            # Serve's step that resolves once a replica accepted the request (private in Ray 2.x; no
            # public equivalent). Awaiting the response afterwards reuses its cached result.
            await asyncio.wait_for(response._fetch_future_result_async(), timeout_s)
        except (BackPressureError, DeploymentUnavailableError) as exc:  # queue full: 429 at once
            raise as_serving_error(exc) from None
        except TimeoutError:
            response.cancel()
            raise ModelUnavailableError(
                f"model {name!r} has no replica to take the request after {timeout_s:g} s: it is starting "
                "(scaling up from zero) or cannot start; try again later"
            ) from None

    async def _open_stream(
        self, name: str, request: ModelRequest
    ) -> tuple[list[TokenDelta] | None, DeploymentResponseGenerator]:
        """The replica's stream and its first chunk of deltas, pulled before answering: errors known up front
        (context too long, overload) become plain HTTP errors. TTFT is unchanged."""
        stream: DeploymentResponseGenerator = self._stream_handles[name].generate_stream.remote(request)
        try:
            await self._wait_for_replica(name, stream)
            return await anext(stream, None), stream
        except BaseException:
            # Cancelling a stream that Serve refused (queue full) raises the refusal again: ignore it.
            with contextlib.suppress(BackPressureError, DeploymentUnavailableError):
                stream.cancel()
            raise

    @app.post("/v1/completions", tags=[OPENAI_TAG], response_model=Completion, responses=OPENAI_COMPLETIONS)
    @app.post("/v2/completions", tags=[OPENAI_TAG], response_model=Completion, responses=OPENAI_COMPLETIONS)
    async def openai_completions(self, body: openai_api.CompletionRequest) -> Response:
        """OpenAI completions. The prompt is sent raw, never through the chat template (unlike the LLM
        Engine routes, which apply it for instruct models): here the client owns the exact prompt text."""
        name = self._check_model(body.model)
        self._limits.check([body.prompt], body.stop)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        request = ModelRequest(request_id, body.prompt, body.to_sampling_params(), is_raw_prompt=True)
        if body.stream:
            chunks = CompletionChunks(request_id, created, body.model)
            return await self._openai_stream(name, request, chunks, body.is_usage_streamed)
        result = await self._generate(name, request)
        return _json_response(Completion.from_result(request_id, created, body.model, result))

    @app.post("/v1/chat/completions", tags=[OPENAI_TAG], response_model=ChatCompletion, responses=OPENAI_CHAT)
    @app.post("/v2/chat/completions", tags=[OPENAI_TAG], response_model=ChatCompletion, responses=OPENAI_CHAT)
    async def openai_chat_completions(self, body: openai_api.ChatCompletionRequest) -> Response:
        """OpenAI chat: the model server applies the tokenizer's chat template to the whole conversation."""
        name = self._check_model(body.model)
        self._limits.check((m.content for m in body.to_messages()), body.stop)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        params, is_auto = body.to_sampling_params(), body.max_new_tokens is None
        request = ModelRequest(request_id, body.to_messages(), params, is_max_tokens_auto=is_auto)
        if body.stream:
            chunks = ChatChunks(request_id, created, body.model)
            return await self._openai_stream(name, request, chunks, body.is_usage_streamed)
        result = await self._generate(name, request)
        return _json_response(ChatCompletion.from_result(request_id, created, body.model, result))

    async def _openai_stream(
        self, name: str, request: ModelRequest, chunks: ChunkBuilder, is_usage_sent: bool
    ) -> StreamingResponse:
        first, stream = await self._open_stream(name, request)
        events = _openai_sse_events(first, stream, chunks, is_usage_sent)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    @app.get("/v1/models", tags=[OPENAI_TAG], response_model=openai_api.ModelList, responses=OPENAI_LIST)
    async def openai_models(self) -> openai_api.ModelList:
        names = self._endpoints.served_names()
        cards = [openai_api.ModelCard(id=n, created=self._created_s) for n in names]
        return openai_api.ModelList(data=cards)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/healthcheck")
    async def healthcheck(self) -> dict[str, str]:
        return {"status": "ok"}

    async def loop_lag(self, duration_s: float, interval_s: float = 0.01) -> list[float]:
        """How late a timer fired on this replica's serving loop, once per `interval_s` for `duration_s`
        (seconds late; through a Serve handle only, for benchmarks/loop_lag_bench.py)."""
        return await sample_loop_lag(duration_s, interval_s)

    @app.get("/readyz", responses=READINESS)
    async def readyz(self) -> JSONResponse:
        """200 when every model answers within READY_TIMEOUT_S, else 503 with each model's state:
        `{"status": "loading", "models": {"a": "ready", "b": "loading"}, "detail": ...}`."""
        configured = {n: h for n, h in self._handles.items() if not self._endpoints.is_runtime(n)}
        status_code, body = readiness(await probe_models(configured, READY_TIMEOUT_S))
        return JSONResponse(body, status_code=status_code)
