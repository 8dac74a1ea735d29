"""The ingress's front door, as ASGI middleware: API keys (401) and the body-size limit (413).

It runs before FastAPI reads or parses anything, so a stranger's or an oversized request costs no
parsing and no more than `max_body_bytes` of memory. A route with a limit of its own (uploads) reads
its body as a stream that the guard counts (413 past the limit). Health routes (exact paths) stay
open; without its settings (the Ingress did not set them) the guard refuses every other request with
503.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import http_error
from deployments.limits import LimitSettings
from deployments.protocol.openai import ErrorResponse
from engine.errors import PayloadTooLargeError, ServingError, UnauthorizedError

OPEN_PATHS = frozenset({"/healthz", "/healthcheck", "/readyz"})  # exact route paths that never need a key
UNAUTHORIZED_MESSAGE = (
    "a valid API key is required: send it as 'x-api-key', 'Authorization: Bearer <key>' "
    "or as the Basic auth username"
)


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """What the middleware enforces; the Ingress puts it on `app.state.guard` when it starts."""

    max_body_bytes: int = LimitSettings().max_body_bytes
    api_keys: tuple[SecretStr, ...] = ()
    # (route path, limit, setting name): a route with its own body limit that reads its body as a stream
    # (batch file uploads): the guard counts the body as the route reads it, and stops it past the limit.
    path_body_limits: tuple[tuple[str, int, str], ...] = ()

    def is_streamed(self, path: str) -> bool:
        return any(path == limit_path for limit_path, _, _ in self.path_body_limits)

    def body_limit(self, path: str) -> tuple[int, str]:
        """The body limit of a route path and the setting that sets it."""
        for limit_path, max_bytes, setting in self.path_body_limits:
            if path == limit_path:
                return max_bytes, setting
        return self.max_body_bytes, "limits.max_body_bytes"

    def is_key_valid(self, key: str | None) -> bool:
        """Constant-time comparison against every key, so timing does not reveal a prefix."""
        if not key:
            return False
        given = key.encode("utf-8")
        matches = [hmac.compare_digest(given, k.get_secret_value().encode("utf-8")) for k in self.api_keys]
        return any(matches)


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Keys as the clients send them: `x-api-key` and Basic username (llmengine), Bearer (openai)."""
    keys = []
    for name, value in headers:
        if name == b"x-api-key":
            keys.append(value.decode("latin-1"))
        elif name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                keys.append(credentials.strip())
            elif scheme.lower() == "basic":
                try:
                    keys.append(
                        base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[0]
                    )
                except (binascii.Error, UnicodeDecodeError):
                    continue
    return keys


def error_json(path: str, exc: ServingError) -> JSONResponse:
    """The error in the route's protocol: OpenAI's shape on /v1 and /v2 but /v1/llm, else `detail`."""
    status_code, message = http_error(exc)
    is_openai = ("/v1/" in path or "/v2/" in path) and "/v1/llm/" not in path
    body = ErrorResponse.of(status_code, message).model_dump() if is_openai else {"detail": message}
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    return JSONResponse(body, status_code=status_code, headers=headers)


class RequestGuard:
    """Pure ASGI middleware: 401 without a valid key (when keys are set), 413 past the body limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        app_state = getattr(scope.get("app"), "state", None)
        guard: GuardSettings | None = getattr(app_state, "guard", None)
        path: str = scope.get("path", "")
        is_open = route_path(scope) in OPEN_PATHS
        if guard is None and not is_open:  # refuse rather than pass unchecked
            return await error_json(path, _unconfigured_error())(scope, receive, send)
        guard = guard or GuardSettings()
        if not is_open and not self._is_key_accepted(guard, scope):
            return await error_json(path, UnauthorizedError(UNAUTHORIZED_MESSAGE))(scope, receive, send)
        max_body_bytes, setting = guard.body_limit(route_path(scope))
        too_large = PayloadTooLargeError(
            f"the request body is larger than {max_body_bytes} bytes ({setting})"
        )
        if _content_length(scope) > max_body_bytes:
            return await error_json(path, too_large)(scope, receive, send)
        if guard.is_streamed(route_path(scope)):
            return await self.app(scope, _counted(receive, max_body_bytes, too_large), send)
        first = await _read_body(receive, max_body_bytes)
        if first is None:
            return await error_json(path, too_large)(scope, receive, send)
        await self.app(scope, _replay(first, receive), send)

    @staticmethod
    def _is_key_accepted(guard: GuardSettings, scope: Scope) -> bool:
        if not guard.api_keys:  # no keys configured: open, for local use
            return True
        return any(guard.is_key_valid(k) for k in presented_keys(scope.get("headers", ())))


def route_path(scope: Scope) -> str:
    """The path inside the app, without the route prefix Serve mounts it under (its `root_path`)."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) : len(root_path) + 1] in ("", "/"):
        return path[len(root_path) :] or "/"
    return path


def _unconfigured_error() -> ServingError:
    error = ServingError(
        "the server's request guard has no settings (the ingress did not start properly): refusing "
        "requests rather than serving them unchecked"
    )
    error.status_code = 503
    return error


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _read_body(receive: Receive, max_bytes: int) -> Message | None:
    """The whole body as one message, counted as it streams in; None once it passes `max_bytes`."""
    chunks, num_bytes = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message  # the client went away: the app sees the disconnect
        chunk = message.get("body", b"")
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def _counted(receive: Receive, max_bytes: int, too_large: PayloadTooLargeError) -> Receive:
    """`receive` that raises `too_large` (413) once the body passes `max_bytes`: the body streams to the
    route, which never holds more than it reads at a time."""
    num_bytes = 0

    async def counted() -> Message:
        nonlocal num_bytes
        message = await receive()
        if message["type"] == "http.request":
            num_bytes += len(message.get("body", b""))
            if num_bytes > max_bytes:
                raise too_large
        return message

    return counted


def _replay(first: Message, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then the real one (disconnect detection)."""
    is_sent = False

    async def replay() -> Message:
        nonlocal is_sent
        if not is_sent:
            is_sent = True
            return first
        return await receive()

    return replay
