"""The ingress's copy of the runtime endpoints: routing, 404s and `/v1/models` from memory only.

The copy is the controller's latest `Snapshot`. It is replaced when a newer one arrives: pushed by the
controller's long poll (`changes`, answered the moment any record changes) or returned by a create,
update or delete made through this replica (which therefore takes effect here at once). No lookup
ever waits on Ray, the GCS or a file: a name that is not in the copy is a 404 at once. When the
controller is down the copy stays as it was until it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from deployments.endpoints import deployer
from deployments.endpoints.snapshot import RouteEntry, Snapshot
from engine.errors import ModelUnavailableError

logger = logging.getLogger("ray.serve")

MAX_RETRY_DELAY_S = 5.0


@dataclass(slots=True)
class Route:
    """Cached handles of one runtime endpoint."""

    handle: DeploymentHandle
    stream_handle: DeploymentHandle
    replica_wait_timeout_s: float
    entry: RouteEntry  # what the handles were built from


class ChangeSource(Protocol):
    async def changes(self, version: tuple[int, int]) -> Snapshot: ...


class RouteTable:
    """Runtime endpoint name → its handles, for the endpoints that serve; kept by `sync`."""

    def __init__(self, configured: Iterable[str]) -> None:
        self._configured = frozenset(configured)
        self._snapshot = Snapshot((0, 0), {})
        self._routes: dict[str, Route] = {}
        self._routed: set[str] = set()  # names whose handles the ingress may hold
        self._served = sorted(self._configured)
        self._sync: asyncio.Task | None = None

    def apply(self, snapshot: Snapshot) -> None:
        """Take `snapshot` if it is newer than the copy (answers can arrive out of order)."""
        if snapshot.version <= self._snapshot.version:
            return
        self._snapshot = snapshot
        for name, route in list(self._routes.items()):
            if snapshot.routes.get(name) != route.entry:
                del self._routes[name]
        serving = (n for n, e in snapshot.routes.items() if e.is_serving)
        self._served = sorted({*self._configured, *serving})

    def is_runtime(self, name: str) -> bool:
        return name in self._routed or name in self._snapshot.routes

    def served_names(self) -> list[str]:
        """Configured models and runtime endpoints that serve (computed when the copy changes)."""
        return self._served

    def route(self, name: str) -> Route | None:
        """Handles of a runtime endpoint that serves; None if there is none; 503 while it is not ready."""
        entry = self._snapshot.routes.get(name)
        if entry is None:
            self._routed.discard(name)
            return None
        if not entry.is_serving:
            detail = f": {entry.status_reason}" if entry.status_reason else ""
            raise ModelUnavailableError(f"model endpoint {name!r} is not ready ({entry.status}){detail}")
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = _route(entry)
            self._routed.add(name)
        return route

    def start_sync(self, source: ChangeSource) -> None:
        """Follow the controller's changes in a task on the running loop (once; again if it ended)."""
        if self._sync is None or self._sync.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop (a test): the first call from the loop starts it
                return
            self._sync = loop.create_task(self._follow(source))

    async def _follow(self, source: ChangeSource) -> None:
        delay_s = 0.0
        while True:
            try:
                self.apply(await source.changes(self._snapshot.version))
                delay_s = 0.0
            except Exception as exc:  # the controller is restarting or being replaced: ask again
                delay_s = min(max(2 * delay_s, 0.2), MAX_RETRY_DELAY_S)
                logger.warning(
                    "endpoint routes: waiting for the controller (%s); retry in %.1f s", exc, delay_s
                )
                await asyncio.sleep(delay_s)


def _route(entry: RouteEntry) -> Route:
    handle = deployer.handle(entry.app_name, entry.deployment_name)  # built locally, no controller call
    return Route(handle, handle.options(stream=True), entry.replica_wait_timeout_s, entry)
