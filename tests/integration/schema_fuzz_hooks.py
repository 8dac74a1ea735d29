"""Schemathesis hooks of the schema fuzzer (loaded through SCHEMATHESIS_HOOKS by test_schema_fuzz.py).

The served model names are supplied so that generated requests get past the 404 of an unknown model:
three generated names in four are replaced by a served one (chosen by a CRC of the generated value,
so a run is reproducible), the fourth stays as generated and exercises the 404 path.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import schemathesis
from hypothesis.internal import lambda_sources

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
    if isinstance(case.path_parameters, dict) and "name" in case.path_parameters:
        case.path_parameters["name"] = _served_name(case.path_parameters["name"])
    return case


CALLS_ENV = "LLMSERVE_FUZZ_CALLS"  # a file: one line per request sent, "METHOD PATH STATUS SECONDS"


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    path = os.environ.get(CALLS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as calls:
            calls.write(f"{case.operation.label} {response.status_code} {response.elapsed:.3f}\n")
