"""Schemathesis hooks of the schema fuzzer (loaded through SCHEMATHESIS_HOOKS by test_schema_fuzz.py).

The served model names are supplied so that generated requests get past the 404 of an unknown model:
three generated names in four are replaced by a served one (chosen by a CRC of the generated value,
so a run is reproducible), the fourth stays as generated and exercises the 404 path.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import schemathesis
from hypothesis.internal import lambda_sources

from tests.suite_profile import sized

MODELS_ENV = "LLMSERVE_FUZZ_MODELS"  # comma-separated served names


_describe_lambda = lambda_sources._lambda_description


def _describe_lambda_or_unknown(f: Any, *args: Any, **kwargs: Any) -> str:
    """CPython 3.11.7's `ast.parse` can raise SystemError ("AST constructor recursion depth mismatch")
    deep in a stack; hypothesis parses a lambda's source only to describe it, so that crashed case
    generation (no request sent). Describe such a lambda as hypothesis does when it has no source."""
    try:
        return _describe_lambda(f, *args, **kwargs)
    except SystemError:
        return "lambda: <unknown>"


lambda_sources._lambda_description = _describe_lambda_or_unknown


def _served_name(value: Any) -> Any:
    models = [m for m in os.environ.get(MODELS_ENV, "").split(",") if m]
    if not models or not isinstance(value, str):
        return value
    crc = zlib.crc32(value.encode("utf-8", "surrogatepass"))
    return value if crc % 4 == 0 else models[crc % len(models)]


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = _served_name(case.body["model"])
    if isinstance(case.query, dict) and "model_endpoint_name" in case.query:
        case.query["model_endpoint_name"] = _served_name(case.query["model_endpoint_name"])
    apply_success_path(case)
    return case


CALLS_ENV = "LLMSERVE_FUZZ_CALLS"  # a file: one line per request sent, "METHOD PATH STATUS SECONDS"


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    path = os.environ.get(CALLS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as calls:
            calls.write(f"{case.operation.label} {response.status_code} {response.elapsed:.3f}\n")
    clean_up_after(case, response)


# ---- success paths: real ids and valid bodies for a fixed number of cases per operation ------------------
# Random ids only ever reach the 404 of an unknown endpoint, file, batch or job, and random create bodies
# the 400/404 of a bad path or model: the responses of success would never be checked against the schema.
# So the first cases of each such operation get a real id (a resource made for it, again for every case
# that consumes one) or a valid body; the rest stay as generated. Jobs made here are cancelled at once
# and endpoints scale to zero, so the budget holds (each still costs a process: a job's runner starts
# before its cancel lands, and an endpoint starts one replica even with min_workers 0, so that a model
# that cannot load is reported; then it scales to zero). The test checks that each of these operations
# answered 2xx at least once.
FIXTURES_ENV = "LLMSERVE_FUZZ_FIXTURES"  # JSON: {"url": app URL, "model": served name, "checkpoint": folder}

_lock = threading.Lock()
_num_used: Counter[str] = Counter()
_cleanup: list[tuple[str, str]] = []  # (method, path) to call at the end of a case: cancels, deletes


def _fixtures() -> dict[str, str] | None:
    text = os.environ.get(FIXTURES_ENV)
    return json.loads(text) if text else None


def _client(fixtures: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=fixtures["url"], timeout=120)


def _new_file(fixtures: dict[str, str]) -> str:
    line = {
        "custom_id": "fuzz",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": fixtures["model"],
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
    }
    with _client(fixtures) as client:
        answer = client.post(
            "v1/files", files={"file": ("in.jsonl", json.dumps(line) + "\n")}, data={"purpose": "batch"}
        )
    answer.raise_for_status()
    return answer.json()["id"]


def _new_endpoint(fixtures: dict[str, str]) -> str:
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    with _client(fixtures) as client:
        client.post("v1/llm/model-endpoints", json=_endpoint_body(fixtures, name)).raise_for_status()
    return name


def _endpoint_body(fixtures: dict[str, str], name: str) -> dict[str, Any]:
    """A runtime endpoint of the tiny model that scales to zero (after the replica every create starts)."""
    return {"name": name, "model_name": "tiny-llama", "checkpoint_path": fixtures["checkpoint"],
            "min_workers": 0, "max_workers": 1}  # fmt: skip


def _job_body(fixtures: dict[str, str]) -> dict[str, Any]:
    return {
        "output_data_path": f"fuzz/{uuid.uuid4().hex}.json",
        "model_config": {"model": fixtures["model"]},
        "content": {"prompts": ["hi"], "max_new_tokens": 2, "temperature": 0.0},
    }


def _new_job(fixtures: dict[str, str]) -> str:
    with _client(fixtures) as client:
        answer = client.post("v2/batch-completions", json=_job_body(fixtures))
        answer.raise_for_status()
        job_id = answer.json()["job_id"]
        client.post(f"v2/batch-completions/{job_id}/actions/cancel").raise_for_status()
    return job_id


def _new_batch(fixtures: dict[str, str]) -> str:
    body = {"input_file_id": _new_file(fixtures), "endpoint": "/v1/chat/completions"}
    with _client(fixtures) as client:
        answer = client.post("v1/batches", json=body)
        answer.raise_for_status()
        batch_id = answer.json()["id"]
        client.post(f"v1/batches/{batch_id}/cancel").raise_for_status()
    return batch_id


def _set_path(name: str, make: Callable[[dict[str, str]], str]) -> Callable[[dict[str, str], Any], None]:
    def apply(fixtures: dict[str, str], case: Any) -> None:
        case.path_parameters = {**(case.path_parameters or {}), name: make(fixtures)}

    return apply


def _set_body(make: Callable[[dict[str, str]], dict[str, Any]]) -> Callable[[dict[str, str], Any], None]:
    def apply(fixtures: dict[str, str], case: Any) -> None:
        case.body = make(fixtures)

    return apply


def _ready_endpoint(fixtures: dict[str, str]) -> str:
    """A new endpoint once READY (an update of a pending one is a 400: a change is in progress)."""
    name = _new_endpoint(fixtures)
    deadline = time.monotonic() + 120
    with _client(fixtures) as client:
        while client.get(f"v1/llm/model-endpoints/{name}").json()["status"] == "UPDATE_PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fuzzer's endpoint {name} did not settle")
            time.sleep(0.2)
    return name


def _update_endpoint(fixtures: dict[str, str], case: Any) -> None:
    _set_path("model_endpoint_name", _ready_endpoint)(fixtures, case)
    case.body = {"max_workers": 2}  # a scaling change: it restarts no replica


# Reads of a job, batch or endpoint take no input but the id, so one real id reaches their success path;
# each such id costs a process (a job's runner, an endpoint's replica: ~2 and ~7 CPU-s), so the default
# profile makes one per read and the full profile two (files cost no process: two in both).
PROCESS_CASES = int(sized(quick=1, full=2))

# operation label -> (success cases, how to make one)
SUCCESS_PATHS: dict[str, tuple[int, Callable[[dict[str, str], Any], None]]] = {
    "GET /v1/files/{file_id}": (2, _set_path("file_id", _new_file)),
    "GET /v1/files/{file_id}/content": (2, _set_path("file_id", _new_file)),
    "DELETE /v1/files/{file_id}": (2, _set_path("file_id", _new_file)),
    "GET /v1/batches/{batch_id}": (PROCESS_CASES, _set_path("batch_id", _new_batch)),
    "POST /v1/batches/{batch_id}/cancel": (1, _set_path("batch_id", _new_batch)),
    "POST /v1/batches": (
        1,
        _set_body(lambda f: {"input_file_id": _new_file(f), "endpoint": "/v1/completions"}),
    ),
    "GET /v1/llm/batch-completions/{job_id}": (PROCESS_CASES, _set_path("job_id", _new_job)),
    "GET /v2/batch-completions/{job_id}": (PROCESS_CASES, _set_path("job_id", _new_job)),
    "POST /v2/batch-completions/{job_id}/actions/cancel": (1, _set_path("job_id", _new_job)),
    "POST /v1/llm/batch-completions": (1, _set_body(_job_body)),
    "POST /v2/batch-completions": (1, _set_body(_job_body)),
    "GET /v1/llm/model-endpoints/{model_endpoint_name}": (
        PROCESS_CASES,
        _set_path("model_endpoint_name", _new_endpoint),
    ),
    "PUT /v1/llm/model-endpoints/{model_endpoint_name}": (1, _update_endpoint),
    "DELETE /v1/llm/model-endpoints/{model_endpoint_name}": (
        1,
        _set_path("model_endpoint_name", _new_endpoint),
    ),
    "POST /v1/llm/model-endpoints": (
        1,
        _set_body(lambda f: _endpoint_body(f, f"fuzz-{uuid.uuid4().hex[:8]}")),
    ),
}


def _take_success_case(label: str) -> bool:
    with _lock:
        if label not in SUCCESS_PATHS or _num_used[label] >= SUCCESS_PATHS[label][0]:
            return False
        _num_used[label] += 1
        return True


def apply_success_path(case: Any) -> None:
    fixtures = _fixtures()
    if fixtures is not None and _take_success_case(case.operation.label):
        SUCCESS_PATHS[case.operation.label][1](fixtures, case)


def clean_up_after(case: Any, response: Any) -> None:
    """Cancel a job and delete an endpoint that a create of this case made (success cases and lucky ones)."""
    fixtures, label = _fixtures(), case.operation.label
    if fixtures is None or response.status_code != 200 or label not in _UNDO:
        return
    with _client(fixtures) as client:
        _UNDO[label](client, case, response.json())


_UNDO: dict[str, Callable[[httpx.Client, Any, dict[str, Any]], Any]] = {
    "POST /v2/batch-completions": lambda c, _, b: c.post(
        f"v2/batch-completions/{b['job_id']}/actions/cancel"
    ),
    "POST /v1/llm/batch-completions": lambda c, _, b: c.post(
        f"v2/batch-completions/{b['job_id']}/actions/cancel"
    ),
    "POST /v1/batches": lambda c, _, b: c.post(f"v1/batches/{b['id']}/cancel"),
    "POST /v1/llm/model-endpoints": lambda c, case, _: c.delete(
        f"v1/llm/model-endpoints/{case.body['name']}"
    ),
}
