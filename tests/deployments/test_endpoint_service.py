"""The endpoint state machine without a cluster: Serve's status in, status and clean-up out.

Ray's KV store and the Serve calls are replaced by in-memory fakes; the integration test
(tests/integration/test_model_endpoints.py) runs the same paths on a real cluster.
"""

from __future__ import annotations

import asyncio

import pytest

from deployments.config import EndpointSettings
from deployments.endpoints import deployer, registry, service
from deployments.endpoints.deployer import AppState
from deployments.endpoints.wire import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from engine.errors import InvalidRequestError, ModelNotFoundError, ModelUnavailableError


class FakeKV:
    """`ray.experimental.internal_kv` in a dict."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def _internal_kv_put(self, key, value, overwrite=True, namespace=None) -> bool:
        exists = key in self.data
        if overwrite or not exists:
            self.data[key] = value
        return exists

    def _internal_kv_get(self, key, namespace=None):
        return self.data.get(key)

    def _internal_kv_del(self, key, namespace=None):
        self.data.pop(key, None)

    def _internal_kv_list(self, prefix, namespace=None):
        return [k for k in self.data if k.startswith(prefix)]


class FakeServe:
    """The deployer's calls, recorded; `apps` is what serve.status() would say."""

    def __init__(self) -> None:
        self.apps: dict[str, AppState] = {}
        self.deployed: list[tuple[str, dict]] = []
        self.deleted: list[str] = []
        self.unplaceable_reason: str | None = None

    def deploy(self, app_name, deployment_name, config, settings) -> None:
        self.deployed.append((app_name, config.deployment.autoscaling_config))
        self.apps[app_name] = AppState("DEPLOYING", "", 0, 1)

    def delete(self, app_name) -> None:
        self.deleted.append(app_name)
        self.apps.pop(app_name, None)

    def states(self, app_names=None):
        return {n: s for n, s in self.apps.items() if app_names is None or n in app_names}

    def unplaceable(self, resources):
        return self.unplaceable_reason

    def handle(self, app_name, deployment_name):
        return FakeHandle(app_name)


class FakeHandle:
    def __init__(self, app_name: str) -> None:
        self.app_name = app_name

    def options(self, **kwargs):
        return self


@pytest.fixture
def serve_fake(monkeypatch: pytest.MonkeyPatch) -> FakeServe:
    fake = FakeServe()
    monkeypatch.setattr(registry, "internal_kv", FakeKV())
    for name in ("deploy", "delete", "states", "unplaceable", "handle"):
        monkeypatch.setattr(deployer, name, getattr(fake, name))
    monkeypatch.setattr(service, "SETTLE_AFTER_S", 0.0)
    monkeypatch.setattr(service, "POLL_S", 0.01)
    return fake


def make_service(**settings) -> service.EndpointService:
    return service.EndpointService("app", {"base": "smollm2-135m-instruct"}, EndpointSettings(**settings))


def request(name: str = "ep", **changes) -> CreateLLMEndpointRequest:
    body = {"name": name, "model_name": "smollm2-135m-instruct", "min_workers": 0, "max_workers": 1}
    return CreateLLMEndpointRequest.model_validate({**body, **changes})


def run(coroutine):
    return asyncio.run(coroutine)


def test_create_is_pending_then_ready_and_routable(serve_fake: FakeServe):
    endpoints = make_service()

    async def scenario():
        await endpoints.create(request())
        assert (await endpoints.get("ep")).status == "UPDATE_PENDING"
        with pytest.raises(ModelUnavailableError, match="UPDATE_PENDING"):
            endpoints.route("ep")
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        return await endpoints.get("ep")

    ready = run(scenario())
    assert ready.status == "READY" and ready.spec["deployment_state"]["available_workers"] == 1
    assert serve_fake.deployed[0][1]["initial_replicas"] == 1  # min_workers 0 still starts one
    assert endpoints.route("ep").handle.app_name == "app.ep"
    assert endpoints.served_names() == ["base", "ep"]


def test_a_deploy_failure_is_update_failed_and_leaves_no_app(serve_fake: FakeServe):
    endpoints = make_service()

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("DEPLOY_FAILED", "constructor raised OSError: no weights", 0, 0)
        return await endpoints.get("ep")

    failed = run(scenario())
    assert failed.status == "UPDATE_FAILED"
    assert "DEPLOY_FAILED: constructor raised OSError" in failed.spec["metadata"]["status_reason"]
    assert set(serve_fake.deleted) == {"app.ep"} and "app.ep" not in serve_fake.apps
    with pytest.raises(ModelUnavailableError, match="no weights"):
        endpoints.route("ep")


def test_no_replica_within_the_start_timeout_is_update_failed_with_serves_reason(serve_fake: FakeServe):
    endpoints = make_service(start_timeout_s=0.05)

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("DEPLOYING", "1 replica pending: resources CPU 8", 0, 1)
        await asyncio.sleep(0.1)
        return await endpoints.get("ep")

    failed = run(scenario())
    assert failed.status == "UPDATE_FAILED"
    assert "Serve says: 1 replica pending" in failed.spec["metadata"]["status_reason"]
    assert set(serve_fake.deleted) == {"app.ep"}


def test_resources_no_node_has_fail_before_any_deploy(serve_fake: FakeServe):
    serve_fake.unplaceable_reason = "no node of the cluster has GPU=1"
    endpoints = make_service()
    run(endpoints.create(request()))
    failed = run(endpoints.get("ep"))
    assert failed.status == "UPDATE_FAILED" and "GPU=1" in failed.spec["metadata"]["status_reason"]
    assert serve_fake.deployed == []


def test_names_taken_configured_or_existing_are_400(serve_fake: FakeServe):
    endpoints = make_service()
    with pytest.raises(InvalidRequestError, match="already exists"):
        run(endpoints.create(request("base")))
    run(endpoints.create(request()))
    with pytest.raises(InvalidRequestError, match="name: "):  # the Serve app exists, or the record
        run(endpoints.create(request()))


def test_update_in_place_then_a_failed_update_is_rolled_back(serve_fake: FakeServe):
    endpoints = make_service(start_timeout_s=0.05)

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        await endpoints.get("ep")
        await endpoints.update("ep", UpdateLLMEndpointRequest(min_workers=1, max_workers=3, per_worker=5))
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        updated = await endpoints.get("ep")
        await endpoints.update("ep", UpdateLLMEndpointRequest(max_workers=4))
        serve_fake.apps["app.ep"] = AppState("DEPLOYING", "replica pending", 1, 1)
        await asyncio.sleep(0.1)
        return updated, await endpoints.get("ep")

    updated, failed = run(scenario())
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
    assert endpoints.route("ep") is not None  # it keeps serving


def test_update_cannot_change_the_model_and_unknown_names_are_404(serve_fake: FakeServe):
    endpoints = make_service()

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        await endpoints.get("ep")
        with pytest.raises(InvalidRequestError, match="model_name"):
            await endpoints.update("ep", UpdateLLMEndpointRequest(model_name="gemma-3-270m"))
        with pytest.raises(InvalidRequestError, match="config"):
            await endpoints.update("base", UpdateLLMEndpointRequest(min_workers=1))
        with pytest.raises(ModelNotFoundError):
            await endpoints.update("nope", UpdateLLMEndpointRequest(min_workers=1))
        with pytest.raises(ModelNotFoundError):
            await endpoints.delete("nope")

    run(scenario())


def test_delete_is_404_at_once_and_the_route_is_dropped(serve_fake: FakeServe):
    endpoints = make_service()

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        await endpoints.get("ep")
        assert endpoints.route("ep") is not None and endpoints.is_runtime("ep")
        assert (await endpoints.delete("ep")).deleted
        with pytest.raises(ModelNotFoundError):
            await endpoints.get("ep")

    run(scenario())
    assert endpoints.route("ep") is None and not endpoints.is_runtime("ep")
    assert set(serve_fake.deleted) == {"app.ep"}


def test_a_ready_endpoint_whose_app_is_gone_reports_it(serve_fake: FakeServe):
    endpoints = make_service()

    async def scenario():
        await endpoints.create(request())
        serve_fake.apps["app.ep"] = AppState("RUNNING", "", 1, 0)
        await endpoints.get("ep")
        serve_fake.apps.clear()  # serve shutdown, or serve delete outside this API
        return await endpoints.get("ep")

    gone = run(scenario())
    assert gone.status == "UPDATE_FAILED" and "is gone" in gone.spec["metadata"]["status_reason"]
