"""Counts the HTTP API's error answers by status code and route: an ASGI middleware of the ingress.

Plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed events pass through unbuffered.
Starlette builds its middleware on the first request, so the counter lives in the ingress replica.
"""

from types import ModuleType
from typing import Any

from ray.util import metrics as ray_metrics

UNMATCHED_ROUTE = "unmatched"  # 404s for unknown paths: one tag value, whatever the path


class HttpErrorMetrics:
    """`llmserve_http_errors` (exported `ray_llmserve_http_errors_total`), tags status_code and route."""

    def __init__(self, app: Any, backend: ModuleType | Any = ray_metrics) -> None:
        self.app = app
        self.errors = backend.Counter(
            "llmserve_http_errors",
            "Error answers (status >= 400) of the HTTP API by status code and route template.",
            tag_keys=("status_code", "route"),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_counting(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                # The router stores the matched route in the scope; its template keeps cardinality low.
                route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
                self.errors.inc(tags={"status_code": str(message["status"]), "route": route})
            await send(message)

        await self.app(scope, receive, send_counting)
