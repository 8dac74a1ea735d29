"""The model-endpoint API of one ingress replica: configured models here, runtime endpoints forwarded.

Changes go to the endpoint controller (deployments/endpoints/controller.py), which owns the records;
GET and list read what it has. Routing, 404s and `/v1/models` come from this replica's `RouteTable`,
in memory (deployments/endpoints/routing.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from deployments.endpoints.routing import Route, RouteTable
from deployments.endpoints.snapshot import Snapshot
from deployments.endpoints.views import FRAMEWORK_TAG, configured_view
from deployments.endpoints.wire import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteLLMEndpointResponse,
    UpdateLLMEndpointRequest,
    UpdateLLMEndpointResponse,
)
from deployments.protocol.llm_engine import ListModelEndpointsResponse, ModelEndpoint
from engine.errors import InvalidRequestError, ModelNotFoundError


class Controller(Protocol):
    """deployments.endpoints.client.ControllerClient, or an in-process stand-in in tests."""

    def attach_blocking(self) -> Snapshot: ...
    async def attach(self) -> Snapshot: ...
    async def changes(self, version: tuple[int, int]) -> Snapshot: ...
    async def create(self, request: CreateLLMEndpointRequest) -> tuple[str, Snapshot]: ...
    async def update(self, name: str, request: UpdateLLMEndpointRequest) -> tuple[str, Snapshot]: ...
    async def delete(self, name: str) -> Snapshot: ...
    async def view(self, name: str) -> tuple[ModelEndpoint | None, Snapshot]: ...
    async def views(self) -> tuple[list[ModelEndpoint], Snapshot]: ...


class EndpointService:
    """Configured models (served name → model name) plus the controller's runtime endpoints."""

    def __init__(
        self,
        configured: Mapping[str, str],
        controller: Controller,
        framework_tags: Mapping[str, str] | None = None,
    ) -> None:
        self._configured = dict(configured)
        self._framework_tags = dict(framework_tags or {})  # served name -> framework_tag(config)
        self._controller = controller
        self._routes = RouteTable(self._configured)

    def attach_blocking(self) -> None:
        """Find the controller and take its routes (the ingress's constructor: it blocks); then follow
        its changes from the serving loop, if this runs on it (Serve's constructors do)."""
        self._routes.apply(self._controller.attach_blocking())
        self._routes.start_sync(self._controller)

    async def attach(self) -> None:
        self._routes.apply(await self._controller.attach())

    # ---- routing: the ingress asks for any name it does not serve from its config ----

    def is_runtime(self, name: str) -> bool:
        """Whether the ingress may hold handles of `name` that must be checked again (never configured)."""
        return self._routes.is_runtime(name)

    def route(self, name: str) -> Route | None:
        """Handles of a runtime endpoint that serves; None if there is none; 503 while it is not ready."""
        self._routes.start_sync(self._controller)
        return self._routes.route(name)

    def served_names(self) -> list[str]:
        """Configured models and runtime endpoints that serve."""
        self._routes.start_sync(self._controller)
        return self._routes.served_names()

    # ---- the model-endpoint routes ----

    async def create(self, request: CreateLLMEndpointRequest) -> CreateLLMEndpointResponse:
        if request.name in self._configured:
            raise InvalidRequestError(
                f"name: the model endpoint {request.name!r} already exists (configured)"
            )
        task_id, snapshot = await self._controller.create(request)
        self._routes.apply(snapshot)
        return CreateLLMEndpointResponse(endpoint_creation_task_id=task_id)

    async def update(self, name: str, request: UpdateLLMEndpointRequest) -> UpdateLLMEndpointResponse:
        self._check_runtime(name, "update")
        task_id, snapshot = await self._controller.update(name, request)
        self._routes.apply(snapshot)
        return UpdateLLMEndpointResponse(endpoint_creation_task_id=task_id)

    async def delete(self, name: str) -> DeleteLLMEndpointResponse:
        self._check_runtime(name, "delete")
        self._routes.apply(await self._controller.delete(name))  # new requests here: 404 from now on
        return DeleteLLMEndpointResponse(deleted=True)

    async def get(self, name: str) -> ModelEndpoint:
        if name in self._configured:
            return self._configured_view(name)
        view, snapshot = await self._controller.view(name)
        self._routes.apply(snapshot)  # what the caller sees READY routes here from now on
        if view is None:
            raise ModelNotFoundError(
                f"Model Endpoint {name} was not found; served: {', '.join(self._routes.served_names())}"
            )
        return view

    async def list(self) -> ListModelEndpointsResponse:
        views = [self._configured_view(n) for n in self._configured]
        runtime, snapshot = await self._controller.views()
        self._routes.apply(snapshot)
        views += runtime
        return ListModelEndpointsResponse(model_endpoints=sorted(views, key=lambda v: v.name))

    def _configured_view(self, name: str) -> ModelEndpoint:
        return configured_view(name, self._configured[name], self._framework_tags.get(name, FRAMEWORK_TAG))

    def _check_runtime(self, name: str, verb: str) -> None:
        if name in self._configured:
            raise InvalidRequestError(
                f"model endpoint {name!r} comes from the app's config (serve_config.yaml): {verb} it there"
            )
