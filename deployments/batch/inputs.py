"""A job's input as rows: (index, JSON payload) pairs, from the request's content or its input file."""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from deployments.batch.protocol import V1Content
from deployments.batch.storage import DataRoot
from deployments.batch.types import JobKind, JobSpec
from deployments.errors import validation_message
from engine.errors import InvalidRequestError

Rows = list[tuple[int, str]]
_REQUEST_LIST = TypeAdapter(list[dict[str, Any]])


def load_rows(spec: JobSpec) -> tuple[JobKind, Rows, str | None]:
    """The kind the input turned out to be (a v2 job may hold v1 content), the rows and, for v1, the
    shared sampling settings as JSON; InvalidRequestError says what is wrong."""
    raw = spec.inline_input_json.encode() if spec.inline_input_json is not None else _read(spec)
    if spec.kind == JobKind.OPENAI:
        lines = raw.decode("utf-8", errors="replace").splitlines()
        rows = [(i, line) for i, line in enumerate(line for line in lines if line.strip())]
        if not rows:
            raise InvalidRequestError("the input file has no lines")
        return spec.kind, rows, None
    data = _parse_json(raw)
    if spec.kind == JobKind.V1 or isinstance(data, dict):
        try:
            content = V1Content.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequestError(
                f"invalid v1 batch content: {validation_message(exc.errors())}"
            ) from None
        rows = [(i, json.dumps(p)) for i, p in enumerate(content.prompts)]
        return JobKind.V1, rows, content.model_dump_json(exclude={"prompts"})
    try:
        requests = _REQUEST_LIST.validate_python(data)
    except ValidationError:
        raise InvalidRequestError("v2 batch content must be a JSON list of request objects") from None
    if not requests:
        raise InvalidRequestError("v2 batch content is an empty list")
    return JobKind.V2, [(i, json.dumps(r)) for i, r in enumerate(requests)], None


def _read(spec: JobSpec) -> bytes:
    is_stored_file = spec.kind == JobKind.OPENAI  # an uploaded file, in the root's own files/ folder
    root = DataRoot(spec.data_root)
    location = root.resolve(spec.input_path, field="input_data_path", is_internal=is_stored_file)
    try:
        return location.read_bytes()
    except FileNotFoundError:
        raise InvalidRequestError(f"input_data_path: {location.url} does not exist") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise InvalidRequestError(f"input_data_path: cannot read {location.url}: {exc}") from None


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the input is not valid JSON: {exc}") from None
