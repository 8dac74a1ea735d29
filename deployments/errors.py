"""The one mapping from an exception to (HTTP status, message); the ingress renders it per protocol."""

import logging

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from engine.errors import ServingError

logger = logging.getLogger("ray.serve")

# Serve's and Ray's own errors, by the status and the words they mean to a client.
_SERVE_ERROR_STATUS: dict[type[Exception], tuple[int, str]] = {
    # max_queued_requests of the model's deployment reached: refused at once.
    BackPressureError: (429, "the model is overloaded, try again later"),
    DeploymentUnavailableError: (503, "the model is unavailable"),
    # The replica's process died mid-request (Serve starts a new one): retrying later can succeed.
    RayActorError: (503, "the model replica serving this request stopped; retry shortly"),
}


def unwrap(exc: BaseException) -> BaseException:
    """The exception raised in a replica, out of Ray's RayTaskError wrapping(s)."""
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def validation_message(errors: list[dict]) -> str:
    """Pydantic errors as one line: "max_new_tokens: Input should be greater than or equal to 1"."""
    located = [(_field_path(error), error) for error in errors]
    parts = []
    for loc, error in located:
        if _is_other_branch(loc, error, located):
            continue
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            message, loc = f"malformed JSON body: {error.get('ctx', {}).get('error', message)}", []
        elif error.get("type") == "model_attributes_type" and not loc:
            message = "the body must be a JSON object"
        elif error.get("type") == "missing" and not loc:
            message = "the request body is missing: send a JSON object"
        parts.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(parts)


def _field_path(error: dict) -> list[str]:
    loc = [str(p) for p in error.get("loc", ()) if not _is_union_branch(p)]
    return loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc


def _is_other_branch(loc: list[str], error: dict, located: list[tuple[list[str], dict]]) -> bool:
    """A type error of one member of a union ("stop: Input should be a valid string") when another
    member got further and failed on the value ("stop.1: is not valid Unicode"): only that one counts."""
    if not str(error.get("type", "")).endswith("_type"):
        return False
    return any(
        other is not error and other_loc[: len(loc)] == loc and not str(other.get("type")).endswith("_type")
        for other_loc, other in located
    )


def _is_union_branch(part: object) -> bool:
    """Pydantic names the member of a union it tried ("str", "list[str]", "function-after[...]"): not a
    field name, so it is left out of the field's path ("stop.1", not "stop.list[...].1")."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def http_error(exc: BaseException) -> tuple[int, str]:
    """The one mapping from an exception to (HTTP status, message); the message always encodes to UTF-8."""
    status_code, message = _status_and_message(unwrap(exc))
    # A message quoting the request's text could hold a lone surrogate ("\ud800" in the JSON): escape it,
    # or encoding the error body would fail and turn a 400 into a 500.
    return status_code, message.encode("utf-8", "backslashreplace").decode("utf-8")


def _status_and_message(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ServingError):
        return exc.status_code, str(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return 400, validation_message(list(exc.errors()))
    if isinstance(exc, HTTPException):  # FastAPI's own: an undecodable body (400), unknown path (404)
        return exc.status_code, str(exc.detail)
    for error_class, (status_code, meaning) in _SERVE_ERROR_STATUS.items():
        if isinstance(exc, error_class):
            return status_code, f"{meaning} ({type(exc).__name__}: {_first_line(exc)})"
    logger.error("internal error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "no details"


def as_serving_error(exc: BaseException) -> ServingError:
    """Serve's own errors as ours: Serve replaces the app's handlers of BackPressureError and
    DeploymentUnavailableError with plain-text 503s, so the ingress converts them before they escape."""
    status_code, message = http_error(exc)
    error = ServingError(message)
    error.status_code = status_code
    return error
