"""Handles of runtime endpoints for the ingress: read from the registry once, cached, re-checked.

A cached route is re-read from the registry after ROUTE_TTL_S, so a delete made through another
ingress replica takes effect here within that time; a delete made here takes effect at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from deployments.endpoints import deployer
from deployments.endpoints.registry import EndpointRegistry
from engine.errors import ModelUnavailableError

ROUTE_TTL_S = 2.0


@dataclass(slots=True)
class Route:
    """Cached handles of one runtime endpoint."""

    handle: DeploymentHandle
    stream_handle: DeploymentHandle
    replica_wait_timeout_s: float
    checked_at_s: float


class RouteCache:
    """Runtime endpoint name → its handles, for the endpoints that serve."""

    def __init__(self, registry: EndpointRegistry) -> None:
        self._registry = registry
        self._routes: dict[str, Route] = {}
        self._routed: set[str] = set()  # names whose handles the ingress may hold

    def is_runtime(self, name: str) -> bool:
        return name in self._routed

    def forget(self, name: str) -> None:
        """The next `route(name)` reads the registry (after a delete here)."""
        self._routes.pop(name, None)

    def route(self, name: str) -> Route | None:
        """Handles of a runtime endpoint that serves; None if there is none; 503 while it is not ready."""
        cached = self._routes.get(name)
        if cached is not None and time.monotonic() - cached.checked_at_s < ROUTE_TTL_S:
            return cached
        record = self._registry.get(name)  # one GCS round trip
        if record is None:
            self._routes.pop(name, None)
            self._routed.discard(name)
            return None
        if not record.is_serving:
            self._routes.pop(name, None)
            detail = f": {record.status_reason}" if record.status_reason else ""
            raise ModelUnavailableError(f"model endpoint {name!r} is not ready ({record.status}){detail}")
        if cached is None:
            handle = deployer.handle(record.app_name, record.deployment_name)
            cached = Route(handle, handle.options(stream=True), record.config.replica_wait_timeout_s, 0.0)
            self._routes[name] = cached
            self._routed.add(name)
        cached.checked_at_s = time.monotonic()
        return cached
