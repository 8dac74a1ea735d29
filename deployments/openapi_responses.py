"""The answers each route publishes in `/openapi.json`: the real error statuses and bodies, no 422.

Routes pass these dicts as FastAPI's `responses=`. LLM Engine routes answer errors as `{"detail": str}`,
OpenAI routes as `{"error": {...}}` (deployments/errors.py is the one exception -> status mapping).
FastAPI would also publish a 422 for every route with a body or parameters; this app answers
validation errors with 400, so `install_openapi` takes the 422 out of the published schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from deployments.protocol.bounds import SEED_MAX, SEED_MIN
from deployments.protocol.llm_engine import CompletionStreamResponse
from deployments.protocol.openai import ErrorResponse
from deployments.protocol.openai_responses import ChatCompletionChunk, Completion

COMPONENT_REF = "#/components/schemas/{model}"
ERROR_MEANINGS: dict[int, str] = {
    400: "Invalid input: the message names the field and the limit (never FastAPI's 422).",
    401: "API keys are configured and the request has no valid one.",
    404: "No served model has this name; the message lists the served ones.",
    413: "The body is larger than limits.max_body_bytes (refused before it is read whole).",
    429: "The model is overloaded (Serve's queue or the engine's is full); retry later.",
    500: "Generating this request failed on the server; other requests go on.",
    503: "The model has no live replica or engine right now (starting, or replaced after a failure).",
    504: "The generation ran past the model's request_timeout_s and was stopped.",
}
GENERATE_STATUSES = (400, 401, 404, 413, 429, 500, 503, 504)  # routes that run a model
LOOKUP_STATUSES = (401, 404)  # GET of one model by name
LIST_STATUSES = (401,)
# The LLM Engine routes' model: required and non-empty (400 naming it otherwise).
MODEL_ENDPOINT_NAME = Query(
    min_length=1, description="The served model's name (GET /v1/llm/model-endpoints)."
)


class DetailError(BaseModel):
    """The LLM Engine routes' error body."""

    detail: str = Field(description="What went wrong.")


class ReadinessBody(BaseModel):
    """`/readyz`: every model's state."""

    status: str = Field(description="ok, loading or unavailable.")
    models: dict[str, str] = Field(description="Each served model's state: ready, loading or unavailable.")
    detail: str | None = Field(None, description="Which models are not ready (on 503).")


def llm_engine_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": DetailError, "description": ERROR_MEANINGS[s]} for s in statuses}


def openai_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": ERROR_MEANINGS[s]} for s in statuses}


def event_stream(
    description: str, events: tuple[type[BaseModel], ...], is_done_sent: bool
) -> dict[int | str, dict[str, Any]]:
    """A 200 that is (or, with `stream: true`, may be) server-sent events. The schema describes one
    event (Open API 3.1): its `data` is the JSON of one of `events`, or OpenAI's final `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": COMPONENT_REF.format(model=m.__name__)} for m in events]},
    }
    data = {"anyOf": [{"const": "[DONE]"}, json_data]} if is_done_sent else json_data
    schema = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"description": description, "content": {"text/event-stream": {"schema": schema}}}}


# The models the event schemas refer to; install_openapi publishes those FastAPI did not.
EVENT_MODELS = (CompletionStreamResponse, Completion, ChatCompletionChunk, ErrorResponse)
_OPENAI_STREAM = (
    "With stream true: chunks, then `data: [DONE]`; an error after the stream started is one "
    '`data: {"error": {...}}` event before [DONE]. Otherwise the JSON body.'
)

LLM_ENGINE_SYNC = llm_engine_errors(*GENERATE_STATUSES)
LLM_ENGINE_STREAM = {
    **event_stream(
        "One event per token: a CompletionStreamResponse, the last with output.finished true; an error "
        "after the stream started is one last event with `error` set. No [DONE].",
        (CompletionStreamResponse,),
        is_done_sent=False,
    ),
    **llm_engine_errors(*GENERATE_STATUSES),
}
OPENAI_COMPLETIONS = {
    **event_stream(_OPENAI_STREAM, (Completion, ErrorResponse), is_done_sent=True),
    **openai_errors(*GENERATE_STATUSES),
}
OPENAI_CHAT = {
    **event_stream(_OPENAI_STREAM, (ChatCompletionChunk, ErrorResponse), is_done_sent=True),
    **openai_errors(*GENERATE_STATUSES),
}
OPENAI_LIST = openai_errors(*LIST_STATUSES)
LLM_ENGINE_LIST = llm_engine_errors(*LIST_STATUSES)
LLM_ENGINE_LOOKUP = llm_engine_errors(*LOOKUP_STATUSES)
READINESS = {
    200: {"model": ReadinessBody, "description": "Every model answers."},
    503: {"model": ReadinessBody, "description": "Some model is loading or unavailable."},
}


def install_openapi(app: FastAPI) -> None:
    """Publish `app`'s schema without FastAPI's 422s, with the models the event streams refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)  # FastAPI's own generation, cached on the app
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _, event_schemas = models_json_schema(
                [(m, "serialization") for m in EVENT_MODELS], ref_template=COMPONENT_REF
            )
            for name, definition in event_schemas.get("$defs", {}).items():
                components.setdefault(name, definition)
            _restore_integer_bounds(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# FastAPI's schema model types `minimum`/`maximum` as floats: 2**63 - 1 comes out as 9.223372036854776e18
# (= 2**63, out of range). The int64 bounds are restored exactly, other whole floats become ints.
_EXACT_BOUNDS = {float(bound): bound for bound in (SEED_MIN, SEED_MAX)}


def _restore_integer_bounds(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _restore_integer_bounds(item)
    elif isinstance(node, dict):
        for key in ("minimum", "maximum"):
            value = node.get(key)
            if node.get("type") == "integer" and isinstance(value, float) and value.is_integer():
                node[key] = _EXACT_BOUNDS.get(value, int(value))
        for item in node.values():
            _restore_integer_bounds(item)
