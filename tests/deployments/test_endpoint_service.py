"""The endpoint controller's state machine without a cluster: Serve's status in, status and clean-up out.

Serve's calls are an in-memory fake; records are real files under a tmp state root. The watcher is
driven by hand (`watch_once`) with an injected clock. tests/deployments/test_endpoint_races.py runs
the same paths on the real Serve.
"""

from __future__ import annotations

import pytest

from deployments.config import EngineSettings
from deployments.endpoints.deployer import AppState
from deployments.endpoints.wire import UpdateLLMEndpointRequest
from engine.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError
from tests.deployments.endpoint_fakes import (
    INGRESS_APP,
    Clock,
    FakeServe,
    make_controller,
    make_service,
    request,
)


async def settled(controller, clock: Clock, seconds: float = 3.0) -> None:
    """One round of the watcher, `seconds` after the change (past the 2 s a RUNNING read is not trusted)."""
    clock.now_s += seconds
    await controller.watch_once()


async def test_a_pending_endpoint_becomes_ready_through_the_watcher_alone(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    assert (await endpoints.get("ep")).status == "UPDATE_PENDING"
    with pytest.raises(ModelUnavailableError, match="UPDATE_PENDING"):
        endpoints.route("ep")
    serve_fake.run("ep")
    await settled(controller, clock)  # nobody calls GET: the controller's watcher settles it
    await endpoints.attach()  # the routes the long poll would push
    assert endpoints.route("ep").handle.app_name == "app.ep"
    assert endpoints.served_names() == ["base", "ep"]
    ready = await endpoints.get("ep")
    assert ready.status == "READY" and ready.spec["deployment_state"]["available_workers"] == 1
    assert serve_fake.deployed[0][1]["initial_replicas"] == 1  # min_workers 0 still starts one


async def test_get_and_list_never_change_a_record_or_serve(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock), start_timeout_s=10)
    await endpoints.create(request("a"))
    await endpoints.create(request("b"))
    serve_fake.run("a")
    await settled(controller, clock)
    files = {p.name: p.read_bytes() for p in (tmp_path / "endpoints" / INGRESS_APP).iterdir()}
    calls = (list(serve_fake.deployed), list(serve_fake.deleted))
    serve_fake.apps.pop("app.a")  # a READY app gone and a pending one past its start timeout: the watcher's
    serve_fake.apps["app.b"] = AppState("DEPLOY_FAILED", "boom", 0, 0)
    clock.now_s += 100
    for name in ("a", "b"):
        await endpoints.get(name)
    await endpoints.list()
    assert {p.name: p.read_bytes() for p in (tmp_path / "endpoints" / INGRESS_APP).iterdir()} == files
    assert (serve_fake.deployed, serve_fake.deleted) == calls
    assert [e.status for e in (await endpoints.list()).model_endpoints] == [
        "READY",
        "UPDATE_PENDING",
        "READY",
    ]


async def test_a_deploy_failure_is_update_failed_and_leaves_no_app(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.apps["app.ep"] = AppState("DEPLOY_FAILED", "constructor raised OSError: no weights", 0, 0)
    await settled(controller, clock, 0.0)
    await endpoints.attach()
    failed = await endpoints.get("ep")
    assert failed.status == "UPDATE_FAILED"
    assert "DEPLOY_FAILED: constructor raised OSError" in failed.spec["metadata"]["status_reason"]
    assert set(serve_fake.deleted) == {"app.ep"} and "app.ep" not in serve_fake.apps
    with pytest.raises(ModelUnavailableError, match="no weights"):
        endpoints.route("ep")


async def test_no_replica_within_the_start_timeout_is_update_failed_with_serves_reason(
    serve_fake: FakeServe, tmp_path
):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock), start_timeout_s=30)
    await endpoints.create(request())
    serve_fake.apps["app.ep"] = AppState("DEPLOYING", "1 replica pending: resources CPU 8", 0, 1)
    await settled(controller, clock, 29)
    assert (await endpoints.get("ep")).status == "UPDATE_PENDING"
    await settled(controller, clock, 2)
    failed = await endpoints.get("ep")
    assert failed.status == "UPDATE_FAILED"
    assert "Serve says: 1 replica pending" in failed.spec["metadata"]["status_reason"]
    assert set(serve_fake.deleted) == {"app.ep"}


async def test_resources_no_node_has_fail_before_any_deploy(serve_fake: FakeServe, tmp_path):
    serve_fake.unplaceable_reason = "no node of the cluster has GPU=1"
    endpoints, _ = await make_service(tmp_path)
    await endpoints.create(request())
    failed = await endpoints.get("ep")
    assert failed.status == "UPDATE_FAILED" and "GPU=1" in failed.spec["metadata"]["status_reason"]
    assert serve_fake.deployed == []


async def test_the_placement_check_counts_min_workers_at_one_replica_a_node(serve_fake: FakeServe, tmp_path):
    endpoints, _ = await make_service(tmp_path)
    await endpoints.create(request("whole", min_workers=2, max_workers=2))
    assert serve_fake.placement_asks[-1] == (2, 1)  # CPU, num_threads null: a node each
    shared, _ = await make_service(tmp_path / "shared", engine=EngineSettings(num_threads=1))
    await shared.create(request("shared", min_workers=2, max_workers=2))
    assert serve_fake.placement_asks[-1] == (2, None)


async def test_names_taken_configured_or_existing_are_400(serve_fake: FakeServe, tmp_path):
    endpoints, _ = await make_service(tmp_path)
    with pytest.raises(InvalidRequestError, match="already exists"):
        await endpoints.create(request("base"))
    await endpoints.create(request())
    with pytest.raises(InvalidRequestError, match="already exists"):
        await endpoints.create(request())


async def test_update_in_place_then_a_failed_update_is_rolled_back(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock), start_timeout_s=30)
    await endpoints.create(request())
    serve_fake.run("ep")
    await settled(controller, clock)
    await endpoints.update("ep", UpdateLLMEndpointRequest(min_workers=1, max_workers=3, per_worker=5))
    serve_fake.run("ep")
    await settled(controller, clock)
    updated = await endpoints.get("ep")
    await endpoints.update("ep", UpdateLLMEndpointRequest(max_workers=4))
    serve_fake.apps["app.ep"] = AppState("DEPLOYING", "replica pending", 1, 1)
    await settled(controller, clock, 31)
    failed = await endpoints.get("ep")
    state = updated.spec["deployment_state"]
    assert (updated.status, state["min_workers"], state["max_workers"], state["per_worker"]) == (
        "READY",
        1,
        3,
        5,
    )
    assert failed.status == "UPDATE_FAILED"
    assert failed.spec["metadata"]["status_reason"].endswith("the previous settings were restored")
    assert failed.spec["deployment_state"]["max_workers"] == 3  # the rolled-back settings
    assert serve_fake.deployed[-1][1]["max_replicas"] == 3 and serve_fake.deleted == []
    await endpoints.attach()
    assert endpoints.route("ep") is not None  # it keeps serving


async def test_update_cannot_change_the_model_and_unknown_names_are_404(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    with pytest.raises(InvalidRequestError, match="UPDATE_PENDING"):
        await endpoints.update("ep", UpdateLLMEndpointRequest(min_workers=1))
    serve_fake.run("ep")
    await settled(controller, clock)
    with pytest.raises(InvalidRequestError, match="model_name"):
        await endpoints.update("ep", UpdateLLMEndpointRequest(model_name="gemma-3-270m"))
    with pytest.raises(InvalidRequestError, match="config"):
        await endpoints.update("base", UpdateLLMEndpointRequest(min_workers=1))
    with pytest.raises(ModelNotFoundError):
        await endpoints.update("nope", UpdateLLMEndpointRequest(min_workers=1))
    with pytest.raises(ModelNotFoundError):
        await endpoints.delete("nope")


async def test_delete_is_404_at_once_and_the_route_is_dropped(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.run("ep")
    await settled(controller, clock)
    await endpoints.attach()
    assert endpoints.route("ep") is not None and endpoints.is_runtime("ep")
    assert (await endpoints.delete("ep")).deleted
    with pytest.raises(ModelNotFoundError):
        await endpoints.get("ep")
    assert endpoints.route("ep") is None and not endpoints.is_runtime("ep")
    assert set(serve_fake.deleted) == {"app.ep"}
    assert not (tmp_path / "endpoints" / INGRESS_APP / "ep.json").exists()


async def test_a_ready_endpoint_whose_app_is_gone_is_reported_by_the_watcher(serve_fake: FakeServe, tmp_path):
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.run("ep")
    await settled(controller, clock)
    serve_fake.apps.pop("app.ep")  # serve delete outside this API
    await settled(controller, clock)
    gone = await endpoints.get("ep")
    assert gone.status == "UPDATE_FAILED" and "is gone" in gone.spec["metadata"]["status_reason"]


async def test_a_shutdown_that_removes_an_endpoint_app_before_the_ingress_app_fails_nothing(
    serve_fake: FakeServe, tmp_path
):
    """serve shutdown (`serve run` stopped) deletes every app at once; the endpoint's small app can be
    gone while the ingress's is still DELETING. The records stay as they were, for the next start (a
    READY endpoint failed here was not deployed again after a restart)."""
    clock = Clock()
    endpoints, controller = await make_service(tmp_path, make_controller(clock))
    await endpoints.create(request())
    serve_fake.run("ep")
    await settled(controller, clock)
    serve_fake.apps[INGRESS_APP] = AppState("DELETING", "", 1, 0, ("Ingress",))
    serve_fake.apps.pop("app.ep")
    await settled(controller, clock)
    assert (await endpoints.get("ep")).status == "READY"


async def test_changes_answers_at_once_when_a_record_changed(serve_fake: FakeServe, tmp_path):
    endpoints, controller = await make_service(tmp_path)
    first = await controller.changes(INGRESS_APP, (0, 0), timeout_s=10)  # another version: at once
    same = await controller.changes(INGRESS_APP, first.version, timeout_s=0.01)  # nothing changed
    assert same.version == first.version and same.routes == {}
    await endpoints.create(request())
    after = await controller.changes(INGRESS_APP, first.version, timeout_s=10)
    assert after.version > first.version and list(after.routes) == ["ep"]
