"""Create, read, update and delete model endpoints at runtime; route requests to them.

State lives in the registry (Ray's KV store); Serve's own status settles a pending change: RUNNING
→ READY; a deploy failure, or no running replica within `start_timeout_s` → UPDATE_FAILED with
Serve's reason, and the half-created application is deleted (an update is rolled back instead).
Every ingress replica can settle any record, so a replaced replica finishes what another began.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping

from deployments.config import EndpointSettings, ModelConfig
from deployments.endpoints import deployer
from deployments.endpoints.deployer import AppState
from deployments.endpoints.registry import FAILED, PENDING, READY, EndpointRecord, EndpointRegistry
from deployments.endpoints.resources import (
    autoscaling,
    check_model,
    engine_for,
    model_config,
    resources,
    resources_of,
    scaling_of,
)
from deployments.endpoints.routing import Route, RouteCache
from deployments.endpoints.views import configured_view, record_view
from deployments.endpoints.wire import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteLLMEndpointResponse,
    UpdateLLMEndpointRequest,
    UpdateLLMEndpointResponse,
)
from deployments.protocol.llm_engine import ListModelEndpointsResponse, ModelEndpoint
from engine.errors import InvalidRequestError, ModelNotFoundError

logger = logging.getLogger("ray.serve")

POLL_S = 1.0
NEVER_DEPLOYED_S = 60.0  # a pending record whose application never appeared (its creator died)
# Serve's controller applies a new target within its loop; a RUNNING read sooner may be the old target's.
SETTLE_AFTER_S = 2.0
_FAILED_APP = ("DEPLOY_FAILED", "UNHEALTHY")


class EndpointService:
    """The model-endpoint API of one ingress app: configured models plus runtime endpoints."""

    def __init__(
        self, ingress_app: str, configured: Mapping[str, str], settings: EndpointSettings | None = None
    ) -> None:
        self._ingress_app = ingress_app
        self._configured = dict(configured)  # served name → model name
        self._settings = settings or EndpointSettings()
        self._registry = EndpointRegistry(ingress_app)
        self._routes = RouteCache(self._registry)
        self._watchers: set[asyncio.Task] = set()

    # ---- routing: the ingress asks for any name it does not serve from its config ----

    def is_runtime(self, name: str) -> bool:
        """Whether the ingress may hold handles of `name` that must be checked again (never configured)."""
        return self._routes.is_runtime(name)

    def route(self, name: str) -> Route | None:
        """Handles of a runtime endpoint that serves; None if there is none; 503 while it is not ready."""
        return self._routes.route(name)

    def served_names(self) -> list[str]:
        """Configured models and runtime endpoints that serve."""
        runtime = [r.name for r in self._registry.all() if r.is_serving]
        return sorted({*self._configured, *runtime})

    # ---- the model-endpoint routes ----

    async def create(self, request: CreateLLMEndpointRequest) -> CreateLLMEndpointResponse:
        if request.name in self._configured:
            raise InvalidRequestError(
                f"name: the model endpoint {request.name!r} already exists (configured)"
            )
        settings = self._settings
        model = check_model(request.model_name, request.checkpoint_path)
        config = self._config(
            request.name,
            model,
            settings.engine,
            request,
            resources(
                cpus=request.cpus,
                gpus=request.gpus,
                memory=request.memory,
                gpu_type=request.gpu_type,
                default_num_cpus=settings.default_num_cpus,
            ),
            (request.min_workers, request.max_workers, request.per_worker),
        )
        record = EndpointRecord(
            name=request.name,
            app_name=f"{self._ingress_app}.{request.name}",
            deployment_name=f"ModelServer:{request.name}",
            model_name=request.model_name,
            config=config,
            storage=request.storage,
            labels=request.labels or {},
            metadata=request.metadata or {},
            image_tag=request.inference_framework_image_tag,
            public_inference=request.public_inference,
            task_id=str(uuid.uuid4()),
        )
        if await asyncio.to_thread(deployer.states, {record.app_name}):
            raise InvalidRequestError(
                f"name: a Serve application {record.app_name!r} still exists (an endpoint of that name is "
                "still draining after its delete); try again in a few seconds"
            )
        if not await asyncio.to_thread(self._registry.add, record):
            raise InvalidRequestError(f"name: the model endpoint {request.name!r} already exists")
        reason = await self._unplaceable(config)
        if reason is not None:
            await self._fail(record, reason)
        else:
            await self._deploy(record)
        return CreateLLMEndpointResponse(endpoint_creation_task_id=record.task_id)

    async def update(self, name: str, request: UpdateLLMEndpointRequest) -> UpdateLLMEndpointResponse:
        record = await self._runtime_record(name, "update")
        if record.status == PENDING:
            raise InvalidRequestError(f"model endpoint {name!r} is still UPDATE_PENDING; try again later")
        if not record.is_serving:
            raise InvalidRequestError(
                f"model endpoint {name!r} is {record.status} ({record.status_reason}); delete and create it"
            )
        if request.model_name not in (None, record.model_name):
            raise InvalidRequestError("model_name: cannot change in place; delete and create the endpoint")
        if request.checkpoint_path is not None and (
            check_model(record.model_name, request.checkpoint_path) != record.config.model
        ):
            raise InvalidRequestError(
                "checkpoint_path: cannot change in place; delete and create the endpoint"
            )
        now = resources_of(record.config)
        needs = resources(
            cpus=_given(request.cpus, now.num_cpus),
            gpus=_given(request.gpus, now.num_gpus),
            memory=_given(request.memory, now.memory_bytes or None),
            gpu_type=_given(request.gpu_type, now.gpu_type),
            default_num_cpus=self._settings.default_num_cpus,
        )
        old = scaling_of(record.config)
        scaling = tuple(
            _given(v, o)
            for v, o in zip((request.min_workers, request.max_workers, request.per_worker), old, strict=True)
        )
        config = self._config(name, record.config.model, record.config.engine, request, needs, scaling)
        reason = await self._unplaceable(config)
        if reason is not None:
            raise InvalidRequestError(f"cpus/gpus/memory/gpu_type: {reason}")
        record.previous_config, record.config = record.config, config
        record.labels = _given(request.labels, record.labels)
        record.metadata = _given(request.metadata, record.metadata)
        record.storage = _given(request.storage, record.storage)
        record.image_tag = _given(request.inference_framework_image_tag, record.image_tag)
        record.status, record.status_reason, record.task_id = PENDING, None, str(uuid.uuid4())
        record.pending_since_s = time.time()
        await asyncio.to_thread(self._registry.put, record)
        await self._deploy(record)
        return UpdateLLMEndpointResponse(endpoint_creation_task_id=record.task_id)

    def _config(self, name, model, engine, request, needs, scaling) -> ModelConfig:
        """The served model's config from the request's engine knobs, resources and scaling."""
        knobs = {k: getattr(request, k) for k in ("max_model_len", "max_num_seqs") if getattr(request, k)}
        deployment = {
            "ray_actor_options": needs.to_ray_actor_options(),
            "autoscaling_config": autoscaling(*scaling),
        }
        wait_s = self._settings.replica_wait_timeout_s
        tag, shards = request.inference_framework_image_tag, request.num_shards
        engine = engine_for(engine.model_copy(update=knobs), image_tag=tag, num_shards=shards)
        return model_config(name, model, engine, deployment, wait_s)

    async def _unplaceable(self, config: ModelConfig) -> str | None:
        if not self._settings.check_node_resources:
            return None
        return await asyncio.to_thread(deployer.unplaceable, resources_of(config))

    async def delete(self, name: str) -> DeleteLLMEndpointResponse:
        record = await self._runtime_record(name, "delete")
        await asyncio.to_thread(self._registry.remove, name)  # new requests: 404 from now on
        self._routes.forget(name)
        await asyncio.to_thread(deployer.delete, record.app_name)  # in-flight requests drain
        return DeleteLLMEndpointResponse(deleted=True)

    async def get(self, name: str) -> ModelEndpoint:
        if name in self._configured:
            return configured_view(name, self._configured[name])
        record = await asyncio.to_thread(self._registry.get, name)
        if record is None:
            raise ModelNotFoundError(
                f"Model Endpoint {name} was not found; served: {', '.join(self.served_names())}"
            )
        states = await asyncio.to_thread(deployer.states, {record.app_name})
        record = await self._settle(record, states.get(record.app_name))
        return record_view(record, states.get(record.app_name))

    async def list(self) -> ListModelEndpointsResponse:
        records = await asyncio.to_thread(self._registry.all)
        states = await asyncio.to_thread(deployer.states, {r.app_name for r in records}) if records else {}
        views = [configured_view(n, m) for n, m in sorted(self._configured.items())]
        for record in records:
            record = await self._settle(record, states.get(record.app_name))
            views.append(record_view(record, states.get(record.app_name)))
        return ListModelEndpointsResponse(model_endpoints=sorted(views, key=lambda v: v.name))

    # ---- settling a change ----

    async def _runtime_record(self, name: str, verb: str) -> EndpointRecord:
        if name in self._configured:
            raise InvalidRequestError(
                f"model endpoint {name!r} comes from the app's config (serve_config.yaml): {verb} it there"
            )
        record = await asyncio.to_thread(self._registry.get, name)
        if record is None:
            raise ModelNotFoundError(f"The requested model endpoint {name!r} could not be found.")
        return record

    async def _apply(self, record: EndpointRecord) -> None:
        """Give Serve the record's config as the application's target (a worker thread: it blocks)."""
        app, deployment = record.app_name, record.deployment_name
        await asyncio.to_thread(deployer.deploy, app, deployment, record.config, self._settings)

    async def _deploy(self, record: EndpointRecord) -> None:
        try:
            await self._apply(record)
        except Exception as exc:  # Serve refused the target: nothing runs, say why
            logger.exception("model endpoint %s: deploy failed", record.name)
            await self._fail(record, f"Serve refused the deployment: {type(exc).__name__}: {exc}")
            return
        task = asyncio.create_task(self._watch(record.name, record.task_id))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, name: str, task_id: str) -> None:
        """Poll Serve until the change with `task_id` is READY or UPDATE_FAILED."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                record = await asyncio.to_thread(self._registry.get, name)
                if record is None or record.task_id != task_id or record.status != PENDING:
                    return
                states = await asyncio.to_thread(deployer.states, {record.app_name})
                await self._settle(record, states.get(record.app_name))
            except Exception:  # keep watching; a GET settles it too
                logger.exception("model endpoint %s: watching its deployment failed", name)

    async def _settle(self, record: EndpointRecord, app: AppState | None) -> EndpointRecord:
        """The record after Serve's state `app` is taken into account (stored when it changed)."""
        elapsed_s = time.time() - record.pending_since_s
        if record.status == READY and app is None:
            reason = f"its Serve application {record.app_name!r} is gone (deleted outside this API)"
            record.status, record.status_reason, record.is_serving = FAILED, reason, False
            await asyncio.to_thread(self._registry.replace, record)
        if record.status != PENDING:
            return record
        if app is not None and app.status == "RUNNING" and elapsed_s > SETTLE_AFTER_S:
            record.status, record.status_reason, record.is_serving = READY, None, True
            record.previous_config = None
            await asyncio.to_thread(self._registry.replace, record)
        elif app is not None and app.status in _FAILED_APP:
            await self._fail(record, f"Serve reports {app.status}: {app.message}")
        elif app is None and elapsed_s > NEVER_DEPLOYED_S:
            await self._fail(record, f"its Serve application {record.app_name!r} was never deployed")
        elif elapsed_s > self._settings.start_timeout_s:
            said = f"; Serve says: {app.message}" if app is not None and app.message else ""
            reason = f"no replica was running {self._settings.start_timeout_s:g} s after the change{said}"
            await self._fail(record, reason)
        return record

    async def _fail(self, record: EndpointRecord, reason: str) -> None:
        """UPDATE_FAILED: a failed create leaves no application behind; a failed update is rolled back."""
        logger.warning("model endpoint %s: UPDATE_FAILED: %s", record.name, reason)
        record.status, record.status_reason = FAILED, reason
        if record.previous_config is not None and record.is_serving:
            record.config, record.previous_config = record.previous_config, None
            record.status_reason = f"{reason}; the previous settings were restored"
            await self._apply(record)
        else:
            record.is_serving = False
            await asyncio.to_thread(deployer.delete, record.app_name)
        await asyncio.to_thread(self._registry.replace, record)


def _given(value, current):
    """The request's value, or the current one where the request left the field null."""
    return current if value is None else value
