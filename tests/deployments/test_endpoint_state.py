"""Endpoint state through races, restarts and upgrades, without a cluster (Serve's calls faked, records
real files); and routing that never waits on state."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from deployments.config import EndpointSettings
from deployments.endpoints import registry
from deployments.endpoints.deployer import AppState
from deployments.endpoints.registry import EndpointRecord, open_store
from deployments.endpoints.service import EndpointService
from deployments.endpoints.snapshot import Snapshot
from deployments.endpoints.wire import UpdateLLMEndpointRequest
from engine.errors import ModelNotFoundError
from tests.deployments.endpoint_fakes import (
    INGRESS_APP,
    Clock,
    FakeServe,
    make_controller,
    make_service,
    request,
)


async def _inside_placement_check(serve_fake: FakeServe, change, other):
    """Start `change`, run `other` while `change` is held in its placement check, then let it go."""
    serve_fake.hold = threading.Event()
    first = asyncio.create_task(change())
    await asyncio.to_thread(serve_fake.held.wait, 10)
    second = asyncio.create_task(other())
    await asyncio.sleep(0.05)  # `other` runs as far as it can (to the name's lock, with the controller)
    serve_fake.hold.set()
    return await asyncio.gather(first, second, return_exceptions=True)


def _agree(serve_fake: FakeServe, tmp_path, name: str) -> tuple[bool, bool]:
    """(record on disk, application in Serve) for `name`."""
    has_record = (tmp_path / "endpoints" / INGRESS_APP / f"{name}.json").exists()
    return has_record, f"app.{name}" in serve_fake.apps


async def test_a_delete_inside_creates_placement_check_leaves_neither_app_nor_record(
    serve_fake: FakeServe, tmp_path
):
    endpoints, _ = await make_service(tmp_path)
    results = await _inside_placement_check(
        serve_fake, lambda: endpoints.create(request()), lambda: endpoints.delete("ep")
    )
    assert not any(isinstance(r, Exception) for r in results), results  # the delete waited for the create
    assert _agree(serve_fake, tmp_path, "ep") == (False, False)


async def test_an_update_racing_a_delete_does_not_bring_the_endpoint_back(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.run("ep")
    clock.now_s += 3
    await controller.watch_once()
    update = UpdateLLMEndpointRequest(max_workers=2)
    results = await _inside_placement_check(
        serve_fake, lambda: endpoints.update("ep", update), lambda: endpoints.delete("ep")
    )
    assert not any(isinstance(r, Exception) for r in results), results
    assert _agree(serve_fake, tmp_path, "ep") == (False, False)
    with pytest.raises(ModelNotFoundError):
        await endpoints.get("ep")


async def test_a_restart_of_the_cluster_deploys_every_serving_endpoint_again(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    for name in ("up", "broken"):
        await endpoints.create(request(name))
    serve_fake.run("up")
    serve_fake.apps["app.broken"] = AppState("DEPLOY_FAILED", "no weights", 0, 0)
    clock.now_s += 3
    await controller.watch_once()
    serve_fake.stop_all()  # the cluster stopped: no application, no controller; the records stay
    num_deployed = len(serve_fake.deployed)
    serve_fake.start_ingress()  # `serve run` again: a new cluster, a new controller

    again, new_controller = await make_service(tmp_path, make_controller(clock))
    assert [d[0] for d in serve_fake.deployed[num_deployed:]] == ["app.up"]  # the failed one stays down
    assert (await again.get("up")).status == "UPDATE_PENDING"
    serve_fake.run("up")
    clock.now_s += 3
    await new_controller.watch_once()
    await again.attach()
    assert (await again.get("up")).status == "READY" and again.route("up") is not None
    assert (await again.get("broken")).status == "UPDATE_FAILED"


async def test_serve_shutdown_freezes_the_records_and_the_ingress_brings_them_back(
    serve_fake: FakeServe, tmp_path
):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.run("ep")
    clock.now_s += 3
    await controller.watch_once()
    serve_fake.stop_all()  # `serve shutdown` on a cluster that stays up: the controller (not Serve's) stays
    clock.now_s += 100
    await controller.watch_once()
    assert (await endpoints.get("ep")).status == "READY"  # not "gone": its ingress is gone with it
    serve_fake.start_ingress()
    again, _ = await make_service(tmp_path, controller)  # the app deployed again attaches
    assert serve_fake.deployed[-1][0] == "app.ep"
    assert (await again.get("ep")).status == "UPDATE_PENDING"


async def test_restore_finishes_a_delete_and_removes_applications_without_a_record(
    serve_fake: FakeServe, tmp_path
):
    store = open_store(str(tmp_path), INGRESS_APP)
    endpoints, _ = await make_service(tmp_path)
    await endpoints.create(request("half-deleted"))
    record = store.get("half-deleted")
    store.put("half-deleted", record.model_copy(update={"status": registry.DELETING}))  # crashed mid-delete
    serve_fake.apps["app.orphan"] = AppState("RUNNING", "", 1, 0, ("ModelServer:orphan",))  # old races
    serve_fake.apps["app.other"] = AppState("RUNNING", "", 1, 0, ("Ingress", "ModelServer:x"))  # not ours

    await make_service(tmp_path)  # a new controller (after a crash) attaches
    assert store.keys() == []
    assert serve_fake.endpoint_apps() == {"app.other"}


async def test_records_of_a_later_release_and_of_rays_kv_are_read(
    serve_fake: FakeServe, tmp_path, monkeypatch
):
    endpoints, _ = await make_service(tmp_path)
    await endpoints.create(request("later"))
    path = tmp_path / "endpoints" / INGRESS_APP / "later.json"
    stored = json.loads(path.read_text())
    stored["record"]["a_new_field"] = 1
    stored["record"]["config"]["engine"]["a_new_engine_knob"] = True  # ModelConfig forbids unknown keys
    path.write_text(json.dumps(stored))
    kv = FakeKV()
    old = stored["record"] | {"name": "in-kv", "app_name": "app.in-kv"}
    kv.data[b"endpoints/app/in-kv"] = json.dumps(old).encode()
    monkeypatch.setattr("ray.experimental.internal_kv", kv)

    again, _ = await make_service(tmp_path)
    assert {e.name for e in (await again.list()).model_endpoints} == {"base", "later", "in-kv"}
    assert kv.data == {}  # moved, not copied
    assert isinstance(open_store(str(tmp_path), INGRESS_APP).get("in-kv"), EndpointRecord)


class FakeKV:
    """`ray.experimental.internal_kv` in a dict (where records lived before the state root)."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def _internal_kv_get(self, key, namespace=None):
        return self.data.get(key)

    def _internal_kv_del(self, key, namespace=None):
        self.data.pop(key, None)

    def _internal_kv_list(self, prefix, namespace=None):
        return [k for k in self.data if k.startswith(prefix)]


class ForbiddenController:
    """A controller that no serving path may call: every call fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the serving path called the controller ({name})")


def test_unknown_names_and_the_model_list_never_call_the_controller_or_the_store():
    service = EndpointService({"base": "m"}, ForbiddenController())
    service._routes.apply(Snapshot((1, 1), {}))
    for i in range(300):
        assert service.route(f"unknown-{i}") is None
        assert service.served_names() == ["base"]


class _Method:
    def __init__(self, outcomes: list) -> None:
        self.outcomes, self.num_calls = outcomes, 0

    def remote(self, *args):
        outcome = self.outcomes[min(self.num_calls, len(self.outcomes) - 1)]
        self.num_calls += 1

        async def call():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return call()


class _Handle:
    """An actor handle whose methods answer (or raise) the given outcomes in turn."""

    def __init__(self, **methods: list) -> None:
        self.attach = _Method([Snapshot((1, 0), {})])
        for name, outcomes in methods.items():
            setattr(self, name, _Method(outcomes))


async def test_the_client_attaches_again_after_a_controller_restart_and_never_repeats_a_change(monkeypatch):
    from ray.exceptions import RayActorError

    from deployments.endpoints import client as client_module
    from deployments.endpoints.client import ControllerClient
    from deployments.endpoints.snapshot import AppNotAttachedError, Attachment
    from engine.errors import ModelUnavailableError

    handle = _Handle(
        view=[AppNotAttachedError("app"), (None, Snapshot((1, 0), {}))],
        views=[RayActorError(), ([], Snapshot((1, 0), {}))],
        create=[RayActorError()],
    )

    async def owner_async(*args, **kwargs):
        return handle

    monkeypatch.setattr(client_module, "owner_async", owner_async)
    client = ControllerClient(Attachment(INGRESS_APP, "/unused", EndpointSettings()))
    assert (await client.view("x"))[0] is None  # the controller forgot the app: attached again, asked again
    assert (await client.views())[0] == []  # it died: found again, asked again (a read)
    with pytest.raises(ModelUnavailableError, match="restarted during the call"):
        await client.create(request())  # a change is never sent twice
    assert (handle.create.num_calls, handle.attach.num_calls) == (1, 3)
