"""One row of a batch job: its input as a `ModelRequest`, its result or error as the output record.

The three job kinds differ only here: what a row holds (a v1 prompt, a v2 request, an OpenAI JSONL
line) and the record written for it. The worker runs every kind through the same model server code.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from deployments.batch.types import JobKind
from deployments.errors import http_error
from deployments.limits import LimitSettings
from deployments.protocol import llm_engine, openai
from deployments.protocol.openai_responses import ChatCompletion, Completion
from deployments.wire import CompletionResult, ModelRequest
from engine.errors import InvalidRequestError

OPENAI_URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True, slots=True)
class RowRequest:
    """A parsed row: the engine request and how to render its result."""

    request: ModelRequest
    is_chat: bool
    custom_id: str | None = None  # openai


class RowParser:
    """Turns a row's JSON payload into a `RowRequest` for one job (its kind, model and v1 settings)."""

    def __init__(
        self,
        kind: JobKind,
        model: str,
        v1_content: dict[str, Any] | None = None,
        limits: LimitSettings | None = None,
    ) -> None:
        self.kind, self.model, self._limits = kind, model, limits or LimitSettings()
        self._v1_content = {k: v for k, v in (v1_content or {}).items() if k != "prompts"}

    def parse(self, index: int, payload: str) -> RowRequest:
        request_id = f"batch-{uuid.uuid4().hex}-{index}"
        if self.kind == JobKind.V1:
            body = llm_engine.CompletionRequest.model_validate(
                {**self._v1_content, "prompt": json.loads(payload)}
            )
            self._limits.check([body.prompt], body.stop_sequences)
            return RowRequest(ModelRequest(request_id, body.prompt, body.to_sampling_params()), is_chat=False)
        data = _json_object(payload)
        custom_id = None
        if self.kind == JobKind.OPENAI:
            custom_id, data = self._openai_body(data)
        data = {**data, "model": self.model, "stream": False}  # v2: the job's model, as Scale's runner does
        return _openai_request(request_id, data, custom_id, self._limits)

    def _openai_body(self, line: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidRequestError("custom_id: a non-empty string is required on every line")
        if str(line.get("method", "")).upper() != "POST":
            raise InvalidRequestError(f"method: only POST is supported, got {line.get('method')!r}")
        if line.get("url") not in OPENAI_URLS:
            raise InvalidRequestError(
                f"url: one of {', '.join(OPENAI_URLS)} is required, got {line.get('url')!r}"
            )
        body = line.get("body")
        if not isinstance(body, dict):
            raise InvalidRequestError("body: a JSON object is required")
        if body.get("model") != self.model:
            raise InvalidRequestError(
                f"body.model: every line of a batch must use the batch's model {self.model!r}, "
                f"got {body.get('model')!r}"
            )
        is_chat = line["url"] == "/v1/chat/completions"
        if is_chat != ("messages" in body):
            raise InvalidRequestError(f"body: does not match url {line['url']} (messages vs prompt)")
        return custom_id, body


def _json_object(payload: str) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"a JSON object is required, got {type(data).__name__}")
    return data


def _openai_request(
    request_id: str, data: dict[str, Any], custom_id: str | None, limits: LimitSettings
) -> RowRequest:
    if "messages" in data:
        chat = openai.ChatCompletionRequest.model_validate(data)
        limits.check((m.content for m in chat.to_messages()), chat.stop)
        params, is_auto = chat.to_sampling_params(), chat.max_new_tokens is None
        request = ModelRequest(request_id, chat.to_messages(), params, is_max_tokens_auto=is_auto)
        return RowRequest(request, is_chat=True, custom_id=custom_id)
    completion = openai.CompletionRequest.model_validate(data)
    limits.check([completion.prompt], completion.stop)
    request = ModelRequest(request_id, completion.prompt, completion.to_sampling_params(), is_raw_prompt=True)
    return RowRequest(request, is_chat=False, custom_id=custom_id)


def render_result(kind: JobKind, model: str, row: RowRequest, result: CompletionResult) -> dict[str, Any]:
    """The output record of a finished row, in its API's shape."""
    if kind == JobKind.V1:
        tokens = [llm_engine.TokenOutput.from_engine(t) for t in result.tokens] if result.tokens else None
        return llm_engine.CompletionOutput(
            text=result.text,
            num_prompt_tokens=result.num_prompt_tokens,
            num_completion_tokens=result.num_completion_tokens,
            tokens=tokens,
        ).model_dump()
    response_class = ChatCompletion if row.is_chat else Completion
    body = response_class.from_result(result.request_id, int(time.time()), model, result).model_dump()
    if kind == JobKind.V2:
        return body
    response = {"status_code": 200, "request_id": result.request_id, "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": row.custom_id,
        "response": response,
        "error": None,
    }


def render_error(kind: JobKind, index: int, payload: str, exc: BaseException) -> dict[str, Any]:
    """The error record of a failed row; OpenAI's error-file shape for OpenAI batches."""
    if isinstance(exc, ValidationError):
        exc = InvalidRequestError(f"line {index + 1}: " + http_error(exc)[1])
    status_code, message = http_error(exc)
    if kind != JobKind.OPENAI:
        return {"index": index, "status_code": status_code, "error": message}
    custom_id = _custom_id_of(payload)
    body = openai.ErrorResponse.of(status_code, message).model_dump()
    response = {"status_code": status_code, "request_id": None, "body": body}
    error = {"code": body["error"]["type"], "message": message, "line": index + 1}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _custom_id_of(payload: str) -> str | None:
    try:
        value = json.loads(payload).get("custom_id")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
