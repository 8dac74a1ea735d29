"""The one owner of runtime endpoints: a detached actor that serializes changes and watches Serve.

Every ingress replica of every app attaches to the same controller (by name, `owner()`), which:
- serializes create, update and delete per endpoint name (a lock per name), so a delete never lands
  inside a create's checks and an update never brings a deleted endpoint back;
- writes the records (deployments/endpoints/registry.py) before it acts on Serve, so a crash leaves
  a record to finish from, never an application without one;
- runs the only watcher: a pending change becomes READY or UPDATE_FAILED without anyone asking;
- restores on attach: after a restart of the cluster, every endpoint that served is deployed again;
- pushes a `Snapshot` of routes to the ingress replicas (`changes`, a long poll), which route from it
  without ever asking anyone on their serving loop. GET and list read; they never change a record.
Its blocking calls (Serve's controller, the store's files) run in worker threads, off its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from deployments.endpoints import deployer
from deployments.endpoints.app_endpoints import AppEndpoints
from deployments.endpoints.changes import plan_create, plan_update
from deployments.endpoints.deployer import AppState
from deployments.endpoints.lifecycle import settle
from deployments.endpoints.registry import (
    DELETING,
    FAILED,
    PENDING,
    READY,
    EndpointRecord,
    migrate_from_ray_kv,
    open_store,
)
from deployments.endpoints.resources import resources_of, scaling_of
from deployments.endpoints.snapshot import AppNotAttachedError, Attachment, Snapshot
from deployments.endpoints.views import record_view
from deployments.endpoints.wire import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from deployments.engines.placement import replicas_per_node
from deployments.protocol.llm_engine import ModelEndpoint
from deployments.state.owner import VersionedOwner
from engine.errors import InvalidRequestError

logger = logging.getLogger("ray")

POLL_S = 1.0  # while a change is pending
IDLE_POLL_S = 10.0  # otherwise: a READY endpoint whose application vanished is reported
CHANGES_TIMEOUT_S = 30.0  # a long poll answers at least this often


class EndpointController(VersionedOwner):
    """Async actor (one event loop): the per-name locks and the records need no other guard."""

    def __init__(
        self, poll_s: float = POLL_S, idle_poll_s: float = IDLE_POLL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._apps: dict[str, AppEndpoints] = {}
        self._attaching: asyncio.Lock | None = None
        self._watcher: asyncio.Task | None = None
        self._poll_s, self._idle_poll_s, self._clock = poll_s, idle_poll_s, clock
        self._started_ns = time.time_ns()  # orders snapshots across restarts of this actor

    # ---- ingress replicas ----

    async def attach(self, attachment: Attachment) -> Snapshot:
        """Register an ingress app (again after a restart of this actor) and bring Serve in line with its
        records: an ingress replica attaches when it starts, e.g. after a restart of the cluster."""
        self._attaching = self._attaching or asyncio.Lock()
        async with self._attaching:
            app = self._apps.get(attachment.ingress_app)
            if app is None or app.attachment.state_root != attachment.state_root:
                app = await self._open(attachment)
                self._apps[attachment.ingress_app] = app
            app.attachment = attachment  # its settings may have changed with a redeploy
            await self._reconcile(app)
        self._ensure_watcher()
        return app.snapshot()

    async def changes(self, ingress_app: str, version: tuple[int, int], timeout_s: float = CHANGES_TIMEOUT_S):
        """The routes once they differ from `version` (a long poll); the same ones after `timeout_s`."""
        app = self._app(ingress_app)
        async with app.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app.changed.wait_for(lambda: app.version != version), timeout_s)
        return app.snapshot()

    # ---- the model-endpoint API ----

    async def create(self, ingress_app: str, request: CreateLLMEndpointRequest) -> tuple[str, Snapshot]:
        app = self._app(ingress_app)
        async with app.locks[request.name]:
            if request.name in app.records:
                raise InvalidRequestError(f"name: the model endpoint {request.name!r} already exists")
            settings = app.attachment.settings
            record = await asyncio.to_thread(plan_create, ingress_app, request, settings)
            record.pending_since_s = self._clock()
            if await asyncio.to_thread(deployer.states, {record.app_name}):
                raise InvalidRequestError(
                    f"name: a Serve application {record.app_name!r} still exists (an endpoint of that name "
                    "is still draining after its delete); try again in a few seconds"
                )
            reason = await self._unplaceable(app, record)
            await self._put(app, record)
            if reason is not None:
                await self._fail(app, record, reason)
            else:
                await self._deploy(app, record)
        return record.task_id, app.snapshot()

    async def update(
        self, ingress_app: str, name: str, request: UpdateLLMEndpointRequest
    ) -> tuple[str, Snapshot]:
        app = self._app(ingress_app)
        async with app.locks[name]:
            record = app.live(name)
            changed = await asyncio.to_thread(plan_update, record, request, app.attachment.settings)
            changed.pending_since_s = self._clock()
            reason = await self._unplaceable(app, changed)
            if reason is not None:
                raise InvalidRequestError(f"cpus/gpus/memory/gpu_type: {reason}")
            await self._put(app, changed)
            await self._deploy(app, changed)
        return changed.task_id, app.snapshot()

    async def delete(self, ingress_app: str, name: str) -> Snapshot:
        """The record says DELETE_IN_PROGRESS (404 from now on), the application goes, then the record."""
        app = self._app(ingress_app)
        async with app.locks[name]:
            record = app.live(name)
            await self._put(app, record.model_copy(update={"status": DELETING, "is_serving": False}))
            await self._remove(app, record)
        return app.snapshot()

    async def view(self, ingress_app: str, name: str) -> tuple[ModelEndpoint | None, Snapshot]:
        """What `Model.get` shows (None for an unknown name), with the routes it was read with (so that
        an endpoint the caller sees READY routes on its replica at once). Reads only."""
        app = self._app(ingress_app)
        snapshot, record = app.snapshot(), app.records.get(name)
        if record is None or record.status == DELETING:
            return None, snapshot
        states = await asyncio.to_thread(deployer.states, {record.app_name})
        return record_view(record, states.get(record.app_name)), snapshot

    async def views(self, ingress_app: str) -> tuple[list[ModelEndpoint], Snapshot]:
        """What `Model.list` shows of the runtime endpoints, with the routes it was read with. Reads only."""
        app = self._app(ingress_app)
        snapshot = app.snapshot()
        records = [r for r in app.records.values() if r.status != DELETING]
        states = await asyncio.to_thread(deployer.states, {r.app_name for r in records}) if records else {}
        return [record_view(r, states.get(r.app_name)) for r in records], snapshot

    # ---- records and Serve ----

    def _app(self, ingress_app: str) -> AppEndpoints:
        app = self._apps.get(ingress_app)
        if app is None:  # this actor restarted since the ingress attached: it attaches again
            raise AppNotAttachedError(ingress_app)
        return app

    async def _open(self, attachment: Attachment) -> AppEndpoints:
        """An app's records, read from its store (and moved there from Ray's KV, once)."""
        name = attachment.ingress_app
        store = await asyncio.to_thread(open_store, attachment.state_root, name)
        if moved := await asyncio.to_thread(migrate_from_ray_kv, store, name):
            logger.info("endpoints of %s: moved %s from Ray's KV store to %s", name, moved, store.folder)
        app = AppEndpoints(attachment, store, self._started_ns)
        app.records = {r.name: r for r in await asyncio.to_thread(store.all)}
        return app

    async def _reconcile(self, app: AppEndpoints) -> None:
        """Every endpoint that should run is deployed (again), a delete cut short is finished, and an
        application of this app's endpoints without a record (left by a crash) is deleted."""
        states = await asyncio.to_thread(deployer.states)
        for name in list(app.records):
            async with app.locks[name]:
                record = app.records.get(name)
                if record is not None:
                    await self._restore(app, record, states.get(record.app_name))
        prefix = f"{app.attachment.ingress_app}."
        for app_name, state in states.items():
            name = app_name.removeprefix(prefix)
            if app_name == name or state.deployment_names != (f"ModelServer:{name}",):
                continue  # not an endpoint's application
            async with app.locks[name]:
                if name not in app.records:
                    logger.warning("endpoints: deleting %s, which has no record", app_name)
                    await asyncio.to_thread(deployer.delete, app_name)

    async def _restore(self, app: AppEndpoints, record: EndpointRecord, state: AppState | None) -> None:
        """Under the name's lock; `state` was read before it was taken."""
        if record.status == DELETING:  # a delete cut short: finish it
            await self._remove(app, record)
            return
        if not (record.is_serving or record.status == PENDING) or state is not None:
            return
        if record.app_name in await asyncio.to_thread(deployer.states, {record.app_name}):
            return  # deployed since `state` was read
        logger.info("endpoint %s: deploying it again (its application is gone: a restart)", record.name)
        again = record.model_copy(
            update={
                "status": PENDING,
                "status_reason": "deployed again after a restart",
                "task_id": f"restore-{time.time_ns()}",
                "pending_since_s": self._clock(),
            }
        )
        await self._put(app, again)
        await self._deploy(app, again)

    async def _put(self, app: AppEndpoints, record: EndpointRecord) -> None:
        await asyncio.to_thread(app.store.put, record.name, record)
        app.records[record.name] = record
        await app.bump()

    async def _remove(self, app: AppEndpoints, record: EndpointRecord) -> None:
        await asyncio.to_thread(deployer.delete, record.app_name)  # in-flight requests drain
        await asyncio.to_thread(app.store.delete, record.name)
        app.records.pop(record.name, None)
        await app.bump()

    async def _unplaceable(self, app: AppEndpoints, record: EndpointRecord) -> str | None:
        if not app.attachment.settings.check_node_resources:
            return None
        config = record.config
        min_replicas = scaling_of(config)[0]
        return await asyncio.to_thread(
            deployer.unplaceable, resources_of(config), min_replicas, replicas_per_node(config)
        )

    async def _apply(self, app: AppEndpoints, record: EndpointRecord) -> None:
        """Give Serve the record's config as its application's target (a worker thread: it blocks)."""
        attachment = app.attachment
        await asyncio.to_thread(
            deployer.deploy,
            record.app_name,
            record.deployment_name,
            record.config,
            attachment.settings,
            attachment.engine_factory,
        )

    async def _deploy(self, app: AppEndpoints, record: EndpointRecord) -> None:
        try:
            await self._apply(app, record)
        except Exception as exc:  # Serve refused the target: nothing runs, say why
            logger.exception("model endpoint %s: deploy failed", record.name)
            await self._fail(app, record, f"Serve refused the deployment: {type(exc).__name__}: {exc}")

    async def _fail(self, app: AppEndpoints, record: EndpointRecord, reason: str) -> None:
        """UPDATE_FAILED: a failed create leaves no application behind; a failed update is rolled back."""
        logger.warning("model endpoint %s: UPDATE_FAILED: %s", record.name, reason)
        if record.previous_config is not None and record.is_serving:
            record = record.model_copy(
                update={
                    "config": record.previous_config,
                    "previous_config": None,
                    "status": FAILED,
                    "status_reason": f"{reason}; the previous settings were restored",
                }
            )
            try:
                await self._apply(app, record)
            except Exception:
                logger.exception("model endpoint %s: restoring the previous settings failed", record.name)
        else:
            record = record.model_copy(
                update={"status": FAILED, "status_reason": reason, "is_serving": False}
            )
            await asyncio.to_thread(deployer.delete, record.app_name)
        await self._put(app, record)

    # ---- the watcher ----

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.watch_once()
            except Exception as exc:  # keep watching: the next round reads Serve again (gone at shutdown)
                logger.warning("endpoint controller: reading Serve's state failed: %s", str(exc)[:300])
            is_pending = any(r.status == PENDING for a in self._apps.values() for r in a.records.values())
            await asyncio.sleep(self._poll_s if is_pending else self._idle_poll_s)

    async def watch_once(self) -> None:
        """Settle every record by one read of Serve's state: pending → READY / UPDATE_FAILED."""
        tasks = {(a, n): r.task_id for a, app in self._apps.items() for n, r in app.records.items()}
        if not tasks:
            return
        states = await asyncio.to_thread(deployer.states)
        for (app_name, name), task_id in tasks.items():
            # Its ingress app down or going (serve shutdown deletes every app at once, and an endpoint's
            # small app can be gone while the ingress's is still DELETING): frozen until it attaches.
            if app_name not in states or states[app_name].status == "DELETING":
                continue
            app = self._apps[app_name]
            async with app.locks[name]:
                record = app.records.get(name)
                if record is None or record.task_id != task_id:  # changed since Serve was read
                    continue
                step = settle(
                    record,
                    states.get(record.app_name),
                    self._clock(),
                    app.attachment.settings.start_timeout_s,
                )
                if step is None:
                    continue
                if step.is_ready:
                    ready = {
                        "status": READY,
                        "status_reason": None,
                        "is_serving": True,
                        "previous_config": None,
                    }
                    await self._put(app, record.model_copy(update=ready))
                else:
                    await self._fail(app, record, step.reason or "")
