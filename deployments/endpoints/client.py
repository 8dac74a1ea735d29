"""The ingress's side of the endpoint controller: find (or start) it, attach, call, attach again.

Every call awaits an actor method (never a blocking Ray call on the serving loop); finding the
controller blocks on Ray's control plane, so it runs in a worker thread (`owner_async`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from deployments.endpoints.controller import EndpointController
from deployments.endpoints.snapshot import AppNotAttachedError, Attachment, Snapshot
from deployments.endpoints.wire import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from deployments.protocol.llm_engine import ModelEndpoint
from deployments.state.owner import owner, owner_async
from engine.errors import ModelUnavailableError

CONTROLLER_NAME = "llmserve-endpoints"
# On the head node, beside the GCS: a local state root is then one folder, whichever node asks; and out
# of any placement group the creating replica may run in (as Ray Train places its state actor).
_PLACEMENT: dict[str, Any] = {
    "resources": {"node:__internal_head__": 0.001},
    "scheduling_strategy": "DEFAULT",
}

Call = Callable[[Any], Awaitable[Any]]  # given the actor handle, one awaited method call


class ControllerClient:
    """Calls to the one `EndpointController` on behalf of one ingress app."""

    def __init__(self, attachment: Attachment) -> None:
        self._attachment = attachment
        self._handle: Any = None

    def attach_blocking(self) -> Snapshot:
        """Start or find the controller and attach (the ingress's constructor, before it serves)."""
        handle = owner(EndpointController, CONTROLLER_NAME, **_PLACEMENT)
        snapshot = ray.get(handle.attach.remote(self._attachment))
        self._handle = handle
        return snapshot

    async def attach(self) -> Snapshot:
        handle = await owner_async(EndpointController, CONTROLLER_NAME, **_PLACEMENT)
        snapshot = await handle.attach.remote(self._attachment)
        self._handle = handle
        return snapshot

    async def changes(self, version: tuple[int, int]) -> Snapshot:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.changes.remote(app, version), is_retried=True)

    async def create(self, request: CreateLLMEndpointRequest) -> tuple[str, Snapshot]:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.create.remote(app, request), is_retried=False)

    async def update(self, name: str, request: UpdateLLMEndpointRequest) -> tuple[str, Snapshot]:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.update.remote(app, name, request), is_retried=False)

    async def delete(self, name: str) -> Snapshot:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.delete.remote(app, name), is_retried=False)

    async def view(self, name: str) -> tuple[ModelEndpoint | None, Snapshot]:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.view.remote(app, name), is_retried=True)

    async def views(self) -> tuple[list[ModelEndpoint], Snapshot]:
        app = self._attachment.ingress_app
        return await self._call(lambda h: h.views.remote(app), is_retried=True)

    async def _call(self, call: Call, *, is_retried: bool) -> Any:
        """`call` on the controller; after its restart (it forgot this app) attach and call again. A
        change cut short by the controller's death is not repeated: the client is told to retry."""
        for attempt in range(3):
            if self._handle is None:
                await self.attach()
            try:
                return await call(self._handle)
            except AppNotAttachedError:
                await self.attach()
            except RayActorError:
                self._handle = None
                if not is_retried or attempt == 2:
                    raise ModelUnavailableError(
                        "the endpoint controller restarted during the call; check the endpoint's state "
                        "(Model.get) and retry"
                    ) from None
        raise ModelUnavailableError("the endpoint controller is unavailable; retry shortly")
